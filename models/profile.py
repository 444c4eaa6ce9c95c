"""Per-layer timing of an ONNX model on this machine with onnxruntime's profiler.

onnxruntime fuses and renames nodes when it optimises a graph, so kernel events are matched to
layers through the optimised model (saved next to the profile): first by node name, then by the
names of the tensors a node writes, then by the layer of the node that feeds it. When the profiler
yields no kernel events (another provider), each layer is timed as its own slice instead.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetpipe.errors import ModelError
from fleetpipe.models.graph import ModelGraph

if TYPE_CHECKING:
    import numpy as np
    import onnx

__all__ = ["LayerProfile", "profile_layers", "random_feeds"]


@dataclass(frozen=True, slots=True)
class LayerProfile:
    """Mean per-layer and whole-model time in ms; ``sum_ratio`` = sum(per_layer_ms) / whole_ms.

    With ``method="profiler"`` the layer times are kernel times; the rest of a run (executor and
    input/output binding overhead) is ``overhead_ms``.
    """

    per_layer_ms: tuple[float, ...]
    whole_ms: float
    sum_ratio: float
    method: str = "profiler"

    @property
    def overhead_ms(self) -> float:
        """Whole-model time not attributed to any layer."""
        return self.whole_ms - sum(self.per_layer_ms)


def random_feeds(graph: ModelGraph, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic random inputs matching the graph's model inputs."""
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for t in graph.inputs:
        if np.dtype(t.dtype).kind == "f":
            feeds[t.name] = rng.standard_normal(t.shape).astype(t.dtype)
        else:
            feeds[t.name] = rng.integers(0, 2, t.shape).astype(t.dtype)
    return feeds


def profile_layers(
    model: onnx.ModelProto,
    graph: ModelGraph,
    feeds: Mapping[str, np.ndarray] | None = None,
    runs: int = 20,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    *,
    threads: int = 1,
    warmup: int = 3,
) -> LayerProfile:
    """Time every layer of ``graph`` over ``runs`` runs (after ``warmup``) with onnxruntime."""
    import onnxruntime as ort

    if runs < 1:
        raise ValueError("runs must be >= 1")
    feeds = dict(feeds) if feeds is not None else random_feeds(graph)
    with tempfile.TemporaryDirectory(prefix="fleetpipe-profile-") as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "profile")
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        try:
            session = ort.InferenceSession(model.SerializeToString(), so, providers=list(providers))
        except Exception as exc:
            raise ModelError(f"onnxruntime cannot load the model: {exc}") from exc
        names = [i.name for i in session.get_inputs()]
        for _ in range(warmup + runs):
            session.run(None, {n: feeds[n] for n in names})
        events = json.loads(Path(session.end_profiling()).read_text())
        optimized = _read_optimized(Path(tmp) / "optimized.onnx")
    result = _from_events(events, model, graph, optimized, warmup)
    if result is None:
        return _profile_by_slices(model, graph, feeds, runs, providers, threads, warmup)
    return result


def _read_optimized(path: Path) -> Any:
    import onnx

    if not path.is_file():
        return None
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception:
        return None


def _from_events(
    events: list[dict[str, Any]], model: onnx.ModelProto, graph: ModelGraph, optimized: Any, warmup: int
) -> LayerProfile | None:
    from fleetpipe.models.onnx_graph import normalize

    runs = sorted(
        (int(e["ts"]), int(e["ts"]) + int(e["dur"]))
        for e in events
        if e.get("cat") == "Session" and e.get("name") == "model_run"
    )[warmup:]
    kernels = [
        e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")
    ]
    if not runs or not kernels:
        return None
    node_layer = {n: layer.index for layer in graph.layers for n in layer.nodes}
    tensor_layer = {
        t: node_layer[n.name]
        for n in normalize(model).graph.node
        if n.name in node_layer
        for t in n.output
        if t
    }
    for t in graph.inputs:
        tensor_layer.setdefault(t.name, 0)
    opt_layer: dict[str, int] = {}
    if optimized is not None:
        for node in optimized.graph.node:
            layer = _match_name(node.name, node_layer)
            if layer is None:
                hits = [tensor_layer[t] for t in node.output if t in tensor_layer]
                hits = hits or [tensor_layer[t] for t in node.input if t in tensor_layer]
                layer = max(hits) if hits else None
            if layer is not None:
                opt_layer[node.name] = layer
                for t in node.output:
                    tensor_layer.setdefault(t, layer)
    per_layer = [0.0] * len(graph.layers)
    for e in kernels:
        ts = int(e["ts"])
        if not any(a <= ts <= b for a, b in runs):
            continue
        name = str(e["name"])[: -len("_kernel_time")]
        layer = opt_layer.get(name)
        if layer is None:
            layer = _match_name(name, node_layer)
        if layer is None:
            layer = 0  # should not happen; keep the time rather than lose it
        per_layer[layer] += float(e["dur"]) / 1000.0
    n = len(runs)
    per_layer_ms = tuple(t / n for t in per_layer)
    whole_ms = sum(b - a for a, b in runs) / 1000.0 / n
    return LayerProfile(per_layer_ms, whole_ms, sum(per_layer_ms) / whole_ms if whole_ms else 0.0)


def _match_name(name: str, node_layer: Mapping[str, int]) -> int | None:
    """Layer of an optimised node: its own name, or its name minus ``_suffix`` parts ORT appends."""
    while name:
        if name in node_layer:
            return node_layer[name]
        if "_" not in name:
            return None
        name = name.rsplit("_", 1)[0]
    return None


def _profile_by_slices(
    model: onnx.ModelProto,
    graph: ModelGraph,
    feeds: Mapping[str, np.ndarray],
    runs: int,
    providers: Sequence[str],
    threads: int,
    warmup: int,
) -> LayerProfile:
    from fleetpipe.models.slicing import make_session, slice_model

    def timed(session: Any, inputs: Mapping[str, Any]) -> tuple[float, dict[str, Any]]:
        names = [i.name for i in session.get_inputs()]
        args = {n: inputs[n] for n in names}
        for _ in range(warmup):
            session.run(None, args)
        t0 = time.perf_counter()
        for _ in range(runs):
            outs = session.run(None, args)
        ms = (time.perf_counter() - t0) * 1000.0 / runs
        return ms, dict(zip((o.name for o in session.get_outputs()), outs, strict=True))

    whole_ms, _ = timed(make_session(model, threads=threads, providers=providers), feeds)
    env: dict[str, Any] = dict(feeds)
    per_layer = []
    for i in range(len(graph.layers)):
        session = make_session(slice_model(model, graph, i, i), threads=threads, providers=providers)
        ms, outs = timed(session, env)
        env.update(outs)
        per_layer.append(ms)
    return LayerProfile(tuple(per_layer), whole_ms, sum(per_layer) / whole_ms, method="slices")
