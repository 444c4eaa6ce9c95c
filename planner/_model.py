"""Private model of the exact solver (:mod:`fleetpipe.planner.partition`): device classes, the
bound-independent tables (:class:`_Model`) and what a search picks from (:class:`_View`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fleetpipe.planner.cost import Stage
from fleetpipe.planner.problem import Problem

if TYPE_CHECKING:
    from fleetpipe.planner._search import _Level

_REL = 1e-9
_TIE = 1e-10
_DOMINANCE_CAP = 48  # failed used-sets kept per (layer, last device) for superset pruning


class _Timeout(Exception):
    pass


_UNKNOWN = object()


def _ctypes(problem: Problem) -> list[int]:
    """An id per device: equal ids have the same compute column and memory."""
    rows = [problem.compute_ms, problem.mem_bytes[None, :]]
    rows += [v[None, :] for v in (problem.hop_ms, problem.byte_ms, problem.client_mbps) if v is not None]
    keys = np.vstack(rows).T
    _, ids = np.unique(keys, axis=0, return_inverse=True)
    return [int(i) for i in np.asarray(ids).reshape(-1)]


def _symmetric_classes(ctype: list[int], link: np.ndarray, pinned: set[int]) -> list[list[int]]:
    """Groups of devices that any plan may permute: same ``ctype``, same ``link`` value (diagonal
    ignored) to and from every device outside the group, one ``link`` value inside it, not pinned."""
    classes: list[list[int]] = []
    for d in range(len(ctype)):
        home = None
        if d not in pinned:
            for cls in classes:
                if cls[0] not in pinned and ctype[cls[0]] == ctype[d] and _joins(link, cls, d):
                    home = cls
                    break
        if home is None:
            classes.append([d])
        else:
            home.append(d)
    out: list[list[int]] = []
    for cls in classes:  # verify the full symmetry condition; split anything doubtful
        if len(cls) > 1 and not _symmetric(link, cls):
            out.extend([d] for d in cls)
        else:
            out.append(cls)
    return out


def _joins(link: np.ndarray, cls: list[int], d: int) -> bool:
    r = cls[0]
    others = np.ones(link.shape[0], dtype=bool)
    others[cls] = False
    others[d] = False
    if not (np.array_equal(link[d, others], link[r, others]) and np.array_equal(link[others, d], link[others, r])):
        return False
    const = link[cls[0], cls[1]] if len(cls) > 1 else link[r, d]
    return all(link[m, d] == const and link[d, m] == const for m in cls)


def _symmetric(link: np.ndarray, cls: list[int]) -> bool:
    n = link.shape[0]
    others = np.ones(n, dtype=bool)
    others[cls] = False
    r = cls[0]
    const = link[cls[0], cls[1]]
    for m in cls:
        same_row = np.array_equal(link[m, others], link[r, others])
        if not (same_row and np.array_equal(link[others, m], link[others, r])):
            return False
        if any(link[m, x] != const for x in cls if x != m):
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
        self.ctype = _ctypes(problem)
        self.pinned = {p.device for p in problem.pins}
        classes = _symmetric_classes(self.ctype, problem.bw_mbps, self.pinned)
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
        s_lat = s_lat + self._message_ms(problem, reps)
        s_lat = np.where(tri[None], s_lat, np.inf)
        s_bn = s_lat / ks[:, None, None]
        if problem.client_mbps is not None:  # input from / result to the client: links of their own
            t_in = np.array([problem.client_ms(r, problem.input_bytes) for r in reps])
            t_out = np.array([problem.client_ms(r, float(problem.out_bytes[-1])) for r in reps])
            s_bn[:, 0, :] = np.maximum(s_bn[:, 0, :], (t_in / ks)[:, None])
            s_bn[:, :, -1] = np.maximum(s_bn[:, :, -1], (t_out / ks)[:, None])
            s_lat[:, 0, :] += t_in[:, None]
            s_lat[:, :, -1] += t_out[:, None]
        self.s_lat = s_lat
        self.s_bn = s_bn
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
        self.cut_bytes = cut_bytes
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

    @staticmethod
    def _message_ms(problem: Problem, reps: list[int]) -> np.ndarray | float:
        """``[U, j, e]``: what a stage j..e on each unit's device spends on its messages per frame
        (``Problem.message_ms`` with cuts at their floors), or 0."""
        if problem.hop_ms is None and problem.byte_ms is None:
            return 0.0
        n_l = problem.n_layers
        got = np.array([problem.input_bytes] + [problem.cut_bytes(j - 1, problem.cut_bits(j - 1))
                                                 for j in range(1, n_l)])
        sent = np.array([problem.cut_bytes(e, problem.cut_bits(e)) for e in range(n_l - 1)]
                        + [float(problem.out_bytes[-1])])
        fixed = np.zeros(len(reps)) if problem.hop_ms is None else problem.hop_ms[reps]
        per_byte = np.zeros(len(reps)) if problem.byte_ms is None else problem.byte_ms[reps]
        return fixed[:, None, None] + per_byte[:, None, None] * (got[None, :, None] + sent[None, None, :])

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
        from fleetpipe.planner._search import _Level  # the levels build on the model

        level = self._levels.get(b)
        if level is None:
            if len(self._levels) > 64:
                self._levels.clear()
            level = self._levels[b] = _Level(self, b)
        return level


@dataclass(frozen=True, slots=True)
class _View:
    """The units a search picks from: device classes, units (class, replicas), their links at B."""

    classes: list[list[int]]
    eu: list[int]              # the model's unit with the same segments (and relaxed DP tables)
    unit_class: np.ndarray
    unit_k: np.ndarray
    t_ok: np.ndarray           # [cut, unit, unit]: the transfer fits in B
    caps: list[tuple[np.ndarray, np.ndarray]]
