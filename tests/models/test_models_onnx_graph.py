"""Loading ONNX models: shapes, FLOPs, crossing tensors, layer grouping, linearisation, bad input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fleetpipe.errors import ModelError, UnsupportedModel
from fleetpipe.models import zoo
from fleetpipe.models.onnx_graph import UNKNOWN_FLOPS_PER_ELEMENT, UnknownOpWarning, load_onnx
from fleetpipe.models.slicing import verify_slices

from ._helpers import TINY, feeds, tiny, tolerance


def _model(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    x_shape: list[object],
    out: str,
    out_shape: list[object],
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _w(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(0).standard_normal(shape).astype(np.float32), name)


def test_resnet50_groups_into_blocks() -> None:
    g = load_onnx(tiny("resnet50"))
    names = [la.name for la in g.layers]
    assert 18 <= len(g.layers) <= 22
    assert names[0].startswith("stem") and names[-1].startswith("head")
    assert sum(n.startswith("layer") for n in names) == 16
    assert all(len(la.out_tensors) == 1 for la in g.layers)
    assert g.inputs[0].shape == (1, 3, 32, 32) and g.outputs[0].shape == (1, 1000)


def test_vit_groups_into_encoder_sublayers() -> None:
    g = load_onnx(tiny("vit"))
    names = [la.name for la in g.layers]
    assert names[1:-1] == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    attn = g.layers[1]
    assert attn.op_types.count("MatMul") == 6 and "Softmax" in attn.op_types


def test_cut_inside_a_residual_block_sends_two_tensors() -> None:
    g = load_onnx(tiny("resnet18"), grouping="nodes")
    inside = [la for la in g.layers if la.nodes[0].startswith("layer1.0/conv1")]
    assert inside and len(inside[0].out_tensors) == 2
    assert inside[0].out_bytes == sum(g.tensor_bytes[t] for t in inside[0].out_tensors)
    # and a slice starting right after it needs both
    assert len(g.inputs_of(inside[0].index + 1)) == 2


def test_initializers_never_cross() -> None:
    g = load_onnx(tiny("vit"), grouping="nodes")
    inits = {t.name for t in tiny("vit").graph.initializer}
    assert not inits & {t for la in g.layers for t in la.out_tensors}
    assert not inits & set(g.tensor_bytes)


def test_flops_conv_depthwise_gemm_matmul() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node(
            "Conv", ["c1", "w2"], ["c2"], name="dw", pads=[1, 1, 1, 1], kernel_shape=[3, 3], group=8
        ),
        helper.make_node("Reshape", ["c2", "s"], ["r"], name="reshape"),
        helper.make_node("MatMul", ["r", "r_t"], ["m"], name="matmul"),
        helper.make_node("Softmax", ["m"], ["y"], name="softmax"),
    ]
    inits = [
        _w("w1", 8, 4, 3, 3),
        _w("w2", 8, 1, 3, 3),
        numpy_helper.from_array(np.array([1, 2, 4, 16]), "s"),
        _w("r_t", 1, 2, 16, 5),
    ]
    g = load_onnx(_model(nodes, inits, [1, 4, 4, 4], "y", [1, 2, 4, 5]), grouping="nodes")
    flops = {la.nodes[0]: la.flops for la in g.layers}
    assert flops["conv"] == 2 * (8 * 16) * (4 * 9)
    assert flops["dw"] == 2 * (8 * 16) * 9
    assert flops["reshape"] == 0
    assert flops["matmul"] == 2 * (2 * 4 * 5) * 16  # batched: every output element is a 16-long dot
    assert flops["softmax"] == 5 * 40
    assert g.layers[0].param_bytes == 8 * 4 * 9 * 4


def test_resnet18_totals_match_the_literature() -> None:
    g = load_onnx(zoo.build("resnet18"))
    assert g.total_flops == pytest.approx(3.64e9, rel=0.02)  # 1.82 GMACs
    assert g.total_param_bytes / 4 == pytest.approx(11.69e6, rel=0.01)


def test_unknown_op_warns_and_is_conservative() -> None:
    nodes = [helper.make_node("LRN", ["x"], ["y"], name="lrn", size=3)]
    with pytest.warns(UnknownOpWarning, match="LRN"):
        g = load_onnx(_model(nodes, [], [1, 4, 8, 8], "y", [1, 4, 8, 8]))
    assert g.layers[0].unknown_ops == ("LRN",)
    assert g.layers[0].flops == UNKNOWN_FLOPS_PER_ELEMENT * 2 * 256


def test_dynamic_batch_alone_is_one_else_given() -> None:
    assert load_onnx(zoo.build("digits")).inputs[0].shape == (1, 64)
    g = load_onnx(zoo.build("digits"), {"input": (5, 64)})
    assert g.inputs[0].shape == (5, 64) and g.outputs[0].shape == (5, 10)
    with pytest.raises(ModelError, match="not model inputs"):
        load_onnx(zoo.build("digits"), {"nope": (1, 64)})


def test_unknown_intermediate_shape_names_the_tensor() -> None:
    nodes = [helper.make_node("Reshape", ["x", "shape_in"], ["y"], name="reshape")]
    graph = helper.make_graph(
        nodes,
        "t",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
            helper.make_tensor_value_info("shape_in", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedModel, match="'y'"):
        load_onnx(model)


@pytest.mark.parametrize("content", [b"", b"garbage\x00\x01not a protobuf", b"\x08\x07"])
def test_corrupt_file(tmp_path: object, content: bytes) -> None:
    path = tmp_path / "bad.onnx"  # type: ignore[operator]
    path.write_bytes(content)
    with pytest.raises(UnsupportedModel):
        load_onnx(path)


def test_missing_file() -> None:
    with pytest.raises(UnsupportedModel, match="no such model file"):
        load_onnx("/nonexistent/model.onnx")


def test_unnamed_nodes_and_constants_are_normalised() -> None:
    const = helper.make_node(
        "Constant", [], ["k"], value=numpy_helper.from_array(np.full((1, 4), 2, np.float32))
    )
    nodes = [
        const,
        helper.make_node("Mul", ["x", "k"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Add", ["b", "x"], ["y"]),
    ]
    model = _model(nodes, [], [1, 4], "y", [1, 4])
    g = load_onnx(model, grouping="nodes")
    assert len(g.layers) == 3 and all(la.nodes[0] for la in g.layers)
    assert g.crossing(0) == ("x", "a")  # the model input is still needed by the Add
    x = {"x": np.arange(4, dtype=np.float32).reshape(1, 4) - 2}
    assert verify_slices(model, g, [0, 1], x) == 0.0


def test_early_graph_output_crosses_every_later_cut() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["early"], name="r"),
        helper.make_node("Neg", ["early"], ["n"], name="n"),
        helper.make_node("Abs", ["n"], ["y"], name="a"),
    ]
    model = _model(nodes, [], [1, 4], "y", [1, 4])
    model.graph.output.append(helper.make_tensor_value_info("early", TensorProto.FLOAT, [1, 4]))
    g = load_onnx(model, grouping="nodes")
    assert g.crossing(1) == ("early", "n")
    assert g.crossing(2) == ("early", "y")
    assert verify_slices(model, g, [0, 1], {"x": np.ones((1, 4), np.float32)}) == 0.0


def test_linearisations_keep_branch_crossings_small() -> None:
    model = tiny("inception")
    peak = {}
    total = {}
    for order in ("file", "dfs", "greedy"):
        g = load_onnx(model, order=order, grouping="nodes")
        peak[order] = max(la.out_bytes for la in g.layers[:-1])
        total[order] = sum(la.out_bytes for la in g.layers[:-1])
        assert verify_slices(model, g, [la.index for la in g.layers[1:-1:3]], feeds("inception")) < tolerance(
            model, feeds("inception")
        )
    # the file interleaves the four branches; the greedy order runs the cheap-to-hold branches first
    assert total["greedy"] < 0.95 * total["file"] and total["greedy"] <= total["dfs"]
    assert peak["greedy"] <= peak["file"]


def test_bad_order_or_grouping() -> None:
    with pytest.raises(ValueError):
        load_onnx(tiny("resnet18"), order="bfs")
    with pytest.raises(ValueError):
        load_onnx(tiny("resnet18"), grouping="ops")


def test_tiny_variants_are_small() -> None:
    assert set(TINY) | {"digits"} == set(zoo.names())
