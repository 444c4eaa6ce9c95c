"""fleetpipe.metrics against synthetic health and hop sequences with known timings."""

from __future__ import annotations

import pytest

from fleetpipe import metrics, wire
from fleetpipe.metrics import FleetView, analyse_hops, metrics_payload, percentile, pipeline_payload
from tests.observe._synth import T, birth, frames, health, plan

approx = lambda v: pytest.approx(v, rel=1e-9, abs=1e-9)  # noqa: E731


def _steady_view(replicas: tuple[str, ...] = ("b",)) -> FleetView:
    """a: stage 0, 50 fps, 10 ms compute, 10 ms idle; stage 1 replicas share 50 fps at 20 ms compute."""
    view = FleetView("f", window_s=5.0, lease_s=3.0)
    view.apply(plan(replicas=replicas), now=T)
    for node in ("a", *replicas):
        view.apply(birth(node), now=T)
    per = 50 // len(replicas)
    for k in range(3):
        view.apply(health("a", T + k, 50 * k, stage=0, compute=10.0, idle=10.0), now=T + k)
        for r in replicas:
            view.apply(health(r, T + k, per * k, stage=1, compute=20.0 * len(replicas), queue=k), now=T + k)
    return view


def test_node_and_stage_figures_from_health() -> None:
    snap = _steady_view().snapshot(now=T + 2.5)
    a, b = snap.nodes
    assert (a.node_id, a.alive, a.device_class, a.stage) == ("a", True, "pi4", 0)
    assert a.fps_out == approx(50.0)
    assert a.utilisation == approx(0.5)  # 50 fps * 10 ms
    assert a.bubble_ratio == approx(0.5)  # idle 10 / (10 + 0 + 10)
    assert b.utilisation == approx(1.0) and b.bubble_ratio == 0.0
    s0, s1 = snap.stages
    assert (s0.index, s0.nodes, s0.fps_out, s0.compute_ms, s0.idle_ms) == (0, ("a",), approx(50.0), 10.0, 10.0)
    assert s0.predicted_utilisation == approx(0.5) and s1.predicted_utilisation == approx(1.0)
    assert s1.queue_depth == 2 and s1.frames_out == 100 and s1.bits == 8
    p = snap.pipeline
    assert p.throughput_fps == approx(50.0)
    assert (p.bottleneck_stage, p.bottleneck_utilisation) == (1, approx(1.0))
    assert p.predicted_fps == approx(50.0) and p.nodes_alive == 2 and p.epoch == 3


def test_replicas_add_throughput_and_average_utilisation() -> None:
    snap = _steady_view(replicas=("b", "c")).snapshot(now=T + 2.5)
    s1 = snap.stages[1]
    assert s1.nodes == ("b", "c") and s1.alive == 2
    assert s1.fps_out == approx(50.0)  # 25 + 25
    assert s1.utilisation == approx(1.0)  # each: 25 fps * 40 ms
    assert snap.pipeline.throughput_fps == approx(50.0)


def test_latency_percentiles_from_results_and_explicit() -> None:
    view = FleetView("f")
    for lat in (50.0, 10.0, 40.0, 20.0, 30.0):
        view.add_latency(lat)
    p = view.snapshot(now=T).pipeline
    assert (p.latency_ms_p50, p.latency_ms_p90, p.latency_ms_p99) == (approx(30.0), approx(46.0), approx(49.6))
    view = FleetView("f")
    for i, f in enumerate(frames(n=3)):
        view.apply(wire.Result(fleet="f", frame_id=f"x{i}", client_id="c", epoch=3, tensors=(), ts=T, hops=f))
    assert view.snapshot(now=T).pipeline.latency_ms_p50 == approx(35.0)  # 10 + 5 + 20 ms, no queueing
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_liveness_death_lease_and_restart() -> None:
    view = _steady_view()
    assert [n.alive for n in view.snapshot(now=T + 2.5).nodes] == [True, True]
    assert [n.alive for n in view.snapshot(now=T + 5.5).nodes] == [False, False]  # past the 3 s lease
    view.apply(wire.NodeDeath(fleet="f", node_id="b", seq=1, ts=T + 3, reason="killed"), now=T + 3)
    b = view.snapshot(now=T + 3).nodes[1]
    assert (b.alive, b.death_reason) == (False, "killed")
    assert view.snapshot(now=T + 3).stages[1].alive == 0
    # a restart: new birth seq, counters start again; rates only use the new incarnation
    view.apply(birth("b", seq=2), now=T + 4)
    view.apply(health("b", T + 4, 0, stage=1, compute=20.0, seq=2), now=T + 4)
    view.apply(health("b", T + 6, 30, stage=1, compute=20.0, seq=2), now=T + 6)
    b = view.snapshot(now=T + 6).nodes[1]
    assert b.alive and b.fps_out == approx(15.0) and b.death_reason == ""
    view.apply(health("b", T + 7, 999, stage=1, compute=20.0, seq=1), now=T + 7)  # old incarnation: ignored
    assert view.snapshot(now=T + 7).nodes[1].frames_out == 30


def test_replans_errors_metrics_and_foreign_fleet() -> None:
    view = FleetView("f")
    view.apply(plan(epoch=3), now=T)
    view.apply(plan(epoch=4), now=T + 1)
    view.apply(plan(epoch=2), now=T + 2)  # stale retained plan
    assert view.plan is not None and view.plan.epoch == 4
    assert [(r.old_epoch, r.new_epoch, r.stages) for r in view.replans] == [(3, 4, 2)]
    for i in range(25):
        view.apply(wire.ErrorReport(fleet="f", source="a", kind="DecodeError", detail=f"bad {i}", ts=T))
    snap = view.snapshot(now=T)
    assert snap.errors_seen == 25 and len(snap.errors) == 20 and snap.errors[-1].detail == "bad 24"
    assert not view.apply(plan(fleet="g"))
    assert not view.apply_payload(b"\x00garbage")
    assert view.apply_payload(wire.encode(wire.Metrics(fleet="f", node_id="planner", ts=T, values={"x": 1.5})))
    assert view.snapshot(now=T).extra_metrics == {"planner": {"x": 1.5}}


def test_metrics_payload_layout_and_values() -> None:
    hist = [health("a", T + k, 50 * k, stage=0, compute=10.0, idle=6.0, transfer=4.0, queue=1) for k in range(4)]
    pay = metrics_payload(hist, window_s=2.0)  # only the last 3 (T+1..T+3) are within 2 s
    assert set(pay) == set(metrics.NODE_METRIC_KEYS)
    assert pay["window_s"] == approx(2.0) and pay["fps_out"] == approx(50.0) and pay["fps_in"] == approx(50.0)
    assert pay["utilisation"] == approx(0.5) and pay["bubble_ratio"] == approx(0.3)
    assert (pay["stage"], pay["epoch"], pay["bits"], pay["frames_out_total"]) == (0.0, 3.0, 8.0, 150.0)
    assert all(isinstance(v, float) for v in pay.values())
    wire.Metrics(fleet="f", node_id="a", ts=T, values=pay)  # publishable as is
    # counters going down (restart without a new seq) restart the rate window
    hist.append(health("a", T + 4, 10, stage=0, compute=10.0))
    hist.append(health("a", T + 5, 30, stage=0, compute=10.0))
    assert metrics_payload(hist)["fps_out"] == approx(20.0)
    none = metrics_payload([health("a", T, 0, stage=None, compute=0.0)])
    assert none["stage"] == -1.0 and none["fps_out"] == 0.0 and none["utilisation"] == 0.0
    assert metrics_payload([]) == {}


def test_pipeline_payload_keys() -> None:
    view = _steady_view()
    view.add_latency(12.0)
    pay = pipeline_payload(view.snapshot(now=T + 2.5))
    assert set(metrics.PIPELINE_METRIC_KEYS) <= set(pay)
    assert pay["pipeline.throughput_fps"] == approx(50.0) and pay["pipeline.bottleneck_stage"] == 1.0
    assert pay["stage.0.utilisation"] == approx(0.5) and pay["stage.1.predicted_ms"] == 20.0
    assert pay["stage.1.replicas"] == 1.0 and pay["pipeline.latency_ms_p99"] == approx(12.0)
    wire.Metrics(fleet="f", node_id="planner", ts=T, values=pay)


def test_analyse_hops_exact_busy_idle_transfer() -> None:
    # stage 0: 10 ms every 20 ms; stage 1: 20 ms, 5 ms after -> busy back to back from 15 to 115 ms
    st = analyse_hops(frames(n=5), plan())
    assert st.frames == 5 and st.wall_s == approx(0.115)
    assert st.stage_utilisation[0] == approx(50 / 115) and st.stage_utilisation[1] == approx(100 / 115)
    assert st.stage_compute_ms == {0: approx(10.0), 1: approx(20.0)}
    assert st.stage_transfer_ms == {1: approx(5.0)}
    assert st.stage_idle_s[0] == approx(0.065) and st.stage_idle_s[1] == approx(0.015)
    a, b = st.rows
    assert [(x - T, y - T) for x, y in a.idle] == [approx((0.010, 0.020)), approx((0.030, 0.040)),
                                                   approx((0.050, 0.060)), approx((0.070, 0.080)),
                                                   approx((0.090, 0.115))]
    assert len(b.busy) == 1 and b.busy_s == approx(0.100) and b.waits == ()
    assert st.predicted_utilisation == {0: approx(0.5), 1: approx(1.0)}
    assert st.latencies_ms == tuple(approx(35.0) for _ in range(5))
    assert st.throughput_fps == approx(5 / 0.115)


def test_analyse_hops_queueing_shows_as_waits() -> None:
    st = analyse_hops(frames(n=3, c1_ms=30.0))  # stage 1 slower than the arrival period: frames queue
    b = st.rows[1]
    assert [(x - T, y - T) for x, y in b.waits] == [approx((0.035, 0.045)), approx((0.055, 0.075))]
    assert b.busy_s == approx(0.090) and st.stage_utilisation[1] == approx(0.090 / 0.105)
    assert st.latencies_ms == (approx(45.0), approx(55.0), approx(65.0))
    assert st.predicted_utilisation == {}
    with pytest.raises(ValueError):
        analyse_hops([])


def test_calibrated_period_replaces_compute_keeps_transfer() -> None:
    stages = (wire.PlanStage(index=0, first_layer=0, last_layer=1, nodes=("a",), bits=8, predicted_ms=12.0,
                             compute_ms=10.0, transfer_ms=12.0),
              wire.PlanStage(index=1, first_layer=2, last_layer=3, nodes=("b", "c"), bits=32, predicted_ms=11.0,
                             compute_ms=11.0))
    p = wire.Plan(fleet="f", epoch=1, model_id="m", ts=T, bottleneck_ms=12.0, latency_ms=40.0, stages=stages)
    assert metrics.calibrated_period_ms(p, {}) is None  # nothing measured yet
    # stage 0 computes slower than planned but its transfer still dominates; the replicas each take 30 ms a
    # frame and share the frames: 15 ms per frame, the new bottleneck
    assert metrics.calibrated_period_ms(p, {0: [11.5], 1: [30.0, 30.0]}) == approx(15.0)
    # a replica not measured yet (or a nonsense figure) is left out; an unmeasured stage keeps its prediction
    assert metrics.calibrated_period_ms(p, {1: [20.0, 0.0, float("nan")]}) == approx(20.0)
    assert metrics.calibrated_period_ms(p, {1: [4.0, 4.0]}) == approx(12.0)


def test_calibrated_period_without_split_prediction_counts_all_as_compute() -> None:
    # plan() has only predicted_ms (10, 20): measuring 25 ms on stage 1 makes it the 25 ms bottleneck, and a
    # faster stage 1 leaves stage 0's 10 ms prediction
    assert metrics.calibrated_period_ms(plan(), {1: [25.0]}) == approx(25.0)
    assert metrics.calibrated_period_ms(plan(), {1: [5.0]}) == approx(10.0)


def test_snapshot_calibrates_the_plan_with_health_compute() -> None:
    snap = _steady_view(replicas=("b", "c")).snapshot(now=T + 2.5)
    # stage 1's two replicas measure 40 ms each: 20 ms per frame, as predicted; stage 0 measures 10 ms
    assert snap.pipeline.predicted_fps == approx(50.0) and snap.pipeline.calibrated_fps == approx(50.0)
    view = FleetView("f", window_s=5.0, lease_s=3.0)
    view.apply(plan(), now=T)
    for node in ("a", "b"):
        view.apply(birth(node), now=T)
    view.apply(health("b", T, 5, stage=1, compute=25.0), now=T)
    pay = pipeline_payload(view.snapshot(now=T + 0.5))
    assert pay["pipeline.predicted_fps"] == approx(50.0) and pay["pipeline.calibrated_fps"] == approx(40.0)
