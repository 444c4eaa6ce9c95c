"""Private searches of the exact solver (:mod:`fleetpipe.planner.partition`).

:class:`_Level` is the model at one bound ``B``: the relaxed DP tables, the capacity and Lagrangian
bounds, and the exact searches (feasibility and minimum latency).
"""

from __future__ import annotations

import math
import time

import numpy as np

from fleetpipe.planner._model import (
    _DOMINANCE_CAP,
    _REL,
    _TIE,
    _Model,
    _symmetric_classes,
    _Timeout,
    _View,
)
from fleetpipe.planner.cost import Stage


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

    # -- Lagrangian bound -------------------------------------------------------------------------

    def lagrangian(self, iters: int = 40, until: float = math.inf) -> tuple[np.ndarray, np.ndarray, float]:
        """Weights ``lam[c] >= 0`` per device of class ``c`` and the table ``nc[e, u]``: the least
        total weight of the devices of a relaxed completion after a stage ending at ``e`` on unit
        ``u`` (devices may repeat in the relaxation). A real completion uses distinct unused devices,
        so a state whose ``nc`` exceeds the weight of its unused devices cannot finish. The weights
        start at the devices' capacities (so this is at least the capacity bound) and are tuned by
        multiplicative subgradient steps on the root (up to ``iters`` or the clock ``until``).
        Returns (lam, nc, root cost - fleet weight).
        """
        m = self.m
        size = m.class_size.astype(np.float64)
        lam = np.maximum(self._caps[1][0][:, 0], 1e-12)
        best: tuple[float, np.ndarray, np.ndarray] | None = None
        for it in range(iters):
            lam = lam / float(size @ lam)
            nc, w_arg, nc_arg, root_u, root = self._weighted_dp(lam)
            value = root - 1.0
            if best is None or value > best[0]:
                best = (value, lam, nc)
            if value > 1e-9 or not math.isfinite(root) or time.perf_counter() > until:
                break
            uses = np.zeros(len(m.classes))
            u, j = root_u, 0
            while True:
                uses[m.unit_class[u]] += m.unit_k[u]
                e = int(w_arg[j, u])
                if e >= m.L - 1:
                    break
                u, j = int(nc_arg[e, u]), e + 1
            g = uses - size
            if not g.any():
                break
            lam = lam * np.exp((0.5 / (1 + it) ** 0.5) * np.clip(g, -2, 2))
        assert best is not None
        return best[1], best[2], best[0]

    def _weighted_dp(self, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, float]:
        m = self.m
        n_l, n_u = m.L, len(m.units)
        lam_u = lam[m.unit_class] * m.unit_k
        inf = np.inf
        nc = np.full((n_l, n_u), inf)
        nc_arg = np.zeros((n_l, n_u), dtype=np.int64)
        w = np.full((n_l, n_u), inf)
        w_arg = np.zeros((n_l, n_u), dtype=np.int64)
        nc[n_l - 1] = 0.0
        for j in range(n_l - 1, -1, -1):
            if j < n_l - 1:
                cost = np.where(self.t_ok[j], w[j + 1][None, :], inf)
                nc_arg[j] = cost.argmin(axis=1)
                nc[j] = cost[np.arange(n_u), nc_arg[j]]
            seg = np.where(self.seg_ok[:, j, j:], nc[j:].T, inf)
            arg = seg.argmin(axis=1)
            w[j] = lam_u + seg[np.arange(n_u), arg]
            w_arg[j] = arg + j
        root_u = int(np.argmin(w[0]))
        return nc, w_arg, nc_arg, root_u, float(w[0, root_u])

    def _view(self) -> _View:
        """The search space of the feasibility check at this bound.

        Without replication, devices are grouped by what matters at B only: the same compute
        column and memory, and links that are usable (transfer <= B) at exactly the same cuts to and
        from every other device. Swapping two such devices maps plans feasible at B to plans
        feasible at B, so the search takes the members of a group in index order (exact symmetry
        breaking); slow Wi-Fi links that no cut can use at B no longer make every device unique.
        """
        m = self.m
        p = m.problem
        exact = _View(m.classes, list(range(len(m.units))), m.unit_class, m.unit_k, self.t_ok, self._caps)
        if p.allow_replication or m.L == 1:
            return exact
        n_d = p.n_devices
        tol = self.b * (1 + _TIE)
        vals, inv = np.unique(p.bw_mbps, return_inverse=True)
        with np.errstate(divide="ignore"):
            per_byte = np.where(vals > 0, 8.0 / (vals * 1000.0), np.inf)  # as in _Model (t_bn)
        with np.errstate(invalid="ignore"):
            pat = (m.cut_bytes[:-1, None] * per_byte[None, :]) <= tol     # [L-1, values]
        uniq, pid = np.unique(pat.T, axis=0, return_inverse=True)  # distinct usable-cut patterns
        link = np.asarray(pid).reshape(-1)[np.asarray(inv).reshape(-1)].reshape(n_d, n_d)
        classes = _symmetric_classes(m.ctype, link, m.pinned)
        if len(classes) == len(m.classes):
            return exact
        exact_of = {d: c for c, members in enumerate(m.classes) for d in members}
        eu = [exact_of[c[0]] for c in classes]  # no replication: exact unit == exact class
        n_c = len(classes)
        reps = np.array([c[0] for c in classes])
        li = link[np.ix_(reps, reps)].copy()
        selfok = np.zeros(n_c, dtype=bool)
        for i, c in enumerate(classes):
            if len(c) > 1:
                li[i, i] = link[c[0], c[1]]
                selfok[i] = True
        t_ok = np.zeros((m.L, n_c, n_c), dtype=bool)
        t_ok[:-1] = uniq.T[:, li]
        lone = np.nonzero(~selfok)[0]
        t_ok[:, lone, lone] = False
        caps = [(cap[eu], need) for cap, need in self._caps]
        return _View(classes, eu, np.arange(n_c), np.ones(n_c, dtype=np.int64), t_ok, caps)

    def feasible_plan(self, deadline: float) -> tuple[Stage, ...] | None:
        """A plan with bottleneck <= B, or None (proven); raises _Timeout.

        A short plain search first; then the search prunes with the Lagrangian bound and tries
        the cheapest relaxed completions first, which follows the Lagrangian path and repairs it
        where it reuses a device.
        """
        now = time.perf_counter()
        try:  # feasible bounds are usually confirmed at once by the plain search
            return self._feasible_plan(min(deadline, now + min(0.03, 0.1 * (deadline - now))), None)
        except _Timeout:
            if time.perf_counter() > deadline:
                raise
        now = time.perf_counter()
        lam, nc, value = self.lagrangian(until=now + 0.15 * (deadline - now))
        if value > 1e-9:
            return None
        return self._feasible_plan(deadline, (lam, nc))

    def _feasible_plan(self, deadline: float,
                       bound: tuple[np.ndarray, np.ndarray] | None) -> tuple[Stage, ...] | None:
        v = self._view()
        n_l = self.m.L
        n_u = len(v.eu)
        classes, eu, unit_class, unit_k, t_ok = v.classes, v.eu, v.unit_class, v.unit_k, v.t_ok
        class_size = np.array([len(c) for c in classes], dtype=np.int64)
        caps = v.caps
        exact_class = {d: c for c, members in enumerate(self.m.classes) for d in members}
        if bound is not None:
            lam, nc = bound
            dev_w = [float(lam[exact_class[d]]) for d in range(self.m.problem.n_devices)]
            slack = [float(dev_w and sum(dev_w))]  # weight of the unused devices
        failed: set[tuple[int, int, int]] = set()
        by_place: dict[tuple[int, int], list[int]] = {}
        used = np.zeros(len(classes), dtype=np.int64)
        path: list[tuple[int, int, int]] = []  # (unit, first, last)
        counter = [0]
        # units ordered by reach at each start layer (furthest first)
        order_cache: dict[int, list[int]] = {}

        ends_cache: dict[tuple[int, int], list[int]] = {}

        def order(j: int) -> list[int]:
            o = order_cache.get(j)
            if o is None:
                if bound is None:
                    reach = [max(self._ends_of(eu[u], j), default=-1) for u in range(n_u)]
                    o = [u for u in sorted(range(n_u), key=lambda u: (-reach[u], u)) if reach[u] >= 0]
                else:  # cheapest relaxed completion first: the Lagrangian path, repaired
                    cost = [min((float(nc[e, eu[u]]) for e in ends(u, j)), default=math.inf) + dev_w[classes[u][0]]
                            if unit_k[u] == 1 else min((float(nc[e, eu[u]]) for e in ends(u, j)), default=math.inf)
                            for u in range(n_u)]
                    o = [u for u in sorted(range(n_u), key=lambda u: (cost[u], u)) if math.isfinite(cost[u])]
                order_cache[j] = o
            return o

        def ends(u: int, j: int) -> list[int]:
            if bound is None:
                return self._ends_of(eu[u], j)
            key = (u, j)
            out = ends_cache.get(key)
            if out is None:
                col = nc[:, eu[u]]
                out = sorted(self._ends_of(eu[u], j), key=lambda e: (float(col[e]), -e))
                ends_cache[key] = out
            return out

        def capacity_ok(j: int) -> bool:
            avail = class_size - used
            return all(float(avail @ cap[:, j]) >= need[j] * (1 - _REL) - _REL for cap, need in caps)

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
            if not capacity_ok(j):
                return fail(key)
            for u in order(j):
                c = unit_class[u]
                k = unit_k[u]
                if used[c] + k > class_size[c]:
                    continue
                if prev >= 0 and not t_ok[j - 1, prev, u]:
                    continue
                bits = 0
                weight = 0.0
                for idx in range(used[c], used[c] + k):
                    bits |= 1 << classes[c][idx]
                    if bound is not None:
                        weight += dev_w[classes[c][idx]]
                if bound is not None:
                    left = (slack[0] - weight) * (1 + 1e-9) + 1e-12
                    ncol = nc[:, eu[u]]
                for e in ends(u, j):
                    path.append((u, j, e))
                    if e == n_l - 1:
                        return True
                    if bound is not None and ncol[e] > left:
                        path.pop()
                        continue
                    used[c] += k
                    if bound is not None:
                        slack[0] -= weight
                    ok = dfs(e + 1, u, mask | bits)
                    used[c] -= k
                    if bound is not None:
                        slack[0] += weight
                    if ok:
                        return True
                    path.pop()
            return fail(key)

        if dfs(0, -1, 0):
            return self._stages(path, classes, unit_class, unit_k)
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

    def _stages(self, path: list[tuple[int, int, int]], classes: list[list[int]] | None = None,
                unit_class: np.ndarray | None = None, unit_k: np.ndarray | None = None) -> tuple[Stage, ...]:
        m = self.m
        p = m.problem
        classes = m.classes if classes is None else classes
        unit_class = m.unit_class if unit_class is None else unit_class
        unit_k = m.unit_k if unit_k is None else unit_k
        used = np.zeros(len(classes), dtype=np.int64)
        out = []
        for u, first, last in path:
            c = int(unit_class[u])
            k = int(unit_k[u])
            devs = tuple(classes[c][used[c] : used[c] + k])
            used[c] += k
            out.append(Stage(devs, first, last, p.cut_bits(last)))
        return tuple(out)
