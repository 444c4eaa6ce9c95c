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
from fleetpipe.planner.cost import PlanReport, Stage, evaluate
from fleetpipe.planner.problem import Problem

__all__ = ["PlanResult", "device_classes", "lower_bound", "solve"]

_REL = 1e-9
_TIE = 1e-10
_DOMINANCE_CAP = 48  # failed used-sets kept per (layer, last device) for superset pruning


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
        # The tie-break gets about as long as the bottleneck search took (at least 0.2 s).
        spend = min(deadline - time.perf_counter(), max(0.2, time.perf_counter() - t0))
        try:
            better = level.min_latency(cur_lat * (1 + 1e-9) + 1e-9, time.perf_counter() + spend)
            latency_optimal = True
            if better is not None and evaluate(problem, better).latency_ms < cur_lat - 1e-9:
                best_stages = better
        except _Timeout:
            pass
    report = evaluate(problem, best_stages)
    lb = min(proven_lb, report.bottleneck_ms)
    gap = 0.0 if exact else (report.bottleneck_ms - lb) / lb if lb > 0 else math.inf
    return PlanResult(best_stages, report, time.perf_counter() - t0, lb, gap, exact,
                      "exact", latency_optimal, "" if exact else "time limit reached; gap is proven")


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
    pinned = {p.device for p in problem.pins}
    bw = problem.bw_mbps
    classes: list[list[int]] = []
    for d in range(problem.n_devices):
        home = None
        if d not in pinned:
            for cls in classes:
                if _joins(problem, cls, d, pinned):
                    home = cls
                    break
        if home is None:
            classes.append([d])
        else:
            home.append(d)
    out: list[list[int]] = []
    for cls in classes:  # verify the full symmetry condition; split anything doubtful
        if len(cls) > 1 and not _symmetric(bw, cls):
            out.extend([d] for d in cls)
        else:
            out.append(cls)
    return out


# ---------------------------------------------------------------------------------------------
# private helpers


class _Timeout(Exception):
    pass


_UNKNOWN = object()


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


def _joins(problem: Problem, cls: list[int], d: int, pinned: set[int]) -> bool:
    r = cls[0]
    if r in pinned or problem.mem_bytes[r] != problem.mem_bytes[d]:
        return False
    if not np.array_equal(problem.compute_ms[:, r], problem.compute_ms[:, d]):
        return False
    bw = problem.bw_mbps
    others = np.ones(problem.n_devices, dtype=bool)
    others[cls] = False
    others[d] = False
    if not (np.array_equal(bw[d, others], bw[r, others]) and np.array_equal(bw[others, d], bw[others, r])):
        return False
    const = bw[cls[0], cls[1]] if len(cls) > 1 else bw[r, d]
    return all(bw[m, d] == const and bw[d, m] == const for m in cls)


def _symmetric(bw: np.ndarray, cls: list[int]) -> bool:
    n = bw.shape[0]
    others = np.ones(n, dtype=bool)
    others[cls] = False
    r = cls[0]
    const = bw[cls[0], cls[1]]
    for m in cls:
        same_row = np.array_equal(bw[m, others], bw[r, others])
        if not (same_row and np.array_equal(bw[others, m], bw[others, r])):
            return False
        if any(bw[m, x] != const for x in cls if x != m):
            return False
    return True


def _diagnose(problem: Problem) -> str:
    """Say what is short when no plan exists."""
    need_one = [problem.stage_mem_bytes(i, i) for i in range(problem.n_layers)]
    biggest = float(problem.mem_bytes.max())
    for i, need in enumerate(need_one):
        if need >= biggest:
            return (f"layer {i + 1} ({problem.layer_names[i]!r}) needs {need / 1e6:.1f} MB (weights and "
                    f"buffers) but the largest device has {biggest / 1e6:.1f} MB")
    weights = float(problem.param_bytes.sum())
    total = float(problem.mem_bytes.sum())
    if weights >= total:
        return (f"the model needs {weights / 1e6:.1f} MB of weights but the fleet has {total / 1e6:.1f} MB "
                f"of memory in total: {(weights - total) / 1e6:.1f} MB short")
    parts = [f"no split of the {problem.n_layers} layers into contiguous stages fits the devices' memory "
             f"(weights {weights / 1e6:.1f} MB, fleet memory {total / 1e6:.1f} MB, "
             "activation buffers included)"]
    if problem.pins:
        parts.append("with the pinned stages")
    if problem.latency_bound_ms:
        parts.append(f"within the latency bound of {problem.latency_bound_ms:.2f} ms")
    return " ".join(parts)


class _Model:
    """Everything about a problem that does not depend on the bound B."""

    def __init__(self, problem: Problem, max_replicas: int | None) -> None:
        self.problem = problem
        n_l, n_d = problem.n_layers, problem.n_devices
        self.L = n_l
        classes = device_classes(problem)
        self.classes = classes
        self.class_size = np.array([len(c) for c in classes], dtype=np.int64)
        pinned = {p.device for p in problem.pins}
        units: list[tuple[int, int]] = []
        for c, members in enumerate(classes):
            kmax = 1
            if problem.allow_replication and members[0] not in pinned:
                kmax = len(members) if max_replicas is None else max(1, min(len(members), max_replicas))
            units.extend((c, k) for k in range(1, kmax + 1))
        self.units = units
        n_u = len(units)
        reps = [classes[c][0] for c, _ in units]
        ks = np.array([k for _, k in units], dtype=np.float64)
        # compute sums per unit: s_lat[u, j, e] = compute of layers j..e on one device of the class
        cum = np.vstack([np.zeros(n_d), np.cumsum(problem.compute_ms, axis=0)])  # [L+1, D]
        rep_cum = cum[:, reps].T  # [U, L+1]
        tri = np.triu(np.ones((n_l, n_l), dtype=bool))
        s_lat = rep_cum[:, None, 1:] - rep_cum[:, :-1, None]  # [U, j, e]
        s_lat = np.where(tri[None], s_lat, np.inf)
        self.s_lat = s_lat
        self.s_bn = s_lat / ks[:, None, None]
        # memory, pins
        pcum = np.concatenate([[0.0], np.cumsum(problem.param_bytes)])
        in_b = np.array([problem.in_bytes(j) for j in range(n_l)])
        buf_in = np.where(np.arange(n_l) > 0, 1 + problem.buffers_in, 1)
        need = (pcum[None, 1:] - pcum[:-1, None]) + (in_b * buf_in)[:, None] + \
            (problem.out_bytes * (1 + problem.buffers_out))[None, :]
        mem = problem.mem_bytes[reps]
        static = tri[None] & (need[None] < mem[:, None, None])
        jj = np.arange(n_l)[:, None]
        ee = np.arange(n_l)[None, :]
        for u, rep in enumerate(reps):
            own = [p for p in problem.pins if p.device == rep]
            for p in problem.pins:
                if p.device != rep:
                    static[u] &= (ee < p.first) | (jj > p.last)
            if own:
                static[u] &= (jj <= min(p.first for p in own)) & (ee >= max(p.last for p in own))
        self.static = static
        # transfers at each cut e between units (bits at the floor of the cut)
        cut_bytes = np.array([problem.cut_bytes(e, problem.cut_bits(e)) for e in range(n_l)])
        link = np.empty((n_u, n_u))
        for a, (ca, ka) in enumerate(units):
            for b, (cb, kb) in enumerate(units):
                if ca == cb:
                    if len(classes[ca]) < ka + kb:
                        link[a, b] = 0.0
                    else:
                        m = classes[ca]
                        link[a, b] = problem.bw_mbps[m[0], m[1]]
                else:
                    link[a, b] = problem.bw_mbps[classes[ca][0], classes[cb][0]]
        with np.errstate(divide="ignore"):
            per_byte = np.where(link > 0, 8.0 / (link * 1000.0), np.inf)  # ms per byte
        self.t_lat = cut_bytes[:, None, None] * per_byte[None]  # [L, U, U]
        self.t_bn = self.t_lat / (ks[:, None] * ks[None, :])[None]
        self.unit_class = np.array([c for c, _ in units], dtype=np.int64)
        self.unit_k = np.array([k for _, k in units], dtype=np.int64)
        self.fastest = problem.compute_ms.min(axis=1)
        self._levels: dict[float, _Level] = {}

    def covers(self, stages: tuple[Stage, ...]) -> bool:
        """Whether the search space includes ``stages`` (replicas: one class, within the cap)."""
        cls_of = {d: c for c, members in enumerate(self.classes) for d in members}
        for s in stages:
            if len(s.devices) > 1:
                c = cls_of[s.devices[0]]
                if any(cls_of[d] != c for d in s.devices) or (c, len(s.devices)) not in self.units:
                    return False
        return True

    def candidates(self) -> np.ndarray:
        comp = self.s_bn[self.static]
        tr = self.t_bn[:-1][np.isfinite(self.t_bn[:-1])]
        vals = np.unique(np.concatenate([comp, tr, [0.0]]))
        keep = np.ones(vals.size, dtype=bool)  # merge values equal up to rounding
        keep[1:] = vals[1:] > vals[:-1] * (1 + _TIE)
        return vals[keep]

    def at(self, b: float) -> _Level:
        level = self._levels.get(b)
        if level is None:
            if len(self._levels) > 64:
                self._levels.clear()
            level = self._levels[b] = _Level(self, b)
        return level


class _Level:
    """The model at one bound B: relaxed DP tables and the exact searches."""

    def __init__(self, model: _Model, b: float) -> None:
        self.m = model
        self.b = b
        n_l, n_u = model.L, len(model.units)
        tol = b * (1 + _TIE)  # values within _TIE (relative) of each other count as equal
        self.seg_ok = model.static & (model.s_bn <= tol)
        self.t_ok = model.t_bn <= tol
        inf = np.inf
        minlat = np.full((n_l + 1, n_u), inf)      # relaxed min latency of a stage starting at j on u
        next_cost = np.full((n_l, n_u), inf)       # relaxed min latency after a stage ending at e on u
        next_cost[n_l - 1] = 0.0
        for j in range(n_l - 1, -1, -1):
            if j < n_l - 1:
                cost = np.where(self.t_ok[j], model.t_lat[j] + minlat[j + 1][None, :], inf)
                next_cost[j] = cost.min(axis=1)
            seg = np.where(self.seg_ok[:, j, j:], model.s_lat[:, j, j:] + next_cost[j:].T, inf)
            minlat[j] = seg.min(axis=1)
        self.minlat = minlat
        self.next_cost = next_cost
        self.good_end = np.isfinite(next_cost)
        self._ends: dict[tuple[int, int], list[int]] = {}
        self._caps = self._capacities()

    def relaxed_feasible(self) -> bool:
        if not np.isfinite(self.minlat[0]).any():
            return False
        return self._capacity_ok(0, self.m.class_size)

    # -- capacity bound -------------------------------------------------------------------------

    def _capacities(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per reference work vector r: (cap[c, j] per device of class c, remaining r from j)."""
        m = self.m
        p = m.problem
        n_l = m.L
        out = []
        b = self.b * (1 + _REL) + _REL
        for r in (np.ones(n_l), m.fastest):
            rc = np.concatenate([[0.0], np.cumsum(r)])
            cap = np.zeros((len(m.classes), n_l + 1))
            for c, members in enumerate(m.classes):
                col = np.concatenate([[0.0], np.cumsum(p.compute_ms[:, members[0]])])
                kmax = int(m.unit_k[m.unit_class == c].max())
                best = np.zeros(n_l)
                for k in range(1, kmax + 1):
                    end = np.searchsorted(col, col[:-1] + k * b, side="right") - 1
                    best = np.maximum(best, (rc[end] - rc[:-1]) / k)
                cap[c, :n_l] = np.maximum.accumulate(best[::-1])[::-1]
            need = rc[-1] - rc
            out.append((cap, need))
        return out

    def _capacity_ok(self, j: int, avail: np.ndarray) -> bool:
        return all(float(avail @ cap[:, j]) >= need[j] * (1 - _REL) - _REL for cap, need in self._caps)

    # -- exact searches ---------------------------------------------------------------------------

    def _ends_of(self, u: int, j: int) -> list[int]:
        key = (u, j)
        ends = self._ends.get(key)
        if ends is None:
            ok = self.seg_ok[u, j, j:] & self.good_end[j:, u]
            ends = [int(e) + j for e in np.nonzero(ok)[0][::-1]]
            self._ends[key] = ends
        return ends

    def feasible_plan(self, deadline: float) -> tuple[Stage, ...] | None:
        """A plan with bottleneck <= B, or None (proven); raises _Timeout."""
        m = self.m
        n_l = m.L
        n_u = len(m.units)
        failed: set[tuple[int, int, int]] = set()
        by_place: dict[tuple[int, int], list[int]] = {}
        used = np.zeros(len(m.classes), dtype=np.int64)
        path: list[tuple[int, int, int]] = []  # (unit, first, last)
        counter = [0]
        # units ordered by reach at each start layer (furthest first)
        order_cache: dict[int, list[int]] = {}

        def order(j: int) -> list[int]:
            o = order_cache.get(j)
            if o is None:
                reach = [max(self._ends_of(u, j), default=-1) for u in range(n_u)]
                o = [u for u in sorted(range(n_u), key=lambda u: (-reach[u], u)) if reach[u] >= 0]
                order_cache[j] = o
            return o

        def fail(key: tuple[int, int, int]) -> bool:
            failed.add(key)
            lst = by_place.setdefault(key[:2], [])
            if len(lst) < _DOMINANCE_CAP:
                lst.append(key[2])
            return False

        def dfs(j: int, prev: int, mask: int) -> bool:
            key = (j, prev, mask)
            if key in failed:
                return False
            # a state that has used a superset of a failed state's devices fails as well
            for f in by_place.get((j, prev), ()):
                if f & mask == f:
                    return False
            counter[0] += 1
            if counter[0] & 1023 == 0 and time.perf_counter() > deadline:
                raise _Timeout
            if not self._capacity_ok(j, m.class_size - used):
                return fail(key)
            for u in order(j):
                c = m.unit_class[u]
                k = m.unit_k[u]
                if used[c] + k > m.class_size[c]:
                    continue
                if prev >= 0 and not self.t_ok[j - 1, prev, u]:
                    continue
                bits = 0
                for idx in range(used[c], used[c] + k):
                    bits |= 1 << m.classes[c][idx]
                for e in self._ends_of(u, j):
                    path.append((u, j, e))
                    if e == n_l - 1:
                        return True
                    used[c] += k
                    ok = dfs(e + 1, u, mask | bits)
                    used[c] -= k
                    if ok:
                        return True
                    path.pop()
            return fail(key)

        if dfs(0, -1, 0):
            return self._stages(path)
        return None

    def min_latency(self, budget: float, deadline: float) -> tuple[Stage, ...] | None:
        """The minimum-latency plan with bottleneck <= B and latency < budget, or None; raises _Timeout."""
        m = self.m
        n_l = m.L
        n_u = len(m.units)
        inf = math.inf
        # relaxed lower bound of the remaining latency from (j, prev)
        state_lb = np.full((n_l + 1, n_u + 1), inf)
        for j in range(1, n_l):
            arrive = m.t_lat[j - 1] + self.minlat[j][None, :]
            state_lb[j, :n_u] = np.where(self.t_ok[j - 1], arrive, inf).min(axis=1)
        state_lb[0, n_u] = self.minlat[0].min()
        memo: dict[tuple[int, int, int], tuple[float, bool, tuple[int, int] | None]] = {}
        used = np.zeros(len(m.classes), dtype=np.int64)
        counter = [0]

        def best_from(j: int, prev: int, mask: int, bud: float) -> tuple[float, bool]:
            """(min remaining latency, True) if it is < bud, else (a lower bound >= bud, False)."""
            key = (j, prev, mask)
            hit = memo.get(key)
            if hit is not None and (hit[1] or hit[0] >= bud):
                return hit[0], hit[1] and hit[0] < bud
            counter[0] += 1
            if counter[0] & 1023 == 0 and time.perf_counter() > deadline:
                raise _Timeout
            lb = state_lb[j, prev if prev >= 0 else n_u]
            if not math.isfinite(lb) or not self._capacity_ok(j, m.class_size - used):
                memo[key] = (inf, True, None)
                return inf, False
            if lb >= bud:
                memo[key] = (lb, False, None)
                return lb, False
            options = []
            for u in range(n_u):
                c = m.unit_class[u]
                k = m.unit_k[u]
                if used[c] + k > m.class_size[c]:
                    continue
                tl = 0.0
                if prev >= 0:
                    if not self.t_ok[j - 1, prev, u]:
                        continue
                    tl = float(m.t_lat[j - 1, prev, u])
                nc = self.next_cost[:, u]
                srow = m.s_lat[u, j]
                for e in self._ends_of(u, j):
                    step = tl + float(srow[e])
                    options.append((step + float(nc[e]), step, u, e))
            options.sort()
            best = inf
            choice = None
            for lb_opt, step, u, e in options:
                limit = min(bud, best)
                if lb_opt >= limit:
                    break
                if e == n_l - 1:
                    cand = step
                else:
                    c = m.unit_class[u]
                    k = m.unit_k[u]
                    bits = 0
                    for idx in range(used[c], used[c] + k):
                        bits |= 1 << m.classes[c][idx]
                    used[c] += k
                    rest, exact = best_from(e + 1, u, mask | bits, limit - step)
                    used[c] -= k
                    if not exact:
                        continue
                    cand = step + rest
                if cand < best:
                    best, choice = cand, (u, e)
            if best < bud:
                memo[key] = (best, True, choice)
                return best, True
            memo[key] = (bud, False, None)
            return bud, False

        _, exact = best_from(0, -1, 0, budget)
        if not exact:
            return None
        path: list[tuple[int, int, int]] = []
        j, prev, mask = 0, -1, 0
        used[:] = 0
        while j < n_l:
            _, _, choice = memo[(j, prev, mask)]
            assert choice is not None
            u, e = choice
            c = m.unit_class[u]
            for idx in range(used[c], used[c] + m.unit_k[u]):
                mask |= 1 << m.classes[c][idx]
            used[c] += m.unit_k[u]
            path.append((u, j, e))
            j, prev = e + 1, u
        return self._stages(path)

    def _stages(self, path: list[tuple[int, int, int]]) -> tuple[Stage, ...]:
        m = self.m
        p = m.problem
        used = np.zeros(len(m.classes), dtype=np.int64)
        out = []
        for u, first, last in path:
            c = int(m.unit_class[u])
            k = int(m.unit_k[u])
            devs = tuple(m.classes[c][used[c] : used[c] + k])
            used[c] += k
            out.append(Stage(devs, first, last, p.cut_bits(last)))
        return tuple(out)
