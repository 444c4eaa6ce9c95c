"""The planning problem: a layer chain, a fleet of devices and the links between them, as arrays.

A :class:`Problem` is built from plain arrays so that the runtime can construct it from real
measurements (per-layer profiles, measured bandwidths), and from the neutral JSON format of
``planner-problems/README.md`` through :meth:`Problem.from_json` / :func:`load_problem`.

Indices are 0-based everywhere in this package (layers ``0..L-1``, devices ``0..D-1``); only the
JSON/CLI boundary speaks 1-based layer numbers.

Units: milliseconds, bytes, Mbit/s (1e6 bit/s). A transfer of ``n`` bytes over ``bw`` Mbit/s takes
``n * 8 / (bw * 1000)`` ms; a bandwidth of 0 means there is no link.

Optional extensions (all off by default):

- ``min_bits[l]``: the activation after layer ``l`` may be sent quantized with any bit-width
  ``b`` in ``[min_bits[l], 32]``; ``out_bytes`` are float32 bytes, so the transfer shrinks by ``b / 32``.
  The calibration (COACH) decides ``min_bits``; memory keeps full-precision buffers (the receiver
  dequantizes).
- ``latency_bound_ms``: plans whose end-to-end latency exceeds it are infeasible.
- ``pins``: a layer range that must run on a given device (the device's stage contains the range).
- ``allow_replication``: a stage may be served by several devices (ScalPipe, shared subscription).
- Costs of the messages themselves (fleetpipe#23; all None: free, the classic model):
  ``hop_ms[d]`` is what device ``d`` spends per frame of a stage on receiving its input and sending its
  output (the broker client, framing, Python), ``byte_ms[d]`` its codec and copy cost per byte received
  or sent; both are compute of the stage. ``client_mbps[d]`` is the link between ``d`` and the client: a
  first stage receives the input over it, a last stage sends the result over it (a transfer like any
  other, a resource of its own). Shared by every stage: the broker relays each message of a frame (the input,
  every cut, the result) at ``broker_msg_ms`` each plus ``broker_byte_ms`` per byte, and a client keeping
  ``window`` frames in flight gets at most ``window`` results per end-to-end latency (Little's law). These two
  do not decompose over stages: the solver minimises the per-stage bottleneck and ``solve`` then compares its
  plan with merged and single-device plans by the full period (``PlanReport.period_ms``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleetpipe.errors import PlanningError

__all__ = ["FULL_BITS", "Pin", "Problem", "load_problem", "transfer_ms"]

FULL_BITS = 32


def transfer_ms(nbytes: float, bw_mbps: float) -> float:
    """Milliseconds to send ``nbytes`` over a link of ``bw_mbps`` Mbit/s (0 Mbit/s: no link, inf)."""
    bw = float(bw_mbps)
    return math.inf if bw <= 0 else float(nbytes) * 8.0 / (bw * 1000.0)


@dataclass(frozen=True, slots=True)
class Pin:
    """Layers ``first..last`` (0-based, inclusive) must run on ``device``."""

    first: int
    last: int
    device: int

    def __post_init__(self) -> None:
        if not 0 <= self.first <= self.last:
            raise ValueError(f"bad pinned layer range {self.first}..{self.last}")
        if self.device < 0:
            raise ValueError(f"bad pinned device index {self.device}")


def _frozen_array(value: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    arr = np.array(value, dtype=np.float64)
    if arr.shape != shape:
        raise ValueError(f"{what} has shape {arr.shape}, expected {shape}")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, slots=True, eq=False)
class Problem:
    """A chain of ``L`` layers to pipeline over ``D`` devices.

    ``compute_ms[l, d]`` is the time of layer ``l`` on device ``d``; ``out_bytes[l]`` the bytes of
    layer ``l``'s output; ``param_bytes[l]`` its resident weights; ``bw_mbps[a, b]`` the link
    ``a -> b`` (diagonal ignored). Arrays are copied and made read-only.
    """

    layer_names: tuple[str, ...]
    compute_ms: np.ndarray
    out_bytes: np.ndarray
    param_bytes: np.ndarray
    input_bytes: float
    device_names: tuple[str, ...]
    mem_bytes: np.ndarray
    bw_mbps: np.ndarray
    buffers_in: int = 0
    buffers_out: int = 0
    min_bits: np.ndarray | None = None
    latency_bound_ms: float | None = None
    pins: tuple[Pin, ...] = ()
    allow_replication: bool = False
    name: str = ""
    device_types: tuple[str, ...] = field(default=())
    hop_ms: np.ndarray | None = None
    byte_ms: np.ndarray | None = None
    client_mbps: np.ndarray | None = None
    broker_msg_ms: float = 0.0
    broker_byte_ms: float = 0.0
    window: int | None = None

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.layer_names)
        devs = tuple(str(n) for n in self.device_names)
        n_layers, n_dev = len(names), len(devs)
        if n_layers == 0 or n_dev == 0:
            raise ValueError("a problem needs at least one layer and one device")
        if len(set(devs)) != n_dev:
            raise ValueError("device names must be unique")
        setattr_ = object.__setattr__
        setattr_(self, "layer_names", names)
        setattr_(self, "device_names", devs)
        setattr_(self, "compute_ms", _frozen_array(self.compute_ms, (n_layers, n_dev), "compute_ms"))
        setattr_(self, "out_bytes", _frozen_array(self.out_bytes, (n_layers,), "out_bytes"))
        setattr_(self, "param_bytes", _frozen_array(self.param_bytes, (n_layers,), "param_bytes"))
        setattr_(self, "mem_bytes", _frozen_array(self.mem_bytes, (n_dev,), "mem_bytes"))
        bw = np.array(self.bw_mbps, dtype=np.float64)
        if bw.shape != (n_dev, n_dev):
            raise ValueError(f"bw_mbps has shape {bw.shape}, expected {(n_dev, n_dev)}")
        np.fill_diagonal(bw, np.inf)
        bw.setflags(write=False)
        setattr_(self, "bw_mbps", bw)
        setattr_(self, "input_bytes", float(self.input_bytes))
        for what, arr in (("compute_ms", self.compute_ms), ("out_bytes", self.out_bytes),
                          ("param_bytes", self.param_bytes), ("mem_bytes", self.mem_bytes)):
            if not np.all(np.isfinite(arr)) or np.any(arr < 0):
                raise ValueError(f"{what} must be finite and >= 0")
        if np.any(bw < 0) or np.any(np.isnan(bw)):
            raise ValueError("bandwidths must be >= 0 Mbit/s (0: no link)")
        if self.input_bytes < 0 or self.buffers_in < 0 or self.buffers_out < 0:
            raise ValueError("input_bytes and buffer counts must be >= 0")
        if self.min_bits is not None:
            mb = np.array(self.min_bits, dtype=np.int64)
            if mb.shape != (n_layers,) or np.any(mb < 1) or np.any(mb > FULL_BITS):
                raise ValueError(f"min_bits must be {n_layers} integers in 1..{FULL_BITS}")
            mb.setflags(write=False)
            setattr_(self, "min_bits", mb)
        if self.latency_bound_ms is not None and not self.latency_bound_ms > 0:
            raise ValueError("latency_bound_ms must be > 0")
        pins = tuple(self.pins)
        for pin in pins:
            if pin.last >= n_layers or pin.device >= n_dev:
                raise ValueError(f"pin {pin} is outside the problem")
        setattr_(self, "pins", pins)
        types = tuple(self.device_types) or devs
        if len(types) != n_dev:
            raise ValueError("device_types must name one type per device")
        setattr_(self, "device_types", types)
        if not (math.isfinite(self.broker_msg_ms) and math.isfinite(self.broker_byte_ms)) or \
                self.broker_msg_ms < 0 or self.broker_byte_ms < 0:
            raise ValueError("broker_msg_ms and broker_byte_ms must be finite and >= 0")
        if self.window is not None and self.window < 1:
            raise ValueError("window must be >= 1 frame")
        for what in ("hop_ms", "byte_ms", "client_mbps"):
            value = getattr(self, what)
            if value is not None:
                arr = _frozen_array(value, (n_dev,), what)
                if np.any(np.isnan(arr)) or np.any(arr < 0) or (what != "client_mbps" and not np.all(np.isfinite(arr))):
                    raise ValueError(f"{what} must be >= 0" + ("" if what == "client_mbps" else " and finite"))
                setattr_(self, what, arr)

    # -- sizes and small helpers ---------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        return len(self.layer_names)

    @property
    def n_devices(self) -> int:
        return len(self.device_names)

    def cut_bits(self, layer: int) -> int:
        """The lowest bit-width allowed for the activation after ``layer`` (32 without calibration)."""
        return FULL_BITS if self.min_bits is None else int(self.min_bits[layer])

    def cut_bytes(self, layer: int, bits: int = FULL_BITS) -> float:
        """Bytes on the wire for the activation after ``layer`` sent at ``bits``."""
        return float(self.out_bytes[layer]) * bits / FULL_BITS

    def in_bytes(self, layer: int) -> float:
        """Bytes of the input of ``layer``."""
        return self.input_bytes if layer == 0 else float(self.out_bytes[layer - 1])

    def message_ms(self, device: int, first: int, last: int, bits_in: int = FULL_BITS,
                   bits_out: int = FULL_BITS) -> float:
        """What device ``device`` spends per frame on the messages of a stage ``first..last`` (0 without
        ``hop_ms``/``byte_ms``): the fixed cost plus the bytes it receives and sends. The input from the
        client and the result to it travel at full precision; a cut at ``bits_in``/``bits_out``."""
        fixed = 0.0 if self.hop_ms is None else float(self.hop_ms[device])
        if self.byte_ms is None:
            return fixed
        got = self.input_bytes if first == 0 else self.cut_bytes(first - 1, bits_in)
        sent = float(self.out_bytes[last]) if last == self.n_layers - 1 else self.cut_bytes(last, bits_out)
        return fixed + float(self.byte_ms[device]) * (got + sent)

    def client_ms(self, device: int, nbytes: float) -> float:
        """Transfer time of ``nbytes`` between ``device`` and the client (0 without ``client_mbps``)."""
        if self.client_mbps is None:
            return 0.0
        return transfer_ms(nbytes, float(self.client_mbps[device]))

    def stage_mem_bytes(self, first: int, last: int) -> float:
        """Memory a device needs to host layers ``first..last`` (README memory model)."""
        buf_in = 1 + (self.buffers_in if first > 0 else 0)
        return (float(self.param_bytes[first : last + 1].sum()) + self.in_bytes(first) * buf_in
                + float(self.out_bytes[last]) * (1 + self.buffers_out))

    def without_devices(self, dead: Iterable[int]) -> Problem:
        """The same problem with devices ``dead`` removed (indices of the rest shift down)."""
        dead_set = set(dead)
        keep = [d for d in range(self.n_devices) if d not in dead_set]
        if not keep:
            raise PlanningError("no device left")
        remap = {d: i for i, d in enumerate(keep)}
        pins = tuple(Pin(p.first, p.last, remap[p.device]) for p in self.pins if p.device in remap)
        per_device = {k: getattr(self, k)[keep] for k in ("hop_ms", "byte_ms", "client_mbps")
                      if getattr(self, k) is not None}
        return _replace(self, compute_ms=self.compute_ms[:, keep],
                        device_names=tuple(self.device_names[d] for d in keep),
                        device_types=tuple(self.device_types[d] for d in keep),
                        mem_bytes=self.mem_bytes[keep], bw_mbps=self.bw_mbps[np.ix_(keep, keep)], pins=pins,
                        **per_device)

    def device_index(self, name: str) -> int:
        try:
            return self.device_names.index(name)
        except ValueError:
            raise PlanningError(f"unknown device {name!r}") from None

    # -- the neutral JSON format ---------------------------------------------------------------

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Problem:
        """Build a problem from the neutral JSON format (see planner-problems/README.md).

        Extensions (optional keys): per layer ``min_bits``; top level ``latency_bound_ms``,
        ``allow_replication`` and ``pins`` (``[{"device": NAME, "first_layer": i, "last_layer": j}]``,
        1-based inclusive); per device ``hop_ms``, ``byte_ms`` and ``client_mbps`` (all devices or none).
        """
        try:
            return _from_json(cls, doc)
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanningError(f"invalid problem: {type(exc).__name__}: {exc}") from exc


def load_problem(path: str | Path) -> Problem:
    """Read a problem from a JSON file in the neutral format."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanningError(f"cannot read problem {path}: {exc}") from exc
    return Problem.from_json(doc)


def _replace(problem: Problem, **changes: Any) -> Problem:
    values = {name: getattr(problem, name) for name in Problem.__dataclass_fields__}
    values.update(changes)
    return Problem(**values)


def _from_json(cls: type[Problem], doc: Mapping[str, Any]) -> Problem:
    layers: Sequence[Mapping[str, Any]] = doc["layers"]
    devices: Sequence[Mapping[str, Any]] = doc["devices"]
    types = [str(d["type"]) for d in devices]
    compute = [[float(layer["compute_ms"][t]) for t in types] for layer in layers]
    n_dev = len(devices)
    if "bandwidth_matrix_mbps" in doc:
        bw = np.array(doc["bandwidth_matrix_mbps"], dtype=np.float64)
    elif n_dev > 0 and all("nic_mbps" in d for d in devices):
        nic = np.array([float(d["nic_mbps"]) for d in devices])
        bw = np.minimum(nic[:, None], nic[None, :])
    elif "bandwidth_mbps" in doc:
        bw = np.full((n_dev, n_dev), float(doc["bandwidth_mbps"]))
    else:
        raise ValueError("no bandwidth given (bandwidth_matrix_mbps, nic_mbps or bandwidth_mbps)")
    mm = doc.get("memory_model") or {}
    min_bits = None
    if any("min_bits" in layer for layer in layers):
        min_bits = [int(layer.get("min_bits", FULL_BITS)) for layer in layers]
    names = [str(d["name"]) for d in devices]
    pins = []
    for pin in doc.get("pins", ()):
        device = names.index(str(pin["device"]))
        pins.append(Pin(int(pin["first_layer"]) - 1, int(pin["last_layer"]) - 1, device))
    bound = doc.get("latency_bound_ms")
    per_device: dict[str, Any] = {k: float(doc[k]) for k in ("broker_msg_ms", "broker_byte_ms") if k in doc}
    if "window" in doc:
        per_device["window"] = int(doc["window"])
    for key in ("hop_ms", "byte_ms", "client_mbps"):
        if any(key in d for d in devices):
            per_device[key] = [float(d[key]) for d in devices]
    return cls(
        layer_names=tuple(str(layer["name"]) for layer in layers),
        compute_ms=np.array(compute, dtype=np.float64).reshape(len(layers), n_dev),
        out_bytes=[float(layer["out_bytes"]) for layer in layers],
        param_bytes=[float(layer.get("param_bytes", 0)) for layer in layers],
        input_bytes=float(doc.get("input_bytes", 0)),
        device_names=tuple(names),
        mem_bytes=[float(d["mem_bytes"]) for d in devices],
        bw_mbps=bw,
        buffers_in=int(mm.get("buffers_in", 0)),
        buffers_out=int(mm.get("buffers_out", 0)),
        min_bits=min_bits,
        latency_bound_ms=None if bound is None else float(bound),
        pins=tuple(pins),
        allow_replication=bool(doc.get("allow_replication", False)),
        name=str(doc.get("name", "")),
        device_types=tuple(types),
        **per_device,
    )
