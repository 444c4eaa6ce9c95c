"""Offline bit-width calibration (COACH): the lowest bit-width per cut that keeps the accuracy loss in a floor.

For every candidate cut (after layer ``i``, ``i < L - 1``) the model is run split at that cut: the prefix
slice runs once per cut (its outputs are cached), every crossing tensor is quantized and dequantized with
:mod:`fleetpipe.codec` one *frame* at a time (a frame is one batch of the graph's input shape, exactly what a
node sends in one message), and the suffix slice finishes the inference. The loss against full precision is

- ``"labels"``: top-1 accuracy drop against the given labels (``acc_full - acc_quant``; may be negative);
- ``"agreement"``: ``1 - top-1 agreement`` with the full-precision model (classifier without labels);
- ``"rel_l2"``: relative L2 error ``||y_q - y|| / ||y||`` of the first model output (non-classifiers).

The metric is chosen automatically: a 2-d float output ``[B, C]`` with ``C >= 2`` is a classifier. The
lowest bit-width within ``floor`` is found by bisection over the sorted candidates (the loss is assumed
monotone in the bits; the chosen width is always one that was measured within the floor). When even the
highest candidate misses the floor, the cut keeps full precision (32 bits).

The result, :class:`Calibration`, is JSON-serialisable so that it can be stored with the plan, and
:meth:`Calibration.min_bits_array` gives the per-layer floor :class:`fleetpipe.planner.problem.Problem`
expects (``min_bits[l]`` for the activation after layer ``l``; the last layer is 32).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleetpipe import codec
from fleetpipe.models.graph import ModelGraph

__all__ = ["DEFAULT_BITS", "DEFAULT_FLOOR", "FULL_BITS", "METRICS", "Calibration", "calibrate", "model_id_of"]

FULL_BITS = 32
DEFAULT_FLOOR = 0.005
DEFAULT_BITS = (2, 3, 4, 5, 6, 7, 8)
METRICS = ("labels", "agreement", "rel_l2")
_FORMAT = "fleetpipe-calibration/1"

Progress = Callable[[int, int, int, int], None]  # (cuts done, cuts total, cut, min bits)


@dataclass(frozen=True, slots=True)
class Calibration:
    """Per-cut lowest bit-width within ``floor``; ``losses[i]``: the ``(bits, loss)`` pairs measured at cut ``i``."""

    model_id: str
    floor: float
    metric: str
    n_samples: int
    bits_candidates: tuple[int, ...]
    min_bits: tuple[int, ...]
    losses: tuple[tuple[tuple[int, float], ...], ...]
    # COACH early exit per cut (classifiers with labels): {cut: {"threshold", "centres", "counts"}}; a cut is
    # absent when its crossing is several tensors, too wide, or no threshold keeps the loss within the floor.
    exits: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, not {self.metric!r}")
        if not (self.floor >= 0 and math.isfinite(self.floor)):
            raise ValueError("floor must be finite and >= 0")
        if len(self.losses) != len(self.min_bits):
            raise ValueError("losses and min_bits must have one entry per cut")
        object.__setattr__(self, "bits_candidates", tuple(int(b) for b in self.bits_candidates))
        object.__setattr__(self, "min_bits", tuple(int(b) for b in self.min_bits))
        object.__setattr__(self, "losses", tuple(
            tuple(sorted((int(b), float(v)) for b, v in cut)) for cut in self.losses))
        for b in self.min_bits:
            if not 1 <= b <= FULL_BITS:
                raise ValueError(f"min bits {b} outside 1..{FULL_BITS}")

    @property
    def n_layers(self) -> int:
        """Layers of the calibrated model (one more than the cuts)."""
        return len(self.min_bits) + 1

    def loss(self, cut: int, bits: int) -> float | None:
        """The measured loss at ``cut`` and ``bits`` (None when not measured)."""
        return dict(self.losses[cut]).get(int(bits))

    def min_bits_array(self) -> np.ndarray:
        """Per-layer floor for ``Problem.min_bits`` (length ``L``; the model output stays 32 bits)."""
        return np.array([*self.min_bits, FULL_BITS], dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (losses keyed by cut, then bits, as strings)."""
        return {
            "format": _FORMAT, "model_id": self.model_id, "floor": self.floor, "metric": self.metric,
            "n_samples": self.n_samples, "bits_candidates": list(self.bits_candidates),
            "min_bits": list(self.min_bits),
            "losses": [{str(b): v for b, v in cut} for cut in self.losses],
            "exits": {str(c): dict(e) for c, e in sorted(self.exits.items())},
        }

    def to_json(self) -> str:
        """Serialise to a JSON string."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, doc: str | bytes | Mapping[str, Any]) -> Calibration:
        """Parse :meth:`to_json` output (a string, bytes or an already decoded dict)."""
        d = json.loads(doc) if isinstance(doc, str | bytes) else doc
        if d.get("format") != _FORMAT:
            raise ValueError(f"not a calibration document (format {d.get('format')!r})")
        return cls(
            model_id=str(d["model_id"]), floor=float(d["floor"]), metric=str(d["metric"]),
            n_samples=int(d["n_samples"]), bits_candidates=tuple(d["bits_candidates"]),
            min_bits=tuple(d["min_bits"]),
            losses=tuple(tuple((int(b), float(v)) for b, v in cut.items()) for cut in d["losses"]),
            exits={int(c): e for c, e in d.get("exits", {}).items()},
        )


def model_id_of(model: Any) -> str:
    """The planner's model id: the first 12 hex chars of the serialized model's content hash."""
    from fleetpipe.slices import content_hash

    return content_hash(model.SerializeToString())[:12]


def calibrate(
    model: Any,
    graph: ModelGraph,
    calib_inputs: np.ndarray | Mapping[str, np.ndarray],
    labels: np.ndarray | None = None,
    *,
    floor: float = DEFAULT_FLOOR,
    bits_candidates: Sequence[int] = DEFAULT_BITS,
    cuts: Sequence[int] | None = None,
    metric: str | None = None,
    progress: Progress | None = None,
    model_id: str | None = None,
) -> Calibration:
    """Calibrate the lowest bit-width within ``floor`` for every cut (or only ``cuts``; others stay 32).

    ``calib_inputs`` is the model input (or a mapping input name -> array) with the samples stacked on
    axis 0; it is cut into frames of the graph's input batch size. ``labels`` (one per sample) switch the
    classifier metric to the accuracy drop against them. ``model_id`` overrides the id the planner checks the
    calibration against (default: :func:`model_id_of` ``model``; the CLI passes the planner's id of the file).
    """
    from fleetpipe.models.slicing import slice_model

    cands = sorted({int(b) for b in bits_candidates})
    if not cands or any(b not in codec.SUPPORTED_BITS or b > 16 for b in cands):
        raise ValueError(f"bits candidates must be codec widths below 32, got {list(bits_candidates)}")
    if not (floor >= 0 and math.isfinite(floor)):
        raise ValueError("floor must be finite and >= 0")
    n_layers = len(graph.layers)
    all_cuts = list(range(n_layers - 1))
    todo = all_cuts if cuts is None else sorted({int(c) for c in cuts})
    bad = [c for c in todo if c not in all_cuts]
    if bad:
        raise ValueError(f"cuts {bad} are not between two layers (valid: 0..{n_layers - 2})")
    feeds, batch, n_samples = _frames(graph, calib_inputs)
    out_name = graph.outputs[0].name
    classifier = _is_classifier(graph)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != n_samples:
            raise ValueError(f"{labels.shape[0]} labels for {n_samples} samples")
    metric = metric or ("labels" if classifier and labels is not None else "agreement" if classifier else "rel_l2")
    if metric not in METRICS or (metric == "labels" and labels is None):
        raise ValueError(f"metric {metric!r} is not usable here (labels given: {labels is not None})")
    reference = _Runner(model, batch).run(feeds)[out_name]
    loss_of = _loss_fn(metric, reference, labels)

    min_bits = [FULL_BITS] * (n_layers - 1)
    losses: list[dict[int, float]] = [{} for _ in range(n_layers - 1)]
    exits: dict[int, dict[str, Any]] = {}
    for done, cut in enumerate(todo, 1):
        prefix = _Runner(slice_model(model, graph, 0, cut), batch)
        suffix = _Runner(slice_model(model, graph, cut + 1, n_layers - 1), batch)
        crossing = prefix.run(feeds)  # cached once per cut

        def measure(bits: int, cut: int = cut, suffix: _Runner = suffix,
                    crossing: dict[str, np.ndarray] = crossing) -> float:
            if bits not in losses[cut]:
                sent = {k: _roundtrip(v, bits, batch) for k, v in crossing.items()}
                losses[cut][bits] = float(loss_of(suffix.run({**feeds, **sent})[out_name]))
            return losses[cut][bits]

        if metric == "labels" and len(crossing) == 1:
            exit_doc = _exit_cache(next(iter(crossing.values())), labels, reference, floor)
            if exit_doc is not None:
                exits[cut] = exit_doc
        min_bits[cut] = _bisect(cands, measure, floor)
        if min_bits[cut] != FULL_BITS and not measure(min_bits[cut]) <= floor:  # verify the found width
            raise AssertionError(f"bisection picked {min_bits[cut]} bits at cut {cut} outside the floor")
        if progress is not None:
            progress(done, len(todo), cut, min_bits[cut])
    return Calibration(
        model_id=model_id or model_id_of(model), floor=float(floor), metric=metric, n_samples=n_samples,
        bits_candidates=tuple(cands), min_bits=tuple(min_bits),
        losses=tuple(tuple(d.items()) for d in losses), exits=exits,
    )


#: Largest semantic cache shipped in an assignment (labels x feature dim), to keep the JSON small.
MAX_EXIT_CACHE = 65536


def _exit_cache(activation: np.ndarray, labels: Any, reference: np.ndarray, floor: float) -> dict[str, Any] | None:
    """Warm per-label centres of the cut's pooled feature and calibrate the exit threshold within ``floor``."""
    from fleetpipe.context import SemanticCache

    feats = SemanticCache.feature(activation)
    n_labels = int(reference.reshape(reference.shape[0], -1).shape[1])
    labs = np.asarray(labels, dtype=np.int64).reshape(-1)
    if feats.shape[0] != labs.shape[0] or n_labels < 2 or n_labels * feats.shape[1] > MAX_EXIT_CACHE:
        return None
    if labs.min() < 0 or labs.max() >= n_labels:
        return None
    cache = SemanticCache(n_labels, feats.shape[1])
    cache.warm(feats, labs)
    threshold = cache.calibrate_threshold(feats, labs, np.argmax(reference.reshape(len(labs), -1), axis=1),
                                          floor)
    if not (math.isfinite(threshold) and threshold > 0):
        return None
    return {"threshold": float(threshold), "centres": cache.centres.round(6).tolist(),
            "counts": cache.counts.astype(int).tolist()}


def _bisect(cands: list[int], measure: Callable[[int], float], floor: float) -> int:
    """Lowest candidate with ``measure(b) <= floor`` assuming monotonicity; 32 when even the highest fails."""
    if not measure(cands[-1]) <= floor:
        return FULL_BITS
    lo, hi = 0, len(cands) - 1  # invariant: cands[hi] is measured within the floor
    while lo < hi:
        mid = (lo + hi) // 2
        if measure(cands[mid]) <= floor:
            hi = mid
        else:
            lo = mid + 1
    return cands[hi]


def _roundtrip(arr: np.ndarray, bits: int, batch: int) -> np.ndarray:
    """Quantize and dequantize ``arr`` one frame (``batch`` rows) at a time, as a node would send it."""
    a = np.asarray(arr)
    if not np.issubdtype(a.dtype, np.floating):
        return a
    if a.ndim == 0 or batch < 1 or a.shape[0] % batch:
        return np.asarray(codec.decode_tensor(codec.encode_tensor(a, bits)))
    out = np.empty_like(a)
    for s in range(0, a.shape[0], batch):
        out[s : s + batch] = codec.decode_tensor(codec.encode_tensor(a[s : s + batch], bits))
    return out


def _frames(graph: ModelGraph, inputs: np.ndarray | Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int, int]:
    """Feeds for the whole calibration set, the frame batch size and the sample count."""
    specs = {t.name: t for t in graph.inputs}
    if not isinstance(inputs, Mapping):
        if len(specs) != 1:
            raise ValueError(f"the model has inputs {sorted(specs)}; pass a mapping name -> array")
        inputs = {next(iter(specs)): inputs}
    feeds: dict[str, np.ndarray] = {}
    batch = n = None
    for name, spec in specs.items():
        if name not in inputs:
            raise ValueError(f"no calibration data for model input {name!r}")
        a = np.ascontiguousarray(inputs[name], dtype=np.dtype(spec.dtype))
        b = spec.shape[0] if spec.shape else 1
        if a.ndim != len(spec.shape) or a.shape[1:] != spec.shape[1:] or a.shape[0] % max(b, 1):
            raise ValueError(f"input {name!r}: data of shape {a.shape} does not stack frames of shape {spec.shape}")
        if batch is not None and (b != batch or a.shape[0] != n):
            raise ValueError("all model inputs must share the batch size and sample count")
        batch, n = b, a.shape[0]
        feeds[name] = a
    if not n:
        raise ValueError("the calibration set is empty")
    assert batch is not None
    return feeds, batch, n


def _is_classifier(graph: ModelGraph) -> bool:
    out = graph.outputs[0]
    return len(out.shape) == 2 and out.shape[1] >= 2 and out.dtype.startswith("float")


def _loss_fn(metric: str, reference: np.ndarray, labels: np.ndarray | None) -> Callable[[np.ndarray], float]:
    ref = np.asarray(reference)
    if metric == "rel_l2":
        norm = float(np.linalg.norm(ref)) or 1.0
        return lambda y: float(np.linalg.norm(np.asarray(y, dtype=np.float64) - ref)) / norm
    top = ref.reshape(ref.shape[0], -1).argmax(axis=1)
    if metric == "agreement":
        return lambda y: 1.0 - float(np.mean(np.asarray(y).reshape(len(top), -1).argmax(axis=1) == top))
    assert labels is not None
    acc_full = float(np.mean(top == labels))
    return lambda y: acc_full - float(np.mean(np.asarray(y).reshape(len(top), -1).argmax(axis=1) == labels))


class _Runner:
    """Runs a model (or slice) on stacked frames: in one batched call when the batch dimension can be freed."""

    def __init__(self, proto: Any, batch: int) -> None:
        from fleetpipe.models.slicing import make_session

        self._batch = batch
        self._single = make_session(proto)
        self._batched = None
        freed, self._freed = _free_batch(proto, batch)
        try:
            self._batched = make_session(freed) if self._freed else None
        except Exception:  # a hard-coded batch (e.g. Reshape) keeps the per-frame path
            self._batched = None

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output, stacked over frames."""
        from fleetpipe.models.slicing import run_model

        n = next(iter(feeds.values())).shape[0]
        if self._batched is not None:
            try:
                outs = run_model(self._batched, feeds)
            except Exception:
                outs = None
            if outs is not None and all(outs[k].shape[:1] == (n,) for k in self._freed if k in outs):
                return outs
            self._batched = None  # the batch is baked into the graph: run frame by frame
        names = [i.name for i in self._single.get_inputs()]
        parts = [run_model(self._single, {k: feeds[k][s : s + self._batch] for k in names})
                 for s in range(0, n, self._batch)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _free_batch(proto: Any, batch: int) -> tuple[Any, tuple[str, ...]]:
    """A copy of ``proto`` whose graph inputs and outputs have a symbolic leading dimension, and the freed outputs."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    del out.graph.value_info[:]
    inits = {t.name for t in out.graph.initializer}
    freed: list[str] = []
    for vi in (*[v for v in out.graph.input if v.name not in inits], *out.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == batch:
            dims[0].Clear()
            dims[0].dim_param = "N"
        if dims and not dims[0].HasField("dim_value"):
            freed.append(vi.name)
    return out, tuple(freed)
