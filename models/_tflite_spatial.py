"""Convolution and pooling for ``fleetpipe.models.onnx_to_tflite``: NHWC kernels, ONNX padding made explicit.

TFLite pads SAME (extra row/column at the end) or VALID. ONNX pads that equal TFLite's SAME for the
input size are SAME; others become an explicit PAD (zeros; PADV2 with the lowest float for max
pooling) before a VALID op; an average pool that excludes padding (``count_include_pad=0``) cannot be
padded explicitly and is only converted when its pads are SAME. The output size TFLite computes is
checked against ONNX's (``ceil_mode``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from fleetpipe.models._tflite_common import (
    OPS,
    attrs,
    const_input,
    fuse_act,
    no_extra_outputs,
    pair,
    reduce,
    text,
    unsupported,
)

if TYPE_CHECKING:
    from fleetpipe.models.onnx_to_tflite import Converter

__all__ = ["average_pool", "conv", "global_pool", "max_pool"]

_LOWEST = float(np.finfo(np.float32).min)


def conv(c: Converter, node: Any) -> None:
    x, w_name = node.input[0], node.input[1]
    if w_name not in c.consts:
        raise unsupported(node, "non-constant weights")
    w = c.consts[w_name].astype(np.float32)
    if w.ndim != 4:
        raise unsupported(node, f"{w.ndim - 2}-D convolution (only 2-D)")
    a = attrs(node)
    group = int(a.get("group", 1))
    cout, cin_g, kh, kw = w.shape
    n, cin = c.shape(x)[:2]
    bias = const_input(c, node, 2, np.zeros(cout, np.float32)).astype(np.float32).reshape(cout)
    strides, dil = pair(a, "strides"), pair(a, "dilations")
    act, out = fuse_act(c, node.output[0])
    xi, padding = _spatial_input(c, node, x, (kh, kw), strides, dil, same_ok=True, fill=0.0)
    y_shape = c.shape(node.output[0])
    b_label = node.input[2] if len(node.input) > 2 and node.input[2] else f"{w_name}/bias"
    if group == 1:
        yi = c.define(out, y_shape, True)
        filt = c.const(w_name, w.transpose(0, 2, 3, 1))
        c.op(OPS.CONV_2D, [xi, filt, c.const(b_label, bias)], [yi], _conv_opts(padding, strides, dil, act))
    elif group == cin and cin_g == 1:
        opts = schema.DepthwiseConv2DOptionsT()
        opts.padding, opts.strideH, opts.strideW = padding, strides[0], strides[1]
        opts.dilationHFactor, opts.dilationWFactor = dil
        opts.depthMultiplier, opts.fusedActivationFunction = cout // cin, act
        yi = c.define(out, y_shape, True)
        filt = c.const(w_name, w[:, 0].transpose(1, 2, 0)[None])
        c.op(OPS.DEPTHWISE_CONV_2D, [xi, filt, c.const(b_label, bias)], [yi], opts)
    else:  # grouped: SPLIT the channels, one CONV_2D per group, CONCATENATION
        og = cout // group
        pn, ph, pw, _ = c.b.shape(xi)
        parts = [c.b.tensor(c.unique(f"{out}/in{g}"), (pn, ph, pw, cin // group)) for g in range(group)]
        split = schema.SplitOptionsT()
        split.numSplits = group
        c.op(OPS.SPLIT, [c.const("axis", np.array(3, np.int32)), xi], parts, split)
        outs = []
        for g in range(group):
            yg = c.new(f"{out}/out{g}", (n, og, *y_shape[2:]), True)
            ws = c.const(f"{w_name}/{g}", w[g * og : (g + 1) * og].transpose(0, 2, 3, 1))
            bs = c.const(f"{b_label}/{g}", bias[g * og : (g + 1) * og])
            c.op(OPS.CONV_2D, [parts[g], ws, bs], [yg], _conv_opts(padding, strides, dil, act))
            outs.append(yg)
        cat = schema.ConcatenationOptionsT()
        cat.axis = 3
        c.op(OPS.CONCATENATION, outs, [c.define(out, y_shape, True)], cat)


def max_pool(c: Converter, node: Any) -> None:
    no_extra_outputs(c, node, "the Indices output")
    _pool(c, node, OPS.MAX_POOL_2D, same_ok=True, fill=_LOWEST)


def average_pool(c: Converter, node: Any) -> None:
    if int(attrs(node).get("count_include_pad", 0)):
        _pool(c, node, OPS.AVERAGE_POOL_2D, same_ok=False, fill=0.0)
    else:  # TFLite SAME excludes the padding from the mean, as count_include_pad=0 does
        _pool(c, node, OPS.AVERAGE_POOL_2D, same_ok=True, fill=None)


def global_pool(c: Converter, node: Any) -> None:
    x, y = node.input[0], node.output[0]
    if len(c.shape(x)) != 4:
        raise unsupported(node, f"rank-{len(c.shape(x))} input (only NCHW)")
    code = OPS.MEAN if node.op_type == "GlobalAveragePool" else OPS.REDUCE_MAX
    reduce(c, code, c.value(x, True), [1, 2], c.define(y, c.shape(y), True))


def _conv_opts(padding: int, strides: tuple[int, int], dil: tuple[int, int], act: int) -> Any:
    opts = schema.Conv2DOptionsT()
    opts.padding, opts.strideH, opts.strideW = padding, strides[0], strides[1]
    opts.dilationHFactor, opts.dilationWFactor = dil
    opts.fusedActivationFunction = act
    return opts


def _spatial_input(
    c: Converter,
    node: Any,
    x: str,
    kernel: Sequence[int],
    strides: tuple[int, int],
    dil: tuple[int, int],
    *,
    same_ok: bool,
    fill: float | None,
) -> tuple[int, int]:
    """The NHWC input of a conv/pool and its TFLite padding, with an explicit PAD when neither fits."""
    a = attrs(node)
    if len(c.shape(x)) != 4:
        raise unsupported(node, f"rank-{len(c.shape(x))} input (only NCHW)")
    n, ch, h, w = c.shape(x)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dil, strict=True)]
    same = []
    for size, k, s in zip((h, w), eff, strides, strict=True):
        total = max((-(-size // s) - 1) * s + k - size, 0)
        same.append((total // 2, total - total // 2))
    auto = text(a.get("auto_pad", "NOTSET"))
    if auto == "VALID":
        pads = [(0, 0), (0, 0)]
    elif auto == "SAME_UPPER":
        pads = same
    elif auto == "SAME_LOWER":
        pads = [(after, before) for before, after in same]
    elif auto == "NOTSET":
        p = [int(v) for v in a.get("pads", (0, 0, 0, 0))]
        pads = [(p[0], p[2]), (p[1], p[3])]
    else:
        raise unsupported(node, f"auto_pad={auto}")
    xi = c.value(x, True)
    if all(v == 0 for pair in pads for v in pair):
        padding, size = schema.Padding.VALID, (h, w)
    elif same_ok and pads == same:
        padding, size = schema.Padding.SAME, (h, w)
    elif fill is None:
        raise unsupported(node, f"pads {pads} other than TFLite's SAME (with count_include_pad=0)")
    else:
        size = (h + sum(pads[0]), w + sum(pads[1]))
        padded = c.new(f"{x}/pad", (n, ch, *size), True)
        paddings = c.const("paddings", np.array([(0, 0), *pads, (0, 0)], np.int32))
        if fill == 0.0:
            c.op(OPS.PAD, [xi, paddings], [padded], schema.PadOptionsT())
        else:
            value = c.const("pad_value", np.array(fill, np.float32))
            c.op(OPS.PADV2, [xi, paddings, value], [padded], schema.PadV2OptionsT())
        xi, padding = padded, schema.Padding.VALID
    if padding == schema.Padding.SAME:
        got = tuple(-(-s // st) for s, st in zip(size, strides, strict=True))
    else:
        got = tuple((s - k) // st + 1 for s, k, st in zip(size, eff, strides, strict=True))
    want = tuple(c.shape(node.output[0])[2:])
    if got != want:
        raise unsupported(node, f"output size {want} that TFLite pooling/conv gives as {got} (ceil_mode?)")
    return xi, padding


def _pool(c: Converter, node: Any, code: int, *, same_ok: bool, fill: float | None) -> None:
    a = attrs(node)
    kernel = [int(k) for k in a["kernel_shape"]]
    if len(kernel) != 2:
        raise unsupported(node, f"{len(kernel)}-D kernel (only 2-D)")
    strides, dil = pair(a, "strides"), pair(a, "dilations")
    if dil != (1, 1):
        raise unsupported(node, f"dilations {dil}")
    xi, padding = _spatial_input(c, node, node.input[0], kernel, strides, dil, same_ok=same_ok, fill=fill)
    opts = schema.Pool2DOptionsT()
    opts.padding, opts.strideH, opts.strideW = padding, strides[0], strides[1]
    opts.filterHeight, opts.filterWidth = kernel
    y = node.output[0]
    c.op(code, [xi], [c.define(y, c.shape(y), True)], opts)
