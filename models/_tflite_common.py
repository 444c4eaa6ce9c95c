"""Helpers shared by the ONNX-op converters in ``_tflite_ops`` and ``_tflite_spatial`` (internal)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from fleetpipe.errors import UnsupportedModel

if TYPE_CHECKING:
    from fleetpipe.models.onnx_to_tflite import Converter

__all__ = [
    "ACT", "OPS", "attrs", "clip_activation", "clip_bounds", "const_input", "fuse_act", "no_extra_outputs", "pair",
    "reduce", "text", "unsupported",
]  # fmt: skip

OPS = schema.BuiltinOperator
ACT = schema.ActivationFunctionType


def unsupported(node: Any, what: str) -> UnsupportedModel:
    """The error for a supported op used in a way the converter does not handle."""
    return UnsupportedModel(f"ONNX op {node.op_type} (node {node.name!r}) with {what} is not supported")


def attrs(node: Any) -> dict[str, Any]:
    """A node's attributes as Python values."""
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def text(value: Any) -> str:
    """A string attribute (bytes in onnx) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def pair(a: dict[str, Any], key: str) -> tuple[int, int]:
    """A 2-D spatial attribute such as strides (default 1, 1)."""
    values = [int(v) for v in a.get(key, (1, 1))]
    if len(values) != 2:
        raise UnsupportedModel(f"{key}={values}: only 2-D spatial ops are supported")
    return values[0], values[1]


def const_input(c: Converter, node: Any, i: int, default: np.ndarray) -> np.ndarray:
    """Optional input ``i``, which must be a constant when present."""
    if len(node.input) <= i or not node.input[i]:
        return default
    if node.input[i] not in c.consts:
        raise unsupported(node, f"non-constant input {i}")
    return c.consts[node.input[i]]


def no_extra_outputs(c: Converter, node: Any, what: str) -> None:
    """Refuse a node whose secondary outputs are used."""
    for t in node.output[1:]:
        if t and (c.consumers.get(t) or t in c.graph_outputs):
            raise unsupported(node, what)


def reduce(c: Converter, code: int, x: int, axes: Sequence[int], out: int) -> None:
    """A keep-dims reduction (MEAN, REDUCE_MAX, ...) over ``axes``."""
    opts = schema.ReducerOptionsT()
    opts.keepDims = True
    c.op(code, [x, c.const("axes", np.array(axes, np.int32))], [out], opts)


def clip_bounds(c: Converter, node: Any) -> tuple[float, float] | None:
    """(min, max) of a Clip (attributes before opset 11, inputs after); None if not constant."""
    a = attrs(node)
    if c.opset < 11:
        return float(a.get("min", -math.inf)), float(a.get("max", math.inf))
    bounds = [-math.inf, math.inf]
    for i in (1, 2):
        if len(node.input) > i and node.input[i]:
            if node.input[i] not in c.consts:
                return None
            bounds[i - 1] = float(c.consts[node.input[i]])
    return bounds[0], bounds[1]


def clip_activation(bounds: tuple[float, float]) -> int | None:
    """The fused activation a Clip with these bounds is, if any."""
    return {(0.0, 6.0): ACT.RELU6, (0.0, math.inf): ACT.RELU, (-1.0, 1.0): ACT.RELU_N1_TO_1}.get(bounds)


def fuse_act(c: Converter, out: str) -> tuple[int, str]:
    """Fuse the Relu/Clip that alone reads ``out``: (activation, name of the fused output)."""
    user = c.sole_consumer(out)
    if user is None or user.name in c.skip:
        return ACT.NONE, out
    act = None
    if user.op_type == "Relu":
        act = ACT.RELU
    elif user.op_type == "Clip" and user.input[0] == out:
        bounds = clip_bounds(c, user)
        act = None if bounds is None else clip_activation(bounds)
    if act is None:
        return ACT.NONE, out
    c.skip.add(user.name)
    return act, user.output[0]
