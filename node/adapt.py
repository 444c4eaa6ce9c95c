"""Online bit-width adaptation at the sending node (COACH Eq. 11): link bandwidth estimate + bit choice.

:class:`BandwidthEstimator` turns observed transfers ``(nbytes, seconds)`` into a link bandwidth. It keeps
exponentially weighted averages of bytes and of seconds and divides them, so every transfer is weighted by
its size (a burst of tiny, latency-bound messages cannot drag the estimate down); transfers below
``min_bytes`` are ignored altogether. The first ``window`` transfers are averaged evenly (bias-corrected
start), after that each new transfer has weight ``alpha``.

:func:`choose_bits` implements Eq. 11, ``Q_c = argmin_{Q >= Q_r} |T'_t(Q) - max(T_e, T'_t(Q), T_c)|``, with
the reading the paper and DESIGN.md give it ("never let the link become the bubble while staying above
the accuracy floor"). Read literally, the expression is 0 for *every* ``Q`` whose transfer is the longest
phase, so with ties going to the most precise width it would always pick 32 bits; what it is meant to
minimise is the bubble the link adds to the pipeline, ``max(0, T'_t(Q) - max(T_e, T_c))``. So:

- a width whose transfer fits in the compute budget ``max(T_e, T_c[, target])`` costs nothing, and among
  those the highest (most precise) wins: a fast link keeps high precision;
- when no width fits, the one with the smallest transfer (the lowest allowed) wins;
- never below ``min_bits`` (``Q_r``, the calibrated floor, possibly relaxed by the context cache).

``target_ms`` (optional) is the plan's bottleneck: a link only needs to keep up with the slowest phase of
the whole pipeline, not with its two neighbours.

:class:`AdaptiveBits` combines both with hysteresis: it lowers the width at once when the link would
become the bottleneck, but raises it only after ``up_after`` consecutive frames in which the higher width
fits even with the bandwidth discounted by ``margin``, so it does not flap frame to frame.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_CANDIDATES",
    "AdaptiveBits",
    "BandwidthEstimator",
    "BitsDecision",
    "choose_bits",
    "transfer_ms",
    "wire_bytes",
]

DEFAULT_CANDIDATES = (2, 3, 4, 5, 6, 7, 8, 16, 32)
_REL_TIE = 1e-9

NBytes = int | Callable[[int], float]


def wire_bytes(nbytes_at_32: NBytes, bits: int) -> float:
    """Bytes on the wire at ``bits``: ``nbytes_at_32(bits)`` for a callable, else ``ceil(n * bits / 32)``."""
    if callable(nbytes_at_32):
        return float(nbytes_at_32(bits))
    return float(math.ceil(int(nbytes_at_32) * bits / 32))


def transfer_ms(nbytes: float, bandwidth_mbps: float) -> float:
    """Milliseconds to move ``nbytes`` over ``bandwidth_mbps`` Mbit/s (inf when the link is down)."""
    return math.inf if not bandwidth_mbps > 0 else float(nbytes) * 8.0 / (float(bandwidth_mbps) * 1000.0)


class BandwidthEstimator:
    """Byte-weighted EWMA of a link's bandwidth from observed transfers."""

    __slots__ = ("_bytes", "_n", "_seconds", "alpha", "min_bytes", "window")

    def __init__(self, alpha: float = 0.3, window: int = 4, *, min_bytes: int = 2048) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        if window < 1 or min_bytes < 0:
            raise ValueError("window must be >= 1 and min_bytes >= 0")
        self.alpha = float(alpha)
        self.window = int(window)
        self.min_bytes = int(min_bytes)
        self._bytes = 0.0
        self._seconds = 0.0
        self._n = 0

    def observe(self, nbytes: int, seconds: float) -> bool:
        """Record a transfer; returns False when it was ignored (too small, or a bad duration)."""
        if nbytes < max(self.min_bytes, 1) or not (seconds > 0 and math.isfinite(seconds)):
            return False
        self._n += 1
        w = max(self.alpha, 1.0 / min(self._n, self.window))
        self._bytes += w * (nbytes - self._bytes)
        self._seconds += w * (seconds - self._seconds)
        return True

    @property
    def samples(self) -> int:
        """Transfers accepted so far."""
        return self._n

    @property
    def mbps(self) -> float | None:
        """Estimated bandwidth in Mbit/s (None before the first accepted transfer)."""
        return None if self._n == 0 else self._bytes * 8.0 / self._seconds / 1e6

    def reset(self) -> None:
        """Forget every observation (e.g. after a re-plan changes the link)."""
        self._bytes = self._seconds = 0.0
        self._n = 0


def choose_bits(
    *,
    compute_ms_prev: float,
    compute_ms_next: float,
    nbytes_at_32: NBytes,
    bandwidth_mbps: float,
    min_bits: int,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    max_bits: int | None = None,
    target_ms: float | None = None,
) -> int:
    """COACH Eq. 11: the width ``>= min_bits`` that adds the least link bubble; ties go to the highest width."""
    allowed = sorted({int(b) for b in candidates if b >= min_bits and (max_bits is None or b <= max_bits)})
    if not allowed:  # nothing between the floor and the cap: the floor wins (never below min_bits)
        above = sorted(int(b) for b in candidates if b >= min_bits)
        return above[0] if above else 32
    budget = max(float(compute_ms_prev), float(compute_ms_next), float(target_ms or 0.0))
    best, best_cost = allowed[0], math.inf
    for b in allowed:  # ascending, so a tie moves to the higher width
        t = transfer_ms(wire_bytes(nbytes_at_32, b), bandwidth_mbps)
        cost = max(0.0, t - budget)  # |T'_t - max(T_e, T'_t, T_c)| as the bubble the link adds
        if cost <= best_cost * (1 + _REL_TIE) + 1e-12:
            best, best_cost = b, min(cost, best_cost)
    return best


@dataclass(frozen=True, slots=True)
class BitsDecision:
    """One frame's choice: the width, the bandwidth it assumed and why it changed (or not)."""

    bits: int
    bandwidth_mbps: float | None
    reason: str  # "initial", "hold", "down", "up", "waiting-up", "floor"


class AdaptiveBits:
    """Per-link adaptive bit-width: a :class:`BandwidthEstimator` plus :func:`choose_bits` with hysteresis."""

    def __init__(
        self,
        *,
        min_bits: int,
        nbytes_at_32: NBytes,
        candidates: Sequence[int] = DEFAULT_CANDIDATES,
        max_bits: int | None = None,
        estimator: BandwidthEstimator | None = None,
        up_after: int = 5,
        margin: float = 0.1,
        initial_bits: int | None = None,
    ) -> None:
        if up_after < 1 or not 0.0 <= margin < 1.0:
            raise ValueError("up_after must be >= 1 and margin in [0, 1)")
        self.min_bits = int(min_bits)
        self.nbytes_at_32 = nbytes_at_32
        self.candidates = tuple(sorted({int(b) for b in candidates}))
        self.max_bits = max_bits
        self.estimator = estimator or BandwidthEstimator()
        self.up_after = int(up_after)
        self.margin = float(margin)
        top = [b for b in self.candidates if max_bits is None or b <= max_bits]
        self._bits = max(int(initial_bits if initial_bits is not None else (top[-1] if top else 32)), self.min_bits)
        self._pending = 0

    @property
    def bits(self) -> int:
        """The width in use."""
        return self._bits

    def observe_transfer(self, nbytes: int, seconds: float) -> bool:
        """Feed a measured transfer of this link to the estimator."""
        return self.estimator.observe(nbytes, seconds)

    def decide(self, compute_ms_prev: float, compute_ms_next: float, *, min_bits: int | None = None,
               target_ms: float | None = None) -> BitsDecision:
        """The width for the next frame (``min_bits`` overrides the floor for this frame, e.g. context relief)."""
        floor = self.min_bits if min_bits is None else int(min_bits)
        bw = self.estimator.mbps
        if bw is None:
            self._bits = max(self._bits, floor)
            return BitsDecision(self._bits, None, "initial")

        def pick(b: float) -> int:
            return choose_bits(compute_ms_prev=compute_ms_prev, compute_ms_next=compute_ms_next,
                               nbytes_at_32=self.nbytes_at_32, bandwidth_mbps=b, min_bits=floor,
                               candidates=self.candidates, max_bits=self.max_bits, target_ms=target_ms)

        now = pick(bw)
        if self._bits < floor:
            self._bits, self._pending = max(now, floor), 0
            return BitsDecision(self._bits, bw, "floor")
        if now < self._bits:
            self._bits, self._pending = now, 0
            return BitsDecision(self._bits, bw, "down")
        up = pick(bw * (1.0 - self.margin))
        if up > self._bits:
            self._pending += 1
            if self._pending >= self.up_after:
                self._bits, self._pending = up, 0
                return BitsDecision(self._bits, bw, "up")
            return BitsDecision(self._bits, bw, "waiting-up")
        self._pending = 0
        return BitsDecision(self._bits, bw, "hold")
