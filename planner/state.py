"""Pure fleet state for the planner: ``apply(state, event) -> state``.

Theory of operation: the planner folds everything it hears into one immutable ``FleetState``.
Liveness follows Sparkplug: a node's retained birth and its last-will death carry a sequence number
``seq`` that grows with every process start. A birth or death whose ``seq`` is older than the one we
know is stale (a retained message from an earlier incarnation) and ignored; a birth with a newer
``seq`` is a new member, never the old one. Health messages renew a lease; a node whose lease runs
out (``Tick``) is dead even if no death arrived (kill -9 with the will lost, SIGSTOP). Every change of
the alive set bumps ``membership`` so the control step knows when to re-plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "Birth",
    "Death",
    "Event",
    "FleetState",
    "Health",
    "NodeView",
    "PlanPublished",
    "Tick",
    "apply",
]


@dataclass(frozen=True, slots=True)
class NodeView:
    """What the planner knows about one node incarnation."""

    node_id: str
    seq: int
    birth: Any
    alive: bool
    last_seen: float
    health: Any = None
    dead_by_death: bool = False


@dataclass(frozen=True, slots=True)
class Birth:
    """A node's birth (capability) message arrived."""

    msg: Any
    now: float


@dataclass(frozen=True, slots=True)
class Death:
    """A node's death message (clean exit or last will) arrived."""

    msg: Any
    now: float


@dataclass(frozen=True, slots=True)
class Health:
    """A node's periodic health message arrived."""

    msg: Any
    now: float


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed; expire leases."""

    now: float
    lease_s: float


@dataclass(frozen=True, slots=True)
class PlanPublished:
    """The planner published (or resumed) a plan for the given membership version."""

    plan: Any
    membership: int
    now: float


Event = Birth | Death | Health | Tick | PlanPublished


@dataclass(frozen=True, slots=True)
class FleetState:
    """Everything the planner knows, immutable."""

    nodes: Mapping[str, NodeView] = field(default_factory=lambda: MappingProxyType({}))
    membership: int = 0
    membership_changed_at: float = 0.0
    plan: Any = None
    planned_membership: int = -1
    epoch: int = 0

    def alive(self) -> dict[str, NodeView]:
        """Alive nodes by id, in a stable order."""
        return {k: v for k, v in sorted(self.nodes.items()) if v.alive}


def apply(state: FleetState, event: Event) -> FleetState:
    """Fold one event into the state."""
    match event:
        case Birth(msg=msg, now=now):
            known = state.nodes.get(msg.node_id)
            if known is not None and msg.seq < known.seq:
                return state  # retained birth of an older incarnation
            if known is not None and msg.seq == known.seq and known.alive:
                return _put(state, dataclasses.replace(known, birth=msg, last_seen=now), changed=False, now=now)
            view = NodeView(msg.node_id, msg.seq, msg, alive=True, last_seen=now)
            return _put(state, view, changed=True, now=now)
        case Death(msg=msg, now=now):
            known = state.nodes.get(msg.node_id)
            if known is None or msg.seq < known.seq or known.dead_by_death:
                return state  # stale death, or already dead
            view = dataclasses.replace(known, alive=False, dead_by_death=True)
            return _put(state, view, changed=known.alive, now=now)
        case Health(msg=msg, now=now):
            known = state.nodes.get(msg.node_id)
            if known is None or msg.seq != known.seq or known.dead_by_death:
                return state  # health of an unknown / other / cleanly dead incarnation: wait for a birth
            # A node whose lease ran out (SIGSTOP, network blip) and speaks again is alive again.
            revived = not known.alive
            view = dataclasses.replace(known, last_seen=now, health=msg, alive=True)
            state = _put(state, view, changed=revived, now=now)
            if msg.epoch > state.epoch:
                # A node runs a newer epoch than we know of (a planner restarted after the broker lost the
                # retained plan): the next plan must outnumber it, or nodes would ignore it as stale.
                state = dataclasses.replace(state, epoch=int(msg.epoch))
            return state
        case Tick(now=now, lease_s=lease_s):
            expired = [v for v in state.nodes.values() if v.alive and now - v.last_seen > lease_s]
            for view in expired:
                state = _put(state, dataclasses.replace(view, alive=False), changed=True, now=now)
            return state
        case PlanPublished(plan=plan, membership=membership):
            epoch = max(state.epoch, int(plan.epoch))
            return dataclasses.replace(state, plan=plan, planned_membership=membership, epoch=epoch)
        case _:  # pragma: no cover - exhaustive over Event
            raise TypeError(f"unknown event {event!r}")


def _put(state: FleetState, view: NodeView, *, changed: bool, now: float) -> FleetState:
    nodes = dict(state.nodes)
    nodes[view.node_id] = view
    if not changed:
        return dataclasses.replace(state, nodes=MappingProxyType(nodes))
    return dataclasses.replace(
        state, nodes=MappingProxyType(nodes), membership=state.membership + 1, membership_changed_at=now
    )
