"""ScalPipe online re-planning: deviation detection and fine-tuning on synthetic problems."""

from __future__ import annotations

import numpy as np
import pytest

from fleetpipe.planner.adapt import Deviation, DeviationMonitor, fine_tune, rescale_problem
from fleetpipe.planner.cost import Stage, evaluate
from fleetpipe.planner.problem import Problem


def _problem(n_layers: int = 12, n_dev: int = 3, replication: bool = False) -> Problem:
    return Problem(
        layer_names=tuple(f"l{i}" for i in range(n_layers)),
        compute_ms=np.full((n_layers, n_dev), 2.0), out_bytes=np.full(n_layers, 10_000.0),
        param_bytes=np.full(n_layers, 1e6), input_bytes=10_000.0,
        device_names=tuple(f"d{i}" for i in range(n_dev)), mem_bytes=np.full(n_dev, 1e9),
        bw_mbps=np.full((n_dev, n_dev), 1000.0), allow_replication=replication,
    )


PLAN = (Stage((0,), 0, 3), Stage((1,), 4, 7), Stage((2,), 8, 11))


def test_rescale_scales_one_column() -> None:
    p = _problem()
    q = rescale_problem(p, 1, 2.5)
    assert np.all(q.compute_ms[:, 1] == 5.0) and np.all(q.compute_ms[:, [0, 2]] == 2.0)
    assert np.all(p.compute_ms[:, 1] == 2.0)  # pure
    with pytest.raises(ValueError):
        rescale_problem(p, 0, 0.0)


def test_sustained_slowdown_triggers_fine_tune_moving_layers_off() -> None:
    p = _problem()
    mon = DeviationMonitor.for_plan(p, PLAN, threshold=0.2, window_s=3.0)
    assert mon.predicted_ms == (8.0, 8.0, 8.0)
    for t in range(10):  # device 1 runs 2x slower for 10 s
        for k in range(3):
            mon.observe(k, 16.0 if k == 1 else 8.0 * (1 + 0.05 * ((t + k) % 2)), now=float(t))
    devs = mon.deviating(now=9.0)
    assert [d.stage for d in devs] == [1] and devs[0].ratio == pytest.approx(2.0)
    result = fine_tune(p, PLAN, devs)
    assert result is not None
    slow_stage = next(s for s in result.stages if 1 in s.devices)
    assert slow_stage.last - slow_stage.first + 1 < 4  # layers moved off the slowed device
    before = evaluate(rescale_problem(p, 1, 2.0), PLAN).bottleneck_ms
    assert result.bottleneck_ms < before * 0.95
    covered = sorted(i for s in result.stages for i in range(s.first, s.last + 1))
    assert covered == list(range(12))  # no layer lost or duplicated


def test_single_spike_does_not_trigger() -> None:
    mon = DeviationMonitor([8.0, 8.0, 8.0], threshold=0.2, window_s=3.0)
    for t in range(10):
        for k in range(3):
            mon.observe(k, 80.0 if (k == 1 and t == 8) else 8.0, now=float(t))
    assert mon.deviating(now=9.0) == []
    assert mon.deviating(now=9.5) == []


def test_within_threshold_no_change() -> None:
    p = _problem()
    mon = DeviationMonitor.for_plan(p, PLAN, threshold=0.2, window_s=3.0)
    for t in range(10):
        for k in range(3):
            mon.observe(k, 8.0 * 1.15, now=float(t))
    assert mon.deviating(now=9.0) == []
    assert fine_tune(p, PLAN, [Deviation(1, 1.15, 3)]) is None  # 15 %: not worth a new epoch
    assert fine_tune(p, PLAN, []) is None


def test_needs_enough_recent_samples_and_reset() -> None:
    mon = DeviationMonitor([10.0], threshold=0.2, window_s=2.0, min_samples=3)
    mon.observe(0, 30.0, now=0.0)
    mon.observe(0, 30.0, now=1.0)
    assert mon.deviating(now=1.0) == []
    mon.observe(0, 30.0, now=2.0)
    assert [d.stage for d in mon.deviating(now=2.0)] == [0]
    assert mon.deviating(now=10.0) == []  # old samples expired
    mon.observe(0, 5.0, now=11.0)
    mon.observe(0, 5.0, now=11.5)
    mon.observe(0, 5.0, now=12.0)
    assert mon.deviating(now=12.0)[0].ratio == pytest.approx(0.5)  # faster than predicted also counts
    mon.reset()
    assert mon.deviating(now=12.0) == []


def test_fine_tune_can_add_a_replica() -> None:
    p = _problem(n_layers=6, n_dev=4, replication=True)
    plan = (Stage((0,), 0, 1), Stage((1,), 2, 3), Stage((2,), 4, 5))  # device 3 idle
    result = fine_tune(p, plan, [Deviation(1, 3.0, 5)])
    assert result is not None
    assert any(3 in s.devices for s in result.stages)
    assert result.bottleneck_ms < evaluate(rescale_problem(p, 1, 3.0), plan).bottleneck_ms * 0.95
