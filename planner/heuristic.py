"""Fast re-planning (ScalPipe's resource-adaptive heuristic): local search from a current plan.

:func:`refine` starts from a plan (or a greedy one) and repeatedly applies the best improving move
that touches the bottleneck: shift a stage boundary by a few layers, move a stage to an unused
device, swap the devices of two stages, split the bottleneck stage onto an unused device, merge two
light neighbours to free a device, add or drop a replica. Plans are compared by (constraint
violation, bottleneck, number of stages at the bottleneck, latency). It runs in milliseconds on
fleets of a few devices and stays within a few percent of :func:`fleetpipe.planner.partition.solve`.

:func:`replan_without` drops failed devices from a running plan: replicas lose the dead member,
a stage whose only device died moves to the best unused device (or merges into a neighbour), then
:func:`refine` polishes the result. Device indices stay those of the original problem.

The returned report always comes from :func:`fleetpipe.planner.cost.evaluate`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence

import numpy as np

from fleetpipe.errors import InfeasiblePlan
from fleetpipe.planner._model import _diagnose
from fleetpipe.planner.cost import Stage, evaluate
from fleetpipe.planner.partition import PlanResult
from fleetpipe.planner.problem import Problem

__all__ = ["greedy_plan", "refine", "replan_without"]

_Plan = list[tuple[tuple[int, ...], int, int]]  # (devices, first, last)


def refine(problem: Problem, stages: Sequence[Stage] | None, *, time_limit_s: float = 0.2,
           exclude: Iterable[int] = (), max_iters: int = 10_000,
           target_ms: float | None = None) -> PlanResult:
    """Improve ``stages`` (or a greedy plan when None) by local search; never uses ``exclude``.

    With ``target_ms``, any bottleneck up to ``target_ms`` counts as equally good, so the search
    lowers latency without letting the bottleneck exceed the target (used to polish exact plans).
    """
    t0 = time.perf_counter()
    ctx = _Ctx(problem, frozenset(exclude), target_ms)
    deadline = t0 + time_limit_s
    plan = (ctx.greedy(t0 + 0.6 * time_limit_s) if stages is None
            else [(tuple(s.devices), s.first, s.last) for s in stages])
    key = ctx.score(plan)
    for _ in range(max_iters):
        if time.perf_counter() > deadline:
            break
        best_key, best_plan = key, None
        for n, cand in enumerate(ctx.neighbours(plan)):
            k = ctx.score(cand)
            if k < best_key:
                best_key, best_plan = k, cand
            if n & 63 == 63 and time.perf_counter() > deadline:
                break
        if best_plan is None:
            break
        plan, key = best_plan, best_key
    result = tuple(Stage(d, f, la, problem.cut_bits(la)) for d, f, la in plan)
    report = evaluate(problem, result)
    return PlanResult(result, report, time.perf_counter() - t0, None, None, False, "heuristic")


def greedy_plan(problem: Problem, *, exclude: Iterable[int] = ()) -> tuple[Stage, ...]:
    """The greedy furthest-reach plan under the smallest bottleneck it can reach (bisection)."""
    ctx = _Ctx(problem, frozenset(exclude))
    return tuple(Stage(d, f, la, problem.cut_bits(la)) for d, f, la in ctx.greedy())


def replan_without(problem: Problem, stages: Sequence[Stage], dead_devices: Iterable[int], *,
                   time_limit_s: float = 0.2) -> PlanResult:
    """Re-plan after ``dead_devices`` failed: repair ``stages`` then :func:`refine` them."""
    dead = frozenset(dead_devices)
    ctx = _Ctx(problem, dead)
    plan: _Plan = []
    in_use = {d for s in stages for d in s.devices if d not in dead}
    for s in stages:
        live = tuple(d for d in s.devices if d not in dead)
        if not live:
            spare = [d for d in ctx.live if d not in in_use and ctx.fits(d, s.first, s.last)]
            if spare:
                d = min(spare, key=lambda d: ctx.cum[s.last + 1, d] - ctx.cum[s.first, d])
                live = (d,)
                in_use.add(d)
        plan.append((live, s.first, s.last))
    merged: _Plan = []
    for devs, f, la in plan:  # stages left without a device merge into a neighbour
        if devs:
            if merged and not merged[-1][0]:
                merged[-1] = (devs, merged[-1][1], la)
            else:
                merged.append((devs, f, la))
        elif merged:
            merged[-1] = (merged[-1][0], merged[-1][1], la)
        else:
            merged.append(((), f, la))
    if not merged or not merged[0][0]:
        if len(merged) < 2:
            return refine(problem, None, time_limit_s=time_limit_s, exclude=dead)
        merged[1] = (merged[1][0], merged[0][1], merged[1][2])
        merged.pop(0)
    repaired = [Stage(d, f, la, problem.cut_bits(la)) for d, f, la in merged]
    return refine(problem, repaired, time_limit_s=time_limit_s, exclude=dead)


class _Ctx:
    def __init__(self, problem: Problem, exclude: frozenset[int], target_ms: float | None = None) -> None:
        self.p = problem
        self.target = target_ms
        self.live = [d for d in range(problem.n_devices) if d not in exclude]
        if not self.live:
            raise InfeasiblePlan("every device is excluded")
        self.cum = np.vstack([np.zeros(problem.n_devices), np.cumsum(problem.compute_ms, axis=0)])
        self.pcum = np.concatenate([[0.0], np.cumsum(problem.param_bytes)])
        self.cut = [problem.cut_bytes(e, problem.cut_bits(e)) * 8.0 / 1000.0 for e in range(problem.n_layers)]
        bw = problem.bw_mbps
        with np.errstate(divide="ignore"):
            self.inv_bw = np.where(bw > 0, 1.0 / np.where(bw > 0, bw, 1.0), math.inf)  # 1 / (Mbit/s)
        self.inv = self.inv_bw.tolist()
        self.cuml = self.cum.tolist()
        self.pins = {p.device: p for p in problem.pins}
        self.cut_arr = np.array(self.cut)
        n_l = problem.n_layers
        in_b = np.array([problem.in_bytes(j) for j in range(n_l)])
        buf_in = np.where(np.arange(n_l) > 0, 1 + problem.buffers_in, 1)
        self.need_m = ((self.pcum[None, 1:] - self.pcum[:-1, None]) + (in_b * buf_in)[:, None]
                       + (problem.out_bytes * (1 + problem.buffers_out))[None, :])  # [first, last]

    def need(self, first: int, last: int) -> float:
        p = self.p
        buf_in = 1 + (p.buffers_in if first > 0 else 0)
        return (self.pcum[last + 1] - self.pcum[first] + p.in_bytes(first) * buf_in
                + float(p.out_bytes[last]) * (1 + p.buffers_out))

    def fits(self, d: int, first: int, last: int) -> bool:
        return self.need(first, last) < self.p.mem_bytes[d]

    # -- scoring (mirrors cost.evaluate; used only to guide the search) --------------------------

    def score(self, plan: _Plan) -> tuple[float, float, int, float]:
        cuml = self.cuml
        viol = 0.0
        times: list[float] = []
        latency = 0.0
        prev_w: list[float] = []
        prev_devs: tuple[int, ...] = ()
        p = self.p
        msgs = p.hop_ms is not None or p.byte_ms is not None
        for idx, (devs, f, la) in enumerate(plan):
            comps = [cuml[la + 1][d] - cuml[f][d] for d in devs]
            if msgs:
                b_in = p.cut_bits(f - 1) if f > 0 else 32
                comps = [c + p.message_ms(d, f, la, b_in, p.cut_bits(la)) for c, d in zip(comps, devs, strict=True)]
            if len(devs) == 1:
                comp = comps[0]
                w = [1.0]
            elif all(c > 0 for c in comps):
                inv = [1.0 / c for c in comps]
                s = sum(inv)
                comp = 1.0 / s
                w = [x / s for x in inv]
            else:
                comp, w = 0.0, [1.0 / len(devs)] * len(devs)
            latency += sum(wi * c for wi, c in zip(w, comps, strict=True))
            times.append(comp)
            if idx > 0:
                nbits = self.cut[plan[idx - 1][2]]
                tr = 0.0
                for a, wa in zip(prev_devs, prev_w, strict=True):
                    for b, wb in zip(devs, w, strict=True):
                        inv = self.inv[a][b]
                        t = nbits * inv if inv != math.inf else math.inf
                        tr = max(tr, wa * wb * t)
                        latency += wa * wb * t
                times.append(tr)
            if p.client_mbps is not None and (idx == 0 or idx == len(plan) - 1):
                ends = ([p.input_bytes] if idx == 0 else []) + (
                    [float(p.out_bytes[-1])] if idx == len(plan) - 1 else [])
                for nbytes in ends:
                    t = [p.client_ms(d, nbytes) for d in devs]
                    times.append(max(wi * ti for wi, ti in zip(w, t, strict=True)))
                    latency += sum(wi * ti for wi, ti in zip(w, t, strict=True))
            need = self.need(f, la)
            for d in devs:
                over = need - self.p.mem_bytes[d]
                if over >= 0:
                    viol += 1.0 + over / 1e6
            prev_w, prev_devs = w, devs
        for d, pin in self.pins.items():
            if not any(devs == (d,) and f <= pin.first and pin.last <= la for devs, f, la in plan):
                viol += 1e6
        bound = self.p.latency_bound_ms
        if bound is not None and latency > bound:
            viol += latency - bound
        bn = max(times)
        if self.target is not None:
            return (viol, max(bn, self.target), 0, latency)
        n_at = sum(1 for t in times if t >= bn * (1 - 1e-12))
        return (viol, bn, n_at, latency)

    # -- moves -----------------------------------------------------------------------------------

    def neighbours(self, plan: _Plan) -> Iterable[_Plan]:
        p = self.p
        n = len(plan)
        cuml = self.cuml
        times = []
        for idx, (devs, f, la) in enumerate(plan):
            comp = min(cuml[la + 1][d] - cuml[f][d] for d in devs) / len(devs)
            times.append((comp, idx))
            if idx + 1 < n:
                inv = self.inv[devs[0]][plan[idx + 1][0][0]]
                times.append((self.cut[la] * inv if inv != math.inf else math.inf, idx + 0.5))
        hot_stages: set[int] = set()
        for _, idx in sorted(times, reverse=True)[:2]:
            if idx == int(idx):
                hot_stages.add(int(idx))
            else:
                hot_stages.update((int(idx), int(idx) + 1))
        used = {d for devs, _, _ in plan for d in devs}
        unused = [d for d in self.live if d not in used]
        if self.target is not None:  # polishing latency: every stage and boundary is in play
            hot_stages = set(range(n))
        # boundary shifts around the hot stages
        for k in sorted({b for s in hot_stages for b in (s - 1, s) if 0 <= b < n - 1}):
            (da, fa, la), (db, _, lb) = plan[k], plan[k + 1]
            for delta in (-3, -2, -1, 1, 2, 3):
                cut = la + delta
                if fa <= cut < lb:
                    new = list(plan)
                    new[k] = (da, fa, cut)
                    new[k + 1] = (db, cut + 1, lb)
                    yield new
        for k in hot_stages:
            devs, f, la = plan[k]
            # move to an unused device; split onto an unused device; add a replica
            for d in unused:
                new = list(plan)
                new[k] = ((d,), f, la)
                yield new
                if la > f:
                    mid = self._balanced_cut(devs[0], d, f, la)
                    for a, b in (((devs), (d,)), ((d,), devs)):
                        new = list(plan)
                        new[k : k + 1] = [(a, f, mid), (b, mid + 1, la)]
                        yield new
                if p.allow_replication and d not in self.pins:
                    new = list(plan)
                    new[k] = ((*devs, d), f, la)
                    yield new
            if len(devs) > 1:
                for d in devs:
                    new = list(plan)
                    new[k] = (tuple(x for x in devs if x != d), f, la)
                    yield new
            # swap with another stage
            for k2 in range(n):
                if k2 != k:
                    new = list(plan)
                    new[k], new[k2] = (plan[k2][0], f, la), (devs, plan[k2][1], plan[k2][2])
                    yield new
        # merge light neighbours to free a device
        bn = max(t for t, _ in times)
        for k in range(n - 1):
            (da, fa, _), (db, _, lb) = plan[k], plan[k + 1]
            for devs in (da, db):
                if min(cuml[lb + 1][d] - cuml[fa][d] for d in devs) / len(devs) <= bn:
                    new = list(plan)
                    new[k : k + 2] = [(devs, fa, lb)]
                    yield new

    def _balanced_cut(self, a: int, b: int, f: int, la: int) -> int:
        cuml = self.cuml
        best, best_t = f, math.inf
        for cut in range(f, la):
            t = max(cuml[cut + 1][a] - cuml[f][a], cuml[la + 1][b] - cuml[cut + 1][b])
            if t < best_t:
                best, best_t = cut, t
        return best

    # -- greedy start ----------------------------------------------------------------------------

    def greedy(self, deadline: float = math.inf) -> _Plan:
        """The best of a few greedy rules, each at the smallest bound it reaches (bisection)."""
        best: tuple[tuple[float, float, int, float], _Plan] | None = None
        for rule in range(3):
            plan = self._greedy_rule(rule, deadline if best is not None else math.inf)
            if plan is not None:
                key = self.score(plan)
                if best is None or key < best[0]:
                    best = (key, plan)
            if time.perf_counter() > deadline:
                break
        if best is None:
            raise InfeasiblePlan(_diagnose(self.p))
        return best[1]

    def _greedy_rule(self, rule: int, deadline: float) -> _Plan | None:
        lo = 0.0
        hi = float(self.cum[-1, self.live].min()) + 1.0
        plan = None
        for _ in range(12):  # grow hi until greedy works (memory may force more stages)
            plan = self._greedy_at(hi, rule)
            if plan is not None:
                break
            hi *= 4.0
        if plan is None:
            return None
        for _ in range(40):
            if hi - lo <= 1e-3 * hi or time.perf_counter() > deadline:
                break
            mid = (lo + hi) / 2
            cand = self._greedy_at(mid, rule)
            if cand is None:
                lo = mid
            else:
                hi, plan = mid, cand
        return plan

    def _greedy_at(self, b: float, rule: int = 0) -> _Plan | None:
        """Stage by stage, a device reaching furthest at bound ``b`` (rule 0: ties to the slowest
        device, saving fast ones; rule 1: ties to the device most unused devices can follow; rule 2:
        like 1 among devices reaching within one layer of the furthest)."""
        p = self.p
        n_l = p.n_layers
        unused = list(self.live)
        plan: _Plan = []
        j, prev = 0, -1
        cum = self.cum
        cut = self.cut_arr
        while j < n_l:
            devs = np.array(unused)
            if prev >= 0:
                devs = devs[(self.inv_bw[prev, devs] < math.inf) & (cut[j - 1] * self.inv_bw[prev, devs] <= b)]
            if devs.size == 0:
                return None
            comp = cum[j + 1 :, devs] - cum[j, devs]                   # [L-j, n]
            ok = (comp <= b) & (self.need_m[j, j:][:, None] < p.mem_bytes[devs][None, :])
            if len(unused) > 1:
                link = self.inv_bw[np.ix_(devs, unused)]
                link[devs[:, None] == np.array(unused)[None, :]] = math.inf
                inv = link.min(axis=1)                                  # best link to another unused device
                with np.errstate(invalid="ignore"):
                    tr_ok = cut[j:, None] * inv[None, :] <= b
                tr_ok[-1] = True
                ok &= tr_ok
            else:
                ok[:-1, :] = False
            for d in self.pins:  # keep pins: pinned device only for its range, others avoid it
                pin = self.pins[d]
                if j > pin.first:
                    continue
                for col, dd in enumerate(devs):
                    if dd == d:
                        ok[: pin.last - j, col] = False
                    else:
                        ok[max(pin.first - j, 0) :, col] = False
            if not ok.any():
                return None
            reach = np.where(ok.any(axis=0), ok.shape[0] - 1 - np.argmax(ok[::-1], axis=0), -1)
            speed = cum[-1, devs]
            if rule == 0:
                col = max(range(devs.size), key=lambda c: (reach[c], speed[c]))
            else:
                e_of = j + np.maximum(reach, 0)
                with np.errstate(invalid="ignore"):
                    follow = (cut[np.minimum(e_of, n_l - 1)][:, None] * self.inv_bw[np.ix_(devs, unused)] <= b).sum(1)
                # A device that reaches no layer (reach -1) never qualifies, even when the furthest reach is 0.
                top = max(reach.max() - (1 if rule == 2 else 0), 0)
                col = max(range(devs.size), key=lambda c: (reach[c] >= top, follow[c], reach[c], speed[c]))
            d = int(devs[col])
            e = j + int(reach[col])
            plan.append(((d,), j, e))
            unused.remove(d)
            j, prev = e + 1, d
        return plan
