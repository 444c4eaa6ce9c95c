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
# Graceful drain on SIGTERM; systemd TimeoutStopSec must be longer.
DRAIN_TIMEOUT_S = 10.0
