"""ONNX -> TFLite conversion in pure Python, without TensorFlow, for the op subset the model zoo uses.

No TensorFlow-free ONNX->TFLite converter exists on PyPI (onnx2tf and onnx-tf need TensorFlow,
ai-edge-torch needs torch and TensorFlow), so this one is hand-written. It writes the flatbuffer
with ``TFLiteBuilder`` (the schema object API that ships with ai-edge-litert) and checks itself
against onnxruntime (``verify_conversion``).

Theory of operation: ``load_onnx(grouping="nodes")`` pins the input shapes, infers a static shape
for every tensor and linearises the nodes in the same ``order`` the ONNX graph analysis uses, so
the TFLite operator list (which is its execution order) cuts like the ONNX graph. Nodes are then
converted one at a time in that order (``_tflite_ops`` holds one function per ONNX op type, with
convolution and pooling in ``_tflite_spatial``):

* Layout. TFLite's spatial kernels are NHWC, ONNX is NCHW. Every converted value records whether
  it is held NHWC (rank-4 tensors only) or in ONNX order. Conv and pooling take and give NHWC;
  elementwise ops, Concat, BatchNormalization, channel Softmax and the Flatten/Reshape of a tensor
  whose memory order is layout-independent (1x1 maps) work in whatever layout their inputs have,
  with constants permuted to match; ops whose meaning depends on ONNX axis order (Reshape,
  Transpose, MatMul, Gather, LayerNormalization) get ONNX order through a TRANSPOSE inserted once
  per value and cached. Rank-4 model inputs and outputs are NHWC with ``layout="nhwc"`` (the
  TFLite convention; ``tflite_feeds`` transposes ONNX inputs) or NCHW with ``layout="nchw"``.
* Fusion. A Relu or Clip(0, 6) that is the only consumer of a Conv, Gemm, MatMul or Add becomes
  that op's fused activation; MatMul by a constant matrix followed by Add of a constant vector is
  one FULLY_CONNECTED with bias. Tensors keep their ONNX names (a fused op's output takes the name
  of the last fused node), so layers carry the ONNX side's scope names (``layer1.0``).
* Missing builtins. Erf has no TFLite builtin: the exact-GELU subgraph ``x * 0.5 * (1 + Erf(x /
  sqrt 2))`` (any order of the multiplies) becomes the GELU builtin (approximate=False), and any
  other Erf is expanded with Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7) in ABS, SIGN, MUL,
  ADD, DIV and EXP. LayerNormalization becomes MEAN, SUB, MUL, MEAN, ADD, RSQRT, MUL, MUL, ADD.
* Constants. A node whose inputs are all constants is folded with onnx's reference evaluator, and
  Shape of a (static) tensor is a constant. Integer constants are stored as int32.

Anything outside ``SUPPORTED_OPS`` (or an unsupported attribute of a supported op) raises
``UnsupportedModel`` naming the op and the node. ``verify_conversion`` also checks that LiteRT's
kernels compute every declared tensor shape (``check_shapes``): a slice boundary carries the
declared shape, so a kernel that disagrees (LiteRT's GATHER keeps the axis of a 0-d index) would
break slicing even when the whole model's output is right.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from fleetpipe.errors import ModelError, UnsupportedModel
from fleetpipe.models._tflite_ops import HANDLERS, match_patterns
from fleetpipe.models.build_tflite import TFLiteBuilder
from fleetpipe.models.onnx_graph import UnknownOpWarning, load_onnx, normalize, read_model
from fleetpipe.models.tflite import run_tflite

if TYPE_CHECKING:
    import onnx

__all__ = ["LAYOUTS", "SUPPORTED_OPS", "check_shapes", "onnx_to_tflite", "tflite_feeds", "verify_conversion"]

Layout = Literal["nhwc", "nchw"]
LAYOUTS: tuple[Layout, ...] = ("nhwc", "nchw")


def onnx_to_tflite(
    model: str | bytes | onnx.ModelProto,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    *,
    layout: Layout = "nhwc",
    order: str = "greedy",
) -> bytes:
    """Convert an ONNX model (float32, static shapes after ``input_shapes``) to .tflite bytes."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    proto = normalize(read_model(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownOpWarning)  # only shapes and the order are used here
        graph = load_onnx(proto, input_shapes, order=order, grouping="nodes")
    conv = Converter(proto, graph, layout)
    for name in [layer.nodes[0] for layer in graph.layers]:
        if name in conv.skip:
            continue
        node = conv.nodes[name]
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedModel(f"ONNX op {node.domain}.{node.op_type} (node {name!r}) is not supported")
        if name in conv.patterns:
            conv.patterns[name](conv)
        elif node.input and all(not t or t in conv.consts for t in node.input):
            conv.fold(node)
        elif node.op_type in HANDLERS:
            HANDLERS[node.op_type](conv, node)
        else:
            raise UnsupportedModel(
                f"ONNX op {node.op_type} (node {name!r}) has no TFLite conversion; "
                f"supported: {', '.join(SUPPORTED_OPS)}"
            )
    return conv.finish()


def tflite_feeds(feeds: Mapping[str, np.ndarray], layout: Layout = "nhwc") -> dict[str, np.ndarray]:
    """ONNX-side inputs as the converted model takes them (rank-4 arrays NHWC with ``layout="nhwc"``)."""
    return {k: _to_layout(np.asarray(v), layout) for k, v in feeds.items()}


def verify_conversion(
    model: onnx.ModelProto,
    tflite_model: bytes,
    feeds: Mapping[str, np.ndarray],
    *,
    layout: Layout = "nhwc",
    threads: int = 1,
) -> float:
    """Max abs difference between onnxruntime on ``model`` and LiteRT on ``tflite_model`` (ONNX feeds)."""
    from fleetpipe.models.slicing import make_session, run_model

    check_shapes(tflite_model)
    want = run_model(make_session(model, threads=threads), feeds)
    got = run_tflite(tflite_model, tflite_feeds(feeds, layout), threads=threads)
    worst = 0.0
    for name, ref in want.items():
        if name not in got:
            raise UnsupportedModel(f"the converted model has no output {name!r} (has {sorted(got)})")
        out = got[name]
        if layout == "nhwc" and out.ndim == 4:
            out = out.transpose(0, 3, 1, 2)
        if out.shape != ref.shape:
            raise UnsupportedModel(f"output {name!r}: TFLite shape {out.shape}, ONNX {ref.shape}")
        if ref.size:
            worst = max(worst, float(np.abs(out.astype(np.float64) - ref.astype(np.float64)).max()))
    return worst


def check_shapes(tflite_model: bytes) -> None:
    """Raise ModelError unless LiteRT's kernels compute every tensor's declared shape."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    sub = schema.Model.GetRootAs(tflite_model, 0).Subgraphs(0)
    # Builtin kernels only: a delegate hides the shapes of the tensors inside its partitions.
    interp = Interpreter(
        model_content=bytes(tflite_model),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    try:
        interp.allocate_tensors()
    except Exception as exc:
        raise ModelError(f"LiteRT cannot prepare the model: {exc}") from exc
    for d in interp.get_tensor_details():
        if d["index"] >= sub.TensorsLength():  # scratch tensors the kernels added
            continue
        tensor = sub.Tensors(d["index"])
        declared = tuple(int(v) for v in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
        if tuple(int(v) for v in d["shape"]) != declared:
            raise ModelError(
                f"tensor {d['name']!r} is declared {declared} but LiteRT computes {tuple(d['shape'])}"
            )


SUPPORTED_OPS: tuple[str, ...] = tuple(sorted(HANDLERS))


# --------------------------------------------------------------------------- conversion state


@dataclass(frozen=True, slots=True)
class Value:
    """A converted activation: its TFLite tensor and whether it is held NHWC."""

    index: int
    nhwc: bool


class Converter:
    """Conversion state shared by the op functions in ``_tflite_ops`` and ``_tflite_spatial`` (internal)."""

    def __init__(self, model: onnx.ModelProto, graph: Any, layout: Layout) -> None:
        from onnx import numpy_helper

        self.b = TFLiteBuilder(f"{graph.name} (converted from ONNX by fleetpipe)")
        self.layout = layout
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.shapes: dict[str, tuple[int, ...]] = {n: i.shape for n, i in graph.tensors.items()}
        self.dtypes: dict[str, str] = {n: i.dtype for n, i in graph.tensors.items()}
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.nodes = {n.name: n for n in model.graph.node}
        self.producer = {t: n for n in model.graph.node for t in n.output if t}
        self.consumers: dict[str, list[Any]] = {}
        for n in model.graph.node:
            for t in {t for t in n.input if t}:
                self.consumers.setdefault(t, []).append(n)
        self.graph_inputs = [t.name for t in graph.inputs]
        self.graph_outputs = [t.name for t in graph.outputs]
        self.vals: dict[str, Value] = {}
        self.skip: set[str] = set()  # nodes absorbed by a fusion or pattern
        self.patterns: dict[str, Any] = {}  # first node of a matched pattern -> emitter
        self._views: dict[tuple[str, bool], int] = {}
        self._const_cache: dict[tuple[str, bool, int], int] = {}
        self._names: set[str] = set()
        for t in graph.inputs:
            if t.dtype != "float32":
                raise UnsupportedModel(f"model input {t.name!r} is {t.dtype}; only float32 inputs are supported")
            self.define(t.name, t.shape, len(t.shape) == 4 and layout == "nhwc")
        match_patterns(self)

    # --- tensors ---------------------------------------------------------------------------------

    def unique(self, name: str) -> str:
        """``name``, or ``name_<k>`` if taken."""
        out, k = name, 0
        while out in self._names:
            k += 1
            out = f"{name}_{k}"
        self._names.add(out)
        return out

    def new(self, name: str, onnx_shape: Sequence[int], nhwc: bool = False, dtype: str = "float32") -> int:
        """A fresh activation tensor (shape given in ONNX order)."""
        shape = _nhwc_shape(onnx_shape) if nhwc else tuple(onnx_shape)
        return self.b.tensor(self.unique(name), shape, dtype)

    def define(self, name: str, onnx_shape: Sequence[int], nhwc: bool) -> int:
        """The tensor holding ONNX value ``name``."""
        dtype = self.dtypes.get(name, "float32")
        if dtype != "float32":
            raise UnsupportedModel(f"tensor {name!r} is {dtype}; only float32 activations are supported")
        index = self.new(name, onnx_shape, nhwc)
        self.vals[name] = Value(index, nhwc)
        return index

    def const(self, label: str, array: np.ndarray) -> int:
        """A constant tensor (floats as float32, integers as int32)."""
        a = np.asarray(array)
        if a.dtype.kind in "iub":
            if a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
                a = np.clip(a, np.iinfo(np.int32).min, np.iinfo(np.int32).max)  # INT64_MAX "to the end"
            a = a.astype(np.int32)
        else:
            a = a.astype(np.float32)
        return self.b.const(self.unique(label), a)

    def shape(self, t: str) -> tuple[int, ...]:
        """ONNX shape of a tensor or constant."""
        if t in self.consts:
            return tuple(self.consts[t].shape)
        if t not in self.shapes:
            raise UnsupportedModel(f"tensor {t!r} has no static shape")
        return self.shapes[t]

    def is_nhwc(self, t: str) -> bool:
        """Whether activation ``t`` is held NHWC (constants never are)."""
        return t not in self.consts and self.vals[t].nhwc

    def value(self, t: str, nhwc: bool | None = None) -> int:
        """Tensor index of ``t``, in the layout asked for (None: as held); constants are rank-aligned."""
        if t in self.consts:
            return self.operand(t, bool(nhwc))
        if t not in self.vals:
            raise UnsupportedModel(f"tensor {t!r} is used before it is produced")
        v = self.vals[t]
        if nhwc is None or v.nhwc == nhwc:
            return v.index
        if nhwc and len(self.shape(t)) != 4:
            raise UnsupportedModel(f"tensor {t!r} of rank {len(self.shape(t))} cannot be held NHWC")
        key = (t, nhwc)
        if key not in self._views:
            out = self.new(f"{t}/{'nhwc' if nhwc else 'nchw'}", self.shape(t), nhwc)
            self.transpose(v.index, (0, 2, 3, 1) if nhwc else (0, 3, 1, 2), out)
            self._views[key] = out
        return self._views[key]

    def operand(self, t: str, nhwc: bool, rank: int = 4) -> int:
        """A constant operand of a broadcasting op, permuted for an NHWC partner of rank ``rank``."""
        a = self.consts[t]
        key = (t, nhwc, rank)
        if key not in self._const_cache:
            if nhwc and a.ndim >= 1:
                a = a.reshape((1,) * (rank - a.ndim) + a.shape).transpose(0, 2, 3, 1)
            self._const_cache[key] = self.const(t, a)
        return self._const_cache[key]

    # --- emitting --------------------------------------------------------------------------------

    def op(self, code: int, inputs: Sequence[int], outputs: Sequence[int], options: Any = None) -> None:
        self.b.op(code, inputs, outputs, options)

    def transpose(self, x: int, perm: Sequence[int], out: int) -> None:
        self.op(
            schema.BuiltinOperator.TRANSPOSE,
            [x, self.const("perm", np.array(perm, np.int32))],
            [out],
            schema.TransposeOptionsT(),
        )

    def sole_consumer(self, t: str) -> Any:
        """The only node reading ``t`` (None if several, none, or ``t`` is a model output)."""
        users = self.consumers.get(t, [])
        if len(users) != 1 or t in self.graph_outputs:
            return None
        return users[0]

    def fold(self, node: Any) -> None:
        """Evaluate a node whose inputs are all constants with onnx's reference evaluator."""
        from onnx.reference import ReferenceEvaluator

        try:
            ref = ReferenceEvaluator(node, opsets={"": self.opset})
            outs = ref.run(None, {t: self.consts[t] for t in node.input if t})
        except Exception as exc:
            raise UnsupportedModel(f"cannot fold constant {node.op_type} node {node.name!r}: {exc}") from exc
        for name, value in zip(node.output, outs, strict=False):
            if name:
                self.consts[name] = np.asarray(value)

    def finish(self) -> bytes:
        outputs = []
        for o in self.graph_outputs:
            if o in self.consts:
                raise UnsupportedModel(f"model output {o!r} is a constant")
            v = self.vals[o]
            want = len(self.shape(o)) == 4 and self.layout == "nhwc"
            if v.nhwc != want:
                self.b.rename(v.index, self.unique(f"{o}/{'nhwc' if v.nhwc else 'nchw'}"))
                self._names.discard(o)
                index = self.value(o, want)
                self.b.rename(index, o)
            else:
                index = v.index
                if self.b.name(index) != o:  # an alias (Identity): copy under the output's name
                    out = self.b.tensor(o, self.b.shape(index))
                    self.reshape(index, self.b.shape(index), out)
                    index = out
            outputs.append(index)
        return self.b.finish([self.vals[t].index for t in self.graph_inputs], outputs)

    def reshape(self, x: int, shape: Sequence[int], out: int) -> None:
        opts = schema.ReshapeOptionsT()
        opts.newShape = [int(d) for d in shape]
        self.op(schema.BuiltinOperator.RESHAPE, [x, self.const("shape", np.array(shape, np.int32))], [out], opts)


def _nhwc_shape(shape: Sequence[int]) -> tuple[int, ...]:
    n, c, h, w = shape
    return (n, h, w, c)


def _to_layout(a: np.ndarray, layout: Layout) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)) if layout == "nhwc" and a.ndim == 4 else a
