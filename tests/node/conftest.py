"""Tiny real models built in memory: an ONNX Gemm+Relu and a TFLite FULLY_CONNECTED(+RELU)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest


@dataclass(frozen=True, slots=True)
class DenseModel:
    """Serialized model bytes and the weights of ``y = relu(x @ w.T + b)``."""

    data: bytes
    w: np.ndarray
    b: np.ndarray

    def expected(self, x: np.ndarray) -> np.ndarray:
        """Numpy oracle."""
        return np.maximum(x @ self.w.T + self.b, 0.0)


def _weights(n_in: int = 4, n_out: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(42)
    return (
        rng.standard_normal((n_out, n_in)).astype(np.float32),
        rng.standard_normal(n_out).astype(np.float32),
    )


@pytest.fixture(scope="session")
def onnx_dense() -> DenseModel:
    """ONNX Gemm(transB=1) + Relu with a dynamic batch dimension."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w, b = _weights()
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1),
            helper.make_node("Relu", ["h"], ["y"]),
        ],
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return DenseModel(model.SerializeToString(), w, b)


@pytest.fixture(scope="session")
def tflite_dense() -> DenseModel:
    """TFLite FULLY_CONNECTED with fused RELU, built from LiteRT's flatbuffer schema (no TensorFlow)."""
    pytest.importorskip("ai_edge_litert")
    flatbuffers = pytest.importorskip("flatbuffers")
    from ai_edge_litert import schema_py_generated as schema

    w, b = _weights()
    buffers = [schema.BufferT()]  # buffer 0 is the empty sentinel

    def buffer(data: np.ndarray | None = None) -> int:
        buf = schema.BufferT()
        buf.data = None if data is None else np.frombuffer(data.tobytes(), np.uint8)
        buffers.append(buf)
        return len(buffers) - 1

    def tensor(name: str, shape: list[int], buf: int, dynamic: bool) -> object:
        t = schema.TensorT()
        t.name, t.type, t.buffer = name, schema.TensorType.FLOAT32, buf
        t.shape = np.array(shape, np.int32)
        if dynamic:
            t.shapeSignature = np.array([-1, *shape[1:]], np.int32)
        return t

    sub = schema.SubGraphT()
    sub.name = "main"
    sub.tensors = [
        tensor("x", [1, 4], buffer(), True),
        tensor("w", [3, 4], buffer(w), False),
        tensor("b", [3], buffer(b), False),
        tensor("y", [1, 3], buffer(), True),
    ]
    sub.inputs, sub.outputs = [0], [3]
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1, 2], [3]
    op.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
    op.builtinOptions = schema.FullyConnectedOptionsT()
    op.builtinOptions.fusedActivationFunction = schema.ActivationFunctionType.RELU
    sub.operators = [op]
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.FULLY_CONNECTED
    code.version = 1
    model = schema.ModelT()
    model.version, model.description = 3, "fleetpipe test"
    model.operatorCodes, model.subgraphs, model.buffers = [code], [sub], buffers
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return DenseModel(bytes(builder.Output()), w, b)
