"""Node lifecycle table: every legal path, every illegal transition, epoch rules."""

from __future__ import annotations

import pytest

from fleetpipe.errors import FleetpipeError, StaleEpoch
from fleetpipe.node.lifecycle import TRANSITIONS, Event, IllegalTransition, NodeLifecycle, State


def _drive(lifecycle: NodeLifecycle, state: State) -> None:
    """Bring a fresh lifecycle to ``state`` through legal events."""
    paths: dict[State, list[Event | int]] = {
        State.IDLE: [],
        State.LOADING: [1],
        State.READY: [1, Event.LOADED],
        State.RUNNING: [1, Event.LOADED, Event.FRAME],
        State.FAILED: [1, Event.LOAD_FAILED],
        State.DRAINING: [Event.DRAIN],
        State.STOPPED: [Event.DRAIN, Event.DRAINED],
    }
    for step in paths[state]:
        if isinstance(step, int):
            lifecycle.assign(step)
        else:
            lifecycle.handle(step)
    assert lifecycle.state is state


def test_table_is_total_over_states() -> None:
    assert set(TRANSITIONS) == set(State)
    assert TRANSITIONS[State.STOPPED] == {}
    for row in TRANSITIONS.values():
        assert all(isinstance(event, Event) and isinstance(target, State) for event, target in row.items())


def test_happy_path_and_graceful_drain() -> None:
    life = NodeLifecycle()
    assert (life.state, life.epoch) == (State.IDLE, None)
    assert life.handle("connect") is State.IDLE
    assert life.assign(1) is State.LOADING and life.epoch == 1
    assert life.handle(Event.LOADED) is State.READY
    assert life.accepts_frames
    assert life.handle(Event.FRAME) is State.RUNNING
    assert life.handle(Event.FRAME) is State.RUNNING
    assert life.handle(Event.DISCONNECT) is State.RUNNING
    assert life.handle(Event.DRAIN) is State.DRAINING
    assert not life.accepts_frames
    assert life.handle(Event.DRAINED) is State.STOPPED


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", list(Event))
def test_every_event_in_every_state(state: State, event: Event) -> None:
    life = NodeLifecycle()
    _drive(life, state)
    expected = TRANSITIONS[state].get(event)
    if expected is None:
        with pytest.raises(IllegalTransition) as info:
            life.handle(event)
        assert (info.value.state, info.value.event) == (state, event)
        assert state.value in str(info.value) and event.value in str(info.value)
        assert isinstance(info.value, FleetpipeError)
        assert life.state is state
    else:
        assert life.handle(event) is expected
        assert life.state is expected


@pytest.mark.parametrize("state", list(State))
def test_assignment_with_newer_epoch_in_every_state(state: State) -> None:
    life = NodeLifecycle()
    _drive(life, state)
    legal = {State.IDLE, State.LOADING, State.READY, State.RUNNING, State.FAILED}
    if state in legal:
        assert life.assign(5) is State.LOADING
        assert life.epoch == 5
    else:
        with pytest.raises(IllegalTransition):
            life.assign(5)
        assert life.state is state


def test_assign_without_epoch_and_explicit_reassign() -> None:
    life = NodeLifecycle()
    assert life.handle("assign") is State.LOADING and life.epoch is None
    with pytest.raises(IllegalTransition):
        NodeLifecycle().handle(Event.REASSIGN)  # nothing held yet
    life.handle(Event.LOADED)
    life.handle(Event.FRAME)
    assert life.handle(Event.REASSIGN, epoch=4) is State.LOADING and life.epoch == 4


def test_reassign_while_running_and_epoch_rules() -> None:
    life = NodeLifecycle()
    _drive(life, State.RUNNING)
    life.check_frame(1)
    assert life.assign(1) is State.RUNNING  # retained re-delivery: no-op
    assert life.assign(2) is State.LOADING  # new epoch while RUNNING
    with pytest.raises(StaleEpoch):
        life.check_frame(1)  # in-flight frames of epoch 1 are stale now
    with pytest.raises(StaleEpoch):
        life.assign(1)
    assert (life.state, life.epoch) == (State.LOADING, 2)
    assert life.assign(3) is State.LOADING  # newer plan while still loading
    life.handle(Event.LOADED)
    life.check_frame(3)
    with pytest.raises(StaleEpoch):
        life.check_frame(4)


def test_failed_recovers_and_unassign_returns_to_idle() -> None:
    life = NodeLifecycle()
    _drive(life, State.FAILED)
    assert life.assign(1) is State.LOADING  # retry of the same epoch after a failed load
    life.handle(Event.LOADED)
    assert life.handle(Event.FAULT) is State.FAILED
    assert life.handle(Event.UNASSIGN) is State.IDLE
    assert life.assign(2) is State.LOADING


def test_frame_before_assignment_is_stale_and_assign_events_need_epochs() -> None:
    life = NodeLifecycle()
    with pytest.raises(StaleEpoch):
        life.check_frame(0)
    with pytest.raises(ValueError, match="only meaningful for assignments"):
        life.handle(Event.FRAME, epoch=1)
    with pytest.raises(ValueError):
        life.handle("explode")


def test_abort_from_every_live_state() -> None:
    for state in State:
        life = NodeLifecycle()
        _drive(life, state)
        if state is State.STOPPED:
            with pytest.raises(IllegalTransition):
                life.handle(Event.ABORT)
        else:
            assert life.handle(Event.ABORT) is State.STOPPED
