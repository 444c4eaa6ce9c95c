"""Per-layer profiling sums to the whole model's time."""

from __future__ import annotations

from typing import Any

import pytest

from fleetpipe.models import zoo
from fleetpipe.models.build_tflite import build_zoo
from fleetpipe.models.onnx_graph import load_onnx
from fleetpipe.models.profile import _profile_by_slices, profile_layers, profile_tflite_layers, random_feeds
from fleetpipe.models.tflite import load_tflite

from ._helpers import tiny


def test_profile_sums_to_whole_model() -> None:
    model = zoo.build("resnet18", width=0.5, resolution=96)
    g = load_onnx(model)
    best = None
    for _ in range(3):  # the machine is shared: retry a noisy measurement
        prof = profile_layers(model, g, runs=15)
        best = prof if best is None or abs(prof.sum_ratio - 1) < abs(best.sum_ratio - 1) else best
        if 0.9 <= prof.sum_ratio <= 1.1:
            break
    assert best is not None and 0.9 <= best.sum_ratio <= 1.1, best
    assert best.method == "profiler" and len(best.per_layer_ms) == len(g.layers)
    assert all(ms > 0 for ms in best.per_layer_ms)  # every layer matched, none lost to renaming
    assert best.overhead_ms == best.whole_ms - sum(best.per_layer_ms)


def test_profile_transformer_matches_every_layer() -> None:
    model = tiny("vit")
    g = load_onnx(model)
    prof = profile_layers(model, g, runs=3)
    assert all(ms > 0 for ms in prof.per_layer_ms)


def test_slice_timing_fallback() -> None:
    model = tiny("resnet18")
    g = load_onnx(model)
    prof = _profile_by_slices(model, g, random_feeds(g), 3, ("CPUExecutionProvider",), 1, 1)
    assert prof.method == "slices" and len(prof.per_layer_ms) == len(g.layers)
    assert all(ms > 0 for ms in prof.per_layer_ms) and prof.whole_ms > 0


def test_tflite_profile_sums_to_whole_model() -> None:
    tfl = build_zoo("resnet18", width=0.5, resolution=96)
    g = load_tflite(tfl)
    best = None
    for _ in range(3):  # the machine is shared: retry a noisy measurement
        prof = profile_tflite_layers(tfl, g, runs=15)
        best = prof if best is None or abs(prof.sum_ratio - 1) < abs(best.sum_ratio - 1) else best
        if 0.9 <= best.sum_ratio <= 1.1:
            break
    assert best is not None and 0.9 <= best.sum_ratio <= 1.1, best
    assert best.method == "slices" and len(best.per_layer_ms) == len(g.layers)
    assert all(ms > 0 for ms in best.per_layer_ms)
    assert best.sum_ratio == pytest.approx(sum(best.per_layer_ms) / best.whole_ms)


def test_tflite_profile_of_a_transformer_and_bad_runs() -> None:
    from ._helpers import TINY

    tfl = build_zoo("vit", **TINY["vit"])
    g = load_tflite(tfl)
    prof = profile_tflite_layers(tfl, g, runs=3, warmup=1)
    assert len(prof.per_layer_ms) == len(g.layers) and prof.whole_ms > 0
    assert all(ms >= 0 for ms in prof.per_layer_ms)
    with pytest.raises(ValueError, match="runs"):
        profile_tflite_layers(tfl, g, runs=0)


def test_profile_ignores_a_preempted_run() -> None:
    """Per-layer times are medians over runs: one run the scheduler preempted (10 ms in one kernel) is ignored."""
    from fleetpipe.models.profile import _from_events

    model = tiny("resnet18")
    g = load_onnx(model)
    events = []
    for r in range(5):
        t0 = 1_000_000 * (r + 1)
        events.append({"cat": "Session", "name": "model_run", "ts": t0, "dur": 50_000})
        for i, layer in enumerate(g.layers):
            dur = 10_000 if (r == 2 and i == 0) else 100
            events.append({"cat": "Node", "name": f"{layer.nodes[0]}_kernel_time", "ts": t0 + 10 * i + 1, "dur": dur})
    prof = _from_events(events, model, g, None, warmup=0)
    assert prof is not None
    # The time outside the kernels (its median over runs) is spread by kernel count (one per layer here): the
    # preempted run's 10 ms kernel is outvoted by the median, and the layers sum to the whole run.
    n = len(g.layers)
    assert prof.per_layer_ms == pytest.approx([0.1 + (50.0 - 0.1 * n) / n] * n)
    assert prof.whole_ms == pytest.approx(50.0)
    assert prof.sum_ratio == pytest.approx(1.0)


def _paddle_like(blocks: int = 6, ch: int = 16) -> Any:
    """A conv net named as paddle2onnx names it: unnamed nodes, tensors like ``batch_norm_0.tmp_2``.

    onnxruntime's NCHWc transformer renames such convolutions ``<tensor>_nchwc`` and adds ``Reorder*`` nodes,
    none of which carry a name of the original graph.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    prev, cin = "x", 3
    for b in range(blocks):
        w = numpy_helper.from_array(rng.standard_normal((ch, cin, 3, 3)).astype(np.float32) * 0.1, f"conv2d_{b}.w_0")
        bn = [numpy_helper.from_array(v.astype(np.float32), f"batch_norm_{b}.{k}")
              for k, v in (("w_0", rng.random(ch) + 0.5), ("b_0", rng.standard_normal(ch)),
                           ("w_1", rng.standard_normal(ch)), ("w_2", rng.random(ch) + 0.5))]
        inits += [w, *bn]
        nodes.append(helper.make_node("Conv", [prev, w.name], [f"conv2d_{b}.tmp_0"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("BatchNormalization", [f"conv2d_{b}.tmp_0", *(t.name for t in bn)],
                                      [f"batch_norm_{b}.tmp_2"]))
        nodes.append(helper.make_node("Relu", [f"batch_norm_{b}.tmp_2"], [f"relu_{b}.tmp_0"]))
        prev, cin = f"relu_{b}.tmp_0", ch
    nodes.append(helper.make_node("GlobalAveragePool", [prev], ["pool2d_0.tmp_0"]))
    nodes.append(helper.make_node("Flatten", ["pool2d_0.tmp_0"], ["flatten_0.tmp_0"]))
    graph = helper.make_graph(
        nodes, "paddle_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("flatten_0.tmp_0", TensorProto.FLOAT, [1, ch])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_profile_owns_every_kernel_of_renamed_nodes() -> None:
    """Kernels of nodes onnxruntime renamed (NCHWc convolutions, Reorder*) land on their own layers, not all on
    layer 0 (which got 1.06 of 1.18 ms, four layers 0, before): every layer is charged, and each layer's share of
    the time stays within 3x its share of the FLOPs (convolutions of one kind here; timing slices as references
    is noisier on a shared host than the property is tight)."""
    model = _paddle_like()
    g = load_onnx(model)
    assert len(g.layers) >= 6
    flops = [layer.flops for layer in g.layers]
    worst = None
    for _ in range(3):  # the machine is shared: retry a noisy measurement
        prof = profile_layers(model, g, runs=15)
        assert prof.method == "profiler", "a kernel no layer owns"
        share = [ms / sum(prof.per_layer_ms) for ms in prof.per_layer_ms]
        flop_share = [f / sum(flops) for f in flops]
        worst = max(max(a / b, b / a) if min(a, b) > 0 else float("inf")
                    for a, b in zip(share, flop_share, strict=True))
        if worst < 3.0:
            break
    assert all(ms > 0 for ms in prof.per_layer_ms), prof
    assert worst is not None and worst < 3.0, (prof, flops)
