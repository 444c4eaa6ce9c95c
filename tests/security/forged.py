"""Hostile slices for the attack tests: what a red team deployed with a stolen planner identity."""

from __future__ import annotations

from typing import Any


def external_data_slice(location: str = "README.md", length: int = 64) -> bytes:
    """A ~110-byte ONNX model whose only tensor is external data at ``location`` (relative to the loader's
    working directory): onnxruntime would read that file and the model would return its bytes."""
    from onnx import TensorProto, helper

    w = TensorProto()
    w.name, w.data_type, w.data_location = "w", TensorProto.UINT8, TensorProto.EXTERNAL
    w.dims.extend([length])
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, [length])
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [], [y], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="")
    model.ir_version = 8
    return model.SerializeToString()


def fake_runtime_slice(features: int = 16384) -> bytes:
    """A ~150-byte JSON slice for the test-only fake runtime whose weight matrix is ``features``² floats."""
    from fleetpipe.node.runtime.fake import fake_model_bytes

    return fake_model_bytes(features, features)


def custom_domain_slice() -> bytes:
    """An ONNX model calling an operator of a custom domain (code the runtime would look up by name)."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Evil", ["x"], ["y"], domain="com.evil")], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.evil", 1)])
    return model.SerializeToString()


def huge_declared_slice() -> bytes:
    """An ONNX model whose output is declared as 2**40 floats (the allocation a runtime would plan for)."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2**20, 2**20])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def tflite_outside_buffer() -> bytes:
    """A TFLite flatbuffer with one buffer whose offset/size point 1 MB past the end of the file."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model: Any = schema.ModelT()
    model.version = 3
    buf = schema.BufferT()
    buf.offset, buf.size = 1 << 20, 4096
    model.buffers = [schema.BufferT(), buf]
    model.subgraphs = [schema.SubGraphT()]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
