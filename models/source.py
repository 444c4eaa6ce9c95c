"""One front door for a user's model: ``.onnx``, ``.tflite`` (told apart by content) or ``zoo:NAME``.

``open_model`` reads the file, pins its inputs (``fleetpipe.models.shapes``: a dynamic batch is 1,
other dynamic dims need ``--input-shape NAME=D,D,...``), has onnxruntime's basic optimiser fold an
ONNX model (``fleetpipe.models.fold``: constant sub-graphs, computed shapes, the fusions its sessions
make anyway), which is also the check that this onnxruntime can run it, or builds one LiteRT
interpreter and allocates its tensors for a TFLite model (``NotRunnable`` otherwise), and analyses
the model into a ``ModelGraph``. The returned ``LoadedModel`` slices, runs and verifies itself, whatever its
format; every command that takes a model (``model inspect/slice``, ``plan``, ``planner``, ``demo``)
goes through it. A TFLite flatbuffer carries the file identifier ``TFL3`` at bytes 4..8; anything else
is read as ONNX (protobuf has no magic).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from fleetpipe.errors import SliceError, UnsupportedModel
from fleetpipe.models.fold import NotRunnable
from fleetpipe.models.graph import ModelGraph, split_ranges
from fleetpipe.models.shapes import InputShapeError, format_dims, resolve_input_shapes

__all__ = [
    "DEFAULT_RTOL",
    "LoadedModel",
    "NotRunnable",
    "VerifyFailed",
    "detect_kind",
    "litert_check",
    "open_model",
    "rel_diff",
]

log = logging.getLogger("fleetpipe.models")

TFLITE_IDENTIFIER = b"TFL3"
# --verify: the slices' outputs may differ from the whole model's by this much (max |a-b| / max |a|).
DEFAULT_RTOL = 1e-5


class VerifyFailed(SliceError):
    """The slices run in sequence do not reproduce the whole model within the tolerance."""


def detect_kind(source: str | PathLike[str] | bytes) -> str:
    """``"tflite"`` for a TFLite flatbuffer (``TFL3`` at bytes 4..8), else ``"onnx"``."""
    if isinstance(source, bytes | bytearray | memoryview):
        head = bytes(source[:8])
    else:
        try:
            with open(source, "rb") as f:
                head = f.read(8)
        except OSError as exc:
            raise UnsupportedModel(f"cannot read model file {source}: {exc}") from exc
    return "tflite" if len(head) >= 8 and head[4:8] == TFLITE_IDENTIFIER else "onnx"


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model ready to plan: its format, the model slices are cut from, its graph and the reference."""

    kind: str  # "onnx" | "tflite"
    model: Any  # onnx.ModelProto (pinned, folded where needed) or TFLite bytes
    graph: ModelGraph
    reference: Any  # what the user gave (inputs pinned): the whole model outputs are checked against
    input_shapes: Mapping[str, tuple[int, ...]]

    def model_bytes(self) -> bytes:
        """The serialised model slices are cut from (what its content hash is taken of)."""
        if self.kind == "tflite":
            return bytes(self.model)
        return bytes(self.model.SerializeToString(deterministic=True))

    def slice(self, first: int, last: int) -> bytes:
        """A standalone model file (same format) for layers ``first..last`` (0-based, inclusive)."""
        if self.kind == "tflite":
            from fleetpipe.models.tflite import slice_tflite

            return slice_tflite(self.model, self.graph, first, last)
        from fleetpipe.models.slicing import slice_bytes

        return bytes(slice_bytes(self.model, self.graph, first, last))

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The whole reference model's outputs (onnxruntime or LiteRT) by name."""
        return run_bytes(self.kind, self.reference, feeds)

    def runner(self, threads: int = 1) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
        """A function running the whole reference model on one frame's feeds, with one session kept open."""
        if self.kind == "tflite":
            from fleetpipe.models.profile import _LiteRT

            lite = _LiteRT(bytes(self.reference), threads)

            def run_lite(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
                lite.feed(feeds)
                return lite.run()

            return run_lite
        from fleetpipe.models.slicing import make_session, run_model

        session = make_session(self.reference, threads=threads)
        return lambda feeds: run_model(session, feeds)

    def verify(self, cuts: Sequence[int], feeds: Mapping[str, np.ndarray]) -> float:
        """Max relative difference (``rel_diff``) of the slices at ``cuts`` run in sequence vs the whole."""
        try:
            ranges = split_ranges(len(self.graph.layers), list(cuts))
        except ValueError as exc:
            raise SliceError(str(exc)) from exc
        whole = self.run(feeds)
        env: dict[str, np.ndarray] = {t.name: np.asarray(feeds[t.name]) for t in self.graph.inputs}
        for first, last in ranges:
            outs = run_bytes(self.kind, self.slice(first, last), {t: env[t] for t in self.graph.inputs_of(first)})
            env.update(outs)
        worst = 0.0
        for out in self.graph.outputs:
            if out.name not in whole:
                raise SliceError(f"the whole model has no output {out.name!r}")
            got, want = env[out.name], whole[out.name]
            if got.shape != want.shape:
                raise SliceError(f"output {out.name!r}: slices give shape {got.shape}, whole model {want.shape}")
            worst = max(worst, rel_diff(got, want))
        return worst


def rel_diff(got: np.ndarray, want: np.ndarray) -> float:
    """``max |got - want| / max |want|`` (0 for empty arrays; the absolute difference when ``want`` is 0)."""
    if not want.size:
        return 0.0
    a, b = got.astype(np.float64), want.astype(np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def run_bytes(kind: str, model: Any, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a whole model or slice (proto or bytes) once on this host."""
    if kind == "tflite":
        from fleetpipe.models.tflite import run_tflite

        return run_tflite(bytes(model), feeds)
    from fleetpipe.models.slicing import make_session, run_model

    try:
        session = make_session(model)
    except Exception as exc:
        from fleetpipe.models.fold import ort_reason

        raise NotRunnable(ort_reason(exc)) from exc
    return run_model(session, feeds)


def open_model(
    source: str | PathLike[str] | bytes | Any,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    *,
    order: str = "greedy",
    grouping: str = "blocks",
    name: str | None = None,
    check: bool = True,
    zoo_kwargs: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Read, pin, fold, check and analyse a model (see the module docstring).

    An op the FLOPs estimator does not know is said in one log line (not a Python warning with a source
    line, which is what a CLI user saw).
    """
    import warnings

    from fleetpipe.models.onnx_graph import UnknownOpWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnknownOpWarning)
        loaded = _open(source, input_shapes, order, grouping, name, check, zoo_kwargs)
    for w in caught:
        if issubclass(w.category, UnknownOpWarning):
            log.warning("%s: %s", loaded.graph.name, w.message)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return loaded


def _open(
    source: Any, input_shapes: Mapping[str, tuple[int, ...]] | None, order: str, grouping: str,
    name: str | None, check: bool, zoo_kwargs: Mapping[str, Any] | None,
) -> LoadedModel:
    data: bytes | None = None
    if isinstance(source, str) and source.startswith("zoo:"):
        from fleetpipe.models import zoo

        zoo_name = source.removeprefix("zoo:")
        try:
            proto: Any = zoo.build(zoo_name, **dict(zoo_kwargs or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise UnsupportedModel(str(exc)) from exc
        if zoo_name == "digits" and not input_shapes:
            input_shapes = {"input": tuple(zoo.input_shape(zoo_name))}
        return _open_onnx(proto, input_shapes, order, grouping, name or zoo_name, check)
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    elif isinstance(source, str | PathLike):
        path = Path(source)
        if not path.is_file():
            raise UnsupportedModel(f"no such model file: {path}")
        name = name or path.stem
        if detect_kind(path) == "tflite" or path.suffix.lower() == ".tflite":
            return _open_tflite(path.read_bytes(), input_shapes, grouping, name, check)
    else:
        return _open_onnx(source, input_shapes, order, grouping, name, check)
    if data is not None and detect_kind(data) == "tflite":
        return _open_tflite(data, input_shapes, grouping, name, check)
    return _open_onnx(data if data is not None else source, input_shapes, order, grouping, name, check)


def litert_check(data: bytes) -> None:
    """Build a LiteRT interpreter and allocate its tensors once; raises NotRunnable with a one-line reason."""
    import re

    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise NotRunnable("LiteRT is not installed here (pip install ai-edge-litert)") from exc
    try:
        Interpreter(model_content=bytes(data), num_threads=1).allocate_tensors()
    except Exception as exc:  # LiteRT raises ValueError/RuntimeError carrying C++ messages
        text = str(exc)
        m = re.search(r"unresolved custom op: ([^.\s]+(?:\.[^.\s]+)*?)\.?(?:\s|$)", text)
        if m:
            raise NotRunnable(f"custom op {m.group(1)} is not available in LiteRT here") from exc
        m = re.search(r"[Dd]idn't find op for builtin opcode '([^']+)' version '(\d+)'", text)
        if m:
            raise NotRunnable(f"op {m.group(1)} version {m.group(2)} is not available in LiteRT here") from exc
        line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
        raise NotRunnable(f"LiteRT here cannot run the model: {line[:300]}") from exc


# --- private helpers -------------------------------------------------------------------------------


def _tflite_declared(data: bytes, graph: ModelGraph) -> dict[str, list[int | None]]:
    """Each model input's dims from its shape signature (-1: dynamic, None here), else its shape."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(data, 0)
    sub = model.Subgraphs(0)
    sigs = []
    for i in range(sub.InputsLength()):
        t = sub.Tensors(sub.Inputs(i))
        buf = model.Buffers(t.Buffer()) if t.Buffer() < model.BuffersLength() else None
        if buf is not None and buf.DataLength() > 0:
            continue  # a constant input is no graph input (as in fleetpipe.models.tflite)
        sigs.append([int(d) for d in t.ShapeSignatureAsNumpy()] if t.ShapeSignatureLength() else None)
    out: dict[str, list[int | None]] = {}
    for info, sig in zip(graph.inputs, sigs, strict=False):
        if sig is None or len(sig) != len(info.shape):
            out[info.name] = list(info.shape)
        else:
            out[info.name] = [None if d < 0 else d for d in sig]
    return out


def _open_onnx(
    source: Any, input_shapes: Mapping[str, tuple[int, ...]] | None, order: str, grouping: str,
    name: str | None, check: bool,
) -> LoadedModel:
    from fleetpipe.models.onnx_graph import load_onnx, normalize, pin_inputs, prepare_onnx, read_model

    original = read_model(source)
    reference = pin_inputs(normalize(original), input_shapes)
    model = prepare_onnx(reference, checked=True)  # folded by an onnxruntime session: the check that it runs here
    graph = load_onnx(model, order=order, grouping=grouping, name=name or original.graph.name or "model",
                      checked=True)
    shapes = {t.name: t.shape for t in graph.inputs}
    return LoadedModel("onnx", model, graph, reference, shapes)


def _open_tflite(
    data: bytes, input_shapes: Mapping[str, tuple[int, ...]] | None, grouping: str, name: str | None,
    check: bool,
) -> LoadedModel:
    try:
        from fleetpipe.models.tflite import load_tflite
    except ImportError as exc:
        raise NotRunnable(str(exc)) from exc
    if detect_kind(data) != "tflite":
        raise UnsupportedModel("not a TFLite flatbuffer (missing 'TFL3' file identifier)")
    if check:  # before the analysis: an unrunnable model says so, not what the FLOPs estimator does not know
        litert_check(data)
    graph = load_tflite(data, name=name, grouping=grouping)  # type: ignore[arg-type]
    declared = _tflite_declared(data, graph)
    for t in graph.inputs:
        if any(d is None for d in declared[t.name][1:]):
            raise InputShapeError(
                f"TFLite input {t.name!r} has dynamic dims {format_dims(declared[t.name])}: fleetpipe slices TFLite "
                f"models at their static shapes; convert it with a fixed input shape"
            )
    shapes = resolve_input_shapes(declared, input_shapes)
    for t in graph.inputs:
        if shapes[t.name] != t.shape:
            raise InputShapeError(
                f"--input-shape {t.name}={','.join(map(str, shapes[t.name]))}: a TFLite model is sliced at its "
                f"static shape {format_dims(list(t.shape))}"
            )
    return LoadedModel("tflite", data, graph, data, shapes)
