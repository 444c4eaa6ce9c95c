"""A rate-limited warning for bad input from the network: a flood of forged messages costs a few log lines."""

from __future__ import annotations

import logging
import time

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """Log at most ``burst`` warnings per ``window_s``; what it held back is counted in the next line it logs."""

    def __init__(self, logger: logging.Logger, *, burst: int = 10, window_s: float = 10.0) -> None:
        self.logger = logger
        self.burst = burst
        self.window_s = window_s
        self.suppressed = 0
        self._start = -window_s
        self._count = 0

    def warning(self, fmt: str, *args: object) -> None:
        """``logger.warning(fmt, *args)`` unless ``burst`` lines went out in this window already."""
        now = time.monotonic()
        if now - self._start >= self.window_s:
            self._start, self._count = now, 0
        if self._count >= self.burst:
            self.suppressed += 1
            return
        self._count += 1
        if self.suppressed:
            fmt, args = fmt + " (%d similar messages not logged)", (*args, self.suppressed)
            self.suppressed = 0
        self.logger.warning(fmt, *args)
