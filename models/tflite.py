"""TFLite flatbuffers as ``ModelGraph`` values, sliced into standalone .tflite stages without TensorFlow.

The flatbuffer schema is the generated object API that ships with ``ai-edge-litert``
(``ai_edge_litert.schema_py_generated``: ``ModelT``, ``SubGraphT``, ``TensorT``, ...), so reading and
writing follow upstream's schema exactly; nothing here imports TensorFlow.

Theory of operation: a TFLite subgraph lists its operators in execution order, which is already a
topological order, so a cut is an operator prefix. The tensors crossing the cut after operator ``k``
are the non-constant tensors produced by operators ``<= k`` (or fed as model inputs) and read by an
operator ``> k`` or returned as a model output. Grouping follows ``fleetpipe.models.onnx_graph``:
``grouping="blocks"`` groups operators at cuts crossed by a single activation and merges a group
without a heavy op (conv, fully connected, ...) into its neighbour; ``grouping="nodes"`` makes every
operator a layer, so every prefix is a candidate cut (inside a residual block two tensors cross).
Unknown ops get the ONNX side's conservative FLOPs guess and an ``UnknownOpWarning``. A slice keeps
only the tensors, buffers and operator codes its operators use, re-indexed, with the crossing
tensors as its inputs and outputs. Tensor names are made unique (``name#index`` when empty or
repeated) and slices carry those names, so a node matches tensors by name.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import flatbuffers
import numpy as np

try:
    from ai_edge_litert import schema_py_generated as schema
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "fleetpipe.models.tflite needs ai-edge-litert: pip install 'fleetpipe[tflite]'"
    ) from exc

from fleetpipe.errors import ModelError, SliceError, UnsupportedModel
from fleetpipe.models.graph import Layer, ModelGraph, TensorInfo, split_ranges
from fleetpipe.models.onnx_graph import GROUPINGS, UNKNOWN_FLOPS_PER_ELEMENT, UnknownOpWarning

__all__ = [
    "load_tflite",
    "op_name",
    "pack_model",
    "run_tflite",
    "slice_tflite",
    "verify_tflite_slices",
]

Grouping = Literal["blocks", "nodes"]


def load_tflite(
    source: str | Path | bytes | bytearray | memoryview,
    *,
    name: str | None = None,
    grouping: Grouping = "blocks",
) -> ModelGraph:
    """Analyse a .tflite model (path or bytes) into a ``ModelGraph``; raises UnsupportedModel."""
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, not {grouping!r}")
    if isinstance(source, str | Path):
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UnsupportedModel(f"cannot read TFLite model {path}: {exc}") from exc
        name = name or path.stem
    else:
        data = bytes(source)
    parsed = _parse(data)
    label = name or _text(parsed.model.description) or "model"
    try:
        return _build_graph(parsed, label, grouping)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        # Structurally valid flatbuffer, inconsistent content (wrong operand count, negative sizes, ...).
        raise UnsupportedModel(f"malformed TFLite model: {type(exc).__name__}: {exc}") from exc


def slice_tflite(model_bytes: bytes, graph: ModelGraph, first: int, last: int) -> bytes:
    """A standalone .tflite for layers ``first..last`` of ``graph`` (inclusive); raises SliceError."""
    n = len(graph.layers)
    if not (isinstance(first, int) and isinstance(last, int)) or not 0 <= first <= last < n:
        raise SliceError(f"invalid layer range {first}..{last} for a model of {n} layers")
    return _slice(_parse(bytes(model_bytes)), graph, first, last)


def run_tflite(
    model_bytes: bytes, feeds: Mapping[str, np.ndarray], *, threads: int = 1
) -> dict[str, np.ndarray]:
    """Run a .tflite model once with LiteRT; inputs and outputs keyed by (unique) tensor name."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        names = _tensor_names(bytes(model_bytes))
        interp = Interpreter(model_content=bytes(model_bytes), num_threads=threads)
        details = interp.get_input_details()
        for d in details:
            array = _feed(feeds, names[d["index"]])
            if tuple(d["shape"]) != array.shape:
                interp.resize_tensor_input(d["index"], list(array.shape), strict=False)
        interp.allocate_tensors()
        for d in details:
            interp.set_tensor(d["index"], np.ascontiguousarray(_feed(feeds, names[d["index"]])))
        interp.invoke()
        return {names[d["index"]]: interp.get_tensor(d["index"]) for d in interp.get_output_details()}
    except ModelError:
        raise
    except Exception as exc:  # LiteRT raises ValueError/RuntimeError carrying C++ messages
        raise ModelError(f"LiteRT failed to run the model: {exc}") from exc


def verify_tflite_slices(
    model_bytes: bytes, graph: ModelGraph, cuts: Sequence[int], feeds: Mapping[str, np.ndarray]
) -> float:
    """Max abs difference between the whole model and its slices at ``cuts`` run in sequence."""
    try:
        ranges = split_ranges(len(graph.layers), list(cuts))
    except ValueError as exc:
        raise SliceError(str(exc)) from exc
    expected = run_tflite(model_bytes, feeds)
    parsed = _parse(bytes(model_bytes))
    env: dict[str, np.ndarray] = {t.name: np.asarray(feeds[t.name]) for t in graph.inputs if t.name in feeds}
    for first, last in ranges:
        piece = _slice(parsed, graph, first, last)
        outs = run_tflite(piece, {t: env[t] for t in graph.inputs_of(first)})
        for name, value in outs.items():
            declared = graph.tensors[name].shape if name in graph.tensors else value.shape
            if value.shape[1:] != declared[1:] or value.ndim != len(declared):  # the batch may differ
                raise SliceError(f"slice {first}..{last}: {name!r} has shape {value.shape}, declared {declared}")
        env.update(outs)
    worst = 0.0
    for out in graph.outputs:
        got, want = env[out.name], expected[out.name]
        if got.shape != want.shape:
            raise SliceError(f"output {out.name!r}: slices give shape {got.shape}, model {want.shape}")
        if got.size:
            diff = np.abs(got.astype(np.float64) - want.astype(np.float64)).max()
            worst = max(worst, float(diff))
    return worst


def op_name(builtin_code: int, custom_code: str | None = None) -> str:
    """The schema name of a builtin operator code (``CUSTOM:<name>`` for custom ops)."""
    if builtin_code == schema.BuiltinOperator.CUSTOM:
        return f"CUSTOM:{custom_code or '?'}"
    return _OP_NAMES.get(builtin_code, f"BUILTIN_{builtin_code}")


def pack_model(model: Any) -> bytes:
    """Serialise a ``schema.ModelT`` (its buffers are swapped for 16-byte-aligned ones, in place)."""
    for i, buf in enumerate(model.buffers or []):
        if not isinstance(buf, _AlignedBufferT):
            model.buffers[i] = _AlignedBufferT(buf.data)
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


# --------------------------------------------------------------------------- private helpers

_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_TYPE_NAMES = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
_NUMPY_TYPES = {
    "FLOAT32": "float32", "FLOAT16": "float16", "FLOAT64": "float64", "INT32": "int32", "UINT8": "uint8",
    "INT64": "int64", "BOOL": "bool", "INT16": "int16", "COMPLEX64": "complex64", "INT8": "int8",
    "COMPLEX128": "complex128", "UINT64": "uint64", "UINT32": "uint32", "UINT16": "uint16",
}  # fmt: skip
_ZERO_FLOP_OPS = frozenset({"RESHAPE", "SQUEEZE", "EXPAND_DIMS", "CONCATENATION", "TRANSPOSE", "PAD", "PADV2",
                            "SLICE", "STRIDED_SLICE", "GATHER", "SPLIT", "PACK", "UNPACK", "DEQUANTIZE",
                            "QUANTIZE", "CAST", "SHAPE"})  # fmt: skip
_HEAVY_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "BATCH_MATMUL",
                        "CONV_3D", "LSTM", "UNIDIRECTIONAL_SEQUENCE_LSTM", "BIDIRECTIONAL_SEQUENCE_LSTM",
                        "UNIDIRECTIONAL_SEQUENCE_RNN", "RNN", "SVDF", "EMBEDDING_LOOKUP"})  # fmt: skip
_LIGHT_OPS = frozenset({"AVERAGE_POOL_2D", "MAX_POOL_2D", "L2_POOL_2D", "MEAN", "SUM", "REDUCE_MAX",
                        "REDUCE_MIN", "REDUCE_PROD", "SOFTMAX", "LOG_SOFTMAX"})  # fmt: skip
_ELEMENTWISE_OPS = frozenset({"ADD", "SUB", "MUL", "DIV", "MAXIMUM", "MINIMUM", "RELU", "RELU6",
                              "RELU_N1_TO_1", "LEAKY_RELU", "PRELU", "ABS", "SQUARE", "SQRT", "RSQRT",
                              "NEG", "SQUARED_DIFFERENCE", "POW", "FLOOR", "CEIL", "ROUND", "SIGN"})  # fmt: skip
# Same weights as the ONNX side: a transcendental function counts 4 FLOPs per element.
_TRANSCENDENTAL_OPS = frozenset({"LOGISTIC", "TANH", "EXP", "LOG", "HARD_SWISH", "GELU", "ELU", "SIN",
                                 "COS"})  # fmt: skip


class _AlignedBufferT(schema.BufferT):  # type: ignore[misc]
    """A BufferT whose data vector starts on a 16-byte boundary (kernels read floats in place)."""

    def __init__(self, data: Any = None) -> None:
        super().__init__(data=None if data is None else np.asarray(data, dtype=np.uint8).reshape(-1))

    def Pack(self, builder: flatbuffers.Builder) -> int:  # flatbuffers' method name
        vec = None
        if self.data is not None:
            raw = self.data.tobytes()
            builder.StartVector(1, len(raw), 16)
            builder.head -= len(raw)
            builder.Bytes[builder.head : builder.head + len(raw)] = raw
            vec = builder.EndVector()
        schema.BufferStart(builder)
        if vec is not None:
            schema.BufferAddData(builder, vec)
        return int(schema.BufferEnd(builder))


@dataclass(frozen=True, slots=True)
class _Parsed:
    """A validated single-subgraph model with per-tensor facts."""

    model: Any  # schema.ModelT
    names: tuple[str, ...]  # unique tensor names, by tensor index
    op_names: tuple[str, ...]  # unique operator names, by operator index
    op_types: tuple[str, ...]
    const: tuple[bool, ...]  # tensor has constant data
    infos: tuple[TensorInfo, ...]
    # operators whose inputs are all constant (DEQUANTIZE / DENSIFY of a weight buffer, ...), by index
    weight_ops: frozenset[int] = frozenset()
    # operator indices in analysis order: file order, weight-only ops moved right before their first consumer
    order: tuple[int, ...] = ()

    @property
    def subgraph(self) -> Any:
        return self.model.subgraphs[0]


def _parse(data: bytes) -> _Parsed:
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise UnsupportedModel("not a TFLite flatbuffer (missing 'TFL3' file identifier)")
    try:
        model = schema.ModelT.InitFromPackedBuf(data, 0)
        _resolve_offsets(model, data)
        return _facts(model)
    except ModelError:
        raise
    except Exception as exc:  # garbage offsets surface as IndexError/struct.error/ValueError/...
        raise UnsupportedModel(f"corrupt TFLite flatbuffer: {type(exc).__name__}: {exc}") from exc


def _resolve_offsets(model: Any, data: bytes) -> None:
    """Inline buffers stored after the flatbuffer (models > 2 GB use offset/size)."""
    if getattr(model, "externalBuffers", None):
        raise UnsupportedModel("TFLite models with external buffers are not supported")
    for buf in model.buffers or []:
        if buf.offset > 1:
            if buf.offset + buf.size > len(data):
                raise UnsupportedModel("a TFLite buffer points past the end of the file")
            buf.data = np.frombuffer(data, np.uint8, buf.size, buf.offset)
        buf.offset, buf.size = 0, 0


def _facts(model: Any) -> _Parsed:
    subgraphs = model.subgraphs or []
    if len(subgraphs) != 1:
        raise UnsupportedModel(f"only single-subgraph TFLite models are supported, found {len(subgraphs)}")
    sg, codes, buffers = subgraphs[0], model.operatorCodes or [], model.buffers or []
    tensors = sg.tensors or []
    sg.inputs = _ints(sg.inputs)
    sg.outputs = _ints(sg.outputs)
    sg.operators = sg.operators or []
    if not sg.operators:
        raise UnsupportedModel("the TFLite subgraph has no operators")
    op_types = []
    for k, op in enumerate(sg.operators):
        op.inputs, op.outputs, op.intermediates = _ints(op.inputs), _ints(op.outputs), _ints(op.intermediates)
        if not 0 <= op.opcodeIndex < len(codes):
            raise UnsupportedModel(f"operator {k} has opcode index {op.opcodeIndex} out of range")
        code = codes[op.opcodeIndex]
        builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
        op_types.append(op_name(builtin, _text(code.customCode)))
        if op_types[-1] in ("WHILE", "IF", "CALL_ONCE", "CALL"):
            raise UnsupportedModel(f"control-flow operator {op_types[-1]} is not supported")
        for t in (*op.inputs, *op.outputs, *op.intermediates, *sg.inputs, *sg.outputs):
            if not -1 <= t < len(tensors):
                raise UnsupportedModel(f"operator {k} refers to tensor {t}, out of range")
    const, infos, raw_names = [], [], []
    for i, t in enumerate(tensors):
        if not 0 <= t.buffer < max(len(buffers), 1):
            raise UnsupportedModel(f"tensor {i} refers to buffer {t.buffer}, out of range")
        data = buffers[t.buffer].data if buffers else None
        const.append(data is not None and len(data) > 0)
        raw_names.append(_text(t.name))
        t.shape = _ints(t.shape)
    names = _unique_names(raw_names)
    for i, t in enumerate(tensors):
        type_name = _TYPE_NAMES.get(t.type, f"TYPE_{t.type}")
        dtype = _NUMPY_TYPES.get(type_name, type_name.lower())
        shape = tuple(max(int(d), 0) for d in t.shape)
        itemsize = np.dtype(dtype).itemsize if dtype in _NUMPY_TYPES.values() else 0
        nbytes = len(buffers[t.buffer].data) if const[i] else int(np.prod(shape, dtype=np.int64)) * itemsize
        infos.append(TensorInfo(names[i], dtype, shape, nbytes))
    op_names = tuple(f"{kind}:{k}" for k, kind in enumerate(op_types))
    weight_ops, order = _weight_order(sg.operators, const)
    return _Parsed(model, names, op_names, tuple(op_types), tuple(const), tuple(infos), weight_ops, order)


def _weight_order(ops: Sequence[Any], const: Sequence[bool]) -> tuple[frozenset[int], tuple[int, ...]]:
    """Weight-only operators (every input constant or weight-only) and the analysis order (see ``_Parsed``)."""
    weight_t: set[int] = set()
    weight_ops: set[int] = set()
    producer: dict[int, int] = {}
    for k, op in enumerate(ops):
        ins = [t for t in op.inputs if t >= 0]
        if ins and all(const[t] or t in weight_t for t in ins):
            weight_ops.add(k)
            weight_t.update(t for t in op.outputs if t >= 0)
        for t in op.outputs:
            if t >= 0:
                producer[t] = k
    order: list[int] = []
    placed: set[int] = set()

    def place(k: int) -> None:
        for t in ops[k].inputs:
            j = producer.get(t)
            if t >= 0 and j is not None and j in weight_ops and j not in placed:
                place(j)
        placed.add(k)
        order.append(k)

    for k in range(len(ops)):
        if k not in weight_ops:
            place(k)
    for k in sorted(weight_ops - placed):  # weight-only ops nobody reads
        place(k)
    return frozenset(weight_ops), tuple(order)


def _unique_names(raw_names: Sequence[str]) -> tuple[str, ...]:
    """Tensor names made unique: ``name#index`` when empty or repeated."""
    seen: dict[str, int] = {}
    for raw in raw_names:
        seen[raw] = seen.get(raw, 0) + 1
    return tuple(raw if raw and seen[raw] == 1 else f"{raw or 'tensor'}#{i}" for i, raw in enumerate(raw_names))


def _tensor_names(data: bytes) -> tuple[str, ...]:
    """The unique tensor names of the first subgraph, read without unpacking the whole model."""
    sub = schema.Model.GetRootAs(data, 0).Subgraphs(0)
    return _unique_names([_text(sub.Tensors(i).Name()) for i in range(sub.TensorsLength())])


def _slice(parsed: _Parsed, graph: ModelGraph, first: int, last: int) -> bytes:
    op_index = {node: i for i, node in enumerate(parsed.op_names)}
    try:
        ops = [op_index[node] for layer in graph.layers[first : last + 1] for node in layer.nodes]
    except KeyError as exc:
        raise SliceError(f"graph {graph.name!r} does not describe this model: no operator {exc}") from exc
    position = {k: i for i, k in enumerate(parsed.order)}
    at = [position[k] for k in ops]
    if at != list(range(at[0], at[-1] + 1)):
        raise SliceError(f"layers {first}..{last} are not a contiguous operator range")
    ops = _weight_producers(parsed, ops) + ops
    tensor_index = {t: i for i, t in enumerate(parsed.names)}
    try:
        inputs = [tensor_index[t] for t in graph.inputs_of(first)]
        outputs = [tensor_index[t] for t in graph.crossing(last)]
    except KeyError as exc:
        raise SliceError(f"graph {graph.name!r} names tensor {exc}, absent from this model") from exc
    return _extract(parsed, ops, inputs, outputs, f"{graph.name}[{first}:{last}]")


def _weight_producers(p: _Parsed, ops: list[int]) -> list[int]:
    """The weight-only operators outside ``ops`` that ``ops`` read from, in file (topological) order."""
    producer = {t: k for k in p.weight_ops for t in p.subgraph.operators[k].outputs if t >= 0}
    have, extra = set(ops), set()
    stack = [t for k in ops for t in p.subgraph.operators[k].inputs if t in producer]
    while stack:
        k = producer[stack.pop()]
        if k not in have and k not in extra:
            extra.add(k)
            stack.extend(t for t in p.subgraph.operators[k].inputs if t in producer)
    return sorted(extra)


def _text(value: Any) -> str:
    """A flatbuffers string field (bytes or None) as text."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value or ""


def _ints(values: Any) -> list[int]:
    return [] if values is None else [int(v) for v in values]


def _build_graph(p: _Parsed, name: str, grouping: Grouping) -> ModelGraph:
    sg = p.subgraph
    ops = [sg.operators[k] for k in p.order]  # by position in the analysis order
    n = len(ops)
    # Weight-only tensors never cross a cut: a slice that reads one recomputes it (``_weight_producers``).
    weight_t = {t for k in p.weight_ops for t in sg.operators[k].outputs if t >= 0}
    last_use = {t: -1 for t in range(len(p.names))}
    for k, op in enumerate(ops):
        for t in op.inputs:
            if t >= 0 and t not in weight_t:
                last_use[t] = k
    for t in sg.outputs:
        last_use[t] = n
    live = {t for t in sg.inputs if not p.const[t] and last_use[t] >= 0}
    crossings: list[tuple[int, ...]] = []
    for k, op in enumerate(ops):
        live.update(t for t in op.outputs if t >= 0 and last_use[t] > k)
        live = {t for t in live if last_use[t] > k}
        crossings.append(tuple(sorted(live)))
    ends = _boundaries(p, crossings, set(sg.outputs), grouping)
    layers, start = [], 0
    for index, end in enumerate(ends):
        span = [p.order[k] for k in range(start, end + 1)]  # operator indices
        flops, unknown, params = 0, [], set[int]()
        for k in span:
            f, known = _op_flops(p, sg.operators[k], p.op_types[k])
            flops += f
            if not known:
                unknown.append(p.op_types[k])
            params.update(t for t in sg.operators[k].inputs if t >= 0 and p.const[t])
        outs = tuple(p.names[t] for t in crossings[end])
        layers.append(
            Layer(
                index=index,
                name=_layer_name(p, index, span),
                nodes=tuple(p.op_names[k] for k in span),
                op_types=tuple(p.op_types[k] for k in span),
                flops=flops,
                param_bytes=sum(p.infos[t].nbytes for t in params),
                out_tensors=outs,
                out_bytes=sum(p.infos[t].nbytes for t in crossings[end]),
                unknown_ops=tuple(unknown),
            )
        )
        start = end + 1
    if any(layer.unknown_ops for layer in layers):
        kinds = sorted({op for layer in layers for op in layer.unknown_ops})
        warnings.warn(
            f"FLOPs of TFLite op(s) {kinds} unknown to the estimator; estimated conservatively as "
            f"{UNKNOWN_FLOPS_PER_ELEMENT} x (input + output elements)",
            UnknownOpWarning,
            stacklevel=3,
        )
    inputs = tuple(p.infos[t] for t in sg.inputs if not p.const[t])
    return ModelGraph(
        name=name,
        layers=tuple(layers),
        inputs=inputs,
        outputs=tuple(p.infos[t] for t in sg.outputs),
        input_bytes=sum(t.nbytes for t in inputs),
        tensor_bytes={info.name: info.nbytes for i, info in enumerate(p.infos) if not p.const[i]},
        tensors={info.name: info for i, info in enumerate(p.infos) if not p.const[i]},
        order="file",
    )


def _op_flops(p: _Parsed, op: Any, kind: str) -> tuple[int, bool]:
    """FLOPs of one operator (a multiply-add counts 2) and whether the op type is known."""

    def elems(t: int) -> int:
        return int(np.prod(p.infos[t].shape, dtype=np.int64)) if t >= 0 else 0

    ins = [t for t in op.inputs if t >= 0]
    out = elems(op.outputs[0]) if op.outputs else 0
    if kind == "FULLY_CONNECTED":
        in_features = p.infos[ins[1]].shape[-1]
        return 2 * out * in_features + (out if len(ins) > 2 else 0), True
    if kind == "BATCH_MATMUL":
        opts = op.builtinOptions
        k = p.infos[ins[0]].shape[-2 if opts is not None and opts.adjX else -1]
        return 2 * out * k, True
    if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        _, kh, kw, cin = p.infos[ins[1]].shape
        per_out = kh * kw * (cin if kind == "CONV_2D" else 1)
        return 2 * out * per_out + (out if len(ins) > 2 else 0), True
    if kind in ("AVERAGE_POOL_2D", "MAX_POOL_2D", "L2_POOL_2D"):
        opts = op.builtinOptions
        return out * opts.filterHeight * opts.filterWidth, True
    if kind in ("MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN", "REDUCE_PROD"):
        return elems(ins[0]), True
    if kind in ("SOFTMAX", "LOG_SOFTMAX"):
        return 5 * out, True
    if kind in _ELEMENTWISE_OPS:
        return out, True
    if kind in _TRANSCENDENTAL_OPS:
        return 4 * out, True
    if kind in _ZERO_FLOP_OPS:
        return 0, True
    # Same conservative (high) guess as the ONNX side, so the planner never under-provisions a stage.
    return UNKNOWN_FLOPS_PER_ELEMENT * (sum(elems(t) for t in ins) + sum(elems(t) for t in op.outputs)), False


def _boundaries(
    p: _Parsed, crossings: list[tuple[int, ...]], outputs: set[int], grouping: Grouping
) -> list[int]:
    """Last operator of every layer (the ONNX side's rule, so both formats group alike)."""
    last = len(crossings) - 1
    kinds = [p.op_types[k] for k in p.order]
    weight = [k in p.weight_ops for k in p.order]  # a weight-only op goes with its consumer
    if grouping == "nodes":
        return [k for k in range(last) if not weight[k]] + [last]

    def counts(t: int) -> bool:
        # Model outputs and tiny integer (shape-like) tensors do not make a cut "wide".
        info = p.infos[t]
        small_int = info.dtype.startswith(("int", "uint")) and int(np.prod(info.shape)) <= 16
        return t not in outputs and not small_int

    # Never cut right after a PAD: the padded tensor is larger than the one the cut before it sends.
    cuts = [
        k
        for k in range(last)
        if kinds[k] not in ("PAD", "PADV2") and not weight[k] and sum(1 for t in crossings[k] if counts(t)) <= 1
    ]
    segments, start = [], 0
    for end in [*cuts, last]:
        segments.append(list(range(start, end + 1)))
        start = end + 1
    merged: list[list[int]] = []
    carry: list[int] = []
    for seg in segments:
        if any(_is_heavy(kinds[k]) for k in seg):
            merged.append(carry + seg)
            carry = []
        elif merged:
            merged[-1].extend(seg)
        else:
            carry.extend(seg)
    if carry:
        merged.append(carry)
    return [seg[-1] for seg in merged]


def _is_heavy(kind: str) -> bool:
    return kind in _HEAVY_OPS or not (
        kind in _ZERO_FLOP_OPS or kind in _ELEMENTWISE_OPS | _TRANSCENDENTAL_OPS | _LIGHT_OPS
    )


def _layer_name(p: _Parsed, index: int, span: Sequence[int]) -> str:
    """Common ``/`` prefix of the heavy ops' output tensor names (``block3``), else the first one's."""
    ops = p.subgraph.operators
    heavy = [k for k in span if _is_heavy(p.op_types[k])] or list(span)
    outs = [p.names[ops[k].outputs[0]] if ops[k].outputs else p.op_names[k] for k in heavy]
    parts = [name.split("/") for name in outs]
    prefix: list[str] = []
    for segs in zip(*parts, strict=False):
        if all(seg == segs[0] for seg in segs):
            prefix.append(segs[0])
        else:
            break
    if prefix and len(parts) > 1:
        return "/".join(prefix)
    return outs[0] or f"layer{index}"


def _extract(p: _Parsed, ops: list[int], inputs: list[int], outputs: list[int], name: str) -> bytes:
    model, sg = p.model, p.subgraph
    available = set(inputs)
    for k in ops:
        op = sg.operators[k]
        for t in op.inputs:
            if t >= 0 and t not in available and not p.const[t] and not sg.tensors[t].isVariable:
                raise SliceError(
                    f"slice {name}: tensor {p.names[t]!r} read by {p.op_names[k]} is neither produced in the "
                    f"slice nor one of its inputs {[p.names[i] for i in inputs]}"
                )
        available.update(t for t in op.outputs if t >= 0)
    for t in outputs:
        if t not in available:
            raise SliceError(f"slice {name}: output {p.names[t]!r} is not produced by the slice")
    used: set[int] = set(inputs) | set(outputs)
    for k in ops:
        op = sg.operators[k]
        used.update(t for t in (*op.inputs, *op.outputs, *op.intermediates) if t >= 0)
    tensor_map = {old: new for new, old in enumerate(sorted(used))}
    buffers = [_AlignedBufferT()]
    new_tensors = []
    for old in sorted(used):
        t = copy.copy(sg.tensors[old])  # the parsed model stays intact for the next slice
        t.name = p.names[old]
        if p.const[old]:
            buffers.append(_AlignedBufferT(model.buffers[t.buffer].data))
            t.buffer = len(buffers) - 1
        else:
            t.buffer = 0
        new_tensors.append(t)
    code_map: dict[int, int] = {}
    new_ops = []
    for k in ops:
        op = copy.copy(sg.operators[k])
        op.opcodeIndex = code_map.setdefault(op.opcodeIndex, len(code_map))
        op.inputs = [tensor_map[t] if t >= 0 else -1 for t in op.inputs]
        op.outputs = [tensor_map[t] if t >= 0 else -1 for t in op.outputs]
        op.intermediates = [tensor_map[t] for t in op.intermediates] or None
        new_ops.append(op)
    codes = [None] * len(code_map)
    for old, new in code_map.items():
        codes[new] = model.operatorCodes[old]
    sub = schema.SubGraphT()
    sub.tensors = new_tensors
    sub.inputs = [tensor_map[t] for t in inputs]
    sub.outputs = [tensor_map[t] for t in outputs]
    sub.operators = new_ops
    sub.name = name
    out = schema.ModelT()
    out.version = model.version or 3
    out.operatorCodes = codes
    out.subgraphs = [sub]
    out.buffers = buffers
    out.description = f"fleetpipe slice {name}"
    return pack_model(out)


def _feed(feeds: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in feeds:
        raise ModelError(f"no value fed for model input {name!r} (have {sorted(feeds)})")
    return np.asarray(feeds[name])
