"""Node lifecycle as one transition table (h11 ``_state.py`` style). Pure: no I/O, no clock.

Theory of operation
-------------------
A node holds at most one stage assignment at a time, identified by the planner's plan *epoch*.

    IDLE --assign--> LOADING --loaded--> READY --frame--> RUNNING --frame--> RUNNING
                        |                  |                 |
                   load_failed      assign (new epoch)   assign (new epoch): RUNNING -> LOADING
                        v                  v                 v
                     FAILED --assign--> LOADING     unassign -> IDLE (from LOADING/READY/RUNNING/FAILED)

    any live state --drain--> DRAINING --drained--> STOPPED;  any non-STOPPED --abort--> STOPPED
    LOADING/READY/RUNNING --fault--> FAILED (the runtime or its worker broke, not a bad frame)

* ``connect`` / ``disconnect`` are self-loops in every live state: the MQTT session is orthogonal to
  the stage, a reconnect only resubscribes. They are in the table so STOPPED rejects them.
* A bad frame (wrong shape, ...) is *not* an event here: it is reported and dropped, the node stays
  RUNNING. Only ``fault`` (the runtime itself is unusable) leads to FAILED.
* ``assign`` is legal whenever the node may take a slice; ``reassign`` is the same move restricted
  to a node that already holds one (LOADING/READY/RUNNING/FAILED), for callers that want to say so.
* DRAINING accepts no new frames (``frame`` is illegal there); in-flight frames finish, then the
  daemon fires ``drained``.

Epochs
------
``handle("assign", epoch=n)`` (or ``assign(n)``) is the only way an epoch changes, and epochs only
move forward:

* an assignment with an epoch *older* than the current one raises ``StaleEpoch`` (a late retained
  message or a planner that lost leadership); the state is unchanged;
* an assignment with the *same* epoch while holding it is a duplicate (retained re-delivery after a
  reconnect) and is a no-op;
* a newer epoch while LOADING/READY/RUNNING is a ``reassign``: the in-progress load is abandoned, or
  frames already inside the runtime finish on the old slice and go out tagged with the *old*
  epoch; the next stage drops them as stale and the source re-sends unacknowledged frames under the
  new epoch, so no frame is lost or duplicated in the result stream.
* ``check_frame(epoch)`` rejects a frame whose epoch differs from the held one with ``StaleEpoch``
  (older: the sender re-sends it; newer: we have not loaded that plan yet, the sender retries).

No other module assigns ``NodeLifecycle.state``.
"""

from __future__ import annotations

from fleetpipe._compat import StrEnum
from fleetpipe.errors import FleetpipeError, StaleEpoch

__all__ = ["TRANSITIONS", "Event", "IllegalTransition", "NodeLifecycle", "State"]


class State(StrEnum):
    """Node lifecycle states."""

    IDLE = "idle"
    LOADING = "loading"
    READY = "ready"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class Event(StrEnum):
    """Events that drive the node lifecycle."""

    CONNECT = "connect"
    DISCONNECT = "disconnect"
    ASSIGN = "assign"
    REASSIGN = "reassign"
    UNASSIGN = "unassign"
    LOADED = "loaded"
    LOAD_FAILED = "load_failed"
    FRAME = "frame"
    FAULT = "fault"
    DRAIN = "drain"
    DRAINED = "drained"
    ABORT = "abort"


class IllegalTransition(FleetpipeError):
    """An event that the lifecycle table does not allow in the current state (a local bug or a race)."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"event {event.value!r} is illegal in state {state.value!r}")
        self.state = state
        self.event = event


_S, _E = State, Event

TRANSITIONS: dict[State, dict[Event, State]] = {
    _S.IDLE: {_E.ASSIGN: _S.LOADING, _E.DRAIN: _S.DRAINING},
    _S.LOADING: {
        _E.ASSIGN: _S.LOADING,
        _E.LOADED: _S.READY,
        _E.LOAD_FAILED: _S.FAILED,
        _E.REASSIGN: _S.LOADING,
        _E.UNASSIGN: _S.IDLE,
        _E.FAULT: _S.FAILED,
        _E.DRAIN: _S.DRAINING,
    },
    _S.READY: {
        _E.ASSIGN: _S.LOADING,
        _E.FRAME: _S.RUNNING,
        _E.REASSIGN: _S.LOADING,
        _E.UNASSIGN: _S.IDLE,
        _E.FAULT: _S.FAILED,
        _E.DRAIN: _S.DRAINING,
    },
    _S.RUNNING: {
        _E.ASSIGN: _S.LOADING,
        _E.FRAME: _S.RUNNING,
        _E.REASSIGN: _S.LOADING,
        _E.UNASSIGN: _S.IDLE,
        _E.FAULT: _S.FAILED,
        _E.DRAIN: _S.DRAINING,
    },
    _S.FAILED: {
        _E.ASSIGN: _S.LOADING,
        _E.REASSIGN: _S.LOADING,
        _E.UNASSIGN: _S.IDLE,
        _E.DRAIN: _S.DRAINING,
    },
    _S.DRAINING: {_E.DRAINED: _S.STOPPED},
    _S.STOPPED: {},
}
# Every live state: link events are self-loops and abort stops at once (second SIGINT).
for _state, _row in TRANSITIONS.items():
    if _state is not _S.STOPPED:
        _row.update({_E.CONNECT: _state, _E.DISCONNECT: _state, _E.ABORT: _S.STOPPED})
del _state, _row


class NodeLifecycle:
    """The node's state and held epoch; every change goes through ``handle`` or ``assign``."""

    def __init__(self) -> None:
        self._state = State.IDLE
        self._epoch: int | None = None

    @property
    def state(self) -> State:
        """Current state."""
        return self._state

    @property
    def epoch(self) -> int | None:
        """Epoch of the held (or last) assignment, None before the first one."""
        return self._epoch

    @property
    def accepts_frames(self) -> bool:
        """Whether a frame may be started now."""
        return Event.FRAME in TRANSITIONS[self._state]

    def handle(self, event: Event | str, *, epoch: int | None = None) -> State:
        """Apply ``event``; raises IllegalTransition naming the state and event.

        ``epoch`` is only for ``assign``/``reassign``: an older epoch raises StaleEpoch and the same
        epoch while holding it is a no-op (see "Epochs" above).
        """
        event = Event(event)
        if epoch is None:
            return self._apply(event)
        if event not in (Event.ASSIGN, Event.REASSIGN):
            raise ValueError(f"epoch is only meaningful for assignments, not {event.value!r}")
        if self._epoch is not None:
            if epoch < self._epoch:
                raise StaleEpoch(f"assignment for epoch {epoch} is older than held epoch {self._epoch}")
            if epoch == self._epoch and self._state in (State.LOADING, State.READY, State.RUNNING):
                return self._state
        state = self._apply(event)
        self._epoch = epoch
        return state

    def assign(self, epoch: int) -> State:
        """Shorthand for ``handle(Event.ASSIGN, epoch=epoch)``."""
        return self.handle(Event.ASSIGN, epoch=epoch)

    def check_frame(self, epoch: int) -> None:
        """Raise StaleEpoch unless a frame of ``epoch`` belongs to the held assignment."""
        if self._epoch is None or epoch != self._epoch:
            raise StaleEpoch(f"frame of epoch {epoch}, node holds epoch {self._epoch}")

    def _apply(self, event: Event) -> State:
        """Look ``event`` up in the table and move."""
        try:
            self._state = TRANSITIONS[self._state][event]
        except KeyError:
            raise IllegalTransition(self._state, event) from None
        return self._state
