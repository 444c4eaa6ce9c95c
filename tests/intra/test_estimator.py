"""The learned cost estimator: features, fit/predict, FLOPs fallback, profiling cache."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from fleetpipe.models import zoo
from fleetpipe.models.onnx_graph import load_onnx
from fleetpipe.planner import estimator as E


def _synthetic(n: int = 400, seed: int = 0):
    """Times that are overhead-bound for small layers and scale sub-linearly with threads."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, len(E.LAYER_FEATURES)))
    flops = 10 ** rng.uniform(4, 9, n)
    conv = rng.integers(0, 2, n)
    x[:, E.LAYER_FEATURES.index("op_Conv")] = conv
    x[:, E.LAYER_FEATURES.index("op_MatMul")] = 1 - conv
    x[:, E.LAYER_FEATURES.index("log_flops")] = np.log1p(flops)
    threads = rng.choice([1, 2, 4], n)
    dev = np.column_stack([10.0 * threads**0.5, threads])
    ms = 0.02 + flops / (dev[:, 0] * 1e6) * (1 + conv) * (1 + 0.05 * rng.standard_normal(n))
    return x, dev, ms


def test_learned_beats_flops_scaling_on_nonlinear_times() -> None:
    x, dev, ms = _synthetic()
    est = E.fit_estimator(x[:300], dev[:300], ms[:300])
    assert est.method == "gbt"
    learned = E.relative_errors(est.predict_ms(x[300:], dev[300:]), ms[300:])
    base = E.relative_errors(E.flops_scaling_ms(np.expm1(x[300:, E.LAYER_FEATURES.index("log_flops")]),
                                                dev[300:, 0]), ms[300:])
    assert learned["median"] < 0.5 * base["median"]
    grid = E.estimate_compute_ms(est, x[:5], dev[:3])
    assert grid.shape == (5, 3) and np.all(grid > 0)


def test_falls_back_to_flops_scaling_without_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    x, dev, ms = _synthetic(50)
    for mod in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    est = E.fit_estimator(x, dev, ms)
    assert est.method == "flops"
    flops = np.expm1(x[:, E.LAYER_FEATURES.index("log_flops")])
    np.testing.assert_allclose(est.predict_ms(x, dev), flops / (dev[:, 0] * 1e6))


def test_layer_features_of_zoo_models() -> None:
    model = zoo.build("resnet18", width=0.125, resolution=32)
    graph = load_onnx(model)
    f = E.layer_features(model, graph)
    assert f.shape == (len(graph), len(E.LAYER_FEATURES))
    col = E.LAYER_FEATURES.index
    assert f[0, col("kernel")] == 7 and f[0, col("op_Conv")] == 1 and f[0, col("op_MaxPool")] == 1
    assert f[-1, col("op_Gemm")] == 1 and f[-1, col("out_channels")] == 1000
    vit = zoo.build("vit", resolution=16, patch=4, dim=32, depth=1, heads=2)
    fv = E.layer_features(vit, load_onnx(vit))
    assert fv[:, col("op_Softmax")].sum() == 1 and fv[:, col("op_LayerNormalization")].sum() >= 2


def test_profile_configs_caches(tmp_path) -> None:
    cache = tmp_path / "p.json"
    variants = [("resnet18", {"width": 0.125, "resolution": 32})]
    doc = E.profile_configs(variants, [1], runs=2, cache=cache)
    assert cache.exists() and set(doc["configs"]) == {"1"}
    assert len(doc["rows"]) == len(load_onnx(zoo.build("resnet18", **variants[0][1])))
    assert all(r["ms"] >= 0 for r in doc["rows"])
    assert E.profile_configs([], [7], cache=cache) == doc  # read back from the cache
