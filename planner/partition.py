"""Exact bottleneck partitioning of a layer chain over a heterogeneous fleet.

:func:`solve` minimises the bottleneck (the largest stage compute or link transfer) over plans of
contiguous stages, one device per stage (or interchangeable replicas when the problem allows it),
any device order, devices may stay unused, per-link bandwidth matrix, memory limits, pins, bit
floors and an optional latency bound; among plans with the optimal bottleneck it minimises latency.

How it works (and why it is exact):

1. *Candidates.* The optimal bottleneck equals one of finitely many values: a stage compute sum
   (per device class and replica count) or a transfer time (per cut and link). They are sorted.
2. *Relaxed lower bound.* For a bound ``B``, a backward DP over (next layer, device) that ignores
   "each device at most once" decides reachability in ``O(L^2 U + L U^2)`` numpy time. Any plan
   feasible at ``B`` is feasible in the relaxation, so the smallest relaxed-feasible candidate is a
   proven lower bound. The same DP gives, per state, the relaxed minimum remaining latency.
3. *Exact feasibility at B.* A depth-first search over states (next layer, last device class,
   used devices) with: device equivalence classes (same compute column, memory, and links to every
   other device; interchangeable devices are taken in index order so the used set is canonical);
   only stage ends from which the relaxed DP can still finish; a capacity bound (the unused
   devices, each covering one segment of compute <= B, must be able to cover the remaining layers,
   counted both in layers and in fastest-device work); memoisation of failed states, and
   dominance: a state that has used a superset of a failed state's devices fails too. Furthest
   reach is tried first, so feasible bounds are confirmed quickly.
   Per bound, devices are grouped by the cuts at which their links fit in B (links no cut can use
   never break symmetry), and a Lagrangian bound (device weights tuned by subgradient steps on the
   relaxed DP, starting from the capacities) prunes states and orders choices (see ``_search``).
4. *Binary search* over the candidates between the lower bound and the heuristic's upper bound.
   A check that runs out of time is "unknown": the search moves on but the lower bound only rises
   on proofs, so the reported ``gap = (bottleneck - lower_bound) / lower_bound`` is always proven.
5. *Tie-break.* At the optimal bottleneck a branch-and-bound DP with memo (budgeted values) finds
   the minimum-latency plan, bounded below by the relaxed latency DP. The same search decides
   feasibility when the problem has a latency bound.

The result is ``exact=True`` only when the bottleneck is proven optimal (``gap == 0``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from fleetpipe.errors import InfeasiblePlan, PlanningError
from fleetpipe.planner._model import _UNKNOWN, _ctypes, _diagnose, _Model, _symmetric_classes, _Timeout
from fleetpipe.planner.cost import PlanReport, Stage, evaluate
from fleetpipe.planner.problem import Problem

__all__ = ["PlanResult", "device_classes", "fewer_stages", "lower_bound", "solve"]



@dataclass(frozen=True, slots=True)
class PlanResult:
    """A plan, its score and how good it is known to be."""

    stages: tuple[Stage, ...]
    report: PlanReport
    solve_s: float
    lower_bound_ms: float | None   # proven lower bound on the optimal bottleneck (None: not computed)
    gap: float | None              # (bottleneck - lower_bound) / lower_bound, proven
    exact: bool                    # the bottleneck is proven optimal
    method: str = "exact"
    latency_optimal: bool = False  # latency is minimal among plans with this bottleneck
    notes: str = ""

    @property
    def bottleneck_ms(self) -> float:
        return self.report.bottleneck_ms

    @property
    def latency_ms(self) -> float:
        return self.report.latency_ms


def solve(problem: Problem, *, time_limit_s: float = 8.0, max_replicas: int | None = None) -> PlanResult:
    """Find a plan with the minimum bottleneck (ties: minimum latency).

    Returns the optimum with ``exact=True``, or, when ``time_limit_s`` runs out, the best plan found
    with a proven ``lower_bound_ms`` and ``gap``. Raises :class:`InfeasiblePlan` (saying what is
    short) when no plan satisfies memory, pins and the latency bound.
    """
    t0 = time.perf_counter()
    deadline = t0 + max(time_limit_s, 0.01)
    model = _Model(problem, max_replicas)
    cands = model.candidates()
    if cands.size == 0:
        raise InfeasiblePlan(_diagnose(problem))
    # Upper bound from the fast heuristic (it is only a starting point).
    from fleetpipe.planner import heuristic  # here: heuristic imports this module

    best_stages: tuple[Stage, ...] | None = None
    best_b = math.inf
    try:
        start = heuristic.refine(problem, None, time_limit_s=min(0.5, time_limit_s / 10))
        if start.report.feasible and model.covers(start.stages):
            best_stages, best_b = start.stages, start.report.bottleneck_ms
    except InfeasiblePlan:
        pass
    # Proven lower bound: smallest candidate feasible in the relaxation.
    lo = _first_true(cands, lambda b: model.at(b).relaxed_feasible(), 0, cands.size - 1)
    if lo is None:
        raise InfeasiblePlan(_diagnose(problem))
    proven_lb = float(cands[lo])
    hi = cands.size - 1
    if best_stages is not None:
        hi = int(np.searchsorted(cands, best_b * (1 + 1e-12), "right")) - 1
    hi = max(min(hi, cands.size - 1), lo)
    unknown = False
    if best_stages is None or hi >= cands.size - 1:
        found = _check(model, float(cands[-1]), deadline)
        if found is None:
            raise InfeasiblePlan(_diagnose(problem))
        if found is not _UNKNOWN:
            best_stages, best_b = found, _bottleneck(problem, found)
            hi = cands.size - 1
        elif best_stages is None:
            raise PlanningError(f"no plan found within {time_limit_s} s")
    while lo < hi:
        mid = (lo + hi) // 2
        steps_left = max(1.0, math.log2(hi - lo + 1))
        budget = (deadline - time.perf_counter()) / steps_left
        found = _check(model, float(cands[mid]), time.perf_counter() + max(budget, 0.0))
        if found is _UNKNOWN:
            unknown = True
            lo = mid + 1  # keep searching upward for a plan; the proven bound does not move
        elif found is None:
            lo = mid + 1
            proven_lb = max(proven_lb, float(cands[lo]))
        else:
            best_stages, best_b = found, _bottleneck(problem, found)
            hi = int(np.searchsorted(cands, best_b * (1 + 1e-12), "right")) - 1
            hi = max(min(hi, mid), lo)
    assert best_stages is not None
    b_star = float(cands[hi]) if not unknown else best_b
    exact = not unknown or proven_lb >= best_b * (1 - 1e-9)
    latency_optimal = False
    remaining = deadline - time.perf_counter()
    if remaining > 0:
        level = model.at(max(b_star, best_b))
        polished = heuristic.refine(problem, best_stages, time_limit_s=min(0.1, remaining / 4),
                                    target_ms=max(b_star, best_b))
        if (polished.report.feasible and polished.report.bottleneck_ms <= best_b * (1 + 1e-12)
                and model.covers(polished.stages)):
            best_stages = polished.stages
        cur_lat = evaluate(problem, best_stages).latency_ms
        # The tie-break is secondary: it gets a tenth of the bottleneck search's time (plus
        # 50 ms); when it runs out, the plan keeps the polished latency and latency_optimal=False.
        spend = min(deadline - time.perf_counter(), 0.05 + 0.1 * (time.perf_counter() - t0))
        try:
            better = level.min_latency(cur_lat * (1 + 1e-9) + 1e-9, time.perf_counter() + spend)
            latency_optimal = True
            if better is not None and evaluate(problem, better).latency_ms < cur_lat - 1e-9:
                best_stages = better
        except _Timeout:
            pass
    report = evaluate(problem, best_stages)
    notes = "" if exact else "time limit reached; gap is proven"
    fewer = fewer_stages(problem, report)
    if fewer is not None:  # the broker or the window make fewer hops pay (fleetpipe#23 item 4)
        notes = (f"{len(fewer.stages)} stage(s) instead of {len(report.stages)}: period {fewer.period_ms:.3g} ms "
                 f"against {report.period_ms:.3g} ms (the broker and the client's window count every hop)")
        report, best_stages, exact, latency_optimal = fewer, fewer.plan, False, False
    lb = min(proven_lb, report.bottleneck_ms)
    gap = 0.0 if exact else (report.bottleneck_ms - lb) / lb if lb > 0 else math.inf
    return PlanResult(best_stages, report, time.perf_counter() - t0, lb, gap, exact,
                      "exact", latency_optimal, notes)


def fewer_stages(problem: Problem, report: PlanReport) -> PlanReport | None:
    """A plan of fewer stages whose full period (broker, window, every message cost included) beats
    ``report``'s, or None: the best single device, and the plan's stages merged pair by pair (each merge onto
    the faster of the two devices that holds the pair, the best merge first), down to one stage."""
    best = report
    cur = report
    while len(cur.stages) > 1:
        stages = list(cur.plan)
        options = []
        for k in range(len(stages) - 1):
            a, b = stages[k], stages[k + 1]
            for devs in (a.devices, b.devices):
                merged = Stage(devs, a.first, b.last, b.bits)
                trial = evaluate(problem, [*stages[:k], merged, *stages[k + 2:]])
                if trial.feasible:
                    options.append(trial)
        if not options:
            break
        cur = min(options, key=lambda r: (r.period_ms, r.latency_ms))
        if cur.period_ms < best.period_ms * (1 - 1e-9):
            best = cur
    for d in range(problem.n_devices):
        single = evaluate(problem, (Stage((d,), 0, problem.n_layers - 1),))
        if single.feasible and single.period_ms < best.period_ms * (1 - 1e-9):
            best = single
    return None if best is report else best


def lower_bound(problem: Problem) -> float:
    """A cheap proven lower bound on the optimal bottleneck (the relaxation of :func:`solve`)."""
    model = _Model(problem, None)
    cands = model.candidates()
    lo = None
    if cands.size:
        lo = _first_true(cands, lambda b: model.at(b).relaxed_feasible(), 0, cands.size - 1)
    if lo is None:
        raise InfeasiblePlan(_diagnose(problem))
    return float(cands[lo])


def device_classes(problem: Problem) -> list[list[int]]:
    """Groups of interchangeable devices: same compute column and memory, same link to every other
    device, the same bandwidth between each other both ways, and not pinned."""
    return _symmetric_classes(_ctypes(problem), problem.bw_mbps, {p.device for p in problem.pins})


# ---------------------------------------------------------------------------------------------
# private helpers


def _bottleneck(problem: Problem, stages: tuple[Stage, ...]) -> float:
    return evaluate(problem, stages).bottleneck_ms


def _first_true(cands: np.ndarray, pred, lo: int, hi: int) -> int | None:  # type: ignore[no-untyped-def]
    """Smallest index in [lo, hi] where the monotone ``pred`` holds, or None."""
    if lo > hi or not pred(float(cands[hi])):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(float(cands[mid])):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _check(model: _Model, b: float, deadline: float) -> tuple[Stage, ...] | object | None:
    """A plan with bottleneck <= b, None if there is none (proven), or _UNKNOWN on timeout."""
    level = model.at(b)
    if not level.relaxed_feasible():
        return None
    try:
        if model.problem.latency_bound_ms:
            return level.min_latency(model.problem.latency_bound_ms * (1 + 1e-12) + 1e-9, deadline)
        return level.feasible_plan(deadline)
    except _Timeout:
        return _UNKNOWN
