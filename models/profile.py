"""Per-layer timing of a model on this machine: ONNX with onnxruntime's profiler, TFLite with LiteRT.

onnxruntime fuses and renames nodes when it optimises a graph, so kernel events are matched to
layers through the optimised model (saved next to the profile): first by node name, then by the
names of the tensors a node writes, then by the layer of the node that feeds it. When the profiler
yields no kernel events (another provider), each layer is timed as its own slice instead.

The LiteRT Python interpreter exposes no per-op profiler, so ``profile_tflite_layers`` times every
layer as its own standalone slice (``fleetpipe.models.tflite.slice_tflite``), which is also how a
node will run it. Every run invokes the whole model and then the slices in model order, each
right after an untimed copy of its input into the interpreter, so a layer finds its input in
cache as it does inside the whole model (timing slices on inputs last touched a run earlier put
the layer sum of a ResNet-50 ~12 % above the whole model, against ~4 % this way), and a burst of
load on a shared machine hits both alike. With one thread the clock is the calling thread's CPU
time, which other processes on a shared machine do not inflate. A layer's time is its median
invoke time minus the median invoke time of a one-op model: every slice pays that fixed cost,
the whole model pays it once, and it stays in ``overhead_ms`` as onnxruntime's run overhead does.
"""

from __future__ import annotations

import bisect
import json
import statistics
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

__all__ = ["LayerProfile", "profile_layers", "profile_tflite_layers", "random_feeds"]


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


def profile_tflite_layers(
    model_bytes: bytes,
    graph: ModelGraph,
    feeds: Mapping[str, np.ndarray] | None = None,
    runs: int = 20,
    *,
    threads: int = 1,
    warmup: int = 3,
) -> LayerProfile:
    """Time every layer of a .tflite ``graph`` as its own slice with the LiteRT interpreter (medians)."""

    import numpy as np

    from fleetpipe.models.tflite import slice_tflite

    if runs < 1:
        raise ValueError("runs must be >= 1")
    # One thread runs on the calling thread: its CPU time ignores other processes on a shared machine.
    clock = time.thread_time if threads == 1 else time.perf_counter
    env: dict[str, Any] = dict(feeds) if feeds is not None else random_feeds(graph)
    whole = _LiteRT(bytes(model_bytes), threads)
    whole.feed(env)
    layers = []
    for i in range(len(graph.layers)):
        part = _LiteRT(slice_tflite(model_bytes, graph, i, i), threads)
        part.feed(env)
        env.update(part.run())
        layers.append(part)
    empty = _LiteRT(_noop_tflite(), threads)
    empty_in = {"x": np.zeros((1, 1), np.float32)}
    whole_t: list[float] = []
    empty_t: list[float] = []
    layer_t: list[list[float]] = [[] for _ in layers]

    def timed(interp: _LiteRT, sink: list[float], inputs: Mapping[str, Any] = env) -> None:
        interp.feed(inputs)  # untimed; leaves the input in cache, as the previous op does inside the whole
        t0 = clock()
        interp.invoke()
        sink.append((clock() - t0) * 1000.0)

    empty.feed(empty_in)
    for interp in [whole, *layers, empty]:
        for _ in range(warmup):
            interp.invoke()
    for _ in range(max(runs, 50)):  # back to back: the warm fixed cost of one invoke (and the clock)
        timed(empty, empty_t, empty_in)
    for _ in range(runs):  # interleaved run by run, so a burst of machine load hits all alike
        timed(whole, whole_t)
        for interp, sink in zip(layers, layer_t, strict=True):  # in model order, as inside the whole
            timed(interp, sink)
    # Each slice pays one invoke's fixed cost, the whole model pays it once: keep it out of the layers.
    fixed = statistics.median(empty_t)
    whole_ms = statistics.median(whole_t)
    per_layer = tuple(max(statistics.median(t) - fixed, 0.0) for t in layer_t)
    return LayerProfile(per_layer, whole_ms, sum(per_layer) / whole_ms if whole_ms else 0.0, method="slices")


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
    opt_layer = _optimized_layers(optimized, node_layer, tensor_layer) if optimized is not None else {}
    # Per layer and run, then the median over runs: a run the scheduler preempted (a 2-core host with
    # nodes starting beside the planner) inflates one layer's kernel time, and a mean would keep it.
    starts = [a for a, _ in runs]
    n_layers = len(graph.layers)
    per_run = [[0.0] * len(runs) for _ in graph.layers]
    kernel_count = [0] * n_layers
    seen_runs: set[int] = set()
    for e in kernels:
        ts = int(e["ts"])
        r = bisect.bisect_right(starts, ts) - 1
        if r < 0 or ts > runs[r][1]:
            continue
        name = str(e["name"])[: -len("_kernel_time")]
        layer = opt_layer.get(name)
        if layer is None:
            layer = _match_name(name, node_layer)
        if layer is None:
            layer = _match_name(name, tensor_layer)
        if layer is None:
            return None  # a kernel no layer owns: time the layers as slices rather than guess
        per_run[layer][r] += float(e["dur"]) / 1000.0
        if r == 0:
            kernel_count[layer] += 1
        seen_runs.add(r)
    # The executor's own cost per kernel (dispatch, fences, allocation) is part of what a layer costs when a
    # node runs it: spread the time outside kernels over the layers by their kernel counts, so the layer
    # times sum to the whole model and a layer of many small kernels is not charged as free. Its median over
    # runs, like the kernels': a run the scheduler preempted outside its kernels is no layer's cost.
    total_k = sum(kernel_count)
    outside = statistics.median((b - a) / 1000.0 - sum(per_run[i][r] for i in range(n_layers))
                                for r, (a, b) in enumerate(runs))
    per_layer_ms = tuple(statistics.median(t) + (max(outside, 0.0) * kernel_count[i] / total_k if total_k else 0.0)
                         for i, t in enumerate(per_run))
    whole_ms = statistics.median(b - a for a, b in runs) / 1000.0
    return LayerProfile(per_layer_ms, whole_ms, sum(per_layer_ms) / whole_ms if whole_ms else 0.0)


def _optimized_layers(
    optimized: Any, node_layer: Mapping[str, int], tensor_layer: dict[str, int]
) -> dict[str, int]:
    """The layer of every node of onnxruntime's optimised graph.

    In order: the node's own name (or that name minus the ``_suffix`` parts ORT appends), the name as a tensor
    name (the NCHWc transformer names a node after the tensor it replaces, ``<tensor>_nchwc``), an original
    tensor the node writes; then, to a fixed point, from its neighbours: a node that only converts data (a
    ``ReorderInput`` in front of an NCHWc convolution, a copy) belongs to the earliest layer that reads what it
    writes, else to the latest layer that writes what it reads.
    """
    nodes = list(optimized.graph.node)
    out: dict[str, int] = {}
    for node in nodes:
        layer = _match_name(node.name, node_layer)
        if layer is None:
            layer = _match_name(node.name, tensor_layer)
        if layer is None:
            hits = [tensor_layer[t] for t in node.output if t in tensor_layer]
            layer = max(hits) if hits else None
        if layer is not None:
            out[node.name] = layer
    producer = {t: n.name for n in nodes for t in n.output if t}
    consumers: dict[str, list[str]] = {}
    for n in nodes:
        for t in n.input:
            consumers.setdefault(t, []).append(n.name)
    pending = [n for n in nodes if n.name not in out]
    while pending:
        left = []
        for node in pending:
            after = [out[c] for t in node.output for c in consumers.get(t, ()) if c in out]
            before = [out[producer[t]] for t in node.input if t in producer and producer[t] in out]
            before += [tensor_layer[t] for t in node.input if t not in producer and t in tensor_layer]
            if after:
                out[node.name] = min(after)
            elif before:
                out[node.name] = max(before)
            else:
                left.append(node)
        if len(left) == len(pending):
            break
        pending = left
    for node in nodes:
        if node.name in out:
            for t in node.output:
                tensor_layer.setdefault(t, out[node.name])
    return out


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


class _LiteRT:
    """One LiteRT interpreter for profiling (``ai_edge_litert``, else ``tflite_runtime``)."""

    def __init__(self, model_bytes: bytes, threads: int) -> None:
        from fleetpipe.models.tflite import _tensor_names

        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:  # pragma: no cover - depends on the installed extras
            from tflite_runtime.interpreter import Interpreter
        try:
            self._names = _tensor_names(model_bytes)
            self._interp = Interpreter(model_content=model_bytes, num_threads=threads)
            self._interp.allocate_tensors()
        except Exception as exc:  # LiteRT raises ValueError/RuntimeError carrying C++ messages
            raise ModelError(f"LiteRT cannot load the model: {exc}") from exc

    def feed(self, env: Mapping[str, Any]) -> None:
        import numpy as np

        for d in self._interp.get_input_details():
            name = self._names[d["index"]]
            if name not in env:
                raise ModelError(f"no value for input {name!r} of a TFLite slice")
            self._interp.set_tensor(d["index"], np.ascontiguousarray(env[name]))

    def invoke(self) -> None:
        self._interp.invoke()

    def run(self) -> dict[str, Any]:
        self._interp.invoke()
        return {self._names[d["index"]]: self._interp.get_tensor(d["index"]) for d in self._interp.get_output_details()}


def _noop_tflite() -> bytes:
    """A one-op model (x + x on one float): what any invoke costs on top of its kernels."""
    from ai_edge_litert import schema_py_generated as schema

    from fleetpipe.models.build_tflite import TFLiteBuilder

    b = TFLiteBuilder("noop")
    x, y = b.tensor("x", (1, 1)), b.tensor("y", (1, 1))
    b.op(schema.BuiltinOperator.ADD, [x, x], [y], schema.AddOptionsT())
    return b.finish([x], [y])
