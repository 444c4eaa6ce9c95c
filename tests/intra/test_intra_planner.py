"""The intra-stage DP: splits where a huge layer caps latency, none where links are slow."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fleetpipe.errors import InfeasiblePlan
from fleetpipe.planner.intra import IntraProblem, solve_intra, stage_cost, tile_options, tile_shares, unit_cost_ms

MB = 1_000_000


def _problem(bw: float, huge: float = 400.0, msg_ms: float = 0.0) -> IntraProblem:
    """Five layers on four equal devices; layer 2 is huge and spatially splittable."""
    base = np.array([5.0, 5.0, huge, 5.0, 5.0])
    return IntraProblem(
        compute_ms=np.repeat(base[:, None], 4, axis=1),
        in_bytes=np.full(5, 0.5 * MB),
        out_bytes=np.full(5, 0.5 * MB),
        bw_mbps=np.full((4, 4), bw),
        kinds=((), (), ("spatial", "channel"), (), ()),
        halo_rows=np.array([0, 0, 1.0, 0, 0]),
        in_rows=np.full(5, 64.0),
        out_rows=np.full(5, 64.0),
        msg_ms=msg_ms,
    )


def test_split_chosen_when_one_huge_layer_dominates() -> None:
    p = _problem(bw=1000.0)
    pipe = solve_intra(p, modes=("single",))
    plan = solve_intra(p)
    assert plan.n_split_units >= 1
    split_stage = next(s for s in plan.stages if any(u.kind for u in s.units))
    assert any(u.first <= 2 <= u.last and u.kind for u in split_stage.units)
    assert len(split_stage.devices) >= 2
    assert plan.latency_ms < 0.5 * pipe.latency_ms


def test_no_split_when_links_are_slow() -> None:
    p = _problem(bw=1.0)  # 0.5 MB over 1 Mbit/s = 4 s per transfer
    plan = solve_intra(p)
    assert plan.n_split_units == 0
    assert plan.latency_ms == pytest.approx(sum(p.compute_ms[:, 0]))


def test_split_not_chosen_for_cheap_layers() -> None:
    p = _problem(bw=100.0, huge=5.0)
    assert solve_intra(p).n_split_units == 0


def test_overlap_lowers_split_cost_and_msg_overhead_limits_tiles() -> None:
    p = _problem(bw=100.0, msg_ms=0.0)
    group = (0, 1, 2, 3)
    plain = unit_cost_ms(p, 2, 2, "spatial", group, 0)
    tiled = unit_cost_ms(p, 2, 2, "spatial", group, 0, overlap=True, tiles=4)
    assert tiled < plain
    p2 = _problem(bw=100.0, msg_ms=50.0)
    many = unit_cost_ms(p2, 2, 2, "spatial", group, 0, overlap=True, tiles=64)
    few = unit_cost_ms(p2, 2, 2, "spatial", group, 0, overlap=True, tiles=2)
    assert many > few


def test_tiles_are_chosen_per_unit_where_messages_are_worth_hiding() -> None:
    """Galaxy+ overlap: 0.5 MB each way at 20 Mbit/s is 200 ms against 100 ms of compute per device."""
    p = _problem(bw=20.0, msg_ms=1.0)
    untiled = solve_intra(p)
    tiled = solve_intra(p, overlap=True, tiles=8)
    units = [u for s in tiled.stages for u in s.units if u.kind]
    assert units and all(u.kind == "spatial" for u in units) and max(u.tiles for u in units) > 1
    assert tiled.latency_ms < 0.8 * untiled.latency_ms
    group = tiled.stages[0].devices if len(tiled.stages) == 1 else next(s.devices for s in tiled.stages if s.units
                                                                        and any(u.kind for u in s.units))
    u = units[0]
    assert u.latency_ms == pytest.approx(unit_cost_ms(p, u.first, u.last, "spatial", group, group[0], overlap=True,
                                                      tiles=u.tiles))
    # Expensive messages: every tile costs two more of them, so the same DP keeps one part per device.
    costly = solve_intra(_problem(bw=20.0, msg_ms=60.0), overlap=True, tiles=8)
    assert all(u.tiles == 1 for s in costly.stages for u in s.units)
    # Without overlap, or for a channel split (every part needs the whole input), there are no tiles.
    assert all(u.tiles == 1 for s in untiled.stages for u in s.units)
    assert math.isinf(unit_cost_ms(p, 2, 2, "channel", (0, 1), 0, overlap=True, tiles=2))
    assert math.isinf(unit_cost_ms(p, 2, 2, "spatial", (0, 1, 2, 3), 0, overlap=True, tiles=32))  # 128 tiles > 64 rows


def test_tile_shares_and_options() -> None:
    assert tile_shares([0.75, 0.25], 2) == [0.375, 0.375, 0.125, 0.125]
    assert tile_shares([0.5, 0.5], 1) == [0.5, 0.5]
    assert tile_options(1) == (1,) and tile_options(4) == (1, 2, 4) and tile_options(6) == (1, 2, 4, 6)


def test_unit_cost_components() -> None:
    p = _problem(bw=8.0)  # 8 Mbit/s: 1 MB/s -> 0.5 MB = 500 ms
    c = unit_cost_ms(p, 2, 2, "channel", (0, 1), 0)
    # scatter 0.5 MB to device 1, half the compute, gather half the output
    assert c == pytest.approx(500.0 + 200.0 + 250.0)
    s = unit_cost_ms(p, 2, 2, "spatial", (0, 1), 0)
    assert s == pytest.approx(0.5 * MB * (0.5 + 1 / 64) * 8 / 8000 + 400 * (0.5 + 0.5 / 64) + 250.0)
    assert math.isinf(unit_cost_ms(p, 2, 2, "tensor", (0, 1), 0))
    assert math.isinf(unit_cost_ms(p, 1, 2, "spatial", (0, 1), 0))


def test_replication_meets_a_throughput_target_split_meets_latency() -> None:
    p = _problem(bw=1000.0)
    target = 150.0  # the huge layer alone takes 400 ms: single stages cannot reach it
    with pytest.raises(InfeasiblePlan):
        solve_intra(p, period_ms=target, modes=("single",))
    plan = solve_intra(p, period_ms=target)
    assert plan.period_ms <= target
    rep = stage_cost(p, 2, 2, (0, 1, 2, 3), "replicate")
    assert rep.period_ms == pytest.approx(100.0)
    assert rep.latency_ms == pytest.approx(400.0)


def test_reverse_objective_minimises_period_under_latency_bound() -> None:
    p = _problem(bw=1000.0)
    loose = solve_intra(p, latency_ms=1e6)
    tight = solve_intra(p, latency_ms=solve_intra(p).latency_ms * 1.001)
    assert loose.period_ms <= tight.period_ms
    assert tight.latency_ms <= solve_intra(p).latency_ms * 1.001


def test_heterogeneous_shares_follow_speed() -> None:
    comp = np.array([[10.0, 40.0]])
    p = IntraProblem(comp, [0.0], [0.0], np.full((2, 2), 1e9), (("channel",),))
    # speeds 1/10 and 1/40 -> shares 0.8/0.2 -> both parts take 8 ms
    assert unit_cost_ms(p, 0, 0, "channel", (0, 1), 0) == pytest.approx(8.0)


def test_spatial_cost_counts_whole_rows_as_the_split_slices_do() -> None:
    """Two devices of speed 1/10 and 1/12 split a 5-row map 3 + 2 (``row_ranges``): the slowest part is not
    a 0.545 share of the work but 3/5 of it; on a 64-row map the rounding hardly matters."""
    from fleetpipe.models.split import row_ranges

    def cost(rows: float) -> float:
        p = IntraProblem(compute_ms=np.array([[100.0, 120.0]]), in_bytes=np.zeros(1), out_bytes=np.zeros(1),
                         bw_mbps=np.full((2, 2), 1000.0), kinds=(("spatial",),), halo_rows=np.zeros(1),
                         in_rows=np.array([rows]), out_rows=np.array([rows]))
        return unit_cost_ms(p, 0, 0, "spatial", (0, 1), 0)

    shares = [1 / 100 / (1 / 100 + 1 / 120), 1 / 120 / (1 / 100 + 1 / 120)]  # 0.545, 0.455
    assert row_ranges(5, shares) == [(0, 3), (3, 5)]
    assert cost(5) == pytest.approx(max(100.0 * 3 / 5, 120.0 * 2 / 5))  # 60 ms, not 54.5
    assert cost(64) == pytest.approx(max(100.0 * 35 / 64, 120.0 * 29 / 64))
    assert cost(64) < cost(5)
