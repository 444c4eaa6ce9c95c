"""Output error of a fleet against the whole model: relative L2 and max abs per output, top-1 for classifiers.

One comparison for everything that checks a fleet's outputs (``fleetpipe demo``, ``fleetpipe infer --check``,
the planner's bit-width probes, the corpus bench), so they all judge with the same numbers:

- per output and frame, the relative L2 error ``||y - ref|| / ||ref||`` (the worst frame is reported) and the
  largest absolute difference. The reference's RMS is floored at :data:`REF_RMS_FLOOR` (1e-3) in the
  denominator, as ``atol`` does in ``numpy.allclose``: a detector's empty probability map (values ~1e-5 on an
  input with nothing to detect) is judged against 1e-3, not against ~0, where any rounding is "100 %";
- top-1 agreement only for *classifier-shaped* outputs (one class vector per item: shape ``(C,)`` or
  ``(B, C)`` with ``C > 1``): an argmax over a whole detection or segmentation map says nothing;
- the check passes when every output's worst relative L2 error is within the tolerance (default 1 %).

Pure numpy: the client imports it as well as the planner.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_TOLERANCE",
    "REF_RMS_FLOOR",
    "Comparison",
    "OutputError",
    "compare_outputs",
    "is_classifier_shaped",
    "rel_l2",
]

#: Relative L2 error allowed per output (1 %).
DEFAULT_TOLERANCE = 0.01
#: Smallest reference RMS a relative error is taken against (an absolute floor for near-empty outputs).
REF_RMS_FLOOR = 1e-3
_TINY = 1e-12


def rel_l2(y: np.ndarray, ref: np.ndarray) -> float:
    """``||y - ref|| / ||ref||`` in float64 (0 when both are zero; inf when the shapes differ).

    The denominator is at least ``REF_RMS_FLOOR * sqrt(size)`` (see the module docstring). Entries where the
    reference itself is not finite (a log of a random probe, say) are left out; a
    non-finite value where the reference is finite makes the error inf.
    """
    a = np.asarray(y, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if a.shape != r.shape:
        return math.inf
    finite = np.isfinite(r)
    if not finite.all():
        a, r = a[finite], r[finite]
    if not np.isfinite(a).all():
        return math.inf
    diff = float(np.linalg.norm(a - r))
    if diff == 0.0:
        return 0.0
    return diff / max(float(np.linalg.norm(r)), REF_RMS_FLOOR * math.sqrt(r.size), _TINY)


def is_classifier_shaped(shape: Sequence[int]) -> bool:
    """One class vector per item: ``(C,)`` or ``(B, C)`` with ``C > 1``."""
    dims = tuple(int(d) for d in shape)
    return len(dims) in (1, 2) and dims[-1] > 1


@dataclass(frozen=True, slots=True)
class OutputError:
    """One output over the compared frames: worst relative L2, largest abs difference, top-1 (classifiers)."""

    name: str
    shape: tuple[int, ...]
    frames: int
    rel_l2: float
    max_abs: float
    top1: float | None = None  # agreement in [0, 1]; None: not classifier-shaped

    def line(self) -> str:
        """``name (shape): rel L2 0.0012, max abs 3.4e-05[, top-1 100.0 %]``."""
        top = "" if self.top1 is None else f", top-1 {100 * self.top1:.1f} %"
        return (f"{self.name} {tuple(self.shape)}: rel L2 {self.rel_l2:.4g}, max abs {self.max_abs:.3g}{top}"
                f" ({self.frames} frames)")


@dataclass(frozen=True, slots=True)
class Comparison:
    """Every output's error and the tolerance it is judged against."""

    outputs: tuple[OutputError, ...]
    tolerance: float = DEFAULT_TOLERANCE
    skipped: int = 0  # frames without the compared outputs (e.g. COACH early exits)

    @property
    def worst_rel_l2(self) -> float:
        """The largest relative L2 error over outputs and frames (0 when nothing was compared)."""
        return max((o.rel_l2 for o in self.outputs), default=0.0)

    @property
    def ok(self) -> bool:
        """Something was compared and every output is within the tolerance."""
        return bool(self.outputs) and all(o.rel_l2 <= self.tolerance for o in self.outputs)

    @property
    def top1(self) -> float | None:
        """The lowest top-1 agreement over classifier-shaped outputs (None when there is none)."""
        tops = [o.top1 for o in self.outputs if o.top1 is not None]
        return min(tops) if tops else None

    def lines(self) -> list[str]:
        """One line per output, then the verdict."""
        out = [o.line() for o in self.outputs]
        verdict = "within" if self.ok else "EXCEEDS"
        what = "nothing compared" if not self.outputs else f"worst rel L2 {self.worst_rel_l2:.4g}"
        skipped = f"; {self.skipped} frames had no comparable output" if self.skipped else ""
        out.append(f"{what}: {verdict} the tolerance {self.tolerance:g}{skipped}")
        return out


def compare_outputs(fleet: Sequence[Mapping[str, np.ndarray]], reference: Sequence[Mapping[str, np.ndarray]],
                    *, tolerance: float = DEFAULT_TOLERANCE) -> Comparison:
    """Compare frame by frame every output the reference has (frames missing one are counted as skipped)."""
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be finite and >= 0, not {tolerance}")
    if len(fleet) != len(reference):
        raise ValueError(f"{len(fleet)} fleet frames for {len(reference)} reference frames")
    names = list(reference[0]) if reference else []
    rel: dict[str, list[float]] = {n: [] for n in names}
    mabs: dict[str, float] = dict.fromkeys(names, 0.0)
    agree: dict[str, list[bool]] = {n: [] for n in names}
    skipped = 0
    for got, ref in zip(fleet, reference, strict=True):
        if any(n not in got for n in names):
            skipped += 1
            continue
        for n in names:
            y, r = np.asarray(got[n]), np.asarray(ref[n])
            rel[n].append(rel_l2(y, r))
            mabs[n] = max(mabs[n], _max_abs(y, r))
            if is_classifier_shaped(r.shape) and y.shape == r.shape:
                agree[n].extend((y.reshape(-1, r.shape[-1]).argmax(-1) == r.reshape(-1, r.shape[-1]).argmax(-1))
                                .tolist())
    outputs = tuple(
        OutputError(name=n, shape=tuple(np.asarray(reference[0][n]).shape), frames=len(rel[n]),
                    rel_l2=max(rel[n]), max_abs=mabs[n],
                    top1=float(np.mean(agree[n])) if agree[n] else None)
        for n in names if rel[n])
    return Comparison(outputs=outputs, tolerance=float(tolerance), skipped=skipped)


def _max_abs(y: np.ndarray, ref: np.ndarray) -> float:
    """Largest ``|y - ref|`` where the reference is finite (inf for a shape mismatch)."""
    if y.shape != ref.shape:
        return math.inf
    r = np.asarray(ref, dtype=np.float64)
    finite = np.isfinite(r)
    if not finite.any():
        return 0.0
    d = np.abs(np.asarray(y, dtype=np.float64)[finite] - r[finite])
    return float(np.max(d)) if np.isfinite(d).all() else math.inf
