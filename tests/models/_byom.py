"""Small ONNX models a user could bring (dynamic dims, shapes computed in the graph, IR 3), built with onnx.helper."""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def _c(name: str, values: list[int]) -> Any:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def computed_reshape(kind: str = "cast", batch: Any = "N", height: Any = "H") -> Any:
    """Conv -> Relu -> Conv -> Reshape whose target is computed from Shape, then a Softmax.

    ``kind="cast"``: Shape -> Cast(float) -> Div -> Cast(int64) -> Slice -> Concat; ``"mul"``: Shape ->
    Gather(H), Gather(W) -> Mul -> Div, Slice(C) -> Mul, Concat ([N, 2C, HW/2]): onnx data propagation stops
    at the Div.
    """
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w2")
    inits = [w1, w2, _c("starts", [0]), _c("ends", [2]), _c("minus1", [-1]), _c("i2", [2]), _c("i3", [3])]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["c2"], ["s"]),
    ]
    if kind == "cast":
        inits.append(numpy_helper.from_array(np.array([1.0], np.float32), "one"))
        nodes += [
            helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
            helper.make_node("Div", ["sf", "one"], ["sd"]),
            helper.make_node("Cast", ["sd"], ["si"], to=TensorProto.INT64),
            helper.make_node("Slice", ["si", "starts", "ends"], ["nc"]),
            helper.make_node("Concat", ["nc", "minus1"], ["target"], axis=0),
        ]
    else:
        nodes += [
            helper.make_node("Gather", ["s", "i2"], ["hh"], axis=0),
            helper.make_node("Gather", ["s", "i3"], ["ww"], axis=0),
            helper.make_node("Mul", ["hh", "ww"], ["hw"]),
            helper.make_node("Div", ["hw", "i2"], ["hw2"]),
            helper.make_node("Slice", ["s", "starts", "one1"], ["n"]),
            helper.make_node("Slice", ["s", "one1", "ends"], ["c"]),
            helper.make_node("Mul", ["c", "i2"], ["cc"]),
            helper.make_node("Concat", ["n", "cc", "hw2"], ["target"], axis=0),
        ]
        inits += [_c("one1", [1])]
    nodes += [
        helper.make_node("Reshape", ["c2", "target"], ["flat"]),
        helper.make_node("Relu", ["flat"], ["r2"]),
        helper.make_node("Softmax", ["r2"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "computed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, height, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, None, None])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def ir3_model() -> Any:
    """IR 3 / opset 8: every initializer is also a graph input (as old exporters wrote them)."""
    rng = np.random.default_rng(1)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])]
    inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in (w1, w2)]
    graph = helper.make_graph(nodes, "ir3", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                   [1, 8, 8, 8])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=3)


def with_constant_chain() -> Any:
    """A weight reached through Constant -> Identity -> Identity, so weight-only nodes sit in the graph."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w2 = numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Constant", [], ["wc"], value=numpy_helper.from_array(w, "wv")),
        helper.make_node("Identity", ["wc"], ["wi"]),
        helper.make_node("Identity", ["w2"], ["w2i"]),
        helper.make_node("Conv", ["x", "wi"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Identity", ["w2i"], ["w2ii"]),
        helper.make_node("Conv", ["r1", "w2ii"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def tflite_fp16_mlp() -> bytes:
    """A float16-weight MLP as converters write it: every DEQUANTIZE of a weight first, then the FCs; fc0's
    dequantized weight is read again by fc2 (a weight shared across layers)."""
    from ai_edge_litert import schema_py_generated as schema

    from fleetpipe.models.build_tflite import TFLiteBuilder

    rng = np.random.default_rng(3)
    b = TFLiteBuilder("fp16 mlp")
    x = b.tensor("input", (1, 16))
    w16 = [b.const(f"w{i}_fp16", rng.standard_normal((16, 16)).astype(np.float16) / 4) for i in range(2)]
    w32 = [b.tensor(f"w{i}", (16, 16)) for i in range(2)]
    for src, dst in zip(w16, w32, strict=True):
        b.op(schema.BuiltinOperator.DEQUANTIZE, [src], [dst])
    h = x
    for i, w in enumerate([w32[0], w32[1], w32[0]]):
        y = b.tensor("logits" if i == 2 else f"fc{i}", (1, 16))
        opts = schema.FullyConnectedOptionsT()
        opts.fusedActivationFunction = schema.ActivationFunctionType.RELU if i < 2 else 0
        b.op(schema.BuiltinOperator.FULLY_CONNECTED, [h, w, -1], [y], opts)
        h = y
    return b.finish([x], [h])


def custom_op_onnx() -> Any:
    """A model with an op no onnxruntime has (domain com.example)."""
    node = helper.make_node("FancyOp", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])


def custom_op_tflite() -> bytes:
    """The fp16 MLP with its last FC swapped for a CUSTOM op stock LiteRT cannot resolve."""
    from ai_edge_litert import schema_py_generated as schema

    from fleetpipe.models.tflite import pack_model

    model = schema.ModelT.InitFromPackedBuf(tflite_fp16_mlp(), 0)
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    code.customCode, code.version = "MyFancyOp", 1
    model.operatorCodes.append(code)
    op = model.subgraphs[0].operators[-1]
    op.opcodeIndex = len(model.operatorCodes) - 1
    op.builtinOptionsType, op.builtinOptions = 0, None
    op.inputs = op.inputs[:1]
    return pack_model(model)
