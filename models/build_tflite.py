"""Build float32 .tflite models in code, without TensorFlow: the digits MLP and a small residual CNN.

``python -m fleetpipe.models.build_tflite`` converts the trained digits MLP
(``models/data/digits_mlp.npz``, written by ``fleetpipe.models.train_digits``) into
``models/data/digits_mlp.tflite`` and prints its test accuracy.

Layouts follow TFLite: activations NHWC, FULLY_CONNECTED weights ``[out, in]``, CONV_2D filters
``[out, kh, kw, in]``, DEPTHWISE_CONV_2D filters ``[1, kh, kw, channels]``. ``build_mlp`` takes weights
in the numpy/ONNX ``x @ W + b`` layout (``W`` is ``[in, out]``) and transposes them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from fleetpipe.models.tflite import pack_model, run_tflite

__all__ = [
    "DATA_DIR",
    "CnnSpec",
    "TFLiteBuilder",
    "build_cnn",
    "build_mlp",
    "build_zoo",
    "cnn_weights",
    "load_mlp_weights",
    "main",
    "mlp_reference",
]

DATA_DIR = Path(__file__).resolve().parent / "data"

_ACTIVATIONS = {
    None: schema.ActivationFunctionType.NONE,
    "none": schema.ActivationFunctionType.NONE,
    "relu": schema.ActivationFunctionType.RELU,
    "relu6": schema.ActivationFunctionType.RELU6,
    "tanh": schema.ActivationFunctionType.TANH,
}
_TYPES = {"float32": schema.TensorType.FLOAT32, "int32": schema.TensorType.INT32, "float16": schema.TensorType.FLOAT16}


class TFLiteBuilder:
    """Assemble one subgraph: add tensors, constants and builtin ops in execution order, then ``finish``."""

    def __init__(self, description: str = "fleetpipe") -> None:
        self._description = description
        self._tensors: list[Any] = []
        self._buffers: list[Any] = [schema.BufferT()]  # buffer 0: the empty sentinel
        self._ops: list[Any] = []
        self._codes: dict[int, int] = {}

    def tensor(self, name: str, shape: Sequence[int], dtype: str = "float32") -> int:
        """Declare an activation tensor; returns its index."""
        t = schema.TensorT()
        t.name, t.shape, t.type, t.buffer = name, [int(d) for d in shape], _TYPES[dtype], 0
        self._tensors.append(t)
        return len(self._tensors) - 1

    def const(self, name: str, value: np.ndarray) -> int:
        """Declare a constant tensor holding ``value`` (float32 or int32); returns its index."""
        array = np.ascontiguousarray(value)
        index = self.tensor(name, array.shape, str(array.dtype))
        buf = schema.BufferT()
        buf.data = np.frombuffer(array.astype(array.dtype.newbyteorder("<")).tobytes(), np.uint8)
        self._buffers.append(buf)
        self._tensors[index].buffer = len(self._buffers) - 1
        return index

    def rename(self, index: int, name: str) -> None:
        """Give tensor ``index`` another name."""
        self._tensors[index].name = name

    def name(self, index: int) -> str:
        """The name of tensor ``index``."""
        return str(self._tensors[index].name)

    def shape(self, index: int) -> tuple[int, ...]:
        """The declared shape of tensor ``index``."""
        return tuple(self._tensors[index].shape)

    def op(self, code: int, inputs: Sequence[int], outputs: Sequence[int], options: Any = None) -> None:
        """Append a builtin operator (``schema.BuiltinOperator`` code) with its ``...OptionsT``."""
        o = schema.OperatorT()
        o.opcodeIndex = self._codes.setdefault(code, len(self._codes))
        o.inputs, o.outputs = list(inputs), list(outputs)
        if options is not None:
            o.builtinOptionsType = getattr(schema.BuiltinOptions, type(options).__name__[:-1])
            o.builtinOptions = options
        self._ops.append(o)

    def finish(self, inputs: Sequence[int], outputs: Sequence[int]) -> bytes:
        """The serialised model with the given subgraph inputs and outputs."""
        sub = schema.SubGraphT()
        sub.tensors, sub.operators = self._tensors, self._ops
        sub.inputs, sub.outputs, sub.name = list(inputs), list(outputs), "main"
        codes = [None] * len(self._codes)
        for code, index in self._codes.items():
            c = schema.OperatorCodeT()
            c.builtinCode = code
            c.deprecatedBuiltinCode = min(code, schema.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
            c.version = 1
            codes[index] = c
        model = schema.ModelT()
        model.version, model.operatorCodes, model.subgraphs = 3, codes, [sub]
        model.buffers, model.description = self._buffers, self._description
        return pack_model(model)


def build_mlp(
    weights: Sequence[tuple[np.ndarray, np.ndarray]],
    activations: Sequence[str | None] | None = None,
    *,
    batch: int = 1,
    description: str = "digits_mlp",
) -> bytes:
    """An MLP of FULLY_CONNECTED ops (``W`` as ``[in, out]``); default: ReLU between layers, logits out."""
    if not weights:
        raise ValueError("an MLP needs at least one layer")
    acts = list(activations) if activations is not None else ["relu"] * (len(weights) - 1) + [None]
    if len(acts) != len(weights):
        raise ValueError(f"{len(weights)} layers but {len(acts)} activations")
    b = TFLiteBuilder(description)
    x = b.tensor("input", (batch, np.shape(weights[0][0])[0]))
    first = x
    for i, ((w, bias), act) in enumerate(zip(weights, acts, strict=True)):
        w = np.asarray(w, np.float32)
        bias = np.asarray(bias, np.float32).reshape(-1)
        if w.ndim != 2 or w.shape[1] != bias.shape[0]:
            raise ValueError(f"layer {i}: W {w.shape} and b {bias.shape} do not match (W is [in, out])")
        if act not in _ACTIVATIONS:
            raise ValueError(f"layer {i}: unknown activation {act!r}")
        last = i == len(weights) - 1
        y = b.tensor("logits" if last else f"fc{i}", (batch, w.shape[1]))
        opts = schema.FullyConnectedOptionsT()
        opts.fusedActivationFunction = _ACTIVATIONS[act]
        wi, bi = b.const(f"fc{i}/W", w.T), b.const(f"fc{i}/b", bias)
        b.op(schema.BuiltinOperator.FULLY_CONNECTED, [x, wi, bi], [y], opts)
        x = y
    return b.finish([first], [x])


def mlp_reference(
    weights: Sequence[tuple[np.ndarray, np.ndarray]],
    x: np.ndarray,
    activations: Sequence[str | None] | None = None,
) -> np.ndarray:
    """Numpy forward pass of the MLP ``build_mlp`` builds."""
    acts = list(activations) if activations is not None else ["relu"] * (len(weights) - 1) + [None]
    h = np.asarray(x, np.float32)
    for (w, bias), act in zip(weights, acts, strict=True):
        h = h @ np.asarray(w, np.float32) + np.asarray(bias, np.float32)
        if act == "relu":
            h = np.maximum(h, 0)
        elif act == "relu6":
            h = np.clip(h, 0, 6)
        elif act == "tanh":
            h = np.tanh(h)
    return h


def load_mlp_weights(path: str | Path | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(W0, b0), (W1, b1), ...]`` from an npz holding arrays ``W<i>`` and ``b<i>``."""
    with np.load(path or DATA_DIR / "digits_mlp.npz") as npz:
        layers, i = [], 0
        while f"W{i}" in npz:
            layers.append((np.asarray(npz[f"W{i}"]), np.asarray(npz[f"b{i}"])))
            i += 1
    if not layers:
        raise ValueError(f"{path}: no arrays W0, b0, ...")
    return layers


@dataclass(frozen=True, slots=True)
class CnnSpec:
    """A small residual CNN: stem conv, ``blocks`` x (depthwise -> pointwise + skip), pool, head."""

    size: int = 16
    in_channels: int = 3
    channels: int = 8
    blocks: int = 2
    classes: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size < 2 or self.size % 2 or self.channels < 1 or self.blocks < 0 or self.classes < 1:
            raise ValueError(f"invalid CNN spec {self}")


def cnn_weights(spec: CnnSpec) -> dict[str, np.ndarray]:
    """Deterministic float32 weights for ``spec`` in TFLite layouts."""
    rng = np.random.default_rng(spec.seed)
    c = spec.channels

    def rand(*shape: int, fan_in: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    w = {"stem/W": rand(c, 3, 3, spec.in_channels, fan_in=9 * spec.in_channels), "stem/b": rand(c, fan_in=c)}
    for i in range(spec.blocks):
        w[f"block{i}/dw/W"] = rand(1, 3, 3, c, fan_in=9)
        w[f"block{i}/dw/b"] = rand(c, fan_in=c)
        w[f"block{i}/pw/W"] = rand(c, 1, 1, c, fan_in=c)
        w[f"block{i}/pw/b"] = rand(c, fan_in=c)
    w["head/W"] = rand(spec.classes, c, fan_in=c)
    w["head/b"] = rand(spec.classes, fan_in=c)
    return w


def build_cnn(spec: CnnSpec | None = None) -> bytes:
    """The residual CNN of ``spec``: input ``[1, size, size, in_channels]``, softmax ``[1, classes]``."""
    spec = spec or CnnSpec()
    w, s, c = cnn_weights(spec), spec.size, spec.channels
    ops, act = schema.BuiltinOperator, schema.ActivationFunctionType
    b = TFLiteBuilder(f"residual_cnn_{s}x{s}_c{c}_b{spec.blocks}")
    x = b.tensor("input", (1, s, s, spec.in_channels))
    inp = x
    y = b.tensor("stem", (1, s, s, c))
    b.op(ops.CONV_2D, [x, *_consts(b, w, "stem")], [y], _conv_options(act.RELU))
    x = y
    for i in range(spec.blocks):
        p = f"block{i}"
        dw = b.tensor(f"{p}/dw", (1, s, s, c))
        opts = schema.DepthwiseConv2DOptionsT(padding=schema.Padding.SAME, strideW=1, strideH=1)
        opts.depthMultiplier, opts.fusedActivationFunction = 1, act.RELU
        b.op(ops.DEPTHWISE_CONV_2D, [x, *_consts(b, w, f"{p}/dw")], [dw], opts)
        pw = b.tensor(f"{p}/pw", (1, s, s, c))
        b.op(ops.CONV_2D, [dw, *_consts(b, w, f"{p}/pw")], [pw], _conv_options(act.NONE))
        out = b.tensor(f"{p}/out", (1, s, s, c))
        add = schema.AddOptionsT()
        add.fusedActivationFunction = act.RELU
        b.op(ops.ADD, [x, pw], [out], add)
        x = out
    pooled = b.tensor("pool", (1, s // 2, s // 2, c))
    pool = schema.Pool2DOptionsT(padding=schema.Padding.VALID, strideW=2, strideH=2)
    pool.filterWidth, pool.filterHeight = 2, 2
    b.op(ops.AVERAGE_POOL_2D, [x], [pooled], pool)
    mean = b.tensor("mean", (1, 1, 1, c))
    reducer = schema.ReducerOptionsT()
    reducer.keepDims = True
    b.op(ops.MEAN, [pooled, b.const("mean/axes", np.array([1, 2], np.int32))], [mean], reducer)
    flat = b.tensor("flat", (1, c))
    reshape = schema.ReshapeOptionsT()
    reshape.newShape = [1, c]
    b.op(ops.RESHAPE, [mean, b.const("flat/shape", np.array([1, c], np.int32))], [flat], reshape)
    logits = b.tensor("logits", (1, spec.classes))
    b.op(ops.FULLY_CONNECTED, [flat, *_consts(b, w, "head")], [logits], schema.FullyConnectedOptionsT())
    probs = b.tensor("probs", (1, spec.classes))
    softmax = schema.SoftmaxOptionsT()
    softmax.beta = 1.0
    b.op(ops.SOFTMAX, [logits], [probs], softmax)
    return b.finish([inp], [probs])


def build_zoo(name: str, **kw: Any) -> bytes:
    """A ``fleetpipe.models.zoo`` model converted to .tflite (image input NHWC; digits: batch 1)."""
    from fleetpipe.models import zoo
    from fleetpipe.models.onnx_to_tflite import onnx_to_tflite

    shapes = {"input": zoo.input_shape(name)} if name == "digits" else None
    return onnx_to_tflite(zoo.build(name, **kw), shapes)


def main(argv: Sequence[str] | None = None) -> int:
    """Write ``digits_mlp.tflite`` from the trained npz and print its test accuracy."""
    parser = argparse.ArgumentParser(prog="python -m fleetpipe.models.build_tflite", description=main.__doc__)
    parser.add_argument("--npz", type=Path, default=DATA_DIR / "digits_mlp.npz")
    parser.add_argument("--out", type=Path, default=DATA_DIR / "digits_mlp.tflite")
    args = parser.parse_args(argv)
    weights = load_mlp_weights(args.npz)
    model = build_mlp(weights)
    args.out.write_bytes(model)
    with np.load(args.npz) as npz:
        x_test, y_test = np.asarray(npz["x_test"], np.float32), np.asarray(npz["y_test"])
    logits = run_tflite(model, {"input": x_test})["logits"]
    ref = mlp_reference(weights, x_test)
    accuracy = float((logits.argmax(axis=1) == y_test).mean())
    print(f"wrote {args.out} ({len(model)} bytes)")
    diff = float(np.abs(logits - ref).max())
    print(f"test accuracy {accuracy:.4f} on {len(y_test)} samples; max |tflite - numpy| {diff:.2e}")
    return 0


def _conv_options(activation: int) -> Any:
    opts = schema.Conv2DOptionsT(padding=schema.Padding.SAME, strideW=1, strideH=1)
    opts.fusedActivationFunction = activation
    return opts


def _consts(b: TFLiteBuilder, weights: dict[str, np.ndarray], prefix: str) -> tuple[int, int]:
    """Constant tensors ``<prefix>/W`` and ``<prefix>/b``."""
    return b.const(f"{prefix}/W", weights[f"{prefix}/W"]), b.const(f"{prefix}/b", weights[f"{prefix}/b"])


if __name__ == "__main__":
    raise SystemExit(main())
