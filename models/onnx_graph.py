"""Load an ONNX model into a ``ModelGraph``: topological order, shapes, FLOPs, crossing tensors, layers.

Theory of operation: the model is read and validated, given input shapes are pinned, and onnx
shape inference gives every tensor a static shape (an unknown shape is an error naming the
tensor). The nodes are linearised (``order``): ``file`` keeps the file order, ``dfs`` finishes a
branch before starting another, ``greedy`` picks the ready node that leaves the fewest live bytes.
Nodes fed only by weights are placed right before their first consumer in every order. Sweeping
the order gives the set of tensors crossing each cut. With ``grouping="blocks"`` the nodes are
grouped at cuts crossed by a single activation (a ResNet becomes stem, blocks, head), and a group
without any heavy op (Conv, Gemm, MatMul, ...) is merged into its neighbour; ``grouping="nodes"``
makes every node a layer (every cut of the order is exposed).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetpipe.errors import UnsupportedModel
from fleetpipe.models.graph import Layer, ModelGraph, TensorInfo

if TYPE_CHECKING:
    import onnx

__all__ = [
    "GROUPINGS",
    "ORDERS",
    "UNKNOWN_FLOPS_PER_ELEMENT",
    "UnknownOpWarning",
    "load_onnx",
    "normalize",
    "pin_inputs",
    "prepare_onnx",
    "read_model",
    "weight_only",
]

ORDERS = ("greedy", "dfs", "file")
GROUPINGS = ("blocks", "nodes")
# Conservative (high) FLOPs per input+output element for ops the estimator does not know.
UNKNOWN_FLOPS_PER_ELEMENT = 100


class UnknownOpWarning(UserWarning):
    """An op the FLOPs estimator does not know; its cost is a conservative guess."""


def read_model(source: str | PathLike[str] | bytes | onnx.ModelProto, *, check: bool = True) -> onnx.ModelProto:
    """Read and validate an ONNX model from a path, bytes or a proto; raises UnsupportedModel.

    ``check=False`` skips the onnx checker (for a proto this module validated or onnxruntime wrote).
    """
    import onnx

    if isinstance(source, onnx.ModelProto):
        model = source
    elif isinstance(source, bytes | bytearray):
        try:
            model = onnx.load_model_from_string(bytes(source))
        except Exception as exc:
            raise UnsupportedModel(f"cannot parse ONNX bytes: {exc}") from exc
    else:
        path = Path(source)
        if not path.is_file():
            raise UnsupportedModel(f"no such model file: {path}")
        try:
            model = onnx.load(str(path))
        except Exception as exc:
            raise UnsupportedModel(f"{path} is not a readable ONNX model: {exc}") from exc
    if not model.graph.node:
        raise UnsupportedModel("the ONNX model has no nodes (corrupt or empty file?)")
    if not check:
        return model
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise UnsupportedModel(f"invalid ONNX model: {exc}") from exc
    return model


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node a unique name, turn Constant nodes into initializers and drop initializers
    listed as graph inputs (IR < 4; the IR version becomes 4) (deterministic).

    Returns ``model`` itself when nothing needs to change, else a modified copy.
    """
    import onnx

    names: set[str] = set()
    init_names = {t.name for t in model.graph.initializer}
    # IR < 4 lists every initializer among the graph inputs too: they are weights, not inputs.
    needs = any(v.name in init_names for v in model.graph.input)
    for node in model.graph.node:
        if not node.name or node.name in names or _constant_value(node) is not None:
            needs = True
            break
        names.add(node.name)
    if not needs:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if any(v.name in init_names for v in out.graph.input):
        real = [v for v in out.graph.input if v.name not in init_names]
        del out.graph.input[:]
        out.graph.input.extend(real)
        out.ir_version = max(out.ir_version, 4)
    keep, names = [], set()
    for i, node in enumerate(out.graph.node):
        value = _constant_value(node)
        if value is not None:
            value.name = node.output[0]
            out.graph.initializer.append(value)
            continue
        if not node.name or node.name in names:
            base = f"{node.op_type}_{i}"
            name, k = base, 0
            while name in names:
                k += 1
                name = f"{base}_{k}"
            node.name = name
        names.add(node.name)
        keep.append(node)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    return out


def load_onnx(
    source: str | PathLike[str] | bytes | onnx.ModelProto,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    *,
    order: str = "greedy",
    grouping: str = "blocks",
    name: str | None = None,
    checked: bool = False,
) -> ModelGraph:
    """Analyse an ONNX model into a ``ModelGraph`` (see the module docstring).

    ``checked``: ``source`` is a proto already validated (``prepare_onnx``'s output): skip the checker.
    """

    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, not {grouping!r}")
    model = pin_inputs(normalize(read_model(source, check=not checked)), input_shapes)
    init_names = {t.name for t in model.graph.initializer}
    real_inputs = [v for v in model.graph.input if v.name not in init_names]
    inferred = _infer(model)
    graph = inferred.graph
    infos = _infos(inferred)
    init_bytes = {t.name: _initializer_nbytes(t) for t in graph.initializer}
    shapes = {name: info.shape for name, info in infos.items()}
    shapes.update({t.name: tuple(int(d) for d in t.dims) for t in graph.initializer})
    nodes = list(model.graph.node)
    unknown_shape = _unknown_shapes(model, infos)
    if unknown_shape:
        t, node = unknown_shape[0]
        raise UnsupportedModel(
            f"the shape of tensor {t!r} (output of {node.op_type}{_domain(node)} node {node.name!r}) is unknown with "
            f"the inputs pinned to {_shapes_text(model, real_inputs)}: the model computes it from data (or, if this "
            "model was not loaded through fleetpipe.models.source.open_model, from constants it would fold)"
        )
    input_names = [v.name for v in real_inputs]
    output_names = [v.name for v in model.graph.output]
    ordered = _linearise(nodes, init_names, input_names, output_names, infos, order)
    flops, unknown = [], []
    for node in ordered:
        f = _node_flops(node, shapes)
        if f is None:
            unknown.append(node)
            f = UNKNOWN_FLOPS_PER_ELEMENT * sum(
                _numel(infos[t].shape) for t in [*node.input, *node.output] if t in infos
            )
        flops.append(int(f))
    if unknown:
        kinds = sorted({n.op_type for n in unknown})
        warnings.warn(
            f"FLOPs of op(s) {kinds} unknown to the estimator; estimated conservatively as "
            f"{UNKNOWN_FLOPS_PER_ELEMENT} x (input + output elements)",
            UnknownOpWarning,
            stacklevel=2,
        )
    unknown_names = {n.name for n in unknown}
    # Tensors computed from weights alone (Identity/Cast/DequantizeLinear of an initializer, ...) never cross a
    # cut: every slice that reads one recomputes it (fleetpipe.models.slicing), and no cut ends on its node.
    weights = weight_only(nodes, init_names)
    crossings = _crossings(ordered, init_names | weights.tensors, input_names, output_names)
    bounds = _boundaries(ordered, crossings, infos, set(output_names), grouping, weights.nodes)
    layers: list[Layer] = []
    start = 0
    for idx, end in enumerate(bounds):
        group = ordered[start : end + 1]
        used = {t for n in group for t in _all_inputs(n) if t in init_bytes}
        cross = crossings[end]
        layers.append(
            Layer(
                index=idx,
                name=_layer_name(idx, group),
                nodes=tuple(n.name for n in group),
                op_types=tuple(n.op_type for n in group),
                flops=sum(flops[start : end + 1]),
                param_bytes=sum(init_bytes[t] for t in used),
                out_tensors=cross,
                out_bytes=sum(infos[t].nbytes for t in cross),
                unknown_ops=tuple(n.op_type for n in group if n.name in unknown_names),
            )
        )
        start = end + 1
    activations = {t: info for t, info in infos.items() if t not in init_names}
    ins = tuple(infos[n] for n in input_names)
    return ModelGraph(
        name=name or model.graph.name or "model",
        layers=tuple(layers),
        inputs=ins,
        outputs=tuple(infos[n] for n in output_names),
        input_bytes=sum(t.nbytes for t in ins),
        tensor_bytes={t: info.nbytes for t, info in activations.items()},
        tensors=activations,
        order=order,
    )


# --- private helpers -------------------------------------------------------------------------------


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    import numpy as np
    from onnx import numpy_helper

    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    for attr in node.attribute:
        if attr.name == "value":
            t = type(attr.t)()
            t.CopyFrom(attr.t)
            return t
        arrays: dict[str, Callable[[Any], np.ndarray]] = {
            "value_float": lambda a: np.array(a.f, np.float32),
            "value_floats": lambda a: np.array(list(a.floats), np.float32),
            "value_int": lambda a: np.array(a.i, np.int64),
            "value_ints": lambda a: np.array(list(a.ints), np.int64),
        }
        if attr.name in arrays:
            return numpy_helper.from_array(arrays[attr.name](attr), node.output[0])
    return None


def pin_inputs(
    model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> onnx.ModelProto:
    """``model`` with every real input given a static shape (``fleetpipe.models.shapes`` rule).

    Given shapes are checked against the declared dims; a dynamic batch dim is taken as 1 (one log
    line); any other dynamic dim without a given shape raises InputShapeError. Returns ``model``
    itself when every input is already static and nothing is given.
    """
    import onnx

    from fleetpipe.models.shapes import resolve_input_shapes

    init_names = {t.name for t in model.graph.initializer}
    _check_tensors(model, [v for v in model.graph.input if v.name not in init_names])
    declared = {v.name: _dims(v) for v in model.graph.input if v.name not in init_names}
    shapes = resolve_input_shapes(declared, input_shapes)
    if all(list(shapes[n]) == declared[n] for n in declared):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in out.graph.input:
        if vi.name not in shapes:
            continue
        del vi.type.tensor_type.shape.dim[:]
        for d in shapes[vi.name]:
            vi.type.tensor_type.shape.dim.add().dim_value = d
    # Inferred shapes of intermediate tensors may carry the old symbols; let inference redo them.
    del out.graph.value_info[:]
    return out


def prepare_onnx(
    source: str | PathLike[str] | bytes | onnx.ModelProto,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    *,
    fold: bool = True,
    checked: bool = False,
) -> onnx.ModelProto:
    """The model ready to analyse and slice: read, normalised, inputs pinned, constants folded.

    With ``fold`` the model is rewritten by onnxruntime's own basic graph optimiser
    (``fleetpipe.models.fold``): constant sub-graphs folded (a Reshape target computed by Shape -> Cast
    -> Slice -> Concat, a Pad width from Shape arithmetic, ...) and the fusions every node's session
    would make anyway (Conv+BatchNormalization, ...), so a cut never separates what the runtime fuses
    (which alone moved a sigmoid map by 3e-3 relative). Without ``fold`` it is folded only when onnx
    shape inference leaves a used tensor's shape unknown with the inputs pinned.
    """
    model = pin_inputs(normalize(read_model(source, check=not checked)), input_shapes)
    if not fold and not _unknown_shapes(model, _infos(_infer(model))):
        return model
    from fleetpipe.models.fold import fold_constants

    return normalize(fold_constants(model))  # a shape that stays unknown: load_onnx says which


def _domain(node: onnx.NodeProto) -> str:
    return f" (domain {node.domain})" if node.domain not in ("", "ai.onnx") else ""


def _check_tensors(model: onnx.ModelProto, real_inputs: list[Any]) -> None:
    """Inputs and outputs must be tensors (a ZipMap's sequence of maps is no activation to stream)."""
    for kind, vis in (("input", real_inputs), ("output", list(model.graph.output))):
        for vi in vis:
            if not vi.type.HasField("tensor_type"):
                what = (vi.type.WhichOneof("value") or "untyped value").removesuffix("_type").replace("_", " ")
                raise UnsupportedModel(
                    f"model {kind} {vi.name!r} is a {what}, not a tensor: fleetpipe streams tensors only"
                )


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise UnsupportedModel(f"shape inference failed: {exc}") from exc


def _infos(inferred: onnx.ModelProto) -> dict[str, TensorInfo]:
    graph = inferred.graph
    infos: dict[str, TensorInfo] = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        info = _tensor_info(vi)
        if info is not None:
            infos[vi.name] = info
    return infos


def _unknown_shapes(model: onnx.ModelProto, infos: Mapping[str, TensorInfo]) -> list[tuple[str, Any]]:
    """(tensor, producing node) for every used tensor whose static shape is unknown (unused outputs are fine)."""
    used = {t for node in model.graph.node for t in _all_inputs(node)} | {v.name for v in model.graph.output}
    return [(t, node) for node in model.graph.node for t in node.output if t and t in used and t not in infos]


def _shapes_text(model: onnx.ModelProto, real_inputs: list[Any]) -> str:
    return ", ".join(f"{v.name}={','.join(str(d) for d in (_dims(v) or []))}" for v in real_inputs)


def _dims(vi: Any) -> list[int | str | None] | None:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value >= 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def _tensor_info(vi: Any) -> TensorInfo | None:
    from onnx import helper

    dims = _dims(vi)
    if dims is None or any(not isinstance(d, int) for d in dims):
        return None
    elem = vi.type.tensor_type.elem_type
    try:
        import numpy as np

        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    except Exception:
        return None
    shape = tuple(int(d) for d in dims)  # type: ignore[arg-type]
    return TensorInfo(vi.name, dtype.name, shape, _numel(shape) * dtype.itemsize)


def _initializer_nbytes(t: onnx.TensorProto) -> int:
    from onnx import helper

    try:
        import numpy as np

        size = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:
        size = 4
    return _numel(tuple(t.dims)) * size


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def _all_inputs(node: onnx.NodeProto) -> list[str]:
    """Inputs of a node, including outer-scope names its subgraphs (If/Loop/Scan) read."""
    names = [t for t in node.input if t]
    for attr in node.attribute:
        for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
            names.extend(_outer_refs(g))
    return names


def _outer_refs(graph: onnx.GraphProto) -> list[str]:
    local = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    refs: list[str] = []
    for node in graph.node:
        refs.extend(t for t in _all_inputs(node) if t not in local)
        local.update(node.output)
    return refs


def _linearise(
    nodes: list[onnx.NodeProto],
    inits: set[str],
    inputs: list[str],
    outputs: list[str],
    infos: Mapping[str, TensorInfo],
    order: str,
) -> list[onnx.NodeProto]:
    """One topological order of ``nodes``; weight-only nodes go right before their first consumer."""
    producer = {t: i for i, n in enumerate(nodes) for t in n.output if t}
    deps = [sorted({producer[t] for t in _all_inputs(n) if t in producer}) for n in nodes]
    missing = [
        (n.name, t)
        for n in nodes
        for t in _all_inputs(n)
        if t not in producer and t not in inits and t not in inputs
    ]
    if missing:
        raise UnsupportedModel(f"node {missing[0][0]!r} reads tensor {missing[0][1]!r} that nothing produces")
    const = [False] * len(nodes)
    for i, n in enumerate(nodes):  # file order is topological (the checker enforces it)
        const[i] = all(t in inits or (t in producer and const[producer[t]]) for t in _all_inputs(n))
    consumers: list[list[int]] = [[] for _ in nodes]
    for i, ds in enumerate(deps):
        for d in ds:
            consumers[d].append(i)
    pending = [sum(1 for d in ds if not const[d]) for ds in deps]
    uses = {t: 0 for t in producer}
    for n in nodes:
        for t in _all_inputs(n):
            if t in uses:
                uses[t] += 1
    out_set = set(outputs)
    main = [i for i in range(len(nodes)) if not const[i]]
    chosen: list[int] = []
    if order == "file":
        chosen = main
    elif order == "dfs":
        stack = sorted((i for i in main if pending[i] == 0), reverse=True)
        while stack:
            i = stack.pop()
            chosen.append(i)
            ready = []
            for c in consumers[i]:
                if not const[c]:
                    pending[c] -= 1
                    if pending[c] == 0:
                        ready.append(c)
            stack.extend(sorted(set(ready), reverse=True))
    else:  # greedy: fewest live bytes after the step; ties -> most recently readied, then file order
        left = dict(uses)
        ready_at: dict[int, int] = {i: 0 for i in main if pending[i] == 0}
        step = 0
        while ready_at:

            def cost(i: int) -> tuple[int, int, int]:
                grow = sum(infos[t].nbytes for t in nodes[i].output if t in infos)
                free = sum(
                    infos[t].nbytes
                    for t in set(_all_inputs(nodes[i]))
                    if t in left
                    and t in infos
                    and t not in out_set
                    and not const[producer[t]]
                    and left[t] == sum(1 for u in _all_inputs(nodes[i]) if u == t)
                )
                return grow - free, -ready_at[i], i

            i = min(ready_at, key=cost)
            del ready_at[i]
            step += 1
            chosen.append(i)
            for t in _all_inputs(nodes[i]):
                if t in left:
                    left[t] -= 1
            for c in consumers[i]:
                if not const[c]:
                    pending[c] -= 1
                    if pending[c] == 0:
                        ready_at[c] = step
    if len(chosen) != len(main):
        raise UnsupportedModel("the ONNX graph has a cycle")
    result: list[int] = []
    placed: set[int] = set()

    def place(i: int) -> None:
        for d in deps[i]:
            if d not in placed:
                place(d)
        placed.add(i)
        result.append(i)

    for i in chosen:
        place(i)
    for i in range(len(nodes)):  # weight-only nodes nobody consumes
        if i not in placed:
            place(i)
    return [nodes[i] for i in result]


@dataclass(frozen=True, slots=True)
class WeightOnly:
    """Nodes whose inputs are all weights (initializers or other such nodes' outputs), and what they produce."""

    nodes: frozenset[str]
    tensors: frozenset[str]


def weight_only(nodes: Sequence[onnx.NodeProto], inits: set[str]) -> WeightOnly:
    """The weight-only nodes of ``nodes`` (in topological order) given the initializer names."""
    tensors: set[str] = set()
    names: set[str] = set()
    for n in nodes:
        ins = _all_inputs(n)
        if ins and all(t in inits or t in tensors for t in ins):
            names.add(n.name)
            tensors.update(t for t in n.output if t)
    return WeightOnly(frozenset(names), frozenset(tensors))


def _crossings(
    ordered: list[onnx.NodeProto], inits: set[str], inputs: list[str], outputs: list[str]
) -> list[tuple[str, ...]]:
    """For each position p, the tensors produced at or before p and needed after p (sorted by birth)."""
    end = len(ordered)
    last: dict[str, int] = {}
    for p, n in enumerate(ordered):
        for t in _all_inputs(n):
            if t not in inits:
                last[t] = p
    for t in outputs:
        last[t] = end
    live: dict[str, tuple[int, str]] = {t: (-1, t) for t in inputs if last.get(t, -1) > -1}
    result = []
    for p, n in enumerate(ordered):
        for t in n.output:
            if t and last.get(t, -1) > p:
                live[t] = (p, t)
        for t in [t for t in live if last.get(t, -1) <= p]:
            del live[t]
        result.append(tuple(t for _, t in sorted(live.values())))
    return result


_HEAVY = {
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "MatMulInteger",
    "QLinearConv",
    "QLinearMatMul",
    "Einsum",
    "LSTM",
    "GRU",
    "RNN",
    "ConvInteger",
    "Attention",
}


def _boundaries(
    ordered: list[onnx.NodeProto],
    crossings: list[tuple[str, ...]],
    infos: Mapping[str, TensorInfo],
    outputs: set[str],
    grouping: str,
    weight_nodes: frozenset[str] = frozenset(),
) -> list[int]:
    """Last node position of every layer (never a weight-only node: it goes with its consumer)."""
    last = len(ordered) - 1
    if grouping == "nodes":
        return [p for p in range(last) if ordered[p].name not in weight_nodes] + [last]

    def counts(t: str) -> bool:
        # Model outputs and tiny integer (shape-like) tensors do not make a cut "wide".
        info = infos[t]
        return t not in outputs and not (info.dtype.startswith(("int", "uint")) and _numel(info.shape) <= 16)

    cuts = [
        p
        for p in range(last)
        if ordered[p].name not in weight_nodes and sum(1 for t in crossings[p] if counts(t)) <= 1
    ]
    segments: list[list[int]] = []
    start = 0
    for end in [*cuts, last]:
        segments.append(list(range(start, end + 1)))
        start = end + 1
    heavy = [
        any(ordered[p].op_type in _HEAVY or ordered[p].op_type not in _KNOWN for p in s) for s in segments
    ]
    merged: list[list[int]] = []
    carry: list[int] = []
    for seg, is_heavy in zip(segments, heavy, strict=True):
        if is_heavy:
            merged.append(carry + seg)
            carry = []
        elif merged:
            merged[-1].extend(seg)
        else:
            carry.extend(seg)
    if carry:
        merged.append(carry)
    return [s[-1] for s in merged]


def _layer_name(index: int, group: list[onnx.NodeProto]) -> str:
    heavy = [n for n in group if n.op_type in _HEAVY] or group
    parts = [n.name.split("/") for n in heavy]
    prefix: list[str] = []
    for segs in zip(*parts, strict=False):
        if all(s == segs[0] for s in segs):
            prefix.append(segs[0])
        else:
            break
    if prefix and len(parts) > 1:
        return "/".join(prefix)
    return heavy[0].name


_ZERO = {
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Concat",
    "Split",
    "Slice",
    "Gather",
    "Shape",
    "Identity",
    "Constant",
    "ConstantOfShape",
    "Expand",
    "Tile",
    "Pad",
    "Dropout",
    "Range",
    "Size",
    "GatherElements",
    "GatherND",
    "ScatterND",
    "Cast",
    "DepthToSpace",
    "SpaceToDepth",
    "CastLike",
    "ArgMax",
    "ArgMin",
    "NonZero",
    "TopK",
    "OneHot",
}
_ELEMENTWISE = {
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Relu",
    "LeakyRelu",
    "PRelu",
    "Clip",
    "Max",
    "Min",
    "Neg",
    "Abs",
    "Sqrt",
    "Pow",
    "Equal",
    "Greater",
    "Less",
    "GreaterOrEqual",
    "LessOrEqual",
    "Where",
    "Not",
    "And",
    "Or",
    "Floor",
    "Ceil",
    "Round",
    "Reciprocal",
    "Sum",
    "Mean",
    "Sign",
    "ThresholdedRelu",
}
_TRANSCENDENTAL = {
    "Sigmoid",
    "Tanh",
    "Erf",
    "Exp",
    "Log",
    "HardSigmoid",
    "HardSwish",
    "Gelu",
    "Softplus",
    "Elu",
    "Selu",
    "Mish",
    "Sin",
    "Cos",
    "Celu",
    "Softsign",
}
_REDUCE = {
    "GlobalAveragePool",
    "GlobalMaxPool",
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceL2",
    "ReduceL1",
    "ReduceProd",
    "ReduceSumSquare",
    "ReduceLogSumExp",
    "GlobalLpPool",
}
_NORM = {
    "LayerNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    "LpNormalization",
    "MeanVarianceNormalization",
    "RMSNormalization",
}
_POOL = {"MaxPool", "AveragePool", "LpPool"}
_KNOWN = (
    _ZERO
    | _ELEMENTWISE
    | _TRANSCENDENTAL
    | _REDUCE
    | _NORM
    | _POOL
    | {
        "Conv",
        "ConvTranspose",
        "Gemm",
        "MatMul",
        "BatchNormalization",
        "Softmax",
        "LogSoftmax",
        "Resize",
        "Upsample",
    }
)


def _node_flops(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """Estimated FLOPs of one node (a multiply-add counts 2), or None for an unknown op."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return None

    def shape(i: int, outputs: bool = False) -> tuple[int, ...]:
        names = node.output if outputs else node.input
        if i >= len(names) or names[i] not in shapes:
            return ()
        return shapes[names[i]]

    out = _numel(shape(0, True))
    if op in _ZERO:
        return 0
    if op in _ELEMENTWISE:
        return out * max(1, len(node.input) - 1)
    if op in _TRANSCENDENTAL:
        return 4 * out
    if op in _REDUCE:
        return _numel(shape(0))
    if op in _NORM:
        return 8 * out
    if op in ("Softmax", "LogSoftmax"):
        return 5 * out
    if op == "BatchNormalization":
        return 2 * out
    if op in ("Resize", "Upsample"):
        return 4 * out
    attrs = {a.name: a for a in node.attribute}
    if op in _POOL:
        kernel = tuple(attrs["kernel_shape"].ints) if "kernel_shape" in attrs else (1,)
        return out * _numel(kernel)
    if op == "Conv":
        w = shape(1)
        bias = out if len(node.input) > 2 and node.input[2] else 0
        return 2 * out * _numel(w[1:]) + bias if w else None
    if op == "ConvTranspose":
        w = shape(1)
        return 2 * _numel(shape(0)) * _numel(w[1:]) if w else None
    if op == "Gemm":
        a = shape(0)
        if len(a) != 2:
            return None
        trans_a = "transA" in attrs and attrs["transA"].i
        k = a[0] if trans_a else a[1]
        bias = out if len(node.input) > 2 and node.input[2] else 0
        return 2 * out * k + bias
    if op == "MatMul":
        a = shape(0)
        return 2 * out * a[-1] if a else None
    return None
