"""The planner's cost matrix from node-reported layer times: reported, node ratio, learned (if it validates), scaled."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest

from fleetpipe import wire
from fleetpipe.planner.loop import node_slowdown
from fleetpipe.planner.reported import ReportedCosts

HOST_SPEED = 10.0
RNG = np.random.default_rng(0)
# 40 layers from 0.02 ms to 20 ms on the host: small layers are where fixed overheads show.
HOST_MS = np.exp(RNG.uniform(np.log(0.02), np.log(20.0), 40))


def _birth(speed: float, factor: float = 1.0) -> SimpleNamespace:
    return SimpleNamespace(speed=speed, emulate_factor=factor)


def _slowdown(birth: SimpleNamespace) -> float:
    return node_slowdown(birth, HOST_SPEED)


def _profile(node: str, first: int, ms: np.ndarray, model_id: str = "m1", threads: int = 1) -> wire.NodeProfile:
    return wire.NodeProfile("lab", node, 1.0, model_id, first, first + len(ms) - 1, tuple(float(v) for v in ms),
                            threads)


def _costs() -> ReportedCosts:
    return ReportedCosts("m1", HOST_MS, HOST_SPEED)


def test_without_reports_every_cell_is_scaled() -> None:
    m = _costs().matrix(["a", "b"], [_birth(5.0), _birth(10.0, factor=3.0)], _slowdown)
    np.testing.assert_allclose(m.compute_ms[:, 0], HOST_MS * 2.0)
    np.testing.assert_allclose(m.compute_ms[:, 1], HOST_MS * 3.0)
    assert set(m.source.ravel()) == {"scaled"} and not m.learned


def test_reported_layers_are_used_and_the_rest_follow_the_nodes_measured_ratio() -> None:
    costs = _costs()
    # Its speed figure says 2x slower; it measures 5x slower on layers 10..14.
    assert costs.add(_profile("a", 10, HOST_MS[10:15] * 5.0 + np.array([0, 0, 0.001, 0, 0]))) is True
    m = costs.matrix(["a", "b"], [_birth(5.0), _birth(5.0)], _slowdown)
    np.testing.assert_allclose(m.compute_ms[10:15, 0], HOST_MS[10:15] * 5.0 + np.array([0, 0, 0.001, 0, 0]))
    assert set(m.source[10:15, 0]) == {"reported"} and set(m.source[:10, 0]) == {"ratio"}
    np.testing.assert_allclose(m.compute_ms[:10, 0], HOST_MS[:10] * 5.0, rtol=1e-3)
    np.testing.assert_allclose(m.compute_ms[:, 1], HOST_MS * 2.0)  # b reported nothing: its speed figure
    assert "a 5 ratio" not in m.summary(["a", "b"]) and "35 ratio+5 reported" in m.summary(["a", "b"])


def test_a_newer_report_overwrites_and_foreign_reports_are_ignored() -> None:
    costs = _costs()
    costs.add(_profile("a", 0, HOST_MS[:3] * 2))
    costs.add(_profile("a", 1, HOST_MS[1:3] * 4))
    assert costs.reports["a"] == pytest.approx({0: HOST_MS[0] * 2, 1: HOST_MS[1] * 4, 2: HOST_MS[2] * 4})
    assert costs.add(_profile("b", 0, HOST_MS[:3], model_id="other")) is False
    assert costs.add(_profile("b", 38, np.ones(5))) is False  # layers past the model's end
    assert set(costs.reports) == {"a"}


def test_one_reported_layer_is_not_a_ratio() -> None:
    costs = _costs()
    costs.add(_profile("a", 7, HOST_MS[7:8] * 9))
    m = costs.matrix(["a"], [_birth(5.0)], _slowdown)
    assert m.source[7, 0] == "reported" and m.compute_ms[7, 0] == pytest.approx(HOST_MS[7] * 9)
    np.testing.assert_allclose(np.delete(m.compute_ms[:, 0], 7), np.delete(HOST_MS, 7) * 2.0)


def _accelerator_ms(ratio: float) -> np.ndarray:
    """A device ``ratio`` times faster than the host on big layers with a 0.3 ms launch cost per layer: speed
    scaling is badly wrong on small layers, and the error depends on the device's speed."""
    return HOST_MS / ratio + 0.3


def test_learned_estimator_costs_an_unprofiled_device_when_it_beats_scaling() -> None:
    pytest.importorskip("sklearn")
    costs = _costs()
    for name, ratio in (("j2", 2.0), ("j8", 8.0), ("j16", 16.0)):
        costs.add(_profile(name, 0, _accelerator_ms(ratio)))
    names = ["j2", "j8", "j16", "new"]
    births = [_birth(HOST_SPEED * r) for r in (2.0, 8.0, 16.0, 4.0)]
    m = costs.matrix(names, births, _slowdown)
    assert m.learned and set(m.source[:, 3]) == {"learned"}, m.summary(names)
    assert m.validation["learned"] < 0.9 * m.validation["scaled"]
    truth = _accelerator_ms(4.0)
    err_learned = np.median(np.abs(m.compute_ms[:, 3] - truth) / truth)
    err_scaled = np.median(np.abs(HOST_MS / 4.0 - truth) / truth)
    assert err_learned < 0.7 * err_scaled, (err_learned, err_scaled)  # trees step between the speeds they saw
    assert "learned used" in m.summary(names)


def test_learned_estimator_is_not_used_where_scaling_is_exact() -> None:
    """An emulated fleet runs exactly factor x the host: scaling validates better and stays."""
    pytest.importorskip("sklearn")
    costs = _costs()
    noise = np.random.default_rng(1)
    for name, factor in (("a", 2.0), ("b", 4.0), ("c", 8.0)):
        costs.add(_profile(name, 0, HOST_MS * factor * noise.uniform(0.97, 1.03, len(HOST_MS))))
    births = [_birth(HOST_SPEED / f, factor=f) for f in (2.0, 4.0, 8.0, 3.0)]
    m = costs.matrix(["a", "b", "c", "d"], births, _slowdown)
    assert not m.learned and set(m.source[:, 3]) == {"scaled"}
    np.testing.assert_allclose(m.compute_ms[:, 3], HOST_MS * 3.0)
    assert m.validation["scaled"] < m.validation["learned"]
    assert not m.learned_layers and m.validation["layers_ratio"] < m.validation["layers_learned"]


def test_learned_estimator_costs_unreported_layers_when_it_beats_the_nodes_ratio() -> None:
    """A device that ran only the big layers: its ratio says 8x faster everywhere, the small layers are not."""
    pytest.importorskip("sklearn")
    costs = _costs()
    for name, ratio in (("j2", 2.0), ("j4", 4.0), ("j16", 16.0)):
        costs.add(_profile(name, 0, _accelerator_ms(ratio)))
    big = np.argsort(HOST_MS)[20:]  # it reported its 20 biggest layers (as single-layer reports)
    for k in big:
        costs.add(_profile("j8", int(k), _accelerator_ms(8.0)[k:k + 1]))
    names = ["j2", "j4", "j16", "j8"]
    m = costs.matrix(names, [_birth(HOST_SPEED * r) for r in (2.0, 4.0, 16.0, 8.0)], _slowdown)
    assert m.learned_layers, m.summary(names)
    small = np.setdiff1d(np.arange(len(HOST_MS)), big)
    assert set(m.source[small, 3]) == {"learned"} and set(m.source[big, 3]) == {"reported"}
    truth = _accelerator_ms(8.0)[small]
    ratio = np.median(_accelerator_ms(8.0)[big] / HOST_MS[big])
    err_learned = np.median(np.abs(m.compute_ms[small, 3] - truth) / truth)
    err_ratio = np.median(np.abs(HOST_MS[small] * ratio - truth) / truth)
    assert err_learned < 0.7 * err_ratio, (err_learned, err_ratio)


def test_without_scikit_learn_unprofiled_devices_are_scaled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.ensemble", None)
    costs = _costs()
    for name, ratio in (("j2", 2.0), ("j8", 8.0)):
        costs.add(_profile(name, 0, _accelerator_ms(ratio)))
    m = costs.matrix(["j2", "j8", "new"], [_birth(20.0), _birth(80.0), _birth(40.0)], _slowdown)
    assert not m.learned and set(m.source[:, 2]) == {"scaled"}
    np.testing.assert_allclose(m.compute_ms[:, 2], HOST_MS / 4.0)


def test_build_problem_takes_the_matrix_and_checks_its_shape() -> None:
    from fleetpipe.models import zoo
    from fleetpipe.models.onnx_graph import load_onnx
    from fleetpipe.planner.loop import ModelInfo, build_problem

    proto = zoo.build("resnet18", width=0.25, resolution=32, num_classes=10)
    graph = load_onnx(proto)
    n = len(graph.layers)
    model = ModelInfo("m1", proto, graph, np.ones(n), HOST_SPEED)
    nodes = {k: SimpleNamespace(birth=SimpleNamespace(speed=5.0, emulate_factor=1.0, bandwidth_mbps=None,
                                                      mem_bytes=None, device_class="x86")) for k in "ab"}
    compute = np.arange(2 * n, dtype=float).reshape(n, 2)
    problem = build_problem(model, nodes, 8, compute=compute)
    np.testing.assert_array_equal(problem.compute_ms, compute)
    with pytest.raises(ValueError, match="compute is"):
        build_problem(model, nodes, 8, compute=compute[:, :1])
