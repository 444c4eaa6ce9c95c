"""One converter per ONNX op type for ``fleetpipe.models.onnx_to_tflite`` (layout rules are there).

Every function takes the conversion state and an ONNX node and appends TFLite operators; it reads
its inputs with ``c.value(t, nhwc)`` (which inserts a cached TRANSPOSE when the layout differs)
and declares its outputs with ``c.define``. Shapes are ONNX-ordered throughout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from fleetpipe.models._tflite_common import (
    ACT,
    OPS,
    attrs,
    clip_activation,
    clip_bounds,
    fuse_act,
    no_extra_outputs,
    reduce,
    text,
    unsupported,
)
from fleetpipe.models._tflite_spatial import average_pool, conv, global_pool, max_pool

if TYPE_CHECKING:
    from fleetpipe.models.onnx_to_tflite import Converter

__all__ = ["HANDLERS", "match_patterns"]

_NHWC_AXIS = (0, 3, 1, 2)  # ONNX axis of a rank-4 tensor -> its position in NHWC
# Abramowitz & Stegun 7.1.26: erf(x) = 1 - t (a1 + t (a2 + ...)) exp(-x^2), t = 1 / (1 + p x), x >= 0.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def match_patterns(c: Converter) -> None:
    """Find the exact-GELU subgraphs and register each as one GELU op at its first node."""
    for node in list(c.nodes.values()):
        if node.op_type == "Erf":
            found = _match_gelu(c, node)
            if found is not None:
                x, chain, out = found
                c.skip.update(chain[1:])
                c.patterns[chain[0]] = lambda conv, x=x, out=out: _emit_gelu(conv, x, out, False)


# --------------------------------------------------------------------------- elementwise


def relu(c: Converter, node: Any) -> None:
    _unary_op(c, node, OPS.RELU)


def clip(c: Converter, node: Any) -> None:
    bounds = clip_bounds(c, node)
    if bounds is None:
        raise unsupported(node, "non-constant min/max")
    act = clip_activation(bounds)
    if act is not None:
        _unary_op(c, node, {ACT.RELU: OPS.RELU, ACT.RELU6: OPS.RELU6, ACT.RELU_N1_TO_1: OPS.RELU_N1_TO_1}[act])
        return
    x, y = node.input[0], node.output[0]
    xi, nhwc = c.value(x), c.is_nhwc(x)
    lo, hi = bounds
    if math.isfinite(lo):
        t = c.new(f"{y}/lower", c.shape(y), nhwc) if math.isfinite(hi) else c.define(y, c.shape(y), nhwc)
        c.op(OPS.MAXIMUM, [xi, c.const("min", np.array(lo, np.float32))], [t], schema.MaximumMinimumOptionsT())
        xi = t
    if math.isfinite(hi):
        out = c.define(y, c.shape(y), nhwc)
        c.op(OPS.MINIMUM, [xi, c.const("max", np.array(hi, np.float32))], [out], schema.MaximumMinimumOptionsT())
    elif not math.isfinite(lo):  # Clip without bounds is an identity
        c.vals[y] = c.vals[x]


def _unary(code: int, options: Callable[[], Any] | None = None) -> Callable[[Converter, Any], None]:
    def convert(c: Converter, node: Any) -> None:
        _unary_op(c, node, code, options() if options else None)

    return convert


_BINARY = {
    "Add": (OPS.ADD, schema.AddOptionsT),
    "Sub": (OPS.SUB, schema.SubOptionsT),
    "Mul": (OPS.MUL, schema.MulOptionsT),
    "Div": (OPS.DIV, schema.DivOptionsT),
    "Max": (OPS.MAXIMUM, schema.MaximumMinimumOptionsT),
    "Min": (OPS.MINIMUM, schema.MaximumMinimumOptionsT),
}


def binary(c: Converter, node: Any) -> None:
    code, options = _BINARY[node.op_type]
    ins = [t for t in node.input if t]
    if len(ins) != 2:
        raise unsupported(node, f"{len(ins)} inputs (only 2)")
    y = node.output[0]
    act, out = fuse_act(c, y) if node.op_type == "Add" else (ACT.NONE, y)
    y_shape = c.shape(y)
    nhwc = _common_nhwc(c, ins, len(y_shape))
    opts = options()
    if hasattr(opts, "fusedActivationFunction"):
        opts.fusedActivationFunction = act
    tensors = [c.operand(t, nhwc) if t in c.consts else c.value(t, nhwc) for t in ins]
    c.op(code, tensors, [c.define(out, y_shape, nhwc)], opts)


def batch_norm(c: Converter, node: Any) -> None:
    no_extra_outputs(c, node, "training-mode outputs")
    x, y = node.input[0], node.output[0]
    params = node.input[1:5]
    if len(params) != 4 or any(p not in c.consts for p in params):
        raise unsupported(node, "non-constant scale, bias, mean or variance")
    scale, bias, mean, var = (c.consts[p].astype(np.float64) for p in params)
    s = scale / np.sqrt(var + float(attrs(node).get("epsilon", 1e-5)))
    t = bias - mean * s
    shape, nhwc = c.shape(x), c.is_nhwc(x)
    if len(shape) < 2:
        raise unsupported(node, "input without a channel axis")
    if not nhwc:
        s, t = s.reshape((-1,) + (1,) * (len(shape) - 2)), t.reshape((-1,) + (1,) * (len(shape) - 2))
    scaled = c.new(f"{y}/scaled", shape, nhwc)
    c.op(OPS.MUL, [c.value(x), c.const(f"{params[0]}/folded", s)], [scaled], schema.MulOptionsT())
    c.op(OPS.ADD, [scaled, c.const(f"{params[1]}/folded", t)], [c.define(y, shape, nhwc)], schema.AddOptionsT())


def erf(c: Converter, node: Any) -> None:
    """Erf has no TFLite builtin: Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7)."""
    x, y = node.input[0], node.output[0]
    xi, nhwc, shape = c.value(x), c.is_nhwc(x), c.shape(y)

    def emit(code: int, ins: Sequence[int], label: str, options: Any = None) -> int:
        out = c.new(f"{y}/{label}", shape, nhwc)
        c.op(code, ins, [out], options)
        return out

    def k(v: float) -> int:
        return c.const("erf/k", np.array(v, np.float32))

    ax = emit(OPS.ABS, [xi], "abs")
    sign = emit(OPS.SIGN, [xi], "sign")
    den = emit(OPS.ADD, [emit(OPS.MUL, [ax, k(_AS_P)], "px", schema.MulOptionsT()), k(1.0)], "den",
               schema.AddOptionsT())  # fmt: skip
    t = emit(OPS.DIV, [k(1.0), den], "t", schema.DivOptionsT())
    acc = emit(OPS.MUL, [t, k(_AS_A[-1])], "poly", schema.MulOptionsT())
    for coef in reversed(_AS_A[:-1]):
        acc = emit(OPS.ADD, [acc, k(coef)], "poly", schema.AddOptionsT())
        acc = emit(OPS.MUL, [acc, t], "poly", schema.MulOptionsT())
    sq = emit(OPS.MUL, [ax, ax], "square", schema.MulOptionsT())
    gauss = emit(OPS.EXP, [emit(OPS.NEG, [sq], "neg")], "exp")
    tail = emit(OPS.MUL, [acc, gauss], "tail", schema.MulOptionsT())
    mag = emit(OPS.SUB, [k(1.0), tail], "magnitude", schema.SubOptionsT())
    c.op(OPS.MUL, [sign, mag], [c.define(y, shape, nhwc)], schema.MulOptionsT())


def gelu(c: Converter, node: Any) -> None:
    approximate = text(attrs(node).get("approximate", b"none")) == "tanh"
    _emit_gelu(c, node.input[0], node.output[0], approximate)


# --------------------------------------------------------------------------- dense


def gemm(c: Converter, node: Any) -> None:
    a_name, b_name = node.input[0], node.input[1]
    a = attrs(node)
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    if b_name not in c.consts:
        raise unsupported(node, "non-constant B (use MatMul)")
    if len(c.shape(a_name)) != 2:
        raise unsupported(node, f"rank-{len(c.shape(a_name))} A")
    w = c.consts[b_name].astype(np.float64)
    w = (w if int(a.get("transB", 0)) else w.T) * alpha  # FULLY_CONNECTED wants [out, in]
    n_out = w.shape[0]
    bias = np.zeros(n_out)
    if len(node.input) > 2 and node.input[2]:
        bias_vec = _bias_vector(c, node.input[2], n_out)
        if bias_vec is None:
            raise unsupported(node, "C that is not a constant vector")
        bias = beta * bias_vec
    ai = c.value(a_name, False)
    if int(a.get("transA", 0)):
        m, k = c.shape(a_name)
        at = c.new(f"{a_name}/T", (k, m))
        c.transpose(ai, (1, 0), at)
        ai = at
    act, out = fuse_act(c, node.output[0])
    _fully_connected(c, ai, w, bias, b_name, out, act, keep_dims=False)


def matmul(c: Converter, node: Any) -> None:
    a_name, b_name = node.input[0], node.input[1]
    ra, rb = len(c.shape(a_name)), len(c.shape(b_name))
    if ra < 2 or rb < 2:
        raise unsupported(node, "rank-1 operands")
    y = node.output[0]
    if b_name in c.consts and rb == 2:
        w = c.consts[b_name].astype(np.float64).T
        bias = np.zeros(w.shape[0])
        add = c.sole_consumer(y)
        if add is not None and add.op_type == "Add":
            other = add.input[1] if add.input[0] == y else add.input[0]
            vec = _bias_vector(c, other, w.shape[0]) if other != y else None
            if vec is not None and c.shape(add.output[0]) == c.shape(y):
                bias, y = vec, add.output[0]
                c.skip.add(add.name)
        act, out = fuse_act(c, y)
        _fully_connected(c, c.value(a_name, False), w, bias, b_name, out, act, keep_dims=ra > 2)
        return
    opts = schema.BatchMatMulOptionsT()
    opts.adjX, opts.adjY = False, False
    ins = [c.value(t, False) for t in (a_name, b_name)]
    c.op(OPS.BATCH_MATMUL, ins, [c.define(y, c.shape(y), False)], opts)


# --------------------------------------------------------------------------- shape and data movement


def reshape(c: Converter, node: Any) -> None:
    """Reshape, Flatten, Squeeze, Unsqueeze: a RESHAPE to the inferred output shape."""
    x, y = node.input[0], node.output[0]
    xs = c.shape(x)
    # NHWC and NCHW order the elements alike when the map is 1x1 or has one channel.
    same_order = len(xs) == 4 and (xs[2] * xs[3] == 1 or xs[1] == 1)
    xi = c.value(x) if same_order else c.value(x, False)
    c.reshape(xi, c.shape(y), c.define(y, c.shape(y), False))


def transpose(c: Converter, node: Any) -> None:
    x, y = node.input[0], node.output[0]
    rank = len(c.shape(x))
    perm = [int(p) for p in attrs(node).get("perm", range(rank - 1, -1, -1))]
    if c.is_nhwc(x):
        perm, xi = [(0, 3, 1, 2)[p] for p in perm], c.value(x)
    else:
        xi = c.value(x, False)
    c.transpose(xi, perm, c.define(y, c.shape(y), False))


def concat(c: Converter, node: Any) -> None:
    y = node.output[0]
    rank = len(c.shape(y))
    axis = int(attrs(node)["axis"]) % rank
    ins = [t for t in node.input if t]
    nhwc = _common_nhwc(c, ins, rank)
    opts = schema.ConcatenationOptionsT()
    opts.axis = _NHWC_AXIS[axis] if nhwc else axis
    tensors = [c.operand(t, nhwc) if t in c.consts else c.value(t, nhwc) for t in ins]
    c.op(OPS.CONCATENATION, tensors, [c.define(y, c.shape(y), nhwc)], opts)


def gather(c: Converter, node: Any) -> None:
    data, idx = node.input[0], node.input[1]
    if idx not in c.consts:
        raise unsupported(node, "non-constant indices")
    shape = c.shape(data)
    axis = int(attrs(node).get("axis", 0)) % len(shape)
    ind = c.consts[idx].astype(np.int64)
    ind = np.where(ind < 0, ind + shape[axis], ind)
    opts = schema.GatherOptionsT()
    opts.axis, opts.batchDims = axis, 0
    y = node.output[0]
    if ind.ndim:
        c.op(OPS.GATHER, [c.value(data, False), c.const(idx, ind)], [c.define(y, c.shape(y), False)], opts)
        return
    # LiteRT treats 0-d indices as [1] (it keeps the gathered axis), so gather one row and reshape.
    row = c.new(f"{y}/row", (*shape[:axis], 1, *shape[axis + 1 :]))
    c.op(OPS.GATHER, [c.value(data, False), c.const(idx, ind.reshape(1))], [row], opts)
    c.reshape(row, c.shape(y), c.define(y, c.shape(y), False))


def softmax(c: Converter, node: Any) -> None:
    x, y = node.input[0], node.output[0]
    rank = len(c.shape(x))
    axis = int(attrs(node).get("axis", -1 if c.opset >= 13 else 1)) % rank
    if axis == 1 and rank == 4 and c.is_nhwc(x) and c.opset >= 13:
        xi, nhwc = c.value(x), True  # the channel axis is last in NHWC
    elif axis == rank - 1:
        xi, nhwc = c.value(x, False), False
    else:
        raise unsupported(node, f"axis {axis} of a rank-{rank} input (TFLite SOFTMAX works on the last axis)")
    opts = schema.SoftmaxOptionsT()
    opts.beta = 1.0
    c.op(OPS.SOFTMAX, [xi], [c.define(y, c.shape(y), nhwc)], opts)


def layer_norm(c: Converter, node: Any) -> None:
    """No LayerNormalization builtin: mean, centre, variance, rsqrt, scale, shift."""
    no_extra_outputs(c, node, "Mean/InvStdDev outputs")
    x, y = node.input[0], node.output[0]
    shape = c.shape(x)
    a = attrs(node)
    axis = int(a.get("axis", -1)) % len(shape)
    red = shape[:axis] + (1,) * (len(shape) - axis)
    axes = list(range(axis, len(shape)))
    xi = c.value(x, False)
    mean = c.new(f"{y}/mean", red)
    reduce(c, OPS.MEAN, xi, axes, mean)
    centred = c.new(f"{y}/centred", shape)
    c.op(OPS.SUB, [xi, mean], [centred], schema.SubOptionsT())
    square = c.new(f"{y}/square", shape)
    c.op(OPS.MUL, [centred, centred], [square], schema.MulOptionsT())
    var = c.new(f"{y}/var", red)
    reduce(c, OPS.MEAN, square, axes, var)
    var_eps = c.new(f"{y}/var_eps", red)
    eps = c.const(f"{y}/epsilon", np.array(float(a.get("epsilon", 1e-5)), np.float32))
    c.op(OPS.ADD, [var, eps], [var_eps], schema.AddOptionsT())
    rstd = c.new(f"{y}/rstd", red)
    c.op(OPS.RSQRT, [var_eps], [rstd])
    has_bias = len(node.input) > 2 and bool(node.input[2])
    normed = c.new(f"{y}/normalized", shape)
    c.op(OPS.MUL, [centred, rstd], [normed], schema.MulOptionsT())
    scaled = c.new(f"{y}/scaled", shape) if has_bias else c.define(y, shape, False)
    c.op(OPS.MUL, [normed, c.value(node.input[1], False)], [scaled], schema.MulOptionsT())
    if has_bias:
        c.op(OPS.ADD, [scaled, c.value(node.input[2], False)], [c.define(y, shape, False)], schema.AddOptionsT())


def identity(c: Converter, node: Any) -> None:
    if node.op_type == "Dropout":
        no_extra_outputs(c, node, "the mask output")
    c.vals[node.output[0]] = c.vals[node.input[0]]


def shape_op(c: Converter, node: Any) -> None:
    a = attrs(node)
    dims = c.shape(node.input[0])
    start, end = int(a.get("start", 0)), a.get("end")
    c.consts[node.output[0]] = np.array(dims[start : None if end is None else int(end)], np.int64)


HANDLERS: dict[str, Callable[[Converter, Any], None]] = {
    "Abs": _unary(OPS.ABS),
    "Add": binary,
    "AveragePool": average_pool,
    "BatchNormalization": batch_norm,
    "Clip": clip,
    "Concat": concat,
    "Conv": conv,
    "Div": binary,
    "Dropout": identity,
    "Erf": erf,
    "Exp": _unary(OPS.EXP),
    "Flatten": reshape,
    "Gather": gather,
    "Gelu": gelu,
    "Gemm": gemm,
    "GlobalAveragePool": global_pool,
    "GlobalMaxPool": global_pool,
    "Identity": identity,
    "LayerNormalization": layer_norm,
    "MatMul": matmul,
    "Max": binary,
    "MaxPool": max_pool,
    "Min": binary,
    "Mul": binary,
    "Neg": _unary(OPS.NEG),
    "Relu": relu,
    "Reshape": reshape,
    "Shape": shape_op,
    "Sigmoid": _unary(OPS.LOGISTIC),
    "Softmax": softmax,
    "Sqrt": _unary(OPS.SQRT),
    "Squeeze": reshape,
    "Sub": binary,
    "Tanh": _unary(OPS.TANH),
    "Transpose": transpose,
    "Unsqueeze": reshape,
}


# --------------------------------------------------------------------------- private helpers


def _common_nhwc(c: Converter, inputs: Sequence[str], out_rank: int) -> bool:
    """Run a broadcasting op NHWC when every activation operand is held NHWC."""
    acts = [t for t in inputs if t not in c.consts]
    return out_rank == 4 and bool(acts) and all(c.is_nhwc(t) for t in acts)


def _unary_op(c: Converter, node: Any, code: int, options: Any = None) -> None:
    x, y = node.input[0], node.output[0]
    c.op(code, [c.value(x)], [c.define(y, c.shape(y), c.is_nhwc(x))], options)


def _bias_vector(c: Converter, t: str, n: int) -> np.ndarray | None:
    """``t`` as a length-``n`` bias if it is a constant broadcasting along the last axis only."""
    if t not in c.consts:
        return None
    v = c.consts[t]
    if v.dtype.kind != "f" or any(d != 1 for d in v.shape[:-1]) or (v.ndim and v.shape[-1] not in (1, n)):
        return None
    return np.broadcast_to(v.reshape(-1).astype(np.float64), (n,))


def _fully_connected(
    c: Converter, x: int, w: np.ndarray, bias: np.ndarray, label: str, out: str, act: int, *, keep_dims: bool
) -> None:
    opts = schema.FullyConnectedOptionsT()
    opts.fusedActivationFunction, opts.keepNumDims = act, keep_dims
    ins = [x, c.const(label, w), c.const(f"{label}/bias", bias)]
    c.op(OPS.FULLY_CONNECTED, ins, [c.define(out, c.shape(out), False)], opts)


def _emit_gelu(c: Converter, x: str, out: str, approximate: bool) -> None:
    opts = schema.GeluOptionsT()
    opts.approximate = approximate
    c.op(OPS.GELU, [c.value(x)], [c.define(out, c.shape(out), c.is_nhwc(x))], opts)


def _is_scalar(c: Converter, t: str, value: float) -> bool:
    return t in c.consts and c.consts[t].size == 1 and abs(float(c.consts[t].reshape(-1)[0]) - value) < 1e-6


def _match_gelu(c: Converter, erf_node: Any) -> tuple[str, list[str], str] | None:
    """``(x, node names in order, output)`` if ``erf_node`` sits in ``x * 0.5 * (1 + erf(x / sqrt 2))``."""
    z = erf_node.input[0]
    scale = c.producer.get(z)
    if scale is None or c.sole_consumer(z) is not erf_node or len(scale.input) != 2:
        return None
    p, q = scale.input
    if scale.op_type == "Mul" and _is_scalar(c, q, 2**-0.5):
        x = p
    elif scale.op_type == "Mul" and _is_scalar(c, p, 2**-0.5):
        x = q
    elif scale.op_type == "Div" and _is_scalar(c, q, 2**0.5):
        x = p
    else:
        return None
    if x in c.consts:
        return None
    chain, cur = [scale.name, erf_node.name], erf_node.output[0]
    add = c.sole_consumer(cur)
    if add is None or add.op_type != "Add" or not any(_is_scalar(c, t, 1.0) for t in add.input):
        return None
    chain.append(add.name)
    cur = add.output[0]
    seen_x = seen_half = False
    for _ in range(2):
        mul = c.sole_consumer(cur)
        if mul is None or mul.op_type != "Mul" or len(mul.input) != 2:
            return None
        other = mul.input[1] if mul.input[0] == cur else mul.input[0]
        if other == x and not seen_x:
            seen_x = True
        elif _is_scalar(c, other, 0.5) and not seen_half:
            seen_half = True
        else:
            return None
        chain.append(mul.name)
        cur = mul.output[0]
    return x, chain, cur
