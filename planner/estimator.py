"""A learned per-layer cost estimator (FlexPie): gradient-boosted trees over layer and device features.

Features of a layer: op-type counts (one-hot over a fixed vocabulary, summed over the layer's
nodes), log FLOPs, log parameter / input / output bytes, largest kernel, input and output channels,
output spatial size, node count. Features of a device (configuration): its speed figure (GFLOP/s on
a calibration model) and its cores/threads. The target is ``log(ms)``; the model is scikit-learn's
``HistGradientBoostingRegressor``. scikit-learn is optional: it is imported only when fitting, and
without it ``fit_estimator`` returns the FLOPs-scaling baseline (``time = FLOPs / speed``), the
same thing the learned model is compared against.

The training set comes from ``profile_configs``: zoo models at several widths/resolutions profiled
layer by layer with onnxruntime at several ``intra_op_num_threads`` (real measured times, so the
relation to FLOPs is genuinely non-linear: small layers are overhead-bound, threads help big
layers only). Profiles are cached as JSON.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

    from fleetpipe.models.graph import ModelGraph

__all__ = [
    "DEVICE_FEATURES",
    "LAYER_FEATURES",
    "OP_VOCAB",
    "CostEstimator",
    "estimate_compute_ms",
    "fit_estimator",
    "flops_scaling_ms",
    "layer_features",
    "profile_configs",
    "relative_errors",
]

OP_VOCAB = ("Conv", "ConvDW", "MatMul", "Gemm", "Add", "Mul", "Relu", "Clip", "MaxPool", "GlobalAveragePool",
            "Softmax", "LayerNormalization", "Reshape", "Transpose", "Erf", "Concat", "other")
LAYER_FEATURES = (*(f"op_{o}" for o in OP_VOCAB), "log_flops", "log_param_bytes", "log_in_bytes",
                  "log_out_bytes", "kernel", "in_channels", "out_channels", "log_spatial", "nodes")
DEVICE_FEATURES = ("gflops", "threads")
_FLOPS = LAYER_FEATURES.index("log_flops")


@dataclass(frozen=True, slots=True, eq=False)
class CostEstimator:
    """A fitted estimator: ``method`` is ``"gbt"`` (learned) or ``"flops"`` (FLOPs / speed scaling)."""

    method: str
    model: Any = None

    def predict_ms(self, layer_x: np.ndarray, device_x: np.ndarray) -> np.ndarray:
        """Predicted ms for rows of layer features paired with rows of device features."""
        layer_x, device_x = np.atleast_2d(layer_x), np.atleast_2d(device_x)
        if self.method == "flops" or self.model is None:
            return flops_scaling_ms(np.expm1(layer_x[:, _FLOPS]), device_x[:, 0])
        return np.exp(self.model.predict(_join(layer_x, device_x)))


def _join(layer_x: np.ndarray, device_x: np.ndarray) -> np.ndarray:
    dev = np.column_stack([np.log(np.maximum(device_x[:, 0], 1e-9)), device_x[:, 1:]])
    return np.column_stack([layer_x, dev]).astype(np.float64)


def flops_scaling_ms(flops: np.ndarray | float, gflops: np.ndarray | float) -> np.ndarray:
    """The baseline: ``flops / (gflops * 1e9)`` seconds, in ms."""
    return np.asarray(flops, dtype=np.float64) / (np.asarray(gflops, dtype=np.float64) * 1e6)


def fit_estimator(
    layer_x: np.ndarray, device_x: np.ndarray, ms: np.ndarray, *, seed: int = 0, max_iter: int = 300
) -> CostEstimator:
    """Fit gradient-boosted trees on ``log(ms)``; FLOPs scaling when scikit-learn is not installed."""
    try:
        from sklearn.ensemble import HistGradientBoostingRegressor
    except ImportError:
        return CostEstimator("flops")
    model = HistGradientBoostingRegressor(max_iter=max_iter, learning_rate=0.05, max_leaf_nodes=15,
                                          min_samples_leaf=5, l2_regularization=1e-3, random_state=seed)
    model.fit(_join(np.atleast_2d(layer_x), np.atleast_2d(device_x)), np.log(np.maximum(ms, 1e-6)))
    return CostEstimator("gbt", model)


def estimate_compute_ms(est: CostEstimator, layer_x: np.ndarray, device_x: np.ndarray) -> np.ndarray:
    """A ``compute_ms[L, D]`` matrix for the planner from ``L`` layers' and ``D`` devices' features."""
    layer_x, device_x = np.atleast_2d(layer_x), np.atleast_2d(device_x)
    n_l, n_d = len(layer_x), len(device_x)
    pred = est.predict_ms(np.repeat(layer_x, n_d, axis=0), np.tile(device_x, (n_l, 1)))
    return pred.reshape(n_l, n_d)


def relative_errors(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Median and 90th percentile of ``|pred - true| / true``."""
    rel = np.abs(np.asarray(pred) - np.asarray(true)) / np.maximum(np.asarray(true), 1e-9)
    return {"median": float(np.median(rel)), "p90": float(np.percentile(rel, 90)), "n": int(rel.size)}


def layer_features(model: onnx.ModelProto, graph: ModelGraph) -> np.ndarray:
    """``[L, len(LAYER_FEATURES)]`` features of every layer of ``graph``."""
    import onnx
    from onnx import numpy_helper

    from fleetpipe.models.onnx_graph import normalize

    model = normalize(model)
    by_name = {n.name: n for n in model.graph.node}
    inits = {t.name: tuple(numpy_helper.to_array(t).shape) for t in model.graph.initializer}
    shapes = {name: t.shape for name, t in graph.tensors.items()}
    inferred = onnx.shape_inference.infer_shapes(model)
    for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes.setdefault(vi.name, tuple(d.dim_value for d in dims))
    rows = []
    for layer in graph.layers:
        ops = dict.fromkeys(OP_VOCAB, 0)
        kernel = cin = cout = spatial = 0
        for nname in layer.nodes:
            node = by_name[nname]
            op = node.op_type
            if op == "Conv":
                group = next((a.i for a in node.attribute if a.name == "group"), 1)
                op = "ConvDW" if group > 1 else "Conv"
                w = inits.get(node.input[1], ())
                if len(w) == 4:
                    kernel = max(kernel, w[2])
                    cin, cout = max(cin, w[1] * group), max(cout, w[0])
            elif op in ("MatMul", "Gemm"):
                w = inits.get(node.input[1], ())
                if len(w) == 2:
                    cin, cout = max(cin, w[0]), max(cout, w[1])
            ops[op if op in ops else "other"] += 1
            out = shapes.get(node.output[0], ())
            if len(out) == 4:
                spatial = max(spatial, out[2] * out[3])
            elif len(out) == 3:
                spatial = max(spatial, out[1])
        in_b = sum(graph.tensor_bytes.get(t, 0) for t in graph.inputs_of(layer.index))
        rows.append([*ops.values(), math.log1p(layer.flops), math.log1p(layer.param_bytes), math.log1p(in_b),
                     math.log1p(layer.out_bytes), kernel, cin, cout, math.log1p(spatial), len(layer.nodes)])
    return np.array(rows, dtype=np.float64)


def _speed_gflops(threads: int, runs: int = 20) -> float:
    """GFLOP/s of the calibration model (zoo resnet18, width 0.5, 64 px) at ``threads``."""
    from fleetpipe.models import zoo
    from fleetpipe.models.onnx_graph import load_onnx
    from fleetpipe.models.profile import random_feeds
    from fleetpipe.models.slicing import make_session

    model = zoo.build("resnet18", width=0.5, resolution=64)
    graph = load_onnx(model)
    sess = make_session(model, threads=threads)
    feeds = random_feeds(graph)
    for _ in range(3):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return graph.total_flops / float(np.min(times)) / 1e9


def profile_configs(
    variants: Sequence[tuple[str, Mapping[str, Any]]],
    threads: Sequence[int],
    *,
    runs: int = 8,
    cache: str | Path | None = None,
    budget_s: float = 60.0,
) -> dict[str, Any]:
    """Profile every ``(zoo name, build kwargs)`` variant layer by layer at every thread count.

    Returns ``{"configs": {threads: gflops}, "rows": [{model, kw, threads, features, ms}]}``;
    read from / written to ``cache`` (JSON) when given. Stops adding variants after ``budget_s``.
    """
    if cache is not None and Path(cache).exists():
        return json.loads(Path(cache).read_text())
    from fleetpipe.models import zoo
    from fleetpipe.models.onnx_graph import load_onnx
    from fleetpipe.models.profile import profile_layers

    start = time.perf_counter()
    configs = {str(t): _speed_gflops(t) for t in threads}
    rows = []
    for name, kw in variants:
        if time.perf_counter() - start > budget_s:
            break
        model = zoo.build(name, **kw)
        graph = load_onnx(model)
        feats = layer_features(model, graph).tolist()
        for t in threads:
            prof = profile_layers(model, graph, runs=runs, threads=t, warmup=2)
            for layer, ms in zip(graph.layers, prof.per_layer_ms, strict=True):
                rows.append({"model": name, "kw": dict(kw), "layer": layer.index, "threads": t,
                             "flops": layer.flops, "features": feats[layer.index], "ms": ms})
    doc = {"configs": configs, "rows": rows, "seconds": time.perf_counter() - start}
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        Path(cache).write_text(json.dumps(doc))
    return doc
