"""Honest emulation of slower devices on one machine: stretch compute time, pace outbound bytes.

Every output is still computed for real. A node emulating a device class runs its slice, then keeps
its inference worker busy for ``(compute_factor - 1) x`` the measured compute time (``stretch``), so
the stage is genuinely occupied as long as the slower device would be; and it paces outbound bytes
through a ``TokenBucket`` at the class's link bandwidth. From factor 4 on, the compute time stretched
is that of a warm run (``fleetpipe.node.executor``: after the stretch sleep the host's caches are cold,
which on a shared VM costs ~20 ms of CPU per run, and the worker times a second pass instead).

``compute_factor`` is relative to *the host running the emulation*, not an absolute device speed:
``rpi4`` = 3.0 means "three times slower than this machine". The defaults below are rough ratios for a
recent x86 laptop core; calibrate with ``fleetpipe.node.profile.measure_speed`` on real hardware if
the ratio matters. A factor below 1 cannot be emulated (we can slow down, not speed up).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from fleetpipe.errors import ConfigError

__all__ = ["CLASSES", "DeviceClass", "TokenBucket", "parse_emulate", "stretch"]

_GIB = 1 << 30


@dataclass(frozen=True, slots=True)
class DeviceClass:
    """An emulated device: compute slowdown vs the host, link bandwidth, memory and cores (None = host's)."""

    name: str
    compute_factor: float
    bandwidth_mbps: float | None = None
    mem_bytes: int | None = None
    cores: int | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("DeviceClass.name must be non-empty")
        if not (math.isfinite(self.compute_factor) and self.compute_factor >= 1.0):
            raise ValueError(f"compute_factor must be a finite number >= 1, got {self.compute_factor}")
        if self.bandwidth_mbps is not None and not self.bandwidth_mbps > 0:
            raise ValueError(f"bandwidth_mbps must be > 0 or None, got {self.bandwidth_mbps}")
        if self.mem_bytes is not None and self.mem_bytes <= 0:
            raise ValueError(f"mem_bytes must be > 0 or None, got {self.mem_bytes}")
        if self.cores is not None and self.cores <= 0:
            raise ValueError(f"cores must be > 0 or None, got {self.cores}")


# Links: Wi-Fi ~40 Mbit/s of real goodput, 100 Mbit Ethernet ~94, GbE ~940.
CLASSES: dict[str, DeviceClass] = {
    c.name: c
    for c in (
        DeviceClass("host", 1.0),
        DeviceClass("x86", 1.0, 940.0, 8 * _GIB, 4),
        DeviceClass("rpi3", 10.0, 94.0, 1 * _GIB, 4),
        DeviceClass("rpi4", 5.0, 940.0, 4 * _GIB, 4),
        DeviceClass("rpi4-wifi", 5.0, 40.0, 4 * _GIB, 4),
        DeviceClass("rpi5", 2.5, 940.0, 8 * _GIB, 4),
        DeviceClass("jetson-nano", 3.0, 940.0, 4 * _GIB, 4),
    )
}


def parse_emulate(spec: str) -> DeviceClass:
    """Parse ``--emulate``: a class name, a factor, optionally ``:bw=MBPS,mem=BYTES,cores=N`` overrides."""
    head, _, tail = spec.strip().partition(":")
    if head in CLASSES:
        device = CLASSES[head]
    else:
        try:
            device = DeviceClass(f"x{head}", float(head))
        except ValueError as exc:
            names = ", ".join(sorted(CLASSES))
            raise ConfigError(f"--emulate {spec!r}: expected a factor >= 1 or one of {names}") from exc
    if not tail:
        return device
    fields: dict[str, float | int] = {}
    for item in tail.split(","):
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError("expected key=value")
            if key == "bw":
                fields["bandwidth_mbps"] = float(value)
            elif key == "mem":
                fields["mem_bytes"] = int(value)
            elif key == "cores":
                fields["cores"] = int(value)
            else:
                raise ValueError(f"unknown key {key!r} (bw, mem, cores)")
        except ValueError as exc:
            raise ConfigError(f"--emulate {spec!r}: bad override {item!r}: {exc}") from exc
    try:
        return replace(device, **fields)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConfigError(f"--emulate {spec!r}: {exc}") from exc


def stretch(compute_ms: float, factor: float) -> float:
    """Extra milliseconds to stay busy so that wall time is ``factor x compute_ms``."""
    return max(0.0, (factor - 1.0) * compute_ms)


BURST_BYTES = 64 * 1024  # what an emulated link sends at once after a pause


class TokenBucket:
    """Paces bytes to ``rate_mbps`` (megabits/s) allowing ``burst_bytes`` at once; loop-only for consume.

    Reservations may drive the bucket into debt, so a message larger than the burst is still sent,
    just late; concurrent senders are served in reservation order. ``math.inf`` disables pacing.
    """

    def __init__(
        self,
        rate_mbps: float,
        burst_bytes: int = BURST_BYTES,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst_bytes < 0:
            raise ValueError(f"burst_bytes must be >= 0, got {burst_bytes}")
        self._clock = clock
        self._burst = float(burst_bytes)
        self._tokens = float(burst_bytes)
        self._stamp = clock()
        self._rate_bps = 0.0
        self.set_rate(rate_mbps)

    @property
    def rate_mbps(self) -> float:
        """Current rate in megabits per second."""
        return self._rate_bps * 8 / 1e6

    def set_rate(self, rate_mbps: float) -> None:
        """Change the rate from now on (tokens earned so far are kept)."""
        if not rate_mbps > 0:
            raise ValueError(f"rate_mbps must be > 0, got {rate_mbps}")
        self._refill()
        self._rate_bps = rate_mbps * 1e6 / 8

    def delay_for(self, nbytes: int) -> float:
        """Seconds until ``nbytes`` could be sent now, without reserving them."""
        self._refill()
        deficit = nbytes - self._tokens
        if deficit <= 0 or math.isinf(self._rate_bps):
            return 0.0
        return deficit / self._rate_bps

    def reserve(self, nbytes: int) -> float:
        """Take ``nbytes`` of tokens now and return how many seconds the caller must wait before sending."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        delay = self.delay_for(nbytes)
        if not math.isinf(self._rate_bps):
            self._tokens -= nbytes
        return delay

    async def consume(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may be sent at the current rate."""
        delay = self.reserve(nbytes)
        if delay > 0:
            await asyncio.sleep(delay)

    def _refill(self) -> None:
        """Add the tokens earned since the last update, up to the burst size."""
        now = self._clock()
        if math.isinf(self._rate_bps):
            self._tokens = self._burst
        elif self._rate_bps:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate_bps)
        self._stamp = now
