"""Pure control step: ``decide(state, now, policy) -> list[Command]``.

The planner's async shell (``loop.py``) calls this on every event and tick and carries out the
commands; nothing here awaits or publishes.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetpipe.planner.state import FleetState

__all__ = ["Command", "Policy", "Replan", "WaitForNodes", "decide"]


@dataclass(frozen=True, slots=True)
class Policy:
    """Knobs of the control step."""

    debounce_s: float = 0.5
    min_nodes: int = 1
    expect_nodes: int = 0
    # Plan with fewer than expect_nodes after waiting this long since the first member appeared.
    expect_wait_s: float = 10.0
    # Re-plan when a stage's measured time deviates from its prediction by more than this (fraction).
    deviation: float = 0.2
    # Before the first plan, wait up to this long (since the first member appeared) for every alive node's
    # health: it says which epoch the node runs, so a restarted planner never plans under a stale epoch.
    health_grace_s: float = 0.0
    # A loss with nobody joining waits only this long (deaths of nodes killed together arrive together).
    loss_debounce_s: float = 0.1


@dataclass(frozen=True, slots=True)
class Replan:
    """Solve again for the alive nodes and publish a new epoch."""

    reason: str
    node_ids: tuple[str, ...]
    epoch: int


@dataclass(frozen=True, slots=True)
class WaitForNodes:
    """Not enough nodes to plan yet."""

    alive: int
    needed: int


Command = Replan | WaitForNodes


def _only_losses(state: FleetState, alive: dict[str, object]) -> bool:
    """Members of the current plan are gone and nobody joined: nothing to batch, no reason to wait."""
    if state.plan is None:
        return False
    planned = {n for s in state.plan.stages for n in s.nodes}
    return bool(planned - set(alive)) and set(alive) <= planned


def decide(state: FleetState, now: float, policy: Policy, first_seen: float | None = None) -> list[Command]:
    """Return what the planner should do now."""
    if state.membership == state.planned_membership:
        return []
    alive = state.alive()
    wait = policy.loss_debounce_s if _only_losses(state, alive) else policy.debounce_s
    if now - state.membership_changed_at < wait:
        return []  # batch joins; a member's death (last will, lease) re-plans almost at once
    needed = max(policy.min_nodes, 1)
    if len(alive) < needed:
        return [WaitForNodes(len(alive), needed)]
    if (
        state.plan is None
        and policy.expect_nodes
        and len(alive) < policy.expect_nodes
        and (first_seen is None or now - first_seen < policy.expect_wait_s)
    ):
        return [WaitForNodes(len(alive), policy.expect_nodes)]
    if (
        state.plan is None
        and any(v.health is None for v in alive.values())
        and (first_seen is None or now - first_seen < policy.health_grace_s)
    ):
        return [WaitForNodes(sum(v.health is not None for v in alive.values()), len(alive))]
    reason = "initial plan" if state.plan is None else "membership changed"
    if state.plan is not None:
        planned = {n for s in state.plan.stages for n in s.nodes}
        lost = sorted(planned - set(alive))
        joined = sorted(set(alive) - planned)
        parts = []
        if lost:
            parts.append("lost " + ",".join(lost))
        if joined:
            parts.append("joined " + ",".join(joined))
        if not parts:
            return []  # same members as the current plan (e.g. a node restarted with the same set)
        reason = "; ".join(parts)
    return [Replan(reason, tuple(alive), state.epoch + 1)]
