"""ONNX -> TFLite conversion: every zoo model agrees with onnxruntime and slices at every cut."""

from __future__ import annotations

from functools import cache

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fleetpipe.errors import UnsupportedModel
from fleetpipe.models import zoo
from fleetpipe.models.build_tflite import build_zoo
from fleetpipe.models.onnx_graph import load_onnx
from fleetpipe.models.onnx_to_tflite import SUPPORTED_OPS, onnx_to_tflite, tflite_feeds, verify_conversion
from fleetpipe.models.tflite import load_tflite, run_tflite, verify_tflite_slices

from ._helpers import TINY, feeds, tiny, tolerance

ZOO = sorted(TINY)


@cache
def converted(name: str) -> bytes:
    return onnx_to_tflite(tiny(name))


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_matches_onnxruntime(name: str) -> None:
    model, inputs = tiny(name), feeds(name)
    assert verify_conversion(model, converted(name), inputs) < tolerance(model, inputs)
    other = feeds(name, seed=1)
    assert verify_conversion(model, converted(name), other) < tolerance(model, other)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_slices_at_every_candidate_cut(name: str) -> None:
    tfl = converted(name)
    graph = load_tflite(tfl)
    inputs = tflite_feeds(feeds(name))
    cuts = [c for c, _ in graph.candidate_cuts()]
    assert cuts
    for cut in cuts:
        assert verify_tflite_slices(tfl, graph, [cut], inputs) < 1e-5, f"cut after layer {cut}"
    assert verify_tflite_slices(tfl, graph, cuts, inputs) < 1e-5


def test_every_operator_boundary_is_a_valid_cut() -> None:
    """With one operator per layer, cuts inside the branchy blocks cross several tensors."""
    name = "inception"
    tfl = converted(name)
    graph = load_tflite(tfl, grouping="nodes")
    inputs = tflite_feeds(feeds(name))
    assert max(len(graph.crossing(c)) for c, _ in graph.candidate_cuts()) > 1
    for cut, _ in graph.candidate_cuts():
        assert verify_tflite_slices(tfl, graph, [cut], inputs) < 1e-5, f"cut after operator {cut}"


@pytest.mark.parametrize("name", ZOO)
def test_tflite_graph_costs_like_the_onnx_graph(name: str) -> None:
    onnx_graph, tfl_graph = load_onnx(tiny(name)), load_tflite(converted(name))
    assert len(tfl_graph) == len(onnx_graph)
    # Layer names differ only in the last part (a fused Conv+Relu is named after the Relu's output).
    assert [la.name.rsplit("/", 1)[0] for la in tfl_graph.layers] == [
        la.name.rsplit("/", 1)[0] for la in onnx_graph.layers
    ]
    assert tfl_graph.total_flops == pytest.approx(onnx_graph.total_flops, rel=0.1)
    assert tfl_graph.total_param_bytes == pytest.approx(onnx_graph.total_param_bytes, rel=0.01)
    assert not any(layer.unknown_ops for layer in tfl_graph.layers)
    for cut, nbytes in onnx_graph.candidate_cuts():
        assert tfl_graph.crossing_bytes(cut) == nbytes  # the same activations cross, only transposed


def test_zoo_ops_are_all_supported() -> None:
    used = {n.op_type for name in ZOO for n in tiny(name).graph.node}
    assert used <= set(SUPPORTED_OPS), used - set(SUPPORTED_OPS)


def test_vit_gelu_and_layer_norm_use_builtins() -> None:
    ops = [op for layer in load_tflite(converted("vit"), grouping="nodes").layers for op in layer.op_types]
    depth = TINY["vit"]["depth"]
    assert ops.count("GELU") == depth  # the Erf subgraph became one GELU per block
    assert "SIGN" not in ops  # no Erf expansion needed
    assert ops.count("RSQRT") == 2 * depth + 1  # two norms per block, one in the head


def test_conversion_is_deterministic_and_layout_nchw_keeps_onnx_input() -> None:
    model = tiny("resnet18")
    assert onnx_to_tflite(model) == converted("resnet18")
    nchw = onnx_to_tflite(model, layout="nchw")
    graph = load_tflite(nchw)
    assert graph.inputs[0].shape == zoo.input_shape("resnet18", **TINY["resnet18"])
    assert verify_conversion(model, nchw, feeds("resnet18"), layout="nchw") < tolerance(model, feeds("resnet18"))
    assert load_tflite(converted("resnet18")).inputs[0].shape == (1, 32, 32, 3)


def test_build_zoo_digits_is_accurate() -> None:
    x, y = zoo.digits_test_set()
    tfl = build_zoo("digits")
    logits = run_tflite(tfl, {"input": x[:1]})
    assert load_tflite(tfl).inputs[0].shape == (1, 64)
    ref = zoo.build("digits")
    assert verify_conversion(ref, tfl, {"input": x[:1]}) < 1e-4
    batch = onnx_to_tflite(ref, {"input": (len(x), 64)})
    pred = run_tflite(batch, {"input": x})[next(iter(logits))].argmax(axis=1)
    assert (pred == y).mean() > 0.9


# --------------------------------------------------------------------------- ops the zoo does not use


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], outputs: dict[str, list[int]],
           opset: int = 20) -> onnx.ModelProto:  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "ops",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 9])],
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in outputs.items()],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _op_zoo() -> onnx.ModelProto:
    rng = np.random.default_rng(5)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    n = helper.make_node
    nodes = [
        n("Conv", ["x", "Wg", "Bg"], ["g"], name="grouped", group=2, kernel_shape=[3, 3], strides=[2, 2],
          pads=[1, 1, 1, 1]),
        n("Conv", ["x", "Wd"], ["d"], name="depthwise_x2", group=4, kernel_shape=[3, 3], auto_pad="SAME_UPPER"),
        n("Conv", ["d", "Wdil"], ["dil"], name="dilated", kernel_shape=[3, 3], dilations=[2, 2], pads=[2, 2, 2, 2]),
        n("BatchNormalization", ["dil", "s", "b", "m", "v"], ["bn"], name="bn"),
        n("Clip", ["bn", "lo", "hi"], ["clip"], name="clip"),
        n("Sigmoid", ["clip"], ["sig"], name="sigmoid"),
        n("AveragePool", ["sig"], ["avg"], name="avg_incl", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
          count_include_pad=1),
        n("AveragePool", ["avg"], ["avg2"], name="avg_same", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        n("MaxPool", ["avg2"], ["mp"], name="max_padded", kernel_shape=[2, 2], pads=[1, 1, 1, 1]),
        n("Tanh", ["g"], ["th"], name="tanh"),
        n("Erf", ["th"], ["erf"], name="erf"),
        n("Softmax", ["erf"], ["sm"], name="channel_softmax", axis=1),
        n("GlobalMaxPool", ["sm"], ["gmp"], name="gmp"),
        n("Flatten", ["gmp"], ["flat"], name="flat"),
        n("Gemm", ["flat", "Wfc", "Cfc"], ["fc"], name="gemm", transB=1, alpha=0.5, beta=2.0),
        n("Gelu", ["fc"], ["gelu"], name="gelu"),
        n("Sub", ["gelu", "k"], ["sub"], name="sub"),
        n("Div", ["sub", "k"], ["div"], name="div"),
        n("Identity", ["div"], ["out"], name="identity"),
        n("Transpose", ["mp"], ["tr"], name="transpose", perm=[0, 2, 3, 1]),
        n("Reshape", ["tr", "shape"], ["rs"], name="reshape"),
        n("MatMul", ["rs", "Wmm"], ["mm"], name="matmul_no_bias"),
        n("Max", ["mm", "zero"], ["mm_relu"], name="max"),
        n("Flatten", ["x"], ["flat_x"], name="flatten_nchw"),
        n("Transpose", ["flat_x"], ["flat_t"], name="transpose_2d"),
        n("Gemm", ["flat_t", "Wt"], ["gemm_t"], name="gemm_trans_a", transA=1),
    ]  # fmt: skip
    inits = {
        "Wg": w(6, 2, 3, 3), "Bg": w(6), "Wd": w(8, 1, 3, 3), "Wdil": w(3, 8, 3, 3),
        "s": w(3) + 1, "b": w(3), "m": w(3), "v": np.abs(w(3)) + 0.5,
        "lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32),
        "Wfc": w(5, 6), "Cfc": w(1, 5), "k": np.array(1.5, np.float32),
        "shape": np.array([1, 100, 3], np.int64), "Wmm": w(3, 7), "zero": np.array(0, np.float32),
        "Wt": w(324, 5),
    }  # fmt: skip
    return _model(nodes, inits, {"out": [1, 5], "mm_relu": [1, 100, 7], "mp": [1, 3, 10, 10], "gemm_t": [1, 5]})


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_ops_beyond_the_zoo_match_onnxruntime(layout: str) -> None:
    model = _op_zoo()
    tfl = onnx_to_tflite(model, layout=layout)  # type: ignore[arg-type]
    ops = {op for layer in load_tflite(tfl, grouping="nodes").layers for op in layer.op_types}
    assert {"SPLIT", "DEPTHWISE_CONV_2D", "PAD", "PADV2", "SIGN", "GELU", "REDUCE_MAX"} <= ops
    for seed in range(3):
        x = {"x": np.random.default_rng(seed).standard_normal((1, 4, 9, 9)).astype(np.float32) * 2}
        assert verify_conversion(model, tfl, x, layout=layout) < 1e-5  # type: ignore[arg-type]


def test_lone_erf_expansion_is_accurate() -> None:
    nodes = [helper.make_node("Erf", ["x"], ["y"], name="erf")]
    model = _model(nodes, {}, {"y": [1, 4, 9, 9]})
    x = {"x": np.linspace(-5, 5, 4 * 81, dtype=np.float32).reshape(1, 4, 9, 9)}
    assert verify_conversion(model, onnx_to_tflite(model), x) < 5e-7


@pytest.mark.parametrize(
    ("node", "size", "match"),
    [
        (helper.make_node("Cos", ["x"], ["y"], name="cosine"), 9, "Cos.*'cosine'.*no TFLite conversion"),
        (helper.make_node("Softmax", ["x"], ["y"], name="sm", axis=2), 9, "Softmax.*'sm'.*axis 2"),
        (helper.make_node("AveragePool", ["x"], ["y"], name="ap", kernel_shape=[3, 3], pads=[0, 0, 2, 2]), 9,
         "AveragePool.*'ap'.*pads"),
        (helper.make_node("MaxPool", ["x"], ["y"], name="mp", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
         5, "MaxPool.*'mp'.*ceil_mode"),
    ],
)  # fmt: skip
def test_unsupported_op_is_named(node: onnx.NodeProto, size: int, match: str) -> None:
    model = _model([node], {}, {"y": [1, 4, size, size]})
    with pytest.raises(UnsupportedModel, match=match):
        onnx_to_tflite(model)


def test_bad_layout_is_rejected() -> None:
    with pytest.raises(ValueError, match="layout"):
        onnx_to_tflite(tiny("vgg16"), layout="nchwc")  # type: ignore[arg-type]


def test_check_shapes_catches_a_kernel_that_disagrees_with_the_declared_shape() -> None:
    from ai_edge_litert import schema_py_generated as schema

    from fleetpipe.errors import ModelError
    from fleetpipe.models.build_tflite import TFLiteBuilder
    from fleetpipe.models.onnx_to_tflite import check_shapes

    def gather(declared: tuple[int, ...], index: np.ndarray) -> bytes:
        b = TFLiteBuilder()
        x, y = b.tensor("x", (1, 3, 4)), b.tensor("y", declared)
        opts = schema.GatherOptionsT()
        opts.axis = 1
        b.op(schema.BuiltinOperator.GATHER, [x, b.const("i", index)], [y], opts)
        return b.finish([x], [y])

    check_shapes(gather((1, 1, 4), np.array([0], np.int32)))
    with pytest.raises(ModelError, match="'y' is declared \\(1, 4\\)"):
        check_shapes(gather((1, 4), np.array([0], np.int32)))


def test_shape_arithmetic_is_folded_into_constants() -> None:
    """The exporter idiom Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])) needs no runtime shape ops."""
    n = helper.make_node
    nodes = [
        n("Shape", ["x"], ["shape"], name="shape"),
        n("Gather", ["shape", "zero"], ["batch"], name="batch", axis=0),
        n("Unsqueeze", ["batch", "axes"], ["batch1"], name="unsqueeze"),
        n("Concat", ["batch1", "minus_one"], ["target"], name="target", axis=0),
        n("Relu", ["x"], ["r"], name="relu"),
        n("Reshape", ["r", "target"], ["flat"], name="flatten"),
        n("Unsqueeze", ["flat", "axes"], ["y"], name="unsqueeze_out"),
    ]
    inits = {"zero": np.array(0, np.int64), "axes": np.array([0], np.int64), "minus_one": np.array([-1], np.int64)}
    model = _model(nodes, inits, {"y": [1, 1, 4 * 81]})
    tfl = onnx_to_tflite(model)
    ops = [op for layer in load_tflite(tfl, grouping="nodes").layers for op in layer.op_types]
    assert "SHAPE" not in ops and "GATHER" not in ops and "CONCATENATION" not in ops
    x = {"x": np.random.default_rng(0).standard_normal((1, 4, 9, 9)).astype(np.float32)}
    assert verify_conversion(model, tfl, x) == 0.0
