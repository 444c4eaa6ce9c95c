"""Per-cut bit-width floors at plan time: never ship a width that costs more output error than allowed.

Two sources of a cut's floor (the lowest activation bit-width the cut may be sent at):

- a **calibration** (``fleetpipe calibrate``, COACH): its per-cut ``min_bits``, measured on real samples;
- otherwise **probe tolerance**: the lowest width whose *end-to-end* output error on synthetic probe inputs
  stays within ``tolerance`` (relative L2 per model output, worst over the probes; default 1 %). Probes match
  the model's input specs: uniform noise, a smoothed random field (image-like), the same field thresholded
  into flat regions with edges, a page (rows of small dark glyph blocks on white: what text and object
  detectors respond to), and standard normal values. A probe on which an output is near-empty (under 1 % of
  the largest probe's norm: a detector's map on noise) is not judged on that output. Bisection over the
  codec's widths (2..8, 16); a cut that misses the tolerance even at 16 bits is sent at 32. A probe error
  must stay within half the tolerance (:data:`PROBE_MARGIN`): a few probes underestimate the worst of many
  streamed frames.

A plan ships ``max(requested, floor)`` per cut (a calibration ships its floors, as COACH does), and the whole
chain is then checked on the probes with every chosen cut quantized at once: while the end-to-end error is
over the tolerance, the cut with the largest error of its own is raised one width and the plan re-solved.
Only the cuts a solver actually picks are probed (a re-solve probes the new ones), and errors are cached
per model, cut and width for the life of the process, so a re-plan costs nothing new.

:func:`plan_with_floors` is the planner's entry point; :func:`choose_bits` is what a script (the corpus
bench) calls for a model and a list of cuts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np

from fleetpipe.accuracy import DEFAULT_TOLERANCE, rel_l2
from fleetpipe.errors import FleetpipeError

__all__ = [
    "CANDIDATES",
    "PROBES",
    "PROBE_MARGIN",
    "BitChoice",
    "BitFloorUnavailable",
    "BitPlan",
    "FloorFinder",
    "choose_bits",
    "plan_model_bits",
    "plan_with_floors",
    "probe_inputs",
    "solve_problem",
]

#: Widths the codec quantizes to below float32, tried by bisection.
CANDIDATES = (2, 3, 4, 5, 6, 7, 8, 16)
FULL_BITS = 32
PROBES = ("uniform", "smooth", "edges", "page", "normal")
# A probe whose reference output has less than this share of the largest probe's norm (for that output) is not
# judged on it: a detector's empty map on noise is all ~0, and relative error there measures nothing.
_EMPTY_SHARE = 0.01
#: A width is accepted when its probe error is within this share of the tolerance: a few probes underestimate
#: the worst of many streamed frames (up to 1.85x over 16 random frames on MediaPipe's face detector).
PROBE_MARGIN = 0.5
_MAX_ROUNDS = 8
# (model key, cut, bits) -> worst error; (model key, stage cuts, bits) -> chain error. Process-wide.
_ERRORS: dict[tuple[Any, ...], float] = {}


class BitFloorUnavailable(FleetpipeError):
    """The model cannot be run split on this host, so no probe floor can be measured."""


@dataclass(frozen=True, slots=True)
class BitChoice:
    """The width shipped at one cut and why."""

    cut: int  # after this layer (0-based)
    bits: int
    floor: int
    source: str  # "calibrated floor", "probe tolerance", "requested" (floors off)
    error: float | None = None  # probe error at ``bits`` (worst rel L2 over outputs and probes)
    requested: int = FULL_BITS

    def why(self) -> str:
        """``cut 3: 16 bits (probe tolerance: floor 16, 8 bits exceed it)`` and the like."""
        err = "" if self.error is None else f", probe error {self.error:.2g}"
        if self.source == "requested":
            return f"cut {self.cut}: {self.bits} bits (as requested, floors off)"
        if self.source == "calibrated floor":
            return f"cut {self.cut}: {self.bits} bits (calibrated floor {self.floor})"
        raised = f"raised from {self.requested}" if self.bits > self.requested else "within it"
        return f"cut {self.cut}: {self.bits} bits ({self.source}: {raised}{err})"


@dataclass(frozen=True, slots=True)
class BitPlan:
    """Every shipped cut's choice, and the chain's end-to-end probe error (None: not probed)."""

    choices: tuple[BitChoice, ...]
    source: str  # "calibrated floor" | "probe tolerance" | "requested"
    tolerance: float
    end_to_end: float | None = None

    def summary(self) -> str:
        """The one log line per plan."""
        how = {"calibrated floor": "calibrated floors (COACH)",
               "probe tolerance": f"probe tolerance {100 * self.tolerance:g} % rel L2 per output (probes within "
                                  f"{100 * self.tolerance * PROBE_MARGIN:g} %)",
               "requested": "the request (bit floors off)"}[self.source]
        cuts = "; ".join(c.why() for c in self.choices) or "no cut (one stage)"
        e2e = "" if self.end_to_end is None else f"; end-to-end probe error {self.end_to_end:.2g}"
        return f"bit-widths from {how}: {cuts}{e2e}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"source": self.source, "tolerance": self.tolerance, "end_to_end_error": self.end_to_end,
                "cuts": [{"after_layer": c.cut, "bits": c.bits, "floor": c.floor, "source": c.source,
                          "error": c.error} for c in self.choices]}

    def floor_of(self, cut: int) -> int | None:
        """The floor of a shipped cut (None when not shipped)."""
        return next((c.floor for c in self.choices if c.cut == cut), None)


def probe_inputs(graph: Any, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """One frame per probe kind (:data:`PROBES`): a value for every model input at its pinned shape and dtype."""
    rng = np.random.default_rng(seed)
    return [{spec.name: _probe(kind, tuple(int(d) for d in spec.shape), np.dtype(spec.dtype), rng)
             for spec in graph.inputs} for kind in PROBES]


Frames = list[dict[str, np.ndarray]]


class FloorFinder:
    """Probe errors and floors of one model (ONNX, or TFLite through ``loaded``), cached; see the module docstring.

    Every probe frame runs on its own, as a node runs one message: inputs need not share a batch axis.
    """

    def __init__(self, proto: Any, graph: Any, *, tolerance: float = DEFAULT_TOLERANCE,
                 candidates: Sequence[int] = CANDIDATES, feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
                 key: str | None = None, loaded: Any = None) -> None:
        """``proto``: an ONNX ModelProto, or TFLite bytes with ``loaded`` (``models.source.LoadedModel``);
        ``feeds``: the probe frames (default :func:`probe_inputs`)."""
        if not (tolerance > 0 and math.isfinite(tolerance)):
            raise ValueError(f"tolerance must be finite and > 0, not {tolerance}")
        onnx_model = hasattr(proto, "graph") and hasattr(proto, "SerializeToString")
        self._tflite = loaded if not onnx_model and getattr(loaded, "kind", None) == "tflite" else None
        # Raised on first use (so a planner falls back to 32 bits, never to unchecked widths).
        self._unavailable = None if onnx_model or self._tflite is not None else (
            f"probe floors need an ONNX or TFLite model, not {type(proto).__name__}")
        self.proto, self.graph, self.tolerance = proto, graph, float(tolerance)
        self.limit = self.tolerance * PROBE_MARGIN  # what a probe error must stay within
        self.candidates = sorted({int(b) for b in candidates})
        self.frames: Frames = [dict(f) for f in feeds] if feeds is not None else probe_inputs(graph)
        if not self.frames:
            raise ValueError("no probe frames")
        self.key = key or _model_key(proto.SerializeToString() if onnx_model else bytes(proto))
        self._cuts: list[int] = []
        self._exact: dict[int, Frames] = {}
        self._reference: Frames | None = None
        self._runners: dict[tuple[int, int], _FrameRunner] = {}

    @property
    def n_probes(self) -> int:
        """Probe frames."""
        return len(self.frames)

    def error(self, cut: int, bits: int) -> float:
        """Worst rel L2 over outputs and probes with only ``cut`` sent at ``bits``."""
        if bits >= FULL_BITS:
            return 0.0
        k = (self.key, self._probe_key(), int(cut), int(bits))
        if k not in _ERRORS:
            exact = self._register([cut])
            _ERRORS[k] = self._worst(self._tail(cut, _send(exact[cut], bits), {}))
        return _ERRORS[k]

    def add_cuts(self, cuts: Sequence[int]) -> None:
        """Announce cuts about to be probed, so the model is sliced once at all of them (not cut by cut)."""
        self._register(cuts)

    def floor(self, cut: int, at_most: int | None = None) -> int:
        """The lowest candidate width within the tolerance at ``cut`` (32 when even the highest misses it).

        With ``at_most``, a width within the tolerance there ends the search: the floor is reported as
        ``at_most`` (the planner ships ``max(requested, floor)``, so lower widths need no probing).
        """
        from fleetpipe.models.calibrate import _bisect

        cands = self.candidates
        if at_most is not None and at_most in cands:
            if self.error(cut, at_most) <= self.limit:
                return int(at_most)
            cands = [b for b in cands if b > at_most]
            if not cands:
                return FULL_BITS
        return _bisect(cands, lambda b: self.error(cut, b), self.limit)

    def chain_error(self, cut_bits: Mapping[int, int]) -> float:
        """Worst rel L2 with every cut in ``cut_bits`` sent at its width (the stages run one after another)."""
        cuts = sorted(cut_bits)
        if not cuts:
            return 0.0
        if len(cuts) == 1:
            return self.error(cuts[0], int(cut_bits[cuts[0]]))
        k = (self.key, self._probe_key(), tuple((c, int(cut_bits[c])) for c in cuts))
        if k not in _ERRORS:
            exact = self._register(cuts)
            sent = _send(exact[cuts[0]], int(cut_bits[cuts[0]]))
            _ERRORS[k] = self._worst(self._tail(cuts[0], sent, {c: int(cut_bits[c]) for c in cuts[1:]}))
        return _ERRORS[k]

    # -- internals --------------------------------------------------------------------------------
    # The model runs as segments between the cuts probed so far (each segment slice built once, so the
    # slices serialised add up to about one model, whatever the number of cuts); the exact values at every
    # probed cut are kept, and a probe runs only the segments after its cut.

    def _probe_key(self) -> tuple[Any, ...]:
        return (len(self.frames), *((n, v.shape, str(v.dtype)) for n, v in sorted(self.frames[0].items())))

    def _register(self, cuts: Sequence[int]) -> dict[int, Frames]:
        """Add ``cuts`` to the segment boundaries; the exact crossing values at every boundary."""
        if self._unavailable:
            raise BitFloorUnavailable(self._unavailable)
        self._cuts = sorted(set(self._cuts) | {int(c) for c in cuts})
        prev = -1
        for c in self._cuts:
            if c not in self._exact:
                self._exact[c] = self._run(prev + 1, c, self._exact.get(prev, self.frames))
            prev = c
        return self._exact

    def _tail(self, cut: int, values: Frames, quantize: Mapping[int, int]) -> Frames:
        """Run the segments after ``cut`` from ``values``, sending the boundaries in ``quantize`` at their bits."""
        last = len(self.graph.layers) - 1
        first = cut + 1
        out = values
        for b in [*(c for c in self._cuts if c > cut), last]:
            out = self._run(first, b, out)
            if b in quantize:
                out = _send(out, quantize[b])
            first = b + 1
        return out

    def _run(self, first: int, last: int, values: Frames) -> Frames:
        from fleetpipe.models.slicing import slice_model

        if self._unavailable:
            raise BitFloorUnavailable(self._unavailable)
        key = (first, last)
        if key not in self._runners:
            whole = (first, last) == (0, len(self.graph.layers) - 1)
            try:
                if self._tflite is not None:
                    model: Any = bytes(self.proto) if whole else self._tflite.slice(first, last)
                else:
                    model = self.proto if whole else slice_model(self.proto, self.graph, first, last)
            except Exception as exc:
                raise BitFloorUnavailable(f"cannot slice layers {first}..{last}: {type(exc).__name__}: {exc}") from exc
            self._runners[key] = _FrameRunner(model)
        # A slice reads model inputs too when they are live across its first cut.
        return [self._runners[key].run({**feeds, **v}) for feeds, v in zip(self.frames, values, strict=True)]

    def _worst(self, outs: Frames) -> float:
        if self._reference is None:
            first = self._cuts[0] if self._cuts else None
            self._reference = (self._run(0, len(self.graph.layers) - 1, self.frames) if first is None
                               else self._tail(first, self._exact[first], {}))
        worst = 0.0
        for spec in self.graph.outputs:
            refs = [r[spec.name] for r in self._reference]
            norms = [_norm(r) for r in refs]
            top = max(norms)
            for ref, got, n in zip(refs, (o[spec.name] for o in outs), norms, strict=True):
                if n >= _EMPTY_SHARE * top:
                    worst = max(worst, rel_l2(got, ref))
        return worst


class _FrameRunner:
    """One onnxruntime session (ONNX proto) or LiteRT interpreter (TFLite bytes), run one frame at a time."""

    def __init__(self, model: Any) -> None:
        self.runtime = "LiteRT" if isinstance(model, bytes | bytearray) else "onnxruntime"
        try:
            if self.runtime == "LiteRT":
                from fleetpipe.models.profile import _LiteRT
                from fleetpipe.models.tflite import _tensor_names

                self.lite = _LiteRT(bytes(model), 1)
                names = _tensor_names(bytes(model))
                self.names = [names[d["index"]] for d in self.lite._interp.get_input_details()]
            else:
                from fleetpipe.models.slicing import make_session

                self.session = make_session(model)
                self.names = [i.name for i in self.session.get_inputs()]
        except Exception as exc:  # the runtime cannot load it here: no floor can be measured
            raise BitFloorUnavailable(f"{self.runtime} cannot load the model: {type(exc).__name__}: {exc}") from exc

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output for one frame's feeds (only the inputs this model reads are passed)."""
        try:
            if self.runtime == "LiteRT":
                self.lite.feed({k: feeds[k] for k in self.names})
                return {k: np.array(v) for k, v in self.lite.run().items()}  # copies: the interpreter reuses buffers
            from fleetpipe.models.slicing import run_model

            return run_model(self.session, {k: feeds[k] for k in self.names})
        except Exception as exc:
            raise BitFloorUnavailable(f"{self.runtime} failed on a probe: {type(exc).__name__}: {exc}") from exc


def _send(frames: Frames, bits: int) -> Frames:
    """Each frame's tensors as a node sends them at ``bits``: floats quantized and back, integers raw."""
    from fleetpipe import codec

    return [{n: (np.asarray(codec.decode_tensor(codec.encode_tensor(np.ascontiguousarray(v), bits)))
                 if np.issubdtype(np.asarray(v).dtype, np.floating) else v)
             for n, v in f.items()} for f in frames]


def plan_with_floors(solve: Callable[[np.ndarray], Any], n_layers: int, requested: int, *,
                     finder: FloorFinder | None = None, calibration: Any = None,
                     tolerance: float = DEFAULT_TOLERANCE) -> tuple[Any, BitPlan]:
    """Solve with per-cut floors; ``solve(min_bits)`` returns a result with ``.stages`` (``.last``, ``.bits``).

    With ``calibration``, its floors are the widths (COACH). With a ``finder``, each cut the solver picks is
    probed and ships ``max(requested, floor)``, then the chain is checked as a whole. With neither, every cut
    ships ``requested`` (floors off).
    """
    if calibration is not None:
        mb = np.asarray(calibration.min_bits_array(), dtype=np.int64)
        result = solve(mb)
        choices = tuple(BitChoice(s.last, int(s.bits), int(mb[s.last]), "calibrated floor", None, int(requested))
                        for s in result.stages[:-1])
        return result, BitPlan(choices, "calibrated floor", float(calibration.floor))
    base = np.full(n_layers, int(requested), dtype=np.int64)  # the last entry is no cut (results go out raw)
    if finder is None or requested >= FULL_BITS:
        result = solve(base)
        src = "requested" if finder is None else "probe tolerance"
        choices = tuple(BitChoice(s.last, int(s.bits), int(s.bits), src, None if finder is None else 0.0,
                                  int(requested)) for s in result.stages[:-1])
        return result, BitPlan(choices, src, tolerance, None if finder is None else 0.0)
    floors: dict[int, int] = {}
    raised: dict[int, int] = {}  # widths lifted by the chain check
    for _ in range(_MAX_ROUNDS):
        mb = base.copy()
        for c, f in floors.items():
            mb[c] = max(mb[c], f, raised.get(c, 0))
        result = solve(mb)
        cuts = [s.last for s in result.stages[:-1]]
        new = [c for c in cuts if c not in floors]
        if new:
            finder.add_cuts(new)
        for c in new:
            floors[c] = finder.floor(c, at_most=int(requested))
        if any(floors[c] > mb[c] for c in new):
            continue  # a picked cut needs more bits than the plan gave it: re-solve with its floor
        shipped = {s.last: int(s.bits) for s in result.stages[:-1]}
        e2e = finder.chain_error(shipped)
        if e2e <= finder.limit or not shipped:
            return result, _probe_plan(result, floors, finder, requested, e2e)
        worst = max((c for c in shipped if shipped[c] < FULL_BITS), key=lambda c: finder.error(c, shipped[c]),
                    default=None)
        if worst is None:
            return result, _probe_plan(result, floors, finder, requested, e2e)
        raised[worst] = next((b for b in [*finder.candidates, FULL_BITS] if b > shipped[worst]), FULL_BITS)
    # Out of rounds (the solver keeps moving its cuts): every cut at its floor, whatever it picks.
    mb = base.copy()
    for c in range(n_layers - 1):
        mb[c] = max(mb[c], floors.get(c) or finder.floor(c, at_most=int(requested)), raised.get(c, 0))
    result = solve(mb)
    shipped = {s.last: int(s.bits) for s in result.stages[:-1]}
    floors = {**floors, **{c: finder.floor(c, at_most=int(requested)) for c in shipped}}
    return result, _probe_plan(result, floors, finder, requested,
                               finder.chain_error(shipped))


def solve_problem(problem: Any, solve: Callable[[Any], Any], requested: int, *, finder: FloorFinder | None = None,
                  calibration: Any = None, tolerance: float = DEFAULT_TOLERANCE,
                  warn: Callable[[str], None] | None = None) -> tuple[Any, Any, BitPlan]:
    """:func:`plan_with_floors` for a planner ``Problem``: ``(problem as solved, result, bit plan)``.

    When the floors cannot be probed (:class:`BitFloorUnavailable`), every cut ships 32 bits and ``warn`` is
    told why.
    """
    from fleetpipe.planner.problem import _replace

    solved: dict[str, Any] = {}

    def run(min_bits: np.ndarray) -> Any:
        solved["problem"] = _replace(problem, min_bits=min_bits)
        return solve(solved["problem"])

    n = len(problem.layer_names)
    try:
        result, bit_plan = plan_with_floors(run, n, requested, finder=finder, calibration=calibration,
                                            tolerance=tolerance)
    except BitFloorUnavailable as exc:
        if warn is not None:
            warn(f"cannot probe bit floors ({exc}); shipping 32 bits at every cut (give a calibration, or turn "
                 f"bit floors off to ship the requested bits unchecked)")
        result, bit_plan = plan_with_floors(run, n, FULL_BITS)
    return solved["problem"], result, bit_plan


def plan_model_bits(problem: Any, info: Any, requested: int, solve: Callable[[Any], Any], *,
                    tolerance: float = DEFAULT_TOLERANCE, floors: bool = True,
                    calibration: str | None = None) -> tuple[Any, Any, BitPlan]:
    """``fleetpipe plan --model``: :func:`solve_problem` for a loaded model (``loop.ModelInfo``)."""
    import sys

    cal = None
    if calibration:
        from fleetpipe.models.calibrate import Calibration

        try:
            with open(calibration) as fh:
                cal = Calibration.from_json(fh.read())
        except OSError as exc:
            raise ValueError(f"cannot read calibration {calibration}: {exc}") from exc
        if cal.model_id != info.model_id:
            raise ValueError(f"calibration {calibration} is for model {cal.model_id}, not {info.model_id}")
    finder = FloorFinder(info.proto, info.graph, tolerance=tolerance, key=info.model_id,
                         loaded=getattr(info, "loaded", None)) if floors else None
    return solve_problem(problem, solve, requested, finder=finder, calibration=cal, tolerance=tolerance,
                         warn=lambda text: print(f"fleetpipe plan: {text}", file=sys.stderr))


def choose_bits(proto: Any, graph: Any, cuts: Sequence[int], requested: int = 8, *,
                tolerance: float = DEFAULT_TOLERANCE, calibration: Any = None, loaded: Any = None) -> BitPlan:
    """The widths a planner ships at fixed ``cuts`` (after-layer indices) of a model, and the probe error.

    For scripts (the corpus bench): the same rule as :func:`plan_with_floors` with the cuts given.
    """
    from types import SimpleNamespace

    cuts = sorted({int(c) for c in cuts})
    n = len(graph.layers)
    bounds = [-1, *cuts, n - 1]
    if cuts and cuts[-1] >= n - 1:
        raise ValueError(f"cuts must be after layers 0..{n - 2}, got {cuts}")

    def solve(mb: np.ndarray) -> Any:
        stages = [SimpleNamespace(first=a + 1, last=b, bits=int(mb[b])) for a, b in pairwise(bounds)]
        return SimpleNamespace(stages=stages)

    finder = None if calibration is not None else FloorFinder(proto, graph, tolerance=tolerance, loaded=loaded)
    return plan_with_floors(solve, n, requested, finder=finder, calibration=calibration, tolerance=tolerance)[1]


def _probe_plan(result: Any, floors: Mapping[int, int], finder: FloorFinder, requested: int,
                e2e: float) -> BitPlan:
    choices = tuple(BitChoice(s.last, int(s.bits), int(floors.get(s.last, s.bits)), "probe tolerance",
                              finder.error(s.last, int(s.bits)), int(requested)) for s in result.stages[:-1])
    return BitPlan(choices, "probe tolerance", finder.tolerance, e2e)


def _model_key(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()[:16]


def _probe(kind: str, shape: tuple[int, ...], dtype: np.dtype[Any], rng: np.random.Generator) -> np.ndarray:
    """One probe frame of ``shape``: see :data:`PROBES`."""
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    if dtype.kind in "iu":  # ids, indices, masks: small values any embedding or gather accepts
        return rng.integers(0, 2, shape).astype(dtype)
    if kind == "uniform":
        x = rng.random(shape)
    elif kind == "normal":
        x = rng.standard_normal(shape)
    else:
        x = _smooth_field(shape, rng)
        if kind == "edges":
            x = np.where(x > np.median(x), 0.9, 0.1) + 0.02 * rng.standard_normal(shape)
        elif kind == "page":
            x = _page(shape, rng)
    return x.astype(dtype)


def _page(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Rows of small dark blocks (glyphs) on a white background over the two largest axes, in [0, 1]."""
    axes = sorted(sorted((a for a in range(len(shape)) if shape[a] > 4), key=lambda a: -shape[a])[:2])
    if len(axes) < 2:
        return np.where(_smooth_field(shape, rng) > 0.5, 0.95, 0.05)
    h, w = shape[axes[0]], shape[axes[1]]
    img = np.full((h, w), 0.95)
    for _ in range(max(2, h // 12)):
        lh = int(rng.integers(max(2, h // 40), max(3, h // 16) + 1))
        top = int(rng.integers(0, max(1, h - lh)))
        left = int(rng.integers(0, max(1, w // 2)))
        right = min(w, left + int(rng.integers(max(4, w // 8), max(5, w // 2) + 1)))
        glyph, gap = max(1, int(0.6 * lh)), max(1, int(0.4 * lh))
        for x0 in range(left, right, glyph + gap):
            img[top : top + lh, x0 : min(right, x0 + glyph)] = 0.05
    view = [1] * len(shape)
    view[axes[0]], view[axes[1]] = h, w
    return np.broadcast_to(img.reshape(view), shape).copy()


def _norm(a: np.ndarray) -> float:
    r = np.asarray(a, dtype=np.float64)
    r = r[np.isfinite(r)]
    return float(np.linalg.norm(r))


def _smooth_field(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered noise over the (up to two) largest axes, scaled to [0, 1]: an image-like frame."""
    noise = rng.standard_normal(shape)
    axes = sorted((a for a in range(len(shape)) if shape[a] > 4), key=lambda a: -shape[a])[:2]
    if not axes:
        return rng.random(shape)
    spec = np.fft.rfftn(noise, axes=axes)
    gain: np.ndarray = np.ones(1)
    for i, a in enumerate(axes):
        freq = np.fft.rfftfreq(shape[a]) if i == len(axes) - 1 else np.fft.fftfreq(shape[a])
        g = np.exp(-0.5 * (freq * shape[a] / 3.0) ** 2)  # keeps some 3 cycles across the axis
        view = [1] * len(shape)
        view[a] = len(freq)
        gain = gain * g.reshape(view)
    field = np.fft.irfftn(spec * gain, s=[shape[a] for a in axes], axes=axes)
    lo, hi = float(field.min()), float(field.max())
    return (field - lo) / (hi - lo) if hi > lo else np.full(shape, 0.5)
