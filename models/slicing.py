"""Cut an ONNX model into standalone, content-addressed slices and check them against the whole model.

A slice covering layers ``first..last`` takes ``graph.inputs_of(first)`` and produces
``graph.crossing(last)``; a tensor that only passes through the slice is both an input and an
output of it. Each slice carries only the initializers it reads, and is checked with the onnx
checker so that an undeclared crossing tensor is a ``SliceError``, never a broken file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fleetpipe.errors import SliceError
from fleetpipe.models.graph import ModelGraph, split_ranges
from fleetpipe.models.onnx_graph import _all_inputs, normalize, weight_only
from fleetpipe.slices import content_hash

if TYPE_CHECKING:
    import numpy as np
    import onnx

__all__ = [
    "content_hash",
    "make_session",
    "run_model",
    "slice_bytes",
    "slice_model",
    "slice_models",
    "verify_slices",
]

PRODUCER = "fleetpipe.models.slicing"


def slice_model(model: onnx.ModelProto, graph: ModelGraph, first: int, last: int) -> onnx.ModelProto:
    """Standalone model for layers ``first..last`` (0-based, inclusive) of ``graph``."""
    import onnx
    from onnx import helper

    n = len(graph.layers)
    if not 0 <= first <= last < n:
        raise SliceError(f"invalid layer range {first}..{last} for a model with {n} layers")
    model = normalize(model)
    by_name = {node.name: node for node in model.graph.node}
    wanted = [name for layer in graph.layers[first : last + 1] for name in layer.nodes]
    missing = [name for name in wanted if name not in by_name]
    if missing:
        raise SliceError(f"nodes {missing[:3]} of the graph are not in the model (graph of another model?)")
    nodes = [by_name[name] for name in wanted]
    inputs = graph.inputs_of(first)
    outputs = graph.crossing(last)
    inits = {t.name: t for t in model.graph.initializer}
    nodes = _with_weight_nodes(list(model.graph.node), nodes, set(inits))
    available = set(inputs)
    used_inits: list[str] = []
    for node in nodes:
        for t in _all_inputs(node):
            if t in available:
                continue
            if t in inits:
                used_inits.append(t)
                available.add(t)
                continue
            raise SliceError(
                f"slice {first}..{last}: node {node.name!r} reads {t!r}, which is neither produced in the "
                "slice nor declared as a slice input"
            )
        available.update(t for t in node.output if t)
    for t in outputs:
        if t not in available:
            raise SliceError(f"slice {first}..{last}: output {t!r} is neither produced nor passed through")
    for t in (*inputs, *outputs):
        if t not in graph.tensors:
            raise SliceError(f"slice {first}..{last}: crossing tensor {t!r} has no known type/shape")
    produced = {t for node in nodes for t in node.output if t}
    value_info = [_value_info(graph, t) for t in sorted(produced - set(outputs)) if t in graph.tensors]
    sliced = helper.make_graph(
        [_copy(node) for node in nodes],
        f"{graph.name}[{first}:{last}]",
        [_value_info(graph, t) for t in inputs],
        [_value_info(graph, t) for t in outputs],
        initializer=[_copy(inits[t]) for t in used_inits],
        value_info=value_info,
    )
    out = helper.make_model(
        sliced,
        opset_imports=list(model.opset_import),
        producer_name=PRODUCER,
        ir_version=model.ir_version,
    )
    if model.functions:
        out.functions.extend(model.functions)
    try:
        onnx.checker.check_model(out)
    except Exception as exc:
        raise SliceError(f"slice {first}..{last} is not a valid model: {exc}") from exc
    return out


def slice_models(model: onnx.ModelProto, graph: ModelGraph, cuts: Sequence[int]) -> list[onnx.ModelProto]:
    """One slice per stage when cutting after the layers in ``cuts``."""
    return [slice_model(model, graph, a, b) for a, b in split_ranges(len(graph.layers), list(cuts))]


def slice_bytes(model: onnx.ModelProto, graph: ModelGraph, first: int, last: int) -> bytes:
    """Serialized slice (deterministic for the same model, graph and range)."""
    return slice_model(model, graph, first, last).SerializeToString(deterministic=True)


def make_session(
    model: onnx.ModelProto | bytes,
    *,
    threads: int = 1,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    options: Any = None,
) -> Any:
    """An onnxruntime InferenceSession for a model proto or serialized model."""
    import onnxruntime as ort

    data = model if isinstance(model, bytes) else model.SerializeToString()
    so = options or ort.SessionOptions()
    if options is None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3  # errors only: "removing unused initializer" warnings are no news to a user
    return ort.InferenceSession(data, so, providers=list(providers))


def run_model(session: Any, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a session on the feeds it needs; returns every output by name."""
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise SliceError(f"no value for slice input(s) {missing}")
    outs = session.run(None, {n: feeds[n] for n in names})
    return dict(zip((o.name for o in session.get_outputs()), outs, strict=True))


def verify_slices(
    model: onnx.ModelProto,
    graph: ModelGraph,
    cuts: Sequence[int],
    feeds: Mapping[str, np.ndarray],
    *,
    threads: int = 1,
) -> float:
    """Run the slices in sequence and return the max abs difference to the whole model's outputs."""
    import numpy as np

    whole = run_model(make_session(model, threads=threads), feeds)
    env: dict[str, np.ndarray] = dict(feeds)
    for part in slice_models(model, graph, cuts):
        env.update(run_model(make_session(part, threads=threads), env))
    diff = 0.0
    for out in graph.outputs:
        a, b = whole[out.name], env[out.name]
        if a.shape != b.shape:
            raise SliceError(f"output {out.name!r}: slices give shape {b.shape}, whole model {a.shape}")
        if a.size:
            diff = max(diff, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
    return diff


def _with_weight_nodes(
    all_nodes: list[onnx.NodeProto], nodes: list[onnx.NodeProto], inits: set[str]
) -> list[onnx.NodeProto]:
    """``nodes`` preceded by the weight-only nodes (of other layers) they read from: weights never cross a cut."""
    weights = weight_only(all_nodes, inits)
    producer = {t: n for n in all_nodes if n.name in weights.nodes for t in n.output if t}
    have = {n.name for n in nodes}
    extra: set[str] = set()
    stack = [t for n in nodes for t in _all_inputs(n) if t in producer]
    while stack:
        node = producer[stack.pop()]
        if node.name not in have and node.name not in extra:
            extra.add(node.name)
            stack.extend(t for t in _all_inputs(node) if t in producer)
    if not extra:
        return nodes
    return [n for n in all_nodes if n.name in extra] + nodes  # file order is topological


def _value_info(graph: ModelGraph, name: str) -> onnx.ValueInfoProto:
    import numpy as np
    from onnx import helper

    info = graph.tensors[name]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(info.dtype))
    return helper.make_tensor_value_info(name, elem, list(info.shape))


def _copy(proto: Any) -> Any:
    out = type(proto)()
    out.CopyFrom(proto)
    return out
