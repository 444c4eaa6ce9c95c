"""Parallelism inside a stage (FlexPie, Galaxy+): a DP over layers choosing pipeline, replication or intra-layer splits.

A plan is a chain of stages on disjoint device groups (so frames still pipeline between stages).
Each stage runs layers ``first..last`` in one of three modes:

- ``single``: one device runs the layers (the classic pipeline stage);
- ``replicate``: ``r`` devices each run the whole stage on alternate frames (ScalPipe, as in
  ``cost.py``): latency ``sum_i w_i c_i``, period ``1 / sum_i 1/c_i``, ``w_i`` proportional to speed;
- ``split``: every frame is shared by the group. The stage is a sequence of *units*; a unit is either
  run on the group's lead device alone, or split across the whole group (kind ``spatial``: rows
  with halos, several conv layers may be fused into one unit; ``channel``/``tensor``: one layer).
  The lead holds the activation between units: it scatters a unit's input, every device computes
  its share (shares proportional to device speed on the unit), the lead gathers the outputs.

Unit cost (split): ``S`` = scatter time (the lead sends part ``d`` its bytes, one after the other;
a spatial part gets ``share_d + halo`` of the input rows, channel/tensor parts the whole input),
``C`` = max over parts of the part's compute (``share_d x time on d``, plus the halo rows for
spatial), ``G`` = gather time (spatial/channel parts return their share of the output, tensor parts
a whole partial sum). Without overlap a unit costs ``S + C + G``. With Galaxy+ tiling in ``T`` tiles
(spatial units: every device's rows in ``T`` row tiles, each with its own halo and one message each
way, which the runtime sends and answers one by one) the three phases pipeline:
``(S + C + G) / T + (T - 1) x max(S, C, G) / T`` plus ``T`` times the per-message overhead per
exchanged message, i.e. max(comm, compute) per tile instead of the sum. With ``overlap`` the DP picks
per unit the tile count (1, 2, 4, ... up to ``tiles``) that costs least, so tiles appear only where
communication is worth hiding and messages are cheap enough.

Plan cost: latency = sum of stage latencies + transfers between stages (expected over replicas);
period = max over stages (a split stage's period is its latency: the group works on one frame at a
time) and links. ``solve_intra`` minimises latency subject to ``period <= period_ms`` (or, given
``latency_ms``, the period subject to the latency bound) exactly for this cost model with a DP over
(next layer, devices used, where the last stage's output lives). Pure functions over arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fleetpipe.errors import InfeasiblePlan
from fleetpipe.models.split import row_ranges
from fleetpipe.planner.problem import Problem, transfer_ms

__all__ = [
    "MODES",
    "IntraPlan",
    "IntraProblem",
    "IntraStage",
    "Unit",
    "part_fractions",
    "part_key",
    "solve_intra",
    "stage_cost",
    "tile_options",
    "tile_shares",
    "unit_cost_ms",
]

MODES = ("single", "replicate", "split")
SPLIT_KINDS = ("spatial", "channel", "tensor")


@dataclass(frozen=True, slots=True, eq=False)
class IntraProblem:
    """Layers x devices for intra-stage planning.

    ``compute_ms[l, d]``: time of layer ``l`` on device ``d``; ``in_bytes``/``out_bytes``: activation
    bytes into/out of each layer; ``bw_mbps[a, b]``: links; ``kinds[l]``: split kinds layer ``l``
    supports; ``halo_rows[l]``: spatial halo per stripe boundary in rows of the layer input, of
    ``in_rows[l]`` rows (output ``out_rows[l]``); ``msg_ms``: fixed cost of one message.
    """

    compute_ms: np.ndarray
    in_bytes: np.ndarray
    out_bytes: np.ndarray
    bw_mbps: np.ndarray
    kinds: tuple[tuple[str, ...], ...]
    halo_rows: np.ndarray = field(default_factory=lambda: np.zeros(0))
    in_rows: np.ndarray = field(default_factory=lambda: np.zeros(0))
    out_rows: np.ndarray = field(default_factory=lambda: np.zeros(0))
    msg_ms: float = 0.0
    # Measured split parts: ``part_key(...)`` -> per part, its time over what ``part_fractions`` assumes
    # (``fleetpipe.planner.split_profile``); parts not measured cost what the model says.
    part_factors: dict[tuple[int, int, str, int], tuple[float, ...]] = field(default_factory=dict)
    # Per split kind, the factor of a part not measured (e.g. the median of those measured; 1 = the model).
    part_prior: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        c = np.array(self.compute_ms, dtype=np.float64)
        if c.ndim != 2 or c.size == 0:
            raise ValueError("compute_ms must be a non-empty [layers, devices] array")
        n_l, n_d = c.shape
        set_ = object.__setattr__
        set_(self, "compute_ms", c)
        for name in ("in_bytes", "out_bytes"):
            set_(self, name, _vec(getattr(self, name), n_l, name))
        for name in ("halo_rows", "in_rows", "out_rows"):
            v = np.asarray(getattr(self, name), dtype=np.float64)
            set_(self, name, np.zeros(n_l) if v.size == 0 else _vec(v, n_l, name))
        bw = np.array(self.bw_mbps, dtype=np.float64)
        if bw.shape != (n_d, n_d):
            raise ValueError(f"bw_mbps must be {(n_d, n_d)}")
        np.fill_diagonal(bw, np.inf)
        set_(self, "bw_mbps", bw)
        kinds = tuple(tuple(k) for k in self.kinds)
        if len(kinds) != n_l or any(k not in SPLIT_KINDS for ks in kinds for k in ks):
            raise ValueError(f"kinds must name split kinds from {SPLIT_KINDS} for each of {n_l} layers")
        set_(self, "kinds", kinds)
        if np.any(c < 0) or not np.all(np.isfinite(c)) or self.msg_ms < 0:
            raise ValueError("compute times and msg_ms must be finite and >= 0")
        factors = {tuple(k): tuple(float(x) for x in v) for k, v in dict(self.part_factors).items()}
        if any(not (math.isfinite(x) and x > 0) for v in factors.values() for x in v):
            raise ValueError("part factors must be finite and > 0")
        set_(self, "part_factors", factors)
        prior = {str(k): float(v) for k, v in dict(self.part_prior).items()}
        if any(not (math.isfinite(v) and v > 0) for v in prior.values()):
            raise ValueError("part priors must be finite and > 0")
        set_(self, "part_prior", prior)

    @property
    def n_layers(self) -> int:
        return int(self.compute_ms.shape[0])

    @property
    def n_devices(self) -> int:
        return int(self.compute_ms.shape[1])

    @classmethod
    def from_problem(
        cls, problem: Problem, kinds: Sequence[Sequence[str]], halo_rows: Sequence[float] = (),
        in_rows: Sequence[float] = (), out_rows: Sequence[float] = (), msg_ms: float = 0.0,
    ) -> IntraProblem:
        """An intra problem from a pipeline ``Problem`` plus per-layer split information."""
        in_b = np.array([problem.in_bytes(i) for i in range(problem.n_layers)])
        return cls(problem.compute_ms, in_b, problem.out_bytes, problem.bw_mbps, tuple(map(tuple, kinds)),
                   np.asarray(halo_rows, float), np.asarray(in_rows, float), np.asarray(out_rows, float), msg_ms)


@dataclass(frozen=True, slots=True)
class Unit:
    """Layers ``first..last`` of a split stage: split by ``kind`` across the group, or on the lead (``""``).

    A spatial unit with ``tiles`` > 1 has ``tiles`` parts per device, so each device's first tile computes
    while the next is still on the way and its result travels back while the next computes.
    """

    first: int
    last: int
    kind: str
    latency_ms: float
    tiles: int = 1  # row tiles per device of a spatial unit (Galaxy+ overlap); 1 = one part per device


@dataclass(frozen=True, slots=True)
class IntraStage:
    """One stage of an intra plan."""

    first: int
    last: int
    devices: tuple[int, ...]
    mode: str
    lead: int
    latency_ms: float
    period_ms: float
    units: tuple[Unit, ...] = ()


@dataclass(frozen=True, slots=True)
class IntraPlan:
    """A chain of stages with its single-frame latency and period (1000 / throughput)."""

    stages: tuple[IntraStage, ...]
    latency_ms: float
    period_ms: float

    @property
    def n_split_units(self) -> int:
        """How many units are split across devices."""
        return sum(1 for s in self.stages for u in s.units if u.kind)


def _vec(value: object, n: int, what: str) -> np.ndarray:
    arr = np.array(value, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"{what} has shape {arr.shape}, expected ({n},)")
    if np.any(arr < 0) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} must be finite and >= 0")
    return arr


def _halo_frac(p: IntraProblem, first: int, last: int) -> float:
    """Halo per boundary as a fraction of the input rows of ``first`` for a fused spatial unit."""
    r = 0.0
    for layer in range(last, first - 1, -1):
        stride = p.in_rows[layer] / p.out_rows[layer] if p.out_rows[layer] > 0 else 1.0
        r = r * stride + p.halo_rows[layer]
    return r / p.in_rows[first] if p.in_rows[first] > 0 else 0.0


def tile_shares(shares: Sequence[float], tiles: int) -> list[float]:
    """Part shares of a spatial unit cut into ``tiles`` row tiles per device (device ``i`` gets tiles
    ``i * tiles .. (i + 1) * tiles - 1``, contiguous rows, in order): the parts the runtime sends."""
    t = max(1, int(tiles))
    return [w / t for w in shares for _ in range(t)]


def part_key(first: int, last: int, kind: str, parts: int) -> tuple[int, int, str, int]:
    """Key of a unit's measured part factors: its layers, split kind and number of parts (devices x tiles)."""
    return (int(first), int(last), kind, int(parts))


def part_fractions(
    p: IntraProblem, first: int, last: int, kind: str, group: Sequence[int], tiles: int = 1
) -> tuple[list[float], list[float]] | None:
    """``(shares, compute)`` of every part of a split unit (device ``i`` owns parts ``i*tiles ..``): its share
    of the output and the fraction of the whole unit's compute the cost model assumes it takes (whole
    output rows plus half its halo rows for spatial parts); None where the unit cannot be split so."""
    if kind not in SPLIT_KINDS:
        raise ValueError(f"unknown split kind {kind!r}")
    if any(kind not in p.kinds[layer] for layer in range(first, last + 1)):
        return None
    if kind != "spatial" and (first != last or tiles > 1):
        return None  # a channel or tensor part needs the whole input: tiling it would send it `tiles` times
    speed = [1.0 / max(float(p.compute_ms[first : last + 1, d].sum()), 1e-12) for d in group]
    shares = tile_shares([s / sum(speed) for s in speed], tiles)
    n = len(shares)
    if kind != "spatial":
        return shares, list(shares)
    rows_out = int(p.out_rows[last])
    if tiles > 1 and 0 < rows_out < n:
        return None  # fewer rows than tiles: the split slices cannot be built
    if rows_out >= n:
        # A part computes whole output rows (``row_ranges``, as the split slices do): on a 5-row feature map
        # a 0.545 share is 3 rows, 0.6 of the work.
        shares = [(b - a) / rows_out for a, b in row_ranges(rows_out, shares)]
    halo = _halo_frac(p, first, last)
    return shares, [min(1.0, w + ((j > 0) + (j < n - 1)) * halo * 0.5) for j, w in enumerate(shares)]


def unit_cost_ms(
    p: IntraProblem, first: int, last: int, kind: str, group: Sequence[int], lead: int, *,
    overlap: bool = False, tiles: int = 1,
) -> float:
    """Latency of layers ``first..last`` split by ``kind`` across ``group`` (``lead`` scatters and gathers).

    With ``overlap`` and ``tiles`` > 1 (spatial only: a channel or tensor part needs the whole input, so
    tiling it would send the input ``tiles`` times) every device's rows are cut into ``tiles`` row tiles,
    each one message each way with its own halo, and scatter, compute and gather pipeline over the tiles.
    A part measured on the host (``IntraProblem.part_factors``) costs its factor times the model's guess,
    one not measured the kind's ``part_prior``.
    """
    t = max(1, int(tiles)) if overlap else 1
    fr = part_fractions(p, first, last, kind, group, t)
    if fr is None:
        return math.inf
    shares, fracs = fr
    n = len(shares)
    factors = p.part_factors.get(part_key(first, last, kind, n), ())
    if len(factors) != n:
        factors = (p.part_prior.get(kind, 1.0),) * n
    comp = [float(p.compute_ms[first : last + 1, d].sum()) for d in group]
    k = len(group)
    halo = _halo_frac(p, first, last) if kind == "spatial" else 0.0
    in_b, out_b = float(p.in_bytes[first]), float(p.out_bytes[last])
    scatter = gather = cmax = 0.0
    for i, (d, c) in enumerate(zip(group, comp, strict=True)):
        part_in = part_c = part_out = 0.0
        for j in range(i * t, (i + 1) * t):
            w = shares[j]
            part_c += c * fracs[j] * factors[j]
            if kind == "spatial":
                part_in += in_b * min(1.0, w + ((j > 0) + (j < n - 1)) * halo)
                part_out += out_b * w
            elif kind == "channel":
                part_in, part_out = in_b, out_b * w
            else:
                part_in, part_out = in_b, out_b
        cmax = max(cmax, part_c)
        if d != lead:
            scatter += transfer_ms(part_in, p.bw_mbps[lead, d])
            gather += transfer_ms(part_out, p.bw_mbps[d, lead])
    msgs = 2 * (k - 1) * t
    if t == 1:
        return scatter + cmax + gather + msgs * p.msg_ms
    # The three phases pipeline over the tiles: one tile's worth of each, then the slowest phase per tile.
    return (scatter + cmax + gather) / t + (t - 1) * max(scatter, cmax, gather) / t + msgs * p.msg_ms


def tile_options(tiles: int) -> tuple[int, ...]:
    """The tile counts the DP tries for a spatial unit when overlap is on: 1, 2, 4, ... up to ``tiles``."""
    out, t = [1], 2
    while t <= max(1, int(tiles)):
        out.append(t)
        t *= 2
    if out[-1] != max(1, int(tiles)):
        out.append(int(tiles))
    return tuple(out)


def _split_stage(
    p: IntraProblem, first: int, last: int, group: tuple[int, ...], lead: int, overlap: bool, tiles: int,
    cache: dict,
) -> tuple[float, tuple[Unit, ...]]:
    """Best sequence of units for layers ``first..last`` on ``group`` (interval DP)."""
    best = [0.0] + [math.inf] * (last - first + 1)
    back: list[tuple[int, str, float, int]] = [(0, "", 0.0, 1)] * (last - first + 2)
    tile_counts = tile_options(tiles) if overlap else (1,)
    for j in range(first, last + 1):
        for i in range(first, j + 1):
            base = best[i - first]
            if base == math.inf:
                continue
            opts = [("", float(p.compute_ms[j, lead]), 1)] if i == j else []
            for kind in SPLIT_KINDS:
                for t in tile_counts if kind == "spatial" else (1,):
                    key = (i, j, kind, group, lead, t)
                    if key not in cache:
                        cache[key] = unit_cost_ms(p, i, j, kind, group, lead, overlap=t > 1, tiles=t)
                    opts.append((kind, cache[key], t))
            for kind, cost, t in opts:
                if base + cost < best[j + 1 - first] - 1e-12:
                    best[j + 1 - first] = base + cost
                    back[j + 1 - first] = (i, kind, cost, t)
    units, j = [], last + 1
    while j > first:
        i, kind, cost, t = back[j - first]
        units.append(Unit(i, j - 1, kind, cost, t))
        j = i
    return best[-1], tuple(reversed(units))


def stage_cost(
    p: IntraProblem, first: int, last: int, group: Sequence[int], mode: str, *,
    overlap: bool = False, tiles: int = 1, cache: dict | None = None,
) -> IntraStage:
    """Cost of layers ``first..last`` on ``group`` in ``mode``."""
    group = tuple(int(d) for d in group)
    comp = [float(p.compute_ms[first : last + 1, d].sum()) for d in group]
    lead = group[int(np.argmin(comp))]
    if mode == "single" or len(group) == 1:
        if len(group) != 1:
            raise ValueError("a single stage has one device")
        c = comp[0]
        return IntraStage(first, last, group, "single", lead, c, c, (Unit(first, last, "", c),))
    if mode == "replicate":
        inv = [1.0 / max(c, 1e-12) for c in comp]
        w = [v / sum(inv) for v in inv]
        lat = sum(wi * c for wi, c in zip(w, comp, strict=True))
        return IntraStage(first, last, group, "replicate", lead, lat, 1.0 / sum(inv))
    if mode != "split":
        raise ValueError(f"mode must be one of {MODES}")
    lat, units = _split_stage(p, first, last, group, lead, overlap, tiles, {} if cache is None else cache)
    return IntraStage(first, last, group, "split", lead, lat, lat, units)


def _exit(stage: IntraStage, p: IntraProblem) -> tuple[tuple[int, float], ...]:
    """Where a stage's output lives: ``(device, probability)`` pairs."""
    if stage.mode != "replicate":
        return ((stage.lead, 1.0),)
    comp = [float(p.compute_ms[stage.first : stage.last + 1, d].sum()) for d in stage.devices]
    inv = [1.0 / max(c, 1e-12) for c in comp]
    return tuple((d, v / sum(inv)) for d, v in zip(stage.devices, inv, strict=True))


def _link(p: IntraProblem, nbytes: float, src: tuple[tuple[int, float], ...],
          dst: tuple[tuple[int, float], ...]) -> tuple[float, float]:
    """Expected transfer time and link period between two stages."""
    lat = per = 0.0
    for a, wa in src:
        for b, wb in dst:
            if a == b:
                continue
            t = transfer_ms(nbytes, p.bw_mbps[a, b]) + p.msg_ms
            lat += wa * wb * t
            per = max(per, wa * wb * t)
    return lat, per


def solve_intra(
    p: IntraProblem, *, period_ms: float | None = None, latency_ms: float | None = None,
    modes: Sequence[str] = MODES, overlap: bool = False, tiles: int = 1, max_group: int | None = None,
) -> IntraPlan:
    """Minimise latency subject to ``period <= period_ms`` (or the period subject to ``latency <= latency_ms``)."""
    if period_ms is not None and latency_ms is not None:
        raise ValueError("give period_ms or latency_ms, not both")
    modes = tuple(modes)
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"modes must come from {MODES}")
    ctx = _Solver(p, modes, overlap, max(1, int(tiles)), max_group or p.n_devices)
    if latency_ms is None:
        return ctx.run(math.inf if period_ms is None else float(period_ms))
    cands = sorted(ctx.periods())
    lo, hi, best = 0, len(cands) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        try:
            plan = ctx.run(cands[mid] * (1 + 1e-9))
        except InfeasiblePlan:
            plan = None
        if plan is not None and plan.latency_ms <= latency_ms:
            best, hi = plan, mid - 1
        else:
            lo = mid + 1
    if best is None:
        raise InfeasiblePlan(f"no plan reaches a latency of {latency_ms} ms")
    return best


class _Solver:
    """The DP, with every stage's cost cached across runs."""

    def __init__(self, p: IntraProblem, modes: tuple[str, ...], overlap: bool, tiles: int, max_group: int) -> None:
        self.p, self.modes, self.overlap, self.tiles = p, modes, overlap, tiles
        n = p.n_devices
        self.groups = [tuple(d for d in range(n) if m >> d & 1) for m in range(1, 1 << n)]
        self.groups = [g for g in self.groups if len(g) <= max_group]
        self.stages: dict[tuple, IntraStage] = {}
        self.units: dict = {}

    def stage(self, i: int, j: int, group: tuple[int, ...], mode: str) -> IntraStage:
        key = (i, j, group, mode)
        if key not in self.stages:
            self.stages[key] = stage_cost(self.p, i, j, group, mode, overlap=self.overlap, tiles=self.tiles,
                                          cache=self.units)
        return self.stages[key]

    def options(self, i: int, j: int) -> list[IntraStage]:
        out = []
        for g in self.groups:
            if len(g) == 1:
                if "single" in self.modes:
                    out.append(self.stage(i, j, g, "single"))
                continue
            for mode in ("replicate", "split"):
                if mode in self.modes:
                    out.append(self.stage(i, j, g, mode))
        return out

    def periods(self) -> set[float]:
        n = self.p.n_layers
        return {s.period_ms for i in range(n) for j in range(i, n) for s in self.options(i, j)}

    def run(self, target: float) -> IntraPlan:
        p, n = self.p, self.p.n_layers
        # state: (used device mask, exit) -> (latency, period, back pointer)
        dp: list[dict] = [dict() for _ in range(n + 1)]
        dp[0][(0, ())] = (0.0, 0.0, None)
        for i in range(n):
            for (used, ex), (lat, per, _) in list(dp[i].items()):
                for j in range(i, n):
                    for st in self.options(i, j):
                        mask = sum(1 << d for d in st.devices)
                        if used & mask or st.period_ms > target:
                            continue
                        entry = _exit(st, p) if st.mode == "replicate" else ((st.lead, 1.0),)
                        tl, tp = _link(p, float(p.in_bytes[i]), ex, entry) if ex else (0.0, 0.0)
                        if tp > target:
                            continue
                        key = (used | mask, _exit(st, p))
                        val = (lat + tl + st.latency_ms, max(per, st.period_ms, tp), (i, used, ex, st))
                        old = dp[j + 1].get(key)
                        if old is None or val[0] < old[0] - 1e-12:
                            dp[j + 1][key] = val
        if not dp[n]:
            raise InfeasiblePlan(f"no plan reaches a period of {target} ms")
        key = min(dp[n], key=lambda k: (dp[n][k][0], dp[n][k][1]))
        lat, per, _ = dp[n][key]
        stages, layer = [], n
        while layer > 0:
            _, _, (i, used, ex, st) = dp[layer][key]
            stages.append(st)
            key, layer = (used, ex), i
        return IntraPlan(tuple(reversed(stages)), lat, per)
