"""The planner's pure core: folding births, deaths, health and ticks, and what ``decide`` asks for."""

from __future__ import annotations

from fleetpipe import wire
from fleetpipe.planner import control, state

FLEET = "lab"


def _birth(node: str, seq: int = 1) -> wire.NodeBirth:
    return wire.NodeBirth(fleet=FLEET, node_id=node, seq=seq, ts=0.0, arch="x86_64", cores=2, mem_bytes=1 << 30,
                          runtimes=("onnx",), providers=("cpu",), device_class="x86", speed=1.0)


def _health(node: str, seq: int = 1, epoch: int = 0) -> wire.NodeHealth:
    return wire.NodeHealth(fleet=FLEET, node_id=node, seq=seq, ts=0.0, epoch=epoch)


def _fold(*events: state.Event) -> state.FleetState:
    s = state.FleetState()
    for e in events:
        s = state.apply(s, e)
    return s


def test_stale_birth_and_death_are_ignored() -> None:
    s = _fold(state.Birth(_birth("a", seq=5), 0.0), state.Birth(_birth("a", seq=4), 0.1),
              state.Death(wire.NodeDeath(fleet=FLEET, node_id="a", seq=4, ts=0.0), 0.2))
    assert s.nodes["a"].seq == 5 and s.nodes["a"].alive
    assert s.membership == 1


def test_a_returning_node_is_a_new_member() -> None:
    s = _fold(state.Birth(_birth("a", seq=1), 0.0),
              state.Death(wire.NodeDeath(fleet=FLEET, node_id="a", seq=1, ts=0.0), 1.0),
              state.Health(_health("a", seq=1), 1.5))  # health of the dead incarnation: ignored
    assert not s.nodes["a"].alive
    s = state.apply(s, state.Birth(_birth("a", seq=2), 2.0))
    assert s.nodes["a"].alive and s.nodes["a"].seq == 2 and s.membership == 3


def test_lease_expiry_and_revival() -> None:
    s = _fold(state.Birth(_birth("a"), 0.0), state.Tick(5.0, lease_s=3.5))
    assert not s.nodes["a"].alive
    s = state.apply(s, state.Health(_health("a"), 6.0))
    assert s.nodes["a"].alive and s.membership == 3


def test_health_epoch_raises_the_next_epoch() -> None:
    """A planner that lost the retained plan learns the running epoch from health and outnumbers it."""
    s = _fold(state.Birth(_birth("a"), 0.0), state.Health(_health("a", epoch=7), 0.1))
    assert s.epoch == 7
    (cmd,) = control.decide(s, 5.0, control.Policy(debounce_s=0.1), first_seen=0.0)
    assert isinstance(cmd, control.Replan) and cmd.epoch == 8


def test_initial_plan_waits_for_health_within_the_grace() -> None:
    policy = control.Policy(debounce_s=0.1, health_grace_s=2.0)
    s = _fold(state.Birth(_birth("a"), 0.0), state.Birth(_birth("b"), 0.0), state.Health(_health("a"), 0.2))
    assert control.decide(s, 1.0, policy, first_seen=0.0) == [control.WaitForNodes(1, 2)]
    # past the grace a node that never reported health does not block the plan
    (late,) = control.decide(s, 2.5, policy, first_seen=0.0)
    assert isinstance(late, control.Replan) and late.node_ids == ("a", "b")
    s = state.apply(s, state.Health(_health("b"), 1.1))
    (cmd,) = control.decide(s, 1.3, policy, first_seen=0.0)
    assert isinstance(cmd, control.Replan) and cmd.reason == "initial plan"


def test_lost_node_triggers_replan_with_reason() -> None:
    s = _fold(state.Birth(_birth("a"), 0.0), state.Birth(_birth("b"), 0.0))
    plan = wire.Plan(fleet=FLEET, epoch=3, model_id="m", stages=(
        wire.PlanStage(index=0, first_layer=0, last_layer=1, nodes=("a",)),
        wire.PlanStage(index=1, first_layer=2, last_layer=3, nodes=("b",))), ts=0.0)
    s = state.apply(s, state.PlanPublished(plan, s.membership, 0.5))
    assert control.decide(s, 1.0, control.Policy()) == []
    s = state.apply(s, state.Death(wire.NodeDeath(fleet=FLEET, node_id="b", seq=1, ts=0.0), 1.0))
    # A loss with nobody joining is not debounced: the death re-plans at once (issue 21.2).
    assert control.decide(s, 1.05, control.Policy(debounce_s=0.5)) == []  # other deaths of the same event
    (cmd,) = control.decide(s, 1.15, control.Policy(debounce_s=0.5))
    assert isinstance(cmd, control.Replan) and cmd.reason == "lost b" and cmd.epoch == 4
    # A join is still batched: b comes back (a new incarnation) and c joins.
    s = state.apply(s, state.Birth(_birth("b", seq=2), 1.2))
    s = state.apply(s, state.Birth(_birth("c"), 1.2))
    assert control.decide(s, 1.3, control.Policy(debounce_s=0.5)) == []  # debounced
    (cmd,) = control.decide(s, 2.0, control.Policy(debounce_s=0.5))
    assert isinstance(cmd, control.Replan) and "joined c" in cmd.reason
