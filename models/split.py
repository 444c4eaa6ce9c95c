"""Intra-layer partitioning: split one stage's ONNX slice into k part models that run on k devices, then merge.

Theory of operation. Three kinds of split (FlexPie, Galaxy+, Megatron):

- ``spatial``: every part computes a horizontal stripe (rows along H) of the stage output. Rows
  needed are propagated backwards through the stage (Conv/MaxPool/AveragePool widen the interval by
  their receptive field, elementwise ops keep it), so each part reads its stripe of the input plus
  the halo. Each Conv/Pool keeps its padding only where its window really crosses the image border
  (``pads`` are rewritten per part); where a tensor is read with a narrower interval than the part
  holds, a ``Slice`` crops it. Merge: ``Concat`` on H. Chains and residual blocks work; ops that mix
  rows (GlobalAveragePool, Gemm, reshapes) do not.
- ``channel``: tensor parallelism without partial sums. A Conv, Gemm or MatMul with constant weights
  fed by a replicated tensor keeps a slice of its output channels (weights and bias); per-channel
  ops after it (activations, per-channel constants, pools, depthwise convs, transposes and
  reshapes that keep the split axis) are carried along. Merge: ``Concat`` on the split axis.
- ``tensor``: Megatron-style. Additionally a Conv/Gemm/MatMul fed by a channel-split tensor keeps the
  matching input rows and yields a partial sum; a residual ``Add`` and the bias are applied by part 0
  only. Attention heads are split by giving the Q/K/V projections whole heads (the head size is
  read from the following Reshape). Merge: ``Sum``. One all-reduce per stage: a nonlinearity on a
  partial sum is refused (split a ViT per block).

Every part is a standalone ONNX model with the same input names (the ``spatial`` parts read a row
range of each input: ``PartSpec.inputs``) and the stage's output names; ``StageSplit.scatter`` and
``StageSplit.merge`` do the data movement in numpy and ``merge_model`` builds it as ONNX.
``verify_split`` runs everything with onnxruntime and compares against the unsplit stage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fleetpipe.errors import SliceError

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from fleetpipe.models.graph import ModelGraph

__all__ = [
    "KINDS",
    "InputSlice",
    "LayerSplitInfo",
    "MergeSpec",
    "PartSpec",
    "SplitError",
    "StageSplit",
    "layer_split_info",
    "merge_model",
    "row_ranges",
    "split_model",
    "split_stage",
    "verify_split",
]

KINDS = ("spatial", "channel", "tensor")
PRODUCER = "fleetpipe.models.split"

_UNARY = frozenset({
    "Relu", "Clip", "Sigmoid", "Tanh", "Erf", "Identity", "LeakyRelu", "Softplus", "HardSigmoid",
    "HardSwish", "Exp", "Neg", "Abs", "Sqrt", "Cast", "Elu", "Selu", "Gelu", "Reciprocal", "Log",
})
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})
_WINDOW = frozenset({"Conv", "MaxPool", "AveragePool"})


class SplitError(SliceError):
    """The stage cannot be split this way."""


@dataclass(frozen=True, slots=True)
class InputSlice:
    """A part reads ``input[name]`` restricted to ``start:stop`` along ``axis``."""

    name: str
    axis: int
    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class MergeSpec:
    """How an output is rebuilt from the parts: ``concat`` on ``axis``, ``sum``, or ``first`` (replicated)."""

    output: str
    kind: str
    axis: int = 0


@dataclass(frozen=True, slots=True, eq=False)
class PartSpec:
    """One part: its serialized model, the row ranges it reads (empty: whole inputs) and its share of the work."""

    model: bytes
    inputs: tuple[InputSlice, ...]
    share: float
    input_bytes: int
    output_bytes: int


@dataclass(frozen=True, slots=True, eq=False)
class StageSplit:
    """A stage split into parts plus how to scatter its inputs and merge its outputs."""

    kind: str
    parts: tuple[PartSpec, ...]
    merges: tuple[MergeSpec, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def scatter(self, feeds: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """The feeds of every part (views of ``feeds``; row ranges for spatial parts)."""
        out = []
        for part in self.parts:
            f = {n: feeds[n] for n in self.inputs}
            for s in part.inputs:
                index = [slice(None)] * f[s.name].ndim
                index[s.axis] = slice(s.start, s.stop)
                f[s.name] = f[s.name][tuple(index)]
            out.append(f)
        return out

    def merge(self, part_outputs: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The stage outputs rebuilt from every part's outputs (in part order)."""
        import numpy as np

        out = {}
        for m in self.merges:
            vals = [p[m.output] for p in part_outputs]
            if m.kind == "concat":
                out[m.output] = np.concatenate(vals, axis=m.axis)
            elif m.kind == "sum":
                acc = vals[0].copy()
                for v in vals[1:]:
                    acc += v
                out[m.output] = acc
            else:
                out[m.output] = vals[0]
        return out


@dataclass(frozen=True, slots=True)
class LayerSplitInfo:
    """What the planner needs about splitting one layer: kinds that work and the spatial halo.

    ``halo_rows`` is the per-boundary halo in rows of the layer input (0 unless ``spatial`` works);
    ``in_rows``/``out_rows`` are the H of its input and output (0 when not 4-D).
    """

    index: int
    kinds: tuple[str, ...]
    halo_rows: float
    in_rows: int
    out_rows: int


def split_stage(
    model: onnx.ModelProto, graph: ModelGraph, first: int, last: int, kind: str, shares: Sequence[float] | int
) -> StageSplit:
    """Slice layers ``first..last`` of ``model`` and split the slice (see ``split_model``)."""
    from fleetpipe.models.slicing import slice_model

    return split_model(slice_model(model, graph, first, last), kind, shares)


def split_model(model: onnx.ModelProto, kind: str, shares: Sequence[float] | int) -> StageSplit:
    """Split a standalone stage model into ``len(shares)`` parts (or ``shares`` equal parts) of ``kind``."""
    import onnx

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    weights = [1.0] * shares if isinstance(shares, int) else [float(s) for s in shares]
    if len(weights) < 1 or any(not w > 0 for w in weights):
        raise ValueError("need at least one part and positive shares")
    total = sum(weights)
    weights = [w / total for w in weights]
    ctx = _Ctx(model)
    if kind == "spatial":
        built = _spatial(ctx, weights)
    else:
        built = _tensor_parallel(ctx, weights, allow_partial=kind == "tensor")
    parts = []
    for (nodes, inits, in_slices, out_infos, in_infos), w in zip(built[0], weights, strict=True):
        graph = onnx.helper.make_graph(nodes, f"{model.graph.name}:{kind}", in_infos, out_infos, initializer=inits)
        pm = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), producer_name=PRODUCER,
                                    ir_version=model.ir_version)
        try:
            onnx.checker.check_model(pm)
        except Exception as exc:  # pragma: no cover - a bug in this module
            raise SplitError(f"part is not a valid model: {exc}") from exc
        parts.append(PartSpec(pm.SerializeToString(), tuple(in_slices), w, _vi_bytes(in_infos),
                              _vi_bytes(out_infos)))
    return StageSplit(kind, tuple(parts), tuple(built[1]), tuple(ctx.inputs), tuple(ctx.outputs))


def merge_model(split: StageSplit) -> onnx.ModelProto:
    """An ONNX model taking ``{output}__p{i}`` for every part and output and producing the merged outputs."""
    import onnx
    from onnx import helper

    protos = [onnx.load_model_from_string(p.model) for p in split.parts]
    nodes, ins, outs = [], [], []
    for m in split.merges:
        names = []
        for i, pm in enumerate(protos):
            vi = next(o for o in pm.graph.output if o.name == m.output)
            name = f"{m.output}__p{i}"
            v = onnx.ValueInfoProto()
            v.CopyFrom(vi)
            v.name = name
            ins.append(v)
            names.append(name)
        if m.kind == "concat":
            nodes.append(helper.make_node("Concat", names, [m.output], axis=m.axis, name=f"merge/{m.output}"))
        elif m.kind == "sum":
            nodes.append(helper.make_node("Sum", names, [m.output], name=f"merge/{m.output}"))
        else:
            nodes.append(helper.make_node("Identity", names[:1], [m.output], name=f"merge/{m.output}"))
        shapes = [[d.dim_value for d in next(o for o in pm.graph.output if o.name == m.output)
                   .type.tensor_type.shape.dim] for pm in protos]
        shape = list(shapes[0])
        if m.kind == "concat":
            shape[m.axis] = sum(sh[m.axis] for sh in shapes)
        elem = next(o for o in protos[0].graph.output if o.name == m.output).type.tensor_type.elem_type
        outs.append(helper.make_tensor_value_info(m.output, elem, shape))
    graph = helper.make_graph(nodes, f"merge:{split.kind}", ins, outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name=PRODUCER)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def verify_split(
    model: onnx.ModelProto, split: StageSplit, feeds: Mapping[str, np.ndarray], *, threads: int = 1,
    merge_with_onnx: bool = True,
) -> float:
    """Run the parts and the merge with onnxruntime; max abs difference to the unsplit stage's outputs."""
    import numpy as np

    from fleetpipe.models.slicing import make_session, run_model

    whole = run_model(make_session(model, threads=threads), feeds)
    outs = [run_model(make_session(p.model, threads=threads), f)
            for p, f in zip(split.parts, split.scatter(feeds), strict=True)]
    if merge_with_onnx:
        mfeeds = {f"{name}__p{i}": o[name] for i, o in enumerate(outs) for name in split.outputs}
        merged = run_model(make_session(merge_model(split), threads=threads), mfeeds)
    else:
        merged = split.merge(outs)
    diff = 0.0
    for name, ref in whole.items():
        got = merged[name]
        if got.shape != ref.shape:
            raise SplitError(f"output {name!r}: split gives shape {got.shape}, unsplit {ref.shape}")
        if ref.size:
            diff = max(diff, float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64)))))
    return diff


def layer_split_info(model: onnx.ModelProto, graph: ModelGraph) -> list[LayerSplitInfo]:
    """For every layer of ``graph``: which split kinds work (2 parts) and the spatial halo in input rows."""
    from fleetpipe.models.slicing import slice_model

    infos = []
    for layer in graph.layers:
        stage = slice_model(model, graph, layer.index, layer.index)
        kinds, halo, in_rows, out_rows = [], 0.0, 0, 0
        for kind in KINDS:
            try:
                sp = split_model(stage, kind, 2)
            except SplitError:
                continue
            kinds.append(kind)
            if kind == "spatial":
                ctx = _Ctx(stage)
                in_rows = ctx.shape(ctx.inputs[0])[2]
                out_rows = ctx.shape(ctx.outputs[0])[2]
                rows = sum(s.stop - s.start for p in sp.parts for s in p.inputs if s.name == ctx.inputs[0])
                halo = max(0.0, (rows - in_rows) / 2.0)
        infos.append(LayerSplitInfo(layer.index, tuple(kinds), halo, in_rows, out_rows))
    return infos


# --- shared parsing ---------------------------------------------------------------------------------


class _Ctx:
    """A parsed stage: nodes, constants, inferred shapes, consumers."""

    def __init__(self, model: onnx.ModelProto) -> None:
        import onnx
        from onnx import numpy_helper

        from fleetpipe.models.onnx_graph import normalize

        model = normalize(model)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        self.model = model
        self.nodes = list(model.graph.node)
        self.consts: dict[str, Any] = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.inputs = [i.name for i in model.graph.input if i.name not in self.consts]
        self.outputs = [o.name for o in model.graph.output]
        self.vi: dict[str, Any] = {}
        for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
            self.vi[vi.name] = vi
        self.consumers: dict[str, list[Any]] = {}
        for n in self.nodes:
            for t in n.input:
                self.consumers.setdefault(t, []).append(n)
        if not self.inputs:
            raise SplitError("the stage has no inputs")
        if any(o in self.inputs for o in self.outputs):
            raise SplitError("a stage input passes straight through to an output")

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.consts:
            return tuple(self.consts[name].shape)
        vi = self.vi.get(name)
        if vi is None:
            raise SplitError(f"no shape for tensor {name!r}")
        dims = vi.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            raise SplitError(f"tensor {name!r} has a symbolic shape")
        return tuple(int(d.dim_value) for d in dims)

    def value_info(self, name: str, shape: Sequence[int] | None = None) -> onnx.ValueInfoProto:
        from onnx import helper

        elem = self.vi[name].type.tensor_type.elem_type
        return helper.make_tensor_value_info(name, elem, list(shape if shape is not None else self.shape(name)))

    def attr(self, node: Any, name: str, default: Any = None) -> Any:
        from onnx import helper

        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default


def _vi_bytes(infos: Sequence[Any]) -> int:
    from onnx import helper

    total = 0
    for vi in infos:
        t = vi.type.tensor_type
        n = 1
        for d in t.shape.dim:
            n *= d.dim_value
        total += n * helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize
    return total


def row_ranges(n: int, weights: Sequence[float], unit: int = 1) -> list[tuple[int, int]]:
    """Split ``n`` (a multiple of ``unit``) into contiguous ranges proportional to ``weights`` (whole units,
    at least one each): the rows every part of a spatial split computes, which the planner's cost uses too."""
    units = n // unit
    k = len(weights)
    if units < k:
        raise SplitError(f"cannot split {units} units of {unit} into {k} parts")
    bounds, acc = [0], 0.0
    for w in weights[:-1]:
        acc += w
        bounds.append(round(acc * units))
    bounds.append(units)
    for i in range(1, k + 1):  # every part at least one unit
        bounds[i] = max(bounds[i], bounds[i - 1] + 1)
    for i in range(k - 1, 0, -1):
        bounds[i] = min(bounds[i], bounds[i + 1] - 1)
    return [(bounds[i] * unit, bounds[i + 1] * unit) for i in range(k)]


def _node(op: str, inputs: Sequence[str], outputs: Sequence[str], name: str, **attrs: Any) -> Any:
    from onnx import helper

    return helper.make_node(op, list(inputs), list(outputs), name=name, **attrs)


def _clone(node: Any, inputs: Sequence[str] | None = None, **attrs: Any) -> Any:
    import onnx
    from onnx import helper

    out = onnx.NodeProto()
    out.CopyFrom(node)
    if inputs is not None:
        del out.input[:]
        out.input.extend(inputs)
    for key, value in attrs.items():
        for i, a in enumerate(out.attribute):
            if a.name == key:
                del out.attribute[i]
                break
        if value is not None:
            out.attribute.append(helper.make_attribute(key, value))
    return out


class _Inits:
    """Initializers of one part: unchanged constants keep their name, sliced ones get a new one."""

    def __init__(self, ctx: _Ctx) -> None:
        self.ctx = ctx
        self.out: dict[str, Any] = {}

    def keep(self, name: str) -> str:
        if name not in self.out:
            from onnx import numpy_helper

            self.out[name] = numpy_helper.from_array(self.ctx.consts[name], name)
        return name

    def new(self, name: str, value: Any) -> str:
        from onnx import numpy_helper

        self.out[name] = numpy_helper.from_array(value, name)
        return name


# --- spatial stripes ----------------------------------------------------------------------------------


def _window(ctx: _Ctx, node: Any) -> tuple[int, int, int, int, int]:
    """``(kernel, stride, pad_top, pad_bottom, dilation)`` along H of a Conv/MaxPool/AveragePool."""
    if ctx.attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise SplitError(f"{node.name}: auto_pad is not supported")
    if ctx.attr(node, "ceil_mode", 0):
        raise SplitError(f"{node.name}: ceil_mode is not supported")
    k = int(ctx.shape(node.input[1])[2]) if node.op_type == "Conv" else int(ctx.attr(node, "kernel_shape")[0])
    strides = ctx.attr(node, "strides") or [1, 1]
    dil = ctx.attr(node, "dilations") or [1, 1]
    pads = ctx.attr(node, "pads") or [0, 0, 0, 0]
    return k, int(strides[0]), int(pads[0]), int(pads[2]), int(dil[0])


def _spatial(ctx: _Ctx, weights: list[float]) -> tuple[list[Any], list[MergeSpec]]:
    out_h = None
    for o in ctx.outputs:
        shp = ctx.shape(o)
        if len(shp) != 4:
            raise SplitError(f"spatial split needs 4-D outputs; {o!r} is {shp}")
        if out_h is not None and shp[2] != out_h:
            raise SplitError("spatial split needs all outputs at the same height")
        out_h = shp[2]
    for name in ctx.inputs:
        if len(ctx.shape(name)) != 4:
            raise SplitError(f"spatial split needs 4-D inputs; {name!r} is {ctx.shape(name)}")
    assert out_h is not None
    rows = row_ranges(out_h, weights)
    parts = [_spatial_part(ctx, a, b, p) for p, (a, b) in enumerate(rows)]
    return parts, [MergeSpec(o, "concat", 2) for o in ctx.outputs]


def _spatial_part(ctx: _Ctx, a: int, b: int, p: int) -> tuple[Any, ...]:
    need: dict[str, tuple[int, int]] = {o: (a, b) for o in ctx.outputs}
    reads: dict[tuple[str, int], tuple[int, int, int, int]] = {}  # (node, input) -> lo, hi, pad_top, pad_bot
    for node in reversed(ctx.nodes):
        live = [need[o] for o in node.output if o in need]
        if not live:
            continue
        if len(node.output) != 1:
            raise SplitError(f"{node.name}: multi-output op {node.op_type} is not supported")
        lo, hi = live[0]
        out_shape = ctx.shape(node.output[0])
        if len(out_shape) != 4:
            raise SplitError(f"{node.name}: {node.op_type} output is not 4-D")
        for i, t in enumerate(node.input):
            if not t or t in ctx.consts:
                if t in ctx.consts and node.op_type not in _WINDOW:
                    cs = ctx.consts[t].shape
                    if len(cs) >= 2 and cs[-2] not in (1,):
                        raise SplitError(f"{node.name}: constant {t!r} varies along H")
                continue
            in_shape = ctx.shape(t)
            if len(in_shape) != 4:
                raise SplitError(f"{node.name}: input {t!r} is not 4-D")
            h = in_shape[2]
            if node.op_type in _WINDOW and i == 0:
                k, s, pt, _pb, d = _window(ctx, node)
                ulo, uhi = lo * s - pt, (hi - 1) * s - pt + (k - 1) * d + 1
                clo, chi = max(0, ulo), min(h, uhi)
                reads[(node.name, i)] = (clo, chi, clo - ulo, uhi - chi)
            elif node.op_type in _UNARY or node.op_type in _BINARY or (
                node.op_type == "Concat" and ctx.attr(node, "axis") in (1, -3)
            ):
                if h == 1 and out_shape[2] != 1:
                    clo, chi = 0, 1
                elif h != out_shape[2]:
                    raise SplitError(f"{node.name}: input {t!r} does not match the output height")
                else:
                    clo, chi = lo, hi
                reads[(node.name, i)] = (clo, chi, 0, 0)
            else:
                raise SplitError(f"{node.name}: {node.op_type} mixes rows; no spatial split")
            old = need.get(t)
            need[t] = (clo, chi) if old is None else (min(old[0], clo), max(old[1], chi))
    inits = _Inits(ctx)
    nodes: list[Any] = []
    for node in ctx.nodes:
        if node.output[0] not in need:
            continue
        ins = []
        for i, t in enumerate(node.input):
            if not t or t in ctx.consts:
                ins.append(inits.keep(t) if t else t)
                continue
            clo, chi, _, _ = reads[(node.name, i)]
            hlo, hhi = need[t]
            if (clo, chi) != (hlo, hhi):
                starts = inits.new(f"{node.name}/{i}/crop_starts", _i64([clo - hlo]))
                ends = inits.new(f"{node.name}/{i}/crop_ends", _i64([chi - hlo]))
                axes = inits.new(f"{node.name}/{i}/crop_axes", _i64([2]))
                cropped = f"{node.name}/{i}/crop"
                nodes.append(_node("Slice", [t, starts, ends, axes], [cropped], cropped))
                t = cropped
            ins.append(t)
        if node.op_type in _WINDOW:
            _, _, ptop, pbot = reads[(node.name, 0)]
            pads = list(ctx.attr(node, "pads") or [0, 0, 0, 0])
            pads[0], pads[2] = ptop, pbot
            nodes.append(_clone(node, ins, pads=pads))
        else:
            nodes.append(_clone(node, ins))
    in_infos, slices = [], []
    for name in ctx.inputs:
        if name not in need:
            raise SplitError(f"part {p} does not read input {name!r}")
        lo, hi = need[name]
        shp = list(ctx.shape(name))
        shp[2] = hi - lo
        in_infos.append(ctx.value_info(name, shp))
        slices.append(InputSlice(name, 2, lo, hi))
    out_infos = []
    for o in ctx.outputs:
        shp = list(ctx.shape(o))
        shp[2] = b - a
        out_infos.append(ctx.value_info(o, shp))
    return nodes, list(inits.out.values()), slices, out_infos, in_infos


def _i64(values: Sequence[int]) -> Any:
    import numpy as np

    return np.array(values, dtype=np.int64)


# --- tensor parallelism (channel / tensor) ----------------------------------------------------------

# A tensor's state in one part: ("R",) replicated, ("C", axis, start, stop) a slice of ``axis``, ("P",) partial sum.


def _col_unit(ctx: _Ctx, out: str) -> int:
    """Granularity of a column split of ``out``: the head size if a Reshape splits the last dim into heads."""
    t = out
    for _ in range(4):
        cons = ctx.consumers.get(t, [])
        if len(cons) != 1:
            return 1
        n = cons[0]
        if n.op_type == "Reshape":
            src, dst = ctx.shape(n.input[0]), ctx.shape(n.output[0])
            if len(dst) == len(src) + 1 and dst[-2] * dst[-1] == src[-1]:
                return int(dst[-1])
            return 1
        if n.op_type not in _BINARY and n.op_type not in _UNARY:
            return 1
        t = n.output[0]
    return 1


def _tensor_parallel(ctx: _Ctx, weights: list[float], allow_partial: bool) -> tuple[list[Any], list[MergeSpec]]:
    parts = [_tp_part(ctx, weights, p, allow_partial) for p in range(len(weights))]
    states = parts[0][1]
    merges = []
    for o in ctx.outputs:
        st = states[o]
        if st[0] == "C":
            merges.append(MergeSpec(o, "concat", st[1]))
        elif st[0] == "P":
            merges.append(MergeSpec(o, "sum"))
        else:
            merges.append(MergeSpec(o, "first"))
    if all(m.kind == "first" for m in merges):
        raise SplitError("nothing in the stage can be split by channels")
    if not allow_partial and any(m.kind == "sum" for m in merges):  # pragma: no cover - refused earlier
        raise SplitError("partial sums need kind='tensor'")
    return [pp[0] for pp in parts], merges


def _tp_part(ctx: _Ctx, weights: list[float], p: int, allow_partial: bool) -> tuple[Any, dict[str, tuple]]:
    inits = _Inits(ctx)
    state: dict[str, tuple] = {name: ("R",) for name in ctx.inputs}
    nodes: list[Any] = []

    def cut(full: int, unit: int = 1) -> tuple[int, int]:
        return row_ranges(full, weights, unit)[p]

    def sliced(node: Any, i: int, value: Any, axis: int, lo: int, hi: int) -> str:
        import numpy as np

        index = [slice(None)] * value.ndim
        index[axis] = slice(lo, hi)
        return inits.new(f"{node.name}/{i}/part", np.ascontiguousarray(value[tuple(index)]))

    def partial_ok(node: Any) -> None:
        if not allow_partial:
            raise SplitError(f"{node.name}: reads a channel-split tensor (needs kind='tensor', a partial sum)")

    for node in ctx.nodes:
        op = node.op_type
        dyn = [t for t in node.input if t and t not in ctx.consts]
        sts = [state[t] for t in dyn]
        out = node.output[0]
        keep_ins = [inits.keep(t) if t in ctx.consts else t for t in node.input]
        if all(s[0] == "R" for s in sts):
            heavy_w = len(node.input) > 1 and node.input[1] in ctx.consts and node.input[0] not in ctx.consts
            if op == "Conv" and heavy_w and int(ctx.attr(node, "group", 1)) == 1:
                w = ctx.consts[node.input[1]]
                lo, hi = cut(w.shape[0])
                ins = [node.input[0], sliced(node, 1, w, 0, lo, hi)]
                if len(node.input) > 2 and node.input[2]:
                    ins.append(sliced(node, 2, ctx.consts[node.input[2]], 0, lo, hi))
                nodes.append(_clone(node, ins))
                state[out] = ("C", 1, lo, hi)
                continue
            if op == "Gemm" and heavy_w and not ctx.attr(node, "transA", 0):
                w = ctx.consts[node.input[1]]
                tb = int(ctx.attr(node, "transB", 0))
                n_out = w.shape[0] if tb else w.shape[1]
                lo, hi = cut(n_out)
                ins = [node.input[0], sliced(node, 1, w, 0 if tb else 1, lo, hi)]
                if len(node.input) > 2 and node.input[2]:
                    c = ctx.consts[node.input[2]]
                    ins.append(sliced(node, 2, c, c.ndim - 1, lo, hi) if c.size > 1 else inits.keep(node.input[2]))
                nodes.append(_clone(node, ins))
                state[out] = ("C", 1, lo, hi)
                continue
            if op == "MatMul" and heavy_w and ctx.consts[node.input[1]].ndim == 2:
                w = ctx.consts[node.input[1]]
                lo, hi = cut(w.shape[1], _col_unit(ctx, out))
                nodes.append(_clone(node, [node.input[0], sliced(node, 1, w, 1, lo, hi)]))
                state[out] = ("C", len(ctx.shape(out)) - 1, lo, hi)
                continue
            nodes.append(_clone(node, keep_ins))
            state[out] = ("R",)
            continue
        if len(node.output) != 1:
            raise SplitError(f"{node.name}: multi-output op {op} on a split tensor")
        x = node.input[0]
        sx = state.get(x, ("R",))
        if any(s[0] == "P" for s in sts):
            if op == "Add" and sum(s[0] == "P" for s in sts) == 1:
                ptensor = next(t for t in dyn if state[t][0] == "P")
                nodes.append(_clone(node, keep_ins) if p == 0 else _node("Identity", [ptensor], [out], node.name))
                state[out] = ("P",)
                continue
            if op == "Add" or op in ("Identity", "Cast"):
                nodes.append(_clone(node, keep_ins))
                state[out] = ("P",)
                continue
            raise SplitError(f"{node.name}: {op} on a partial sum needs an all-reduce first")
        # some input is channel-split
        cs = [s for s in sts if s[0] == "C"]
        if op in ("Conv", "Gemm", "MatMul") and sx[0] == "C" and len(node.input) > 1 and node.input[1] in ctx.consts:
            w = ctx.consts[node.input[1]]
            _, axis, lo, hi = sx
            rank = len(ctx.shape(x))
            if op == "Conv":
                group = int(ctx.attr(node, "group", 1))
                if axis != 1:
                    raise SplitError(f"{node.name}: Conv input split on axis {axis}")
                if group == ctx.shape(x)[1] and w.shape[0] == group:  # depthwise: stays split
                    ins = [x, sliced(node, 1, w, 0, lo, hi)]
                    if len(node.input) > 2 and node.input[2]:
                        ins.append(sliced(node, 2, ctx.consts[node.input[2]], 0, lo, hi))
                    nodes.append(_clone(node, ins, group=hi - lo))
                    state[out] = ("C", 1, lo, hi)
                    continue
                if group != 1:
                    raise SplitError(f"{node.name}: grouped Conv on a channel-split input")
                partial_ok(node)
                ins = [x, sliced(node, 1, w, 1, lo, hi)]
                if p == 0 and len(node.input) > 2 and node.input[2]:
                    ins.append(inits.keep(node.input[2]))
                nodes.append(_clone(node, ins))
                state[out] = ("P",)
                continue
            if axis != rank - 1 or (op == "Gemm" and ctx.attr(node, "transA", 0)):
                raise SplitError(f"{node.name}: {op} input split on axis {axis}")
            partial_ok(node)
            if op == "Gemm":
                tb = int(ctx.attr(node, "transB", 0))
                ins = [x, sliced(node, 1, w, 1 if tb else 0, lo, hi)]
                if p == 0 and len(node.input) > 2 and node.input[2]:
                    ins.append(inits.keep(node.input[2]))
            else:
                if w.ndim != 2:
                    raise SplitError(f"{node.name}: MatMul weight is not 2-D")
                ins = [x, sliced(node, 1, w, 0, lo, hi)]
            nodes.append(_clone(node, ins))
            state[out] = ("P",)
            continue
        out_rank = len(ctx.shape(out))
        full_out = ctx.shape(out)
        if op in _UNARY or op in _BINARY or op in ("MatMul", "Concat"):
            axes = {(s[1] + out_rank - len(ctx.shape(t)), s[2], s[3]) for t, s in zip(dyn, sts, strict=True)
                    if s[0] == "C"}
            if op == "MatMul":
                axes = {(s[1], s[2], s[3]) for s in cs}
            if len(axes) != 1:
                raise SplitError(f"{node.name}: inputs split differently")
            axis, lo, hi = next(iter(axes))
            if op == "MatMul" and (len(cs) != 2 or axis >= out_rank - 2):
                raise SplitError(f"{node.name}: MatMul of split tensors is only supported on a batch (head) axis")
            if op == "Concat":
                cat = int(ctx.attr(node, "axis")) % out_rank
                if cat == axis:
                    raise SplitError(f"{node.name}: Concat along the split axis")
            ins = []
            for i, t in enumerate(node.input):
                if not t:
                    ins.append(t)
                    continue
                if t in ctx.consts:
                    c = ctx.consts[t]
                    ca = axis - (out_rank - c.ndim)
                    if ca >= 0 and c.shape[ca] == full_out[axis] and full_out[axis] != 1:
                        ins.append(sliced(node, i, c, ca, lo, hi))
                    elif ca >= 0 and c.shape[ca] not in (1,):
                        raise SplitError(f"{node.name}: constant {t!r} does not match the split axis")
                    else:
                        ins.append(inits.keep(t))
                    continue
                if state[t][0] == "R":
                    ta = axis - (out_rank - len(ctx.shape(t)))
                    if ta >= 0 and ctx.shape(t)[ta] != 1:
                        raise SplitError(f"{node.name}: replicated input {t!r} would need slicing")
                ins.append(t)
            nodes.append(_clone(node, ins))
            state[out] = ("C", axis, lo, hi)
            continue
        if sx[0] != "C" or len(cs) != 1:
            raise SplitError(f"{node.name}: {op} on a split tensor is not supported")
        _, axis, lo, hi = sx
        in_shape = ctx.shape(x)
        if op in ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool") and axis == 1:
            nodes.append(_clone(node, keep_ins))
            state[out] = ("C", 1, lo, hi)
        elif (op == "Softmax" and int(ctx.attr(node, "axis", -1)) % out_rank != axis) or (
            op == "LayerNormalization" and axis < int(ctx.attr(node, "axis", -1)) % out_rank
        ):
            nodes.append(_clone(node, keep_ins))
            state[out] = ("C", axis, lo, hi)
        elif op == "Transpose":
            perm = list(ctx.attr(node, "perm"))
            nodes.append(_clone(node, keep_ins))
            state[out] = ("C", perm.index(axis), lo, hi)
        elif op == "Flatten":
            f = int(ctx.attr(node, "axis", 1)) % len(in_shape)
            if axis != f or any(d != 1 for d in in_shape[axis + 1:]) or any(d != 1 for d in in_shape[1:f]):
                raise SplitError(f"{node.name}: Flatten would mix the split axis")
            nodes.append(_clone(node, keep_ins))
            state[out] = ("C", 1 if f > 0 else 0, lo, hi)
        elif op == "Gather" and node.input[1] in ctx.consts and ctx.consts[node.input[1]].ndim == 0:
            g = int(ctx.attr(node, "axis", 0)) % len(in_shape)
            if g == axis:
                raise SplitError(f"{node.name}: Gather along the split axis")
            nodes.append(_clone(node, keep_ins))
            state[out] = ("C", axis - 1 if g < axis else axis, lo, hi)
        elif op == "Reshape":
            import numpy as np

            dst = list(full_out)
            r = len(in_shape)
            if list(in_shape[: axis + 1]) == dst[: axis + 1]:
                new_axis, nlo, nhi = axis, lo, hi
                dst[axis] = hi - lo
            elif axis == r - 1 and len(dst) == r + 1 and dst[: r - 1] == list(in_shape[: r - 1]) \
                    and dst[-2] * dst[-1] == in_shape[-1] and lo % dst[-1] == 0 and hi % dst[-1] == 0:
                new_axis, nlo, nhi = r - 1, lo // dst[-1], hi // dst[-1]
                dst[-2] = nhi - nlo
            elif axis == r - 2 and len(dst) == r - 1 and dst[: r - 2] == list(in_shape[: r - 2]) \
                    and dst[-1] == in_shape[-2] * in_shape[-1]:
                new_axis, nlo, nhi = r - 2, lo * in_shape[-1], hi * in_shape[-1]
                dst[-1] = nhi - nlo
            else:
                raise SplitError(f"{node.name}: Reshape {in_shape}->{tuple(full_out)} moves the split axis")
            shape_name = inits.new(f"{node.name}/1/part", np.array(dst, dtype=np.int64))
            nodes.append(_clone(node, [x, shape_name]))
            state[out] = ("C", new_axis, nlo, nhi)
        else:
            raise SplitError(f"{node.name}: {op} on a split tensor is not supported")
    in_infos = [ctx.value_info(n) for n in ctx.inputs]
    out_infos = []
    for o in ctx.outputs:
        shp = list(ctx.shape(o))
        if state[o][0] == "C":
            shp[state[o][1]] = state[o][3] - state[o][2]
        out_infos.append(ctx.value_info(o, shp))
    used = {t for n in nodes for t in n.input}
    init_list = [v for k, v in inits.out.items() if k in used]
    return (nodes, init_list, [], out_infos, in_infos), state
