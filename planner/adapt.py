"""Online re-planning (ScalPipe): detect stages that drift from their predicted time and fine-tune the plan.

:class:`DeviationMonitor` is fed with each stage's measured time (e.g. the ``compute_ms_avg`` of its node's
health message) next to the plan's prediction. A stage *deviates* when, over the last ``window_s`` seconds,
at least ``min_samples`` measurements were taken and all of them (and so their median) are beyond the
threshold on the same side: a lasting slowdown or speed-up, not a single spike.

:func:`rescale_problem` scales a device's compute column by measured / predicted so the heuristic sees the
fleet as it is now, and :func:`fine_tune` runs :func:`fleetpipe.planner.heuristic.refine` from the current
plan on that view (moving boundary layers, adding or dropping a replica) and returns the new plan only
when it lowers the bottleneck by more than ``margin`` (default 5 %), so the fleet does not switch epochs
for a marginal gain.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from fleetpipe.planner.cost import Stage, evaluate
from fleetpipe.planner.partition import PlanResult
from fleetpipe.planner.problem import Problem, _replace

__all__ = ["Deviation", "DeviationMonitor", "device_factors", "fine_tune", "rescale_problem"]


@dataclass(frozen=True, slots=True)
class Deviation:
    """Stage ``stage`` runs at ``ratio`` times its predicted time (median over the window)."""

    stage: int
    ratio: float
    samples: int


class DeviationMonitor:
    """Per-stage measured/predicted ratios over a sliding time window."""

    def __init__(self, predicted_ms: Sequence[float], *, threshold: float = 0.2, window_s: float = 5.0,
                 min_samples: int = 3) -> None:
        if not threshold > 0 or not window_s > 0 or min_samples < 1:
            raise ValueError("threshold and window_s must be > 0, min_samples >= 1")
        self.predicted_ms = tuple(float(p) for p in predicted_ms)
        if any(not (p > 0 and math.isfinite(p)) for p in self.predicted_ms):
            raise ValueError("predicted stage times must be finite and > 0")
        self.threshold = float(threshold)
        self.window_s = float(window_s)
        self.min_samples = int(min_samples)
        self._obs: list[deque[tuple[float, float]]] = [deque() for _ in self.predicted_ms]

    @classmethod
    def for_plan(cls, problem: Problem, stages: Sequence[Stage], **kw: float) -> DeviationMonitor:
        """A monitor whose predictions are the per-stage compute times of ``stages`` on ``problem``."""
        report = evaluate(problem, tuple(stages))
        return cls([max(s.compute_ms, 1e-9) for s in report.stages], **kw)  # type: ignore[arg-type]

    def observe(self, stage: int, measured_ms: float, now: float) -> None:
        """Record a measured time for ``stage`` at time ``now`` (seconds, any monotonic clock)."""
        if not (measured_ms >= 0 and math.isfinite(measured_ms)):
            return
        q = self._obs[stage]
        q.append((float(now), float(measured_ms) / self.predicted_ms[stage]))
        self._expire(q, now)

    def deviating(self, now: float) -> list[Deviation]:
        """Stages whose every ratio in the window is beyond ``1 +- threshold`` on the same side."""
        out: list[Deviation] = []
        for k, q in enumerate(self._obs):
            self._expire(q, now)
            if len(q) < self.min_samples:
                continue
            ratios = np.array([r for _, r in q])
            slow = bool(np.all(ratios > 1 + self.threshold))
            fast = bool(np.all(ratios < 1 - self.threshold))
            if slow or fast:
                out.append(Deviation(k, float(np.median(ratios)), len(q)))
        return out

    def reset(self, predicted_ms: Sequence[float] | None = None) -> None:
        """Forget every observation (after a re-plan), optionally with new predictions."""
        if predicted_ms is not None:
            self.predicted_ms = tuple(float(p) for p in predicted_ms)
        self._obs = [deque() for _ in self.predicted_ms]

    def _expire(self, q: deque[tuple[float, float]], now: float) -> None:
        while q and q[0][0] < now - self.window_s:
            q.popleft()


def rescale_problem(problem: Problem, device_index: int, factor: float) -> Problem:
    """``problem`` with device ``device_index``'s compute column multiplied by ``factor`` (> 0)."""
    if not (factor > 0 and math.isfinite(factor)):
        raise ValueError("factor must be finite and > 0")
    compute = np.array(problem.compute_ms, copy=True)
    compute[:, device_index] *= factor
    return _replace(problem, compute_ms=compute)


def device_factors(stages: Sequence[Stage], deviations: Iterable[Deviation]) -> dict[int, float]:
    """Per-device slowdown factors implied by stage deviations (a replicated stage: all its devices)."""
    factors: dict[int, float] = {}
    for dev in deviations:
        for d in stages[dev.stage].devices:
            factors[d] = dev.ratio
    return factors


def fine_tune(problem: Problem, current_stages: Sequence[Stage], deviations: Iterable[Deviation], *,
              margin: float = 0.05, time_limit_s: float = 0.2) -> PlanResult | None:
    """Refine the plan on the rescaled problem; the result only if its bottleneck beats the current one by ``margin``.

    The returned result is scored on the rescaled problem (reality as measured). None: keep the plan.
    """
    from fleetpipe.planner.heuristic import refine

    current = tuple(current_stages)
    view = problem
    for d, f in device_factors(current, deviations).items():
        view = rescale_problem(view, d, f)
    now = evaluate(view, current)
    result = refine(view, current, time_limit_s=time_limit_s)
    if not result.report.feasible:
        return None
    if now.feasible and not result.report.bottleneck_ms < now.bottleneck_ms * (1 - margin):
        return None
    return result
