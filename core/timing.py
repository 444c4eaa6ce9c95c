"""Timing constants, all in seconds unless the name says otherwise.

Tests patch these through fixtures; production code reads them at call time
(``timing.HEALTH_INTERVAL_S``), never copies them at import.
"""

from __future__ import annotations

__all__ = [
    "ACK_TIMEOUT_S",
    "CONNECT_TIMEOUT_S",
    "DRAIN_TIMEOUT_S",
    "FRAME_RESEND_S",
    "HEALTH_INTERVAL_S",
    "LEASE_S",
    "RECONNECT_MAX_S",
    "RECONNECT_MIN_S",
    "REPLAN_DEBOUNCE_S",
    "SPLIT_PART_TIMEOUT_S",
    "SPLIT_RETRY_S",
    "override_from_env",
]

HEALTH_INTERVAL_S = 1.0
# A node that misses health for this long is considered dead.
LEASE_S = 3.5
CONNECT_TIMEOUT_S = 10.0
RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 5.0
ACK_TIMEOUT_S = 10.0
# Client re-sends an unanswered frame after this long (only after a re-plan or timeout).
FRAME_RESEND_S = 5.0
# Wait this long after a membership change before re-planning, to batch joins.
REPLAN_DEBOUNCE_S = 0.5
# The lead of a split stage waits this long for a unit's part replies (when the assignment names no
# timeout), then computes the unit itself; a node that missed is not asked again for SPLIT_RETRY_S.
SPLIT_PART_TIMEOUT_S = 2.0
SPLIT_RETRY_S = 5.0
# Graceful drain on SIGTERM; systemd TimeoutStopSec must be longer.
DRAIN_TIMEOUT_S = 10.0


def override_from_env(env: dict[str, str]) -> dict[str, float]:
    """Apply ``FLEETPIPE_TIMING_<NAME>=<seconds>`` overrides (the CLI calls this; tests use it for
    child processes). Returns what was changed; unknown names raise ValueError."""
    changed: dict[str, float] = {}
    for key, raw in env.items():
        if not key.startswith("FLEETPIPE_TIMING_"):
            continue
        name = key.removeprefix("FLEETPIPE_TIMING_")
        if name not in __all__ or not name.endswith("_S"):
            raise ValueError(f"{key}: unknown timing constant {name}")
        value = float(raw)
        if not value > 0:
            raise ValueError(f"{key} must be > 0")
        globals()[name] = value
        changed[name] = value
    return changed
