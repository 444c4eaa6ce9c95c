"""systemd's sd_notify protocol without a dependency: READY=1, WATCHDOG=1, STOPPING=1, STATUS=...

A unit with ``Type=notify`` waits for ``READY=1``; with ``WatchdogSec=N`` systemd kills (and, with
``Restart=on-failure``, restarts) a service that does not send ``WATCHDOG=1`` at least every N s.
systemd passes the socket in ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace) and
the watchdog period in ``$WATCHDOG_USEC`` (for ``$WATCHDOG_PID``). Outside systemd (no socket) every
call is a no-op that returns False, so daemons call these unconditionally::

    from fleetpipe.deploy import sdnotify

    sdnotify.notify("READY=1")                   # after the first CONNACK and subscriptions
    period = sdnotify.watchdog_period()          # None when no watchdog is configured
    ...  every `period` s from the main loop:  sdnotify.notify("WATCHDOG=1")
    sdnotify.notify("STOPPING=1")                # when shutdown/drain starts

``env`` defaults to ``os.environ`` *at call time* (never at import); pass a mapping to test or to
let the composition root decide. Sending never raises: a failure is logged once and returns False.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["notify", "watchdog_period"]

_log = logging.getLogger(__name__)


def notify(state: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, ``"WATCHDOG=1"``, ``"STOPPING=1"``, ``"STATUS=draining"``;
    several assignments may be joined with newlines) to systemd. True if it was sent."""
    address = _address((os.environ if env is None else env).get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        _log.warning("sd_notify %r to %r failed: %s", state, address, exc)
        return False
    return True


def watchdog_period(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec``), or None when the watchdog is off
    or meant for another process (``$WATCHDOG_PID``)."""
    env = os.environ if env is None else env
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


# --- private helpers --------------------------------------------------------------------------------


def _address(value: str) -> str | None:
    if not value or value[0] not in "/@":
        return None  # unset, or vsock:... (not used on our targets)
    return "\0" + value[1:] if value.startswith("@") else value
