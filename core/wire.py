"""The wire contract: every message fleetpipe puts on MQTT, and ``encode``/``decode`` to bytes.

Theory of operation. Each message is a frozen dataclass with a ``TAG`` and validates itself in
``__post_init__`` (``TypeError`` for a wrong type, ``ValueError`` for a bad value; ints given for float
fields become floats, lists become tuples, mappings become read-only). ``encode`` writes an envelope
``{"v": WIRE_VERSION, "type": TAG, ...fields}``: control messages as compact JSON (readable with
``mosquitto_sub``), data messages (:class:`Activation`, :class:`Result`, :class:`SliceChunk`,
:class:`PartRequest`, :class:`PartReply`) as msgpack
with raw tensor bytes (:mod:`fleetpipe.codec`). ``decode`` tells the two apart by the first byte (``{`` is
JSON; a msgpack map never starts with it), checks size, version, tag and every field's type, and raises
:class:`~fleetpipe.errors.DecodeError` naming the offending field, or
:class:`~fleetpipe.errors.VersionMismatch`. Any bytes at all give a message or one of these errors.

Data messages with big binary values (tensor payloads, slice chunks: ``>= BLOB_MIN`` bytes) are framed
as the msgpack array ``[blob, envelope]``: ``0x92``, a bin32 ``blob`` holding every big value (each at a
16-byte aligned offset of the message), then the envelope map, in which each big value is replaced by an
ext ``REF_EXT`` of 16 bytes (big-endian u64 offset and length into the blob). Encoding copies each
payload once (``bytes.join``; a plain ``msgpack.packb`` copies it twice); decoding copies none: the
envelope is unpacked from the bytes after the blob and every reference becomes a ``memoryview`` slice of
the message, so ``np.frombuffer`` decodes raw tensors in place. Any msgpack reader still reads the frame.

This module is sans-IO: it imports only the standard library, msgpack, numpy and fleetpipe.codec/errors.
"""

from __future__ import annotations

import json
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields, is_dataclass
from typing import Any, ClassVar, Union

import msgpack

from fleetpipe.codec import MAX_DECODED_BYTES, EncodedTensor, from_wire, to_wire
from fleetpipe.errors import DecodeError, EncodeError, VersionMismatch

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_PACKET_BYTES",
    "MESSAGE_TYPES",
    "NAME_PATTERN",
    "PLANNER_ID",
    "PLAN_STATUSES",
    "WIRE_VERSION",
    "Activation",
    "EmulationControl",
    "ErrorReport",
    "ExitCache",
    "Hop",
    "Message",
    "Metrics",
    "NodeBirth",
    "NodeDeath",
    "NodeHealth",
    "NodeProfile",
    "PartReply",
    "PartRequest",
    "Plan",
    "PlanStage",
    "PlannerState",
    "Result",
    "SliceChunk",
    "SliceRequest",
    "SplitAssign",
    "SplitPart",
    "SplitUnit",
    "StageAssign",
    "decode",
    "encode",
    "is_binary",
]

WIRE_VERSION = 1
#: Inputs larger than this are rejected by :func:`decode` unless the caller passes ``max_bytes``.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
PLAN_STATUSES = frozenset({"active", "infeasible"})
#: The node name under which the planner publishes its state and metrics (no node may take it).
PLANNER_ID = "planner"
#: The one bound on an MQTT packet: a payload of DEFAULT_MAX_BYTES plus room for the topic and properties. The
#: shipped broker configs set ``max_packet_size`` to it and every MqttBus announces it as its CONNECT Maximum
#: Packet Size, so the broker refuses (and never forwards) what no fleetpipe process would accept.
MAX_PACKET_BYTES = DEFAULT_MAX_BYTES + 64 * 1024
#: Fleet names, node ids and client ids appear in topics, so they are restricted to this.
NAME_PATTERN = r"[A-Za-z0-9_.-]{1,64}"

_NAME = re.compile(NAME_PATTERN + r"\Z")
_FRAME_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}\Z")
_HASH = re.compile(r"[A-Za-z0-9_.-]{1,128}\Z")
_INT_MAX = 2**63 - 1
_STR_MAX = 65536
_SEQ_MAX = 4096
_BITS = frozenset({2, 3, 4, 5, 6, 7, 8, 16, 32})
# Fields added after a message type shipped: left out of the encoding when None, so older peers decode it.
_OMIT_NONE = frozenset({"min_bits"})
#: Binary values of data messages at least this large travel in the frame's blob (see the module docstring).
BLOB_MIN = 1024
#: msgpack ext type code of a blob reference.
REF_EXT = 1
_BLOB_HEAD = 6  # 0x92, 0xc6, u32 blob length
_ALIGN = 16


class _Msg:
    """Shared validation for message dataclasses (type coercion driven by the annotations)."""

    __slots__ = ()
    TAG: ClassVar[str]
    BINARY: ClassVar[bool] = False

    def __post_init__(self) -> None:
        setattr_ = object.__setattr__
        for name, chk in _plan(type(self)).checks:
            setattr_(self, name, chk(getattr(self, name), name))
        self._validate()

    def _validate(self) -> None:
        """Value checks beyond types; overridden per message."""


@dataclass(frozen=True, slots=True)
class NodeBirth(_Msg):
    """A node's capabilities, retained on its state topic while it lives."""

    TAG: ClassVar[str] = "node_birth"
    fleet: str
    node_id: str
    seq: int
    ts: float
    arch: str
    cores: int
    mem_bytes: int
    runtimes: tuple[str, ...]
    providers: tuple[str, ...]
    device_class: str
    speed: float
    emulate_factor: float = 1.0
    bandwidth_mbps: float | None = None
    profile: Mapping[str, float] | None = None

    def _validate(self) -> None:
        _names(self, "fleet", "node_id")
        _nonneg(self, "seq", "ts", "mem_bytes", "emulate_factor")
        _positive(self, "cores", "speed")
        if self.bandwidth_mbps is not None and self.bandwidth_mbps <= 0:
            raise ValueError("bandwidth_mbps must be > 0 or None")
        if self.profile is not None and any(v < 0 for v in self.profile.values()):
            raise ValueError("profile times must be >= 0")


@dataclass(frozen=True, slots=True)
class NodeDeath(_Msg):
    """A node is gone (also its MQTT last will); ``seq`` matches the birth it ends."""

    TAG: ClassVar[str] = "node_death"
    fleet: str
    node_id: str
    seq: int
    ts: float
    reason: str = ""

    def _validate(self) -> None:
        _names(self, "fleet", "node_id")
        _nonneg(self, "seq", "ts")


@dataclass(frozen=True, slots=True)
class PlannerState(_Msg):
    """The planner's birth (``online``) and death, retained on ``node/planner/state`` (Sparkplug's primary host
    STATE). ``planner_id`` is a fresh session id per process start; ``seq`` grows with every (re)connect.

    The last will is fixed at connect, so a will says ``ts=0`` (time unknown when it was written): a receiver
    stamps its arrival. A clean shutdown publishes its death with the real time.
    """

    TAG: ClassVar[str] = "planner_state"
    fleet: str
    planner_id: str
    seq: int
    online: bool
    ts: float
    reason: str = ""

    @property
    def node_id(self) -> str:
        """The reserved node name whose state topic carries the planner's (``topics.check`` binds it)."""
        return PLANNER_ID

    def _validate(self) -> None:
        _names(self, "fleet")
        _nonneg(self, "seq", "ts")
        if not self.planner_id or len(self.planner_id) > 64:
            raise ValueError("planner_id must be 1..64 characters")


@dataclass(frozen=True, slots=True)
class NodeHealth(_Msg):
    """Periodic load and pipeline statistics of one node."""

    TAG: ClassVar[str] = "node_health"
    fleet: str
    node_id: str
    seq: int
    ts: float
    load: float = 0.0
    mem_used_bytes: int = 0
    queue_depth: int = 0
    frames_in: int = 0
    frames_out: int = 0
    errors: int = 0
    stage: int | None = None
    epoch: int = 0
    compute_ms_avg: float = 0.0
    transfer_ms_avg: float = 0.0
    idle_ms_avg: float = 0.0
    bits: int = 32
    bandwidth_mbps_est: float | None = None
    # Lead of a split stage: the cost of one part message (ms) that makes its units' predictions match.
    msg_ms_est: float | None = None

    def _validate(self) -> None:
        _names(self, "fleet", "node_id")
        _nonneg(self, "seq", "ts", "load", "mem_used_bytes", "queue_depth", "frames_in", "frames_out",
                "errors", "stage", "epoch", "compute_ms_avg", "transfer_ms_avg", "idle_ms_avg",
                "bandwidth_mbps_est", "msg_ms_est")
        _bits(self.bits)


@dataclass(frozen=True, slots=True)
class NodeProfile(_Msg):
    """Per-layer times a node measured on the slice it loaded (retained; the planner's cost matrix uses them).

    ``layer_ms[i]`` is model layer ``first_layer + i`` of model ``model_id`` on this node as it runs it
    (``threads`` intra-op threads; an emulating node's times are stretched by its factor, as its frames are).
    """

    TAG: ClassVar[str] = "node_profile"
    fleet: str
    node_id: str
    ts: float
    model_id: str
    first_layer: int
    last_layer: int
    layer_ms: tuple[float, ...]
    threads: int = 1

    def _validate(self) -> None:
        _names(self, "fleet", "node_id")
        _nonneg(self, "ts", "first_layer")
        _layers(self.first_layer, self.last_layer)
        _positive(self, "threads")
        if not self.model_id:
            raise ValueError("model_id must not be empty")
        if len(self.layer_ms) != self.last_layer - self.first_layer + 1:
            raise ValueError(f"layer_ms has {len(self.layer_ms)} times for layers {self.first_layer}.."
                             f"{self.last_layer}")
        if not all(math.isfinite(v) and v >= 0 for v in self.layer_ms):
            raise ValueError("layer times must be finite and >= 0")


@dataclass(frozen=True, slots=True)
class PlanStage(_Msg):
    """One pipeline stage of a plan: a contiguous layer range on one or more replica nodes."""

    TAG: ClassVar[str] = "plan_stage"
    index: int
    first_layer: int
    last_layer: int
    nodes: tuple[str, ...]
    bits: int = 32
    slice_hash: str = ""
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    predicted_ms: float = 0.0
    # The two parts of predicted_ms (their max), amortised per frame over the replicas; 0 = not given (an
    # intra plan, an older planner): a calibration then takes the whole prediction as compute.
    compute_ms: float = 0.0
    transfer_ms: float = 0.0
    # The cut's accuracy floor (calibrated, or probed within the planner's tolerance); None = not given (an
    # older planner). Omitted from the encoding when None, so older decoders still read the message.
    min_bits: int | None = None

    def _validate(self) -> None:
        _nonneg(self, "index", "first_layer", "last_layer", "predicted_ms", "compute_ms", "transfer_ms")
        _floor_bits(self.min_bits, self.bits)
        _layers(self.first_layer, self.last_layer)
        if not self.nodes:
            raise ValueError("a stage needs at least one node")
        if len(set(self.nodes)) != len(self.nodes):
            raise ValueError(f"duplicate node in stage {self.index}")
        for n in self.nodes:
            _name(n, "nodes")
        _bits(self.bits)
        _slice_hash(self.slice_hash, allow_empty=True)


@dataclass(frozen=True, slots=True)
class Plan(_Msg):
    """The fleet's current partition, epoch-numbered and retained."""

    TAG: ClassVar[str] = "plan"
    fleet: str
    epoch: int
    model_id: str
    stages: tuple[PlanStage, ...]
    ts: float
    bottleneck_ms: float = 0.0
    latency_ms: float = 0.0
    # The session id of the planner that published it (its PlannerState birth names the same id); nodes and
    # clients follow only the plan of the planner whose birth they see. "" from builds before planner births.
    planner_id: str = ""
    # "active", or "infeasible": the fleet cannot run the model now (no stages; ``detail`` says what is short).
    status: str = "active"
    detail: str = ""

    def _validate(self) -> None:
        _names(self, "fleet")
        _nonneg(self, "epoch", "ts", "bottleneck_ms", "latency_ms")
        _text(self.model_id, "model_id")
        if self.status not in PLAN_STATUSES:
            raise ValueError(f"plan status {self.status!r} is not one of {sorted(PLAN_STATUSES)}")
        if self.status == "infeasible" and self.stages:
            raise ValueError("an infeasible plan has no stages")
        if len(self.planner_id) > 64 or len(self.detail) > 1000:
            raise ValueError("planner_id or detail too long")
        for i, st in enumerate(self.stages):
            if st.index != i:
                raise ValueError(f"stage {i} has index {st.index}")
            if i and st.first_layer != self.stages[i - 1].last_layer + 1:
                raise ValueError(f"stage {i} does not start where stage {i - 1} ends")


@dataclass(frozen=True, slots=True)
class StageAssign(_Msg):
    """Tells one node which stage (layer range and slice) to run in an epoch; retained."""

    TAG: ClassVar[str] = "stage_assign"
    fleet: str
    node_id: str
    epoch: int
    stage: int
    n_stages: int
    first_layer: int
    last_layer: int
    model_id: str
    slice_hash: str
    slice_size: int
    ts: float
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    bits: int = 32
    next_stage: int | None = None
    exit_cache: ExitCache | None = None
    split: SplitAssign | None = None
    # The planner's Ed25519 signature over everything else (base64; fleetpipe.signing); "" = unsigned.
    signature: str = ""
    # The lowest width the node may send at (no per-message adaptation or context relief goes below it);
    # None = not given (an older planner: ``bits`` is the floor). Omitted from the encoding when None.
    min_bits: int | None = None

    def _validate(self) -> None:
        _names(self, "fleet", "node_id")
        _floor_bits(self.min_bits, self.bits)
        _nonneg(self, "epoch", "stage", "first_layer", "last_layer", "slice_size", "ts", "next_stage")
        if len(self.signature) > 128:
            raise ValueError("signature longer than 128 characters")
        if self.split is not None:
            units = self.split.units
            if units[0].first_layer != self.first_layer or units[-1].last_layer != self.last_layer:
                raise ValueError("split units must cover the stage's layers")
            members = {self.split.lead} | {p.node_id for u in self.split.units for p in u.parts}
            if self.node_id not in members:
                raise ValueError(f"node {self.node_id} has no role in the split of stage {self.stage}")
        _positive(self, "n_stages")
        if self.stage >= self.n_stages:
            raise ValueError(f"stage {self.stage} >= n_stages {self.n_stages}")
        if self.next_stage is not None and self.next_stage >= self.n_stages:
            raise ValueError(f"next_stage {self.next_stage} >= n_stages {self.n_stages}")
        _layers(self.first_layer, self.last_layer)
        _text(self.model_id, "model_id")
        _slice_hash(self.slice_hash, allow_empty=True)
        _bits(self.bits)


@dataclass(frozen=True, slots=True)
class SplitPart(_Msg):
    """One part of a split unit: the node computing it, its part slice and the row ranges it reads.

    ``inputs`` holds ``(tensor, axis, start, stop)`` per input read in part (spatial splits); inputs not
    listed are sent whole.
    """

    TAG: ClassVar[str] = "split_part"
    node_id: str
    slice_hash: str
    slice_size: int
    inputs: tuple[tuple[str, int, int, int], ...] = ()

    def _validate(self) -> None:
        _names(self, "node_id")
        _slice_hash(self.slice_hash, allow_empty=False)
        _nonneg(self, "slice_size")
        for name, axis, start, stop in self.inputs:
            _text(name, "part input name")
            if axis < 0 or not 0 <= start < stop:
                raise ValueError(f"part input {name!r}: bad range axis {axis} {start}:{stop}")


# How a split unit's outputs are rebuilt from its parts (``fleetpipe.models.split.MergeSpec``).
_MERGE_KINDS = frozenset({"concat", "sum", "first"})
# Split kinds of a unit; "" runs the unit on the lead alone.
_SPLIT_KINDS = frozenset({"", "spatial", "channel", "tensor"})


@dataclass(frozen=True, slots=True)
class SplitUnit(_Msg):
    """Layers ``first_layer..last_layer`` of a split stage: on the lead alone (``kind=""``) or split in parts.

    ``slice_hash`` is the whole unit (the lead runs it for lead-only units and as the fallback when a
    part does not answer); ``merges`` holds ``(output, kind, axis)`` per output of a split unit. A node
    may compute several parts of a unit (row tiles of a spatial unit, Galaxy+ overlap): each is one
    request and one reply, answered in order, so its first tile computes while the next is on the way.
    """

    TAG: ClassVar[str] = "split_unit"
    first_layer: int
    last_layer: int
    kind: str
    slice_hash: str
    slice_size: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    parts: tuple[SplitPart, ...] = ()
    merges: tuple[tuple[str, str, int], ...] = ()
    predicted_ms: float = 0.0

    def _validate(self) -> None:
        _nonneg(self, "first_layer", "last_layer", "slice_size", "predicted_ms")
        _layers(self.first_layer, self.last_layer)
        _slice_hash(self.slice_hash, allow_empty=False)
        if self.kind not in _SPLIT_KINDS:
            raise ValueError(f"split kind must be one of {sorted(_SPLIT_KINDS)}, got {self.kind!r}")
        if not self.input_names or not self.output_names:
            raise ValueError("a unit needs input and output names")
        if self.kind and len({p.node_id for p in self.parts}) < 2:
            raise ValueError("a split unit needs parts on >= 2 nodes")
        if not self.kind and (self.parts or self.merges):
            raise ValueError("a lead-only unit has no parts or merges")
        if self.kind and sorted(m[0] for m in self.merges) != sorted(self.output_names):
            raise ValueError("a split unit needs one merge per output")
        for _, kind, axis in self.merges:
            if kind not in _MERGE_KINDS or axis < 0:
                raise ValueError(f"bad merge {kind!r} on axis {axis}")


@dataclass(frozen=True, slots=True)
class SplitAssign(_Msg):
    """Intra-stage parallelism of a stage: the lead receives frames, scatters split units, gathers parts."""

    TAG: ClassVar[str] = "split_assign"
    lead: str
    units: tuple[SplitUnit, ...]
    part_timeout_ms: float = 0.0
    # The fixed cost of one message the plan's unit predictions assume (the lead reports what it measures).
    msg_ms: float = 0.0

    def _validate(self) -> None:
        _names(self, "lead")
        _nonneg(self, "part_timeout_ms", "msg_ms")
        if not self.units:
            raise ValueError("a split stage needs at least one unit")
        for a, b in zip(self.units, self.units[1:], strict=False):
            if b.first_layer != a.last_layer + 1:
                raise ValueError(f"unit at layer {b.first_layer} does not follow unit ending at {a.last_layer}")
        for u in self.units:
            if u.parts and self.lead not in {p.node_id for p in u.parts}:
                raise ValueError("the lead computes one part of every split unit")


@dataclass(frozen=True, slots=True)
class ExitCache(_Msg):
    """COACH early exit for a stage: per-label semantic centres of its output feature and the threshold."""

    TAG: ClassVar[str] = "exit_cache"
    threshold: float
    centres: tuple[tuple[float, ...], ...]
    counts: tuple[int, ...]

    def _validate(self) -> None:
        if not self.threshold > 0:
            raise ValueError("exit threshold must be > 0")
        if len(self.centres) < 2 or len(self.counts) != len(self.centres):
            raise ValueError("an exit cache needs >= 2 labels with one count each")
        if len({len(c) for c in self.centres}) != 1 or not self.centres[0]:
            raise ValueError("exit cache centres must share one non-zero dimension")
        if any(c < 0 for c in self.counts):
            raise ValueError("exit cache counts must be >= 0")


@dataclass(frozen=True, slots=True)
class Hop(_Msg):
    """Timing of one stage a frame went through (wall-clock seconds and milliseconds)."""

    TAG: ClassVar[str] = "hop"
    stage: int
    node_id: str
    recv_ts: float
    compute_ms: float
    send_ts: float

    def _validate(self) -> None:
        _names(self, "node_id")
        _nonneg(self, "stage", "recv_ts", "compute_ms", "send_ts")


@dataclass(frozen=True, slots=True)
class Activation(_Msg):
    """A frame's tensors on their way to ``stage`` (data plane, msgpack)."""

    TAG: ClassVar[str] = "activation"
    BINARY: ClassVar[bool] = True
    fleet: str
    epoch: int
    frame_id: str
    client_id: str
    stage: int
    tensors: tuple[tuple[str, EncodedTensor], ...]
    reply_to: str
    sent_ts: float
    hops: tuple[Hop, ...] = ()

    def _validate(self) -> None:
        _names(self, "fleet", "client_id")
        _nonneg(self, "epoch", "stage", "sent_ts")
        _frame_id(self.frame_id)
        _tensors(self.tensors)
        _reply_topic(self.reply_to)


@dataclass(frozen=True, slots=True)
class PartRequest(_Msg):
    """The lead of a split stage sends part ``part`` of unit ``unit`` of a frame to the part's node (msgpack)."""

    TAG: ClassVar[str] = "part_request"
    BINARY: ClassVar[bool] = True
    fleet: str
    epoch: int
    stage: int
    frame_id: str
    unit: int
    part: int
    lead: str
    tensors: tuple[tuple[str, EncodedTensor], ...]
    sent_ts: float

    def _validate(self) -> None:
        _names(self, "fleet", "lead")
        _nonneg(self, "epoch", "stage", "unit", "part", "sent_ts")
        _frame_id(self.frame_id)
        _tensors(self.tensors)


@dataclass(frozen=True, slots=True)
class PartReply(_Msg):
    """A part node's outputs for one part request, back to the lead (msgpack); ``error`` set on failure."""

    TAG: ClassVar[str] = "part_reply"
    BINARY: ClassVar[bool] = True
    fleet: str
    epoch: int
    stage: int
    frame_id: str
    unit: int
    part: int
    node_id: str
    tensors: tuple[tuple[str, EncodedTensor], ...]
    compute_ms: float
    sent_ts: float
    error: str = ""

    def _validate(self) -> None:
        _names(self, "fleet", "node_id")
        _nonneg(self, "epoch", "stage", "unit", "part", "compute_ms", "sent_ts")
        _frame_id(self.frame_id)
        _tensors(self.tensors)
        if len(self.error) > 500:
            raise ValueError("error text longer than 500 characters")


@dataclass(frozen=True, slots=True)
class Result(_Msg):
    """A frame's final outputs, sent to the client's result topic (data plane, msgpack)."""

    TAG: ClassVar[str] = "result"
    BINARY: ClassVar[bool] = True
    fleet: str
    frame_id: str
    client_id: str
    epoch: int
    tensors: tuple[tuple[str, EncodedTensor], ...]
    ts: float
    hops: tuple[Hop, ...] = ()
    early_exit: bool = False
    label: int | None = None

    def _validate(self) -> None:
        _names(self, "fleet", "client_id")
        _nonneg(self, "epoch", "ts", "label")
        _frame_id(self.frame_id)
        _tensors(self.tensors)


@dataclass(frozen=True, slots=True)
class ErrorReport(_Msg):
    """Something went wrong on ``source``; ``kind`` is the exception class name."""

    TAG: ClassVar[str] = "error_report"
    fleet: str
    source: str
    kind: str
    detail: str
    ts: float
    frame_id: str | None = None

    def _validate(self) -> None:
        _names(self, "fleet", "source")
        _nonneg(self, "ts")
        _text(self.kind, "kind")
        if self.frame_id is not None:
            _frame_id(self.frame_id)


@dataclass(frozen=True, slots=True)
class SliceChunk(_Msg):
    """Chunk ``index`` of ``count`` of a model slice file (data plane, msgpack)."""

    TAG: ClassVar[str] = "slice_chunk"
    BINARY: ClassVar[bool] = True
    slice_hash: str
    index: int
    count: int
    data: bytes | bytearray | memoryview

    def _validate(self) -> None:
        _slice_hash(self.slice_hash, allow_empty=False)
        _nonneg(self, "index")
        _positive(self, "count")
        if self.index >= self.count:
            raise ValueError(f"chunk index {self.index} >= count {self.count}")


@dataclass(frozen=True, slots=True)
class SliceRequest(_Msg):
    """A node asks for the chunks of a slice it does not have."""

    TAG: ClassVar[str] = "slice_request"
    fleet: str
    node_id: str
    slice_hash: str

    def _validate(self) -> None:
        _names(self, "fleet", "node_id")
        _slice_hash(self.slice_hash, allow_empty=False)


@dataclass(frozen=True, slots=True)
class Metrics(_Msg):
    """Free-form flat numeric metrics of one node."""

    TAG: ClassVar[str] = "metrics"
    fleet: str
    node_id: str
    ts: float
    values: Mapping[str, float]

    def _validate(self) -> None:
        _names(self, "fleet", "node_id")
        _nonneg(self, "ts")


@dataclass(frozen=True, slots=True)
class EmulationControl(_Msg):
    """Change an emulating node's device at run time (scripted slowdowns and bandwidth profiles).

    Only nodes started with ``--emulate`` obey it; ``None`` leaves a setting as it is.
    """

    TAG: ClassVar[str] = "emulation_control"
    fleet: str
    node_id: str
    ts: float
    compute_factor: float | None = None
    bandwidth_mbps: float | None = None

    def _validate(self) -> None:
        _names(self, "fleet", "node_id")
        _nonneg(self, "ts")
        if self.compute_factor is not None and not (math.isfinite(self.compute_factor) and self.compute_factor >= 1):
            raise ValueError("compute_factor must be a finite number >= 1")
        if self.bandwidth_mbps is not None and not (math.isfinite(self.bandwidth_mbps) and self.bandwidth_mbps > 0):
            raise ValueError("bandwidth_mbps must be a finite number > 0")


Message = Union[  # noqa: UP007  (a runtime alias that isinstance and match understand)
    NodeBirth, NodeDeath, NodeHealth, Plan, StageAssign, Activation, Result, ErrorReport, SliceChunk,
    SliceRequest, Metrics, EmulationControl, PartRequest, PartReply, NodeProfile, PlannerState,
]
#: Tag -> class of every top-level message type.
MESSAGE_TYPES: Mapping[str, type[Any]] = types.MappingProxyType(
    {cls.TAG: cls for cls in typing.get_args(Message)}
)


def encode(msg: Message) -> bytes:
    """Serialise a message: JSON for control messages, msgpack for data messages."""
    cls = type(msg)
    if MESSAGE_TYPES.get(getattr(cls, "TAG", None)) is not cls:  # type: ignore[arg-type]
        raise EncodeError(f"not a wire message: {cls.__name__}")
    body: dict[str, Any] = {"v": WIRE_VERSION, "type": cls.TAG}
    body.update(_dump_fields(msg))
    try:
        if cls.BINARY:
            return _pack_binary(body)
        return json.dumps(body, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"cannot encode {cls.__name__}: {exc}") from exc


def decode(data: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Parse bytes into a message; raises DecodeError (or VersionMismatch) naming what is wrong."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    size = memoryview(data).nbytes
    if size == 0:
        raise DecodeError("empty message")
    if size > max_bytes:
        raise DecodeError(f"message of {size} bytes exceeds max_bytes={max_bytes}")
    binary = data[0] != 0x7B  # '{'
    try:
        if binary and data[0] == 0x92 and size >= _BLOB_HEAD and data[1] == 0xC6:
            body = _unpack_framed(memoryview(data).cast("B"), max_bytes)
        elif binary:
            body = _unpackb(data, max_bytes, max_ext_len=0)
        else:
            body = json.loads(bytes(data).decode("utf-8"), parse_constant=_reject_constant)
    except Exception as exc:  # every parser failure is the peer's fault
        kind = "msgpack" if binary else "JSON"
        raise DecodeError(f"malformed {kind}: {type(exc).__name__}: {exc}") from None
    if not isinstance(body, dict):
        raise DecodeError(f"message must be a map, got {type(body).__name__}")
    version = body.pop("v", None)
    if type(version) is not int:
        raise DecodeError(f"missing or non-integer wire version 'v': {version!r}")
    if version != WIRE_VERSION:
        raise VersionMismatch(f"wire version {version}, this build speaks {WIRE_VERSION}")
    tag = body.pop("type", None)
    cls = MESSAGE_TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise DecodeError(f"unknown message type {tag!r}")
    if binary != cls.BINARY:
        raise DecodeError(f"{tag} must be {'msgpack' if cls.BINARY else 'JSON'}")
    return _build(cls, body, tag)  # type: ignore[no-any-return]


def _pack_binary(body: dict[str, Any]) -> bytes:
    """msgpack of ``body``; big binary values go to the blob of a ``[blob, envelope]`` frame."""
    parts: list[Any] = []
    env = _lift(body, parts, [_BLOB_HEAD])
    if not parts:
        return msgpack.packb(env, use_bin_type=True)  # type: ignore[no-any-return]
    header = msgpack.packb(env, use_bin_type=True)
    blob_len = sum(memoryview(p).nbytes for p in parts)
    if blob_len > 0xFFFFFFFF:
        raise ValueError(f"blob of {blob_len} bytes exceeds the bin32 limit")
    parts[0] = b"\x92\xc6" + blob_len.to_bytes(4, "big") + parts[0]
    parts.append(header)
    return b"".join(parts)


def _lift(v: Any, parts: list[Any], end: list[int]) -> Any:
    """``v`` with every big binary value replaced by a blob reference; ``parts`` gets padding and payloads."""
    t = type(v)
    if t is dict:
        return {k: _lift(x, parts, end) for k, x in v.items()}
    if t is list:
        return [_lift(x, parts, end) for x in v]
    if t is bytes or t is bytearray or t is memoryview:
        n = memoryview(v).nbytes
        if n < BLOB_MIN:
            return v
        pad = -end[0] % _ALIGN
        parts.append(b"\0" * pad)
        parts.append(v)
        off = end[0] + pad - _BLOB_HEAD
        end[0] += pad + n
        return msgpack.ExtType(REF_EXT, off.to_bytes(8, "big") + n.to_bytes(8, "big"))
    return v


def _unpack_framed(mv: memoryview, max_bytes: int) -> Any:
    """The envelope of a ``[blob, envelope]`` frame, blob references resolved to zero-copy slices."""
    blob_len = int.from_bytes(mv[2:_BLOB_HEAD], "big")
    end = _BLOB_HEAD + blob_len
    if end >= mv.nbytes:
        raise DecodeError(f"truncated frame: blob of {blob_len} bytes, message of {mv.nbytes}")
    blob = mv[_BLOB_HEAD:end]

    def ref(code: int, data: bytes) -> memoryview:
        if code != REF_EXT or len(data) != 16:
            raise DecodeError(f"unknown ext type {code} ({len(data)} bytes)")
        off, n = int.from_bytes(data[:8], "big"), int.from_bytes(data[8:], "big")
        if off + n > blob_len:
            raise DecodeError(f"blob reference {off}+{n} outside a blob of {blob_len} bytes")
        return blob[off : off + n]

    return _unpackb(mv[end:], max_bytes, max_ext_len=16, ext_hook=ref)


def _unpackb(data: Any, max_bytes: int, **ext: Any) -> Any:
    """msgpack with this module's limits on every container and string (``ext``: the ext-type settings)."""
    return msgpack.unpackb(
        data, raw=False, strict_map_key=True, max_bin_len=max_bytes, max_str_len=_STR_MAX,
        max_array_len=max(_SEQ_MAX, 1024), max_map_len=_SEQ_MAX, **ext,
    )


def is_binary(data: bytes | bytearray | memoryview) -> bool:
    """Whether an encoded message is msgpack (data plane) rather than JSON."""
    return len(data) > 0 and data[0] != 0x7B


# ---------------------------------------------------------------------------------------------- private

_SCHEMAS: dict[type, tuple[tuple[str, Any], ...]] = {}


def _schema(cls: type) -> tuple[tuple[str, Any], ...]:
    s = _SCHEMAS.get(cls)
    if s is None:
        hints = typing.get_type_hints(cls, globalns=globals())
        s = _SCHEMAS[cls] = tuple((f.name, hints[f.name]) for f in fields(cls))
    return s


class _ClassPlan:
    """Per-class work precomputed once: field checkers (construction), loaders and key sets (decode)."""

    __slots__ = ("checks", "loads", "names", "required")

    def __init__(self, cls: type) -> None:
        schema = _schema(cls)
        self.checks = tuple((n, _checker(tp)) for n, tp in schema)
        self.loads = tuple((n, _loader(tp)) for n, tp in schema)
        self.names = frozenset(n for n, _ in schema)
        self.required = frozenset(
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        )


_PLANS: dict[type, _ClassPlan] = {}


def _plan(cls: type) -> _ClassPlan:
    p = _PLANS.get(cls)
    if p is None:
        p = _PLANS[cls] = _ClassPlan(cls)
    return p


_Fn = typing.Callable[[Any, str], Any]


def _checker(tp: Any) -> _Fn:
    """``_check`` specialised to one annotation (same results and errors, no per-call introspection)."""
    if tp is str:
        def check_str(v: Any, where: str) -> Any:
            if type(v) is not str:
                raise TypeError(f"{where}: expected str, got {type(v).__name__}")
            if len(v) > _STR_MAX:
                raise ValueError(f"{where}: string longer than {_STR_MAX}")
            return v
        return check_str
    if tp is int:
        def check_int(v: Any, where: str) -> Any:
            if type(v) is not int:
                raise TypeError(f"{where}: expected an int, got {type(v).__name__}")
            if not -_INT_MAX <= v <= _INT_MAX:
                raise ValueError(f"{where}: int out of range")
            return v
        return check_int
    if tp is float:
        def check_float(v: Any, where: str) -> Any:
            if type(v) is float:
                if v - v != 0.0:  # inf or NaN
                    raise ValueError(f"{where}: must be finite, got {v}")
                return v
            return _check(float, v, where)
        return check_float
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1 and type(None) in typing.get_args(tp):
            one = _checker(inner[0])

            def check_optional(v: Any, where: str) -> Any:
                return None if v is None else one(v, where)
            return check_optional
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            item = _checker(args[0])

            def check_seq(v: Any, where: str) -> Any:
                if type(v) is not tuple and type(v) is not list and not isinstance(v, tuple | list):
                    raise TypeError(f"{where}: expected a sequence, got {type(v).__name__}")
                if len(v) > _SEQ_MAX:
                    raise ValueError(f"{where}: more than {_SEQ_MAX} entries")
                return tuple([item(x, f"{where}[{i}]") for i, x in enumerate(v)])
            return check_seq
        items = tuple(_checker(a) for a in args)

        def check_fixed(v: Any, where: str) -> Any:
            if not isinstance(v, tuple | list):
                raise TypeError(f"{where}: expected a sequence, got {type(v).__name__}")
            if len(v) != len(items):
                raise TypeError(f"{where}: expected {len(items)} entries, got {len(v)}")
            return tuple([c(x, f"{where}[{i}]") for i, (c, x) in enumerate(zip(items, v, strict=True))])
        return check_fixed
    if origin is None and isinstance(tp, type) and tp not in (bool, str, int, float):
        def check_instance(v: Any, where: str) -> Any:
            if isinstance(v, tp):
                return v
            return _check(tp, v, where)
        return check_instance

    def check_generic(v: Any, where: str) -> Any:
        return _check(tp, v, where)
    return check_generic


def _loader(tp: Any) -> _Fn:
    """``_load`` specialised to one annotation."""
    if tp in (str, int, float, bool):
        return _identity
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) != 1:
            return _identity
        one = _loader(inner[0])
        if one is _identity:
            return _identity

        def load_optional(v: Any, where: str) -> Any:
            return v if v is None else one(v, where)
        return load_optional
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            item = _loader(args[0])

            def load_seq(v: Any, where: str) -> Any:
                if type(v) is not list:
                    return v
                if len(v) > _SEQ_MAX:
                    raise DecodeError(f"{where}: more than {_SEQ_MAX} entries")
                if item is _identity:
                    return tuple(v)
                return tuple([item(x, f"{where}[{i}]") for i, x in enumerate(v)])
            return load_seq
        items = tuple(_loader(a) for a in args)

        def load_fixed(v: Any, where: str) -> Any:
            if type(v) is not list:
                return v
            if len(v) != len(items):
                raise DecodeError(f"{where}: expected {len(items)} entries, got {len(v)}")
            return tuple([f(x, f"{where}[{i}]") for i, (f, x) in enumerate(zip(items, v, strict=True))])
        return load_fixed
    if tp is EncodedTensor:
        def load_tensor(v: Any, where: str) -> Any:
            try:
                return from_wire(v)
            except DecodeError as exc:
                raise DecodeError(f"{where}: {exc}") from None
        return load_tensor
    if isinstance(tp, type) and is_dataclass(tp):
        def load_message(v: Any, where: str) -> Any:
            return _build(tp, v, where)
        return load_message

    def load_generic(v: Any, where: str) -> Any:
        return _load(tp, v, where)
    return load_generic


def _identity(v: Any, where: str) -> Any:
    return v


def _check(tp: Any, v: Any, where: str) -> Any:
    """Type-check (and lightly coerce) one value against an annotation."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        if v is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return _check(inner[0], v, where)
        if isinstance(v, tuple(inner)):  # bytes | bytearray | memoryview
            return v
        raise TypeError(f"{where}: expected {tp}, got {type(v).__name__}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(v, tuple | list):
            raise TypeError(f"{where}: expected a sequence, got {type(v).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            if len(v) > _SEQ_MAX:
                raise ValueError(f"{where}: more than {_SEQ_MAX} entries")
            return tuple(_check(args[0], x, f"{where}[{i}]") for i, x in enumerate(v))
        if len(v) != len(args):
            raise TypeError(f"{where}: expected {len(args)} entries, got {len(v)}")
        return tuple(_check(a, x, f"{where}[{i}]") for i, (a, x) in enumerate(zip(args, v, strict=True)))
    if origin is Mapping:
        if not isinstance(v, Mapping):
            raise TypeError(f"{where}: expected a mapping, got {type(v).__name__}")
        if len(v) > _SEQ_MAX:
            raise ValueError(f"{where}: more than {_SEQ_MAX} entries")
        kt, vt = typing.get_args(tp)
        return types.MappingProxyType(
            {_check(kt, k, f"{where} key"): _check(vt, x, f"{where}[{k!r}]") for k, x in v.items()}
        )
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise TypeError(f"{where}: expected a number, got {type(v).__name__}")
        f = float(v)
        if not math.isfinite(f):
            raise ValueError(f"{where}: must be finite, got {f}")
        return f
    if tp is int:
        if type(v) is not int:
            raise TypeError(f"{where}: expected an int, got {type(v).__name__}")
        if not -_INT_MAX <= v <= _INT_MAX:
            raise ValueError(f"{where}: int out of range")
        return v
    if tp is bool or tp is str:
        if type(v) is not tp:
            raise TypeError(f"{where}: expected {tp.__name__}, got {type(v).__name__}")
        if tp is str and len(v) > _STR_MAX:
            raise ValueError(f"{where}: string longer than {_STR_MAX}")
        return v
    if isinstance(tp, type) and isinstance(v, tp):
        return v
    raise TypeError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {type(v).__name__}")


def _dump(v: Any) -> Any:
    if isinstance(v, _Msg):
        return _dump_fields(v)
    if isinstance(v, EncodedTensor):
        return to_wire(v)
    if isinstance(v, tuple):
        return [_dump(x) for x in v]
    if isinstance(v, Mapping):
        return dict(v)
    return v


_PLAIN = frozenset({str, int, float, bool, type(None), bytes})


def _dump_fields(msg: Any) -> dict[str, Any]:
    out = {}
    for name, _ in _schema(type(msg)):
        v = getattr(msg, name)
        if v is None and name in _OMIT_NONE:
            continue
        out[name] = v if type(v) in _PLAIN else _dump(v)
    return out


def _load(tp: Any, v: Any, where: str) -> Any:
    """Turn wire values (dicts, lists) into the objects the constructor expects."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return v if v is None or len(inner) != 1 else _load(inner[0], v, where)
    if origin is tuple and isinstance(v, list):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            if len(v) > _SEQ_MAX:
                raise DecodeError(f"{where}: more than {_SEQ_MAX} entries")
            return tuple(_load(args[0], x, f"{where}[{i}]") for i, x in enumerate(v))
        if len(v) != len(args):
            raise DecodeError(f"{where}: expected {len(args)} entries, got {len(v)}")
        return tuple(_load(a, x, f"{where}[{i}]") for i, (a, x) in enumerate(zip(args, v, strict=True)))
    if tp is EncodedTensor:
        try:
            return from_wire(v)
        except DecodeError as exc:
            raise DecodeError(f"{where}: {exc}") from None
    if isinstance(tp, type) and is_dataclass(tp):
        return _build(tp, v, where)
    return v


def _build(cls: type, body: Any, where: str) -> Any:
    if not isinstance(body, dict):
        raise DecodeError(f"{where}: expected a map, got {type(body).__name__}")
    plan = _plan(cls)
    names = plan.names
    if not names.issuperset(body):
        unknown = [str(k) for k in body if k not in names]
        raise DecodeError(f"{where}: unknown fields {sorted(unknown)}")
    missing = plan.required - body.keys()
    if missing:
        raise DecodeError(f"{where}: missing fields {sorted(missing)}")
    kwargs = {n: load(body[n], f"{where}.{n}") for n, load in plan.loads if n in body}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"{where}: {exc}") from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-finite number {name}")


def _name(v: str, what: str) -> None:
    if not _NAME.match(v):
        raise ValueError(f"{what} {v!r} must match {NAME_PATTERN}")


def _names(msg: Any, *attrs: str) -> None:
    for a in attrs:
        _name(getattr(msg, a), a)


def _nonneg(msg: Any, *attrs: str) -> None:
    for a in attrs:
        v = getattr(msg, a)
        if v is not None and v < 0:
            raise ValueError(f"{a} must be >= 0, got {v}")


def _positive(msg: Any, *attrs: str) -> None:
    for a in attrs:
        if getattr(msg, a) <= 0:
            raise ValueError(f"{a} must be > 0, got {getattr(msg, a)}")


def _bits(b: int) -> None:
    if b not in _BITS:
        raise ValueError(f"bits must be one of {sorted(_BITS)}, got {b}")


def _floor_bits(floor: int | None, bits: int) -> None:
    if floor is None:
        return
    _bits(floor)
    if floor > bits:
        raise ValueError(f"min_bits {floor} above bits {bits}")


def _layers(first: int, last: int) -> None:
    if first > last:
        raise ValueError(f"first_layer {first} > last_layer {last}")


def _text(v: str, what: str) -> None:
    if not v or len(v) > 256:
        raise ValueError(f"{what} must have 1..256 characters")


def _frame_id(v: str) -> None:
    if not _FRAME_ID.match(v):
        raise ValueError(f"frame_id {v!r} must match [A-Za-z0-9_.:-]{{1,128}}")


def _slice_hash(v: str, *, allow_empty: bool) -> None:
    if not (allow_empty and v == "") and not _HASH.match(v):
        raise ValueError(f"slice_hash {v!r} must match [A-Za-z0-9_.-]{{1,128}}")


def _reply_topic(v: str) -> None:
    if not v or len(v) > 1024 or any(c in v for c in "+#\x00"):
        raise ValueError(f"reply_to {v!r} must be a concrete topic")


def _tensors(ts: tuple[tuple[str, EncodedTensor], ...]) -> None:
    names = [n for n, _ in ts]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names")
    decoded = sum(t.decoded_nbytes for _, t in ts if isinstance(t, EncodedTensor))
    if decoded > MAX_DECODED_BYTES:
        raise ValueError(f"tensors would decode to {decoded} bytes, more than MAX_DECODED_BYTES={MAX_DECODED_BYTES}")
    for n in names:
        _text(n, "tensor name")
