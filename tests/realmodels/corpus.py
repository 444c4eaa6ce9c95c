"""The real-model corpus: model files nobody in fleetpipe wrote, plus our own torch.onnx exports.

``manifest.json`` pins the wheels and files that ``scripts/fetch-models`` caches; ``torch/torch.json``
lists the committed torch exports. ``corpus()`` joins both into ``RealModel`` values, which the tests
take as parameters (``params``), and ``resolve`` finds a model's file, failing under CI (CI=true) when
it is missing and skipping elsewhere. ``KNOWN`` lists, per test step, the models that the product does
not handle yet, with the precise reason: the tests mark them xfail(strict=True), so a fix shows as an
XPASS failure and the entry must go.

The runners here (``runner``, ``run_file``, ``run_stages``) call onnxruntime and LiteRT directly,
independently of fleetpipe, to check fleetpipe's slices against the whole model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifest.json"
TORCH_DIR = HERE / "torch"
# Slices must equal the whole model to this max relative difference on every final output.
SLICE_REL_TOL = 1e-5


@dataclass(frozen=True)
class RealModel:
    """One corpus entry."""

    id: str
    path: Path
    kind: str  # "onnx" or "tflite"
    exporter: str
    source: str  # "mediapipe==0.10.14" or "torch export (committed)"
    expected: str  # "runnable" or "negative"
    reason: str  # for negatives: the cause the product must name
    input_shape: tuple[str, ...]  # --input-shape flags a user must pass (non-batch dynamic dims)
    sha256: str
    description: str = ""
    cause_words: tuple[str, ...] = ()  # words the negative's one-line error must contain

    @property
    def shape_flags(self) -> list[str]:
        return [a for s in self.input_shape for a in ("--input-shape", s)]


# Words each negative case's error must name (the cause, as a user would search for it).
NEGATIVE_CAUSE = {
    "mp_face_landmark_attention": ("Landmarks2TransformMatrix",),
    "ort_logreg_iris": ("sequence",),
}

# (step, model id) -> why the product fails there today; steps: inspect, slice, slice-nodes, fleet, demo.
KNOWN: dict[tuple[str, str], str] = {}
# Models whose whole-model runs take seconds here (ResNet-50 / GoogLeNet with ConstantOfShape weights, the
# PP-OCRv4 detector and recogniser): marked slow in every step.
HEAVY = frozenset({"caffe2_resnet50", "caffe2_inception_v1", "ppocr_det_v4", "ppocr_rec_v4"})


def cache_dir() -> Path:
    """The fetched corpus (same rule as scripts/fetch-models)."""
    explicit = os.environ.get("FLEETPIPE_REALMODELS_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fleetpipe" / "realmodels"


def manifest() -> dict[str, Any]:
    return json.loads(MANIFEST.read_text())


def torch_manifest() -> dict[str, Any]:
    return json.loads((TORCH_DIR / "torch.json").read_text())


def corpus() -> list[RealModel]:
    """Every model: the fetched wheel files first, then the committed torch exports."""
    doc = manifest()
    cache = cache_dir()
    out = []
    for m in doc["models"]:
        out.append(
            RealModel(
                id=m["id"], path=cache / f"{m['id']}.{m['kind']}", kind=m["kind"], exporter=m["exporter"],
                source=doc["wheels"][m["wheel"]]["requirement"], expected=m["expected"],
                reason=m.get("reason", ""), input_shape=tuple(m["input_shape"]), sha256=m["sha256"],
                description=m.get("description", ""), cause_words=NEGATIVE_CAUSE.get(m["id"], ()),
            )
        )
    for m in torch_manifest()["models"]:
        out.append(
            RealModel(
                id=m["id"], path=TORCH_DIR / m["file"], kind="onnx", exporter=m["exporter"],
                source=f"torch export, opset {m['opset']} (committed)", expected="runnable", reason="",
                input_shape=tuple(m["input_shape"]), sha256=m["sha256"], description=m["description"],
            )
        )
    return out


def by_id(model_id: str) -> RealModel:
    for m in corpus():
        if m.id == model_id:
            return m
    raise KeyError(model_id)


def params(step: str, models: Iterable[RealModel] | None = None) -> list[Any]:
    """``pytest.param`` per model with its id, xfail(strict=True) where ``KNOWN`` says the step fails."""
    out = []
    for m in corpus() if models is None else models:
        marks: list[Any] = [pytest.mark.slow] if m.id in HEAVY else []
        why = KNOWN.get((step, m.id))
        if why:
            marks.append(pytest.mark.xfail(reason=why, strict=True))
        out.append(pytest.param(m, id=m.id, marks=marks))
    return out


def resolve(model: RealModel) -> Path:
    """The model's file, sha256-checked; missing: a failure under CI, else a skip naming the fix."""
    if not model.path.is_file():
        msg = f"{model.id}: {model.path} is missing; run .venv/bin/python scripts/fetch-models"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " (under CI a missing corpus file is a failure; scripts/setup fetches it)")
        pytest.skip(msg)
    got = hashlib.sha256(model.path.read_bytes()).hexdigest()
    if got != model.sha256:
        pytest.fail(f"{model.id}: {model.path} has sha256 {got}, pinned {model.sha256}; re-run scripts/fetch-models")
    return model.path


# --- independent runners (onnxruntime / LiteRT, no fleetpipe) ---------------------------------------


def random_inputs(specs: Iterable[tuple[str, str, tuple[int, ...]]], seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs in [0, 1) (integers: 0/1) for ``(name, dtype, shape)`` specs."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, dtype, shape in specs:
        dt = np.dtype(dtype)
        if dt.kind == "f":
            out[name] = rng.random(shape, dtype=np.float64).astype(dt)
        else:
            out[name] = rng.integers(0, 2, size=shape).astype(dt)
    return out


def runner(kind: str, model: Path | bytes) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    """A loaded model (one thread) as a function of its named inputs: onnxruntime or LiteRT."""
    data = model.read_bytes() if isinstance(model, Path) else model
    return _onnx_runner(data) if kind == "onnx" else _tflite_runner(data)


def run_file(kind: str, model: Path | bytes, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return runner(kind, model)(feeds)


def _onnx_runner(data: bytes) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted}), strict=True))

    return run


def _tflite_runner(data: bytes) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=data, num_threads=1)
    allocated: list[tuple[int, ...]] = []

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = [tuple(feeds[d["name"]].shape) for d in it.get_input_details()]
        if shapes != allocated:
            for d, shape in zip(it.get_input_details(), shapes, strict=True):
                if tuple(d["shape"]) != shape:
                    it.resize_tensor_input(d["index"], list(shape))
            it.allocate_tensors()
            allocated[:] = shapes
        for d in it.get_input_details():
            it.set_tensor(d["index"], np.ascontiguousarray(feeds[d["name"]], dtype=d["dtype"]))
        it.invoke()
        return {d["name"]: np.array(it.get_tensor(d["index"])) for d in it.get_output_details()}

    return run


def run_stages(kind: str, stage_dir: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the stage files of a ``fleetpipe model slice`` manifest in order; every tensor they produce."""
    doc = json.loads((stage_dir / "manifest.json").read_text())
    env = dict(feeds)
    for stage in doc["stages"]:
        names = [t["name"] for t in stage["inputs"]]
        missing = [n for n in names if n not in env]
        assert not missing, f"stage {stage['stage']} reads {missing}, which no earlier stage produced"
        env.update(run_file(kind, stage_dir / stage["file"], {n: env[n] for n in names}))
    return env


def rel_diff(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| (0 for empty tensors)."""
    if want.size == 0:
        return 0.0
    a, b = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))


def model_input_specs(model: RealModel) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of the model's inputs, dynamic dims taken from ``input_shape`` (batch 1)."""
    pinned = {}
    for s in model.input_shape:
        name, _, dims = s.partition("=")
        pinned[name] = tuple(int(d) for d in dims.split(","))
    if model.kind == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(model_path=str(model.path))
        return [(d["name"], np.dtype(d["dtype"]).name, tuple(int(x) for x in d["shape"]))
                for d in it.get_input_details()]
    import onnx

    m = onnx.load(str(model.path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    out = []
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        if vi.name in pinned:
            shape = pinned[vi.name]
        else:
            shape = tuple(d.dim_value if d.dim_value > 0 else 1 for d in tt.shape.dim)
        out.append((vi.name, dtype, shape))
    return out
