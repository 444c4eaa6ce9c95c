"""Every MQTT topic of fleetpipe, declared once with its payload type, QoS and retain flag.

Two planes under two prefixes, so that ``mosquitto_sub -v -t 'fleetpipe/#'`` (or MQTT Explorer on ``fleetpipe/``)
shows a human the control plane (JSON-sized messages) without the megabytes of tensors and model weights.

Control plane, under ``fleetpipe/v1/<fleet>/`` (:data:`PREFIX`, :func:`control_filter`)::

    node/<node_id>/state     NodeBirth | NodeDeath   qos1 retained  (the last will is a NodeDeath here)
    node/planner/state       PlannerState            qos1 retained  (the planner's birth and last-will death)
    node/<node_id>/health    NodeHealth              qos0
    node/<node_id>/assign    StageAssign             qos1 retained
    node/<node_id>/metrics   Metrics                 qos0
    node/<node_id>/profile   NodeProfile             qos1 retained  (per-layer times of its loaded slice)
    node/<node_id>/control   EmulationControl        qos1
    plan                     Plan                    qos1 retained
    error                    ErrorReport             qos1

Data plane, under ``fleetpipe-data/v1/<fleet>/`` (:data:`DATA_PREFIX`, :func:`data_filter`); the last level of
a frame's, part's or result's topic names its sender (the identity the secure ACL binds)::

    epoch/<e>/stage/<k>/in/<client_id>    Activation   qos1  (replicas: $share/<fleet>-e<e>-s<k>/.../in/+)
    epoch/<e>/stage/<k>/part/<node_id>/<lead>    PartRequest  qos1  (split stage: lead -> part node)
    epoch/<e>/stage/<k>/gather/<lead>/<node_id>  PartReply    qos1  (split stage: part node -> lead)
    result/<client_id>       Result                  qos1
    slice/<hash>/<index>     SliceChunk              qos1 retained
    slice/request            SliceRequest            qos1

Code never formats topic strings inline: it calls the builders here, ``parse`` to go back, and the pure
``matches`` for MQTT wildcard semantics (``+``, ``#``, ``$share/<group>/`` and ``$``-topics).

Identity comes from the topic. The broker's ACL (``fleetpipe.deploy.creds``, generated from this table)
binds topic levels to the identity that may publish there: a node writes only ``node/<itself>/...``, a
client only frames on ``.../in/<itself>``, a split-stage sender only part/gather topics whose last level
is itself. Each spec's ``binds`` names the payload fields that must equal such topic levels, and
:func:`check` (every receiver calls it) rejects a message whose payload names another identity or fleet
than its topic: the payload is never trusted for who sent it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from fleetpipe.wire import (
    NAME_PATTERN,
    PLANNER_ID,
    Activation,
    EmulationControl,
    ErrorReport,
    Metrics,
    NodeBirth,
    NodeDeath,
    NodeHealth,
    NodeProfile,
    PartReply,
    PartRequest,
    Plan,
    PlannerState,
    Result,
    SliceChunk,
    SliceRequest,
    StageAssign,
)

__all__ = [
    "DATA_PREFIX",
    "PLANNER_ID",
    "PREFIX",
    "SPECS",
    "TopicSpec",
    "check",
    "control_filter",
    "data_filter",
    "error",
    "fleet_filter",
    "matches",
    "node_assign",
    "node_control",
    "node_health",
    "node_metrics",
    "node_profile",
    "node_state",
    "parse",
    "part_gather",
    "part_in",
    "plan",
    "planner_state",
    "result",
    "shared",
    "slice_chunk",
    "slice_request",
    "spec_for",
    "stage_group",
    "stage_in",
    "stage_in_filter",
    "validate_filter",
    "validate_topic",
]

PREFIX = "fleetpipe/v1"  # the control plane
DATA_PREFIX = "fleetpipe-data/v1"  # frames, results, parts, model slices
_NAME = re.compile(NAME_PATTERN + r"\Z")
_HASH = re.compile(r"[A-Za-z0-9_.-]{1,128}\Z")
_INT = re.compile(r"(0|[1-9][0-9]{0,8})\Z")


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One topic: ``pattern`` has ``{fleet}`` and other ``{param}`` levels; payload types, QoS, retain."""

    name: str
    pattern: str
    payload: tuple[type[Any], ...]
    qos: int
    retain: bool
    #: (topic parameter, payload field) pairs that must be equal (see :func:`check`); ``fleet`` always is.
    binds: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {self.qos}")
        if not self.payload or not all(isinstance(t, type) for t in self.payload):
            raise TypeError("payload must be a non-empty tuple of message classes")
        if not self.pattern.startswith((PREFIX + "/{fleet}/", DATA_PREFIX + "/{fleet}/")):
            raise ValueError(f"pattern must start with {PREFIX}/{{fleet}}/ or {DATA_PREFIX}/{{fleet}}/")
        if any(param not in self.params for param, _field in self.binds):
            raise ValueError(f"{self.name}: binds names a parameter its pattern lacks")

    @property
    def data_plane(self) -> bool:
        """Whether this topic carries the data plane (under :data:`DATA_PREFIX`)."""
        return self.pattern.startswith(DATA_PREFIX + "/")

    @property
    def params(self) -> tuple[str, ...]:
        """Names of the ``{param}`` levels, in order (``fleet`` first)."""
        return tuple(p[1:-1] for p in self.pattern.split("/") if p.startswith("{"))

    def topic(self, **params: Any) -> str:
        """Concrete topic for these parameters (each validated)."""
        if set(params) != set(self.params):
            raise ValueError(f"{self.name} needs parameters {self.params}, got {sorted(params)}")
        return "/".join(
            _format(level[1:-1], params[level[1:-1]]) if level.startswith("{") else level
            for level in self.pattern.split("/")
        )

    def filter(self, **params: Any) -> str:
        """Subscription filter: given parameters filled in, the others ``+``."""
        unknown = set(params) - set(self.params)
        if unknown:
            raise ValueError(f"{self.name} has no parameters {sorted(unknown)}")
        return "/".join(
            (_format(level[1:-1], params[level[1:-1]]) if level[1:-1] in params else "+")
            if level.startswith("{")
            else level
            for level in self.pattern.split("/")
        )

    def accepts(self, msg: object) -> bool:
        """Whether ``msg`` is a payload type of this topic."""
        return isinstance(msg, self.payload)


_P = PREFIX + "/{fleet}"
_D = DATA_PREFIX + "/{fleet}"
_NODE = (("node_id", "node_id"),)
NODE_STATE = TopicSpec("node_state", _P + "/node/{node_id}/state", (NodeBirth, NodeDeath, PlannerState), 1, True,
                       _NODE)
NODE_HEALTH = TopicSpec("node_health", _P + "/node/{node_id}/health", (NodeHealth,), 0, False, _NODE)
NODE_ASSIGN = TopicSpec("node_assign", _P + "/node/{node_id}/assign", (StageAssign,), 1, True, _NODE)
NODE_METRICS = TopicSpec("node_metrics", _P + "/node/{node_id}/metrics", (Metrics,), 0, False, _NODE)
NODE_PROFILE = TopicSpec("node_profile", _P + "/node/{node_id}/profile", (NodeProfile,), 1, True, _NODE)
NODE_CONTROL = TopicSpec("node_control", _P + "/node/{node_id}/control", (EmulationControl,), 1, False, _NODE)
PLAN = TopicSpec("plan", _P + "/plan", (Plan,), 1, True)
# The last level of a data-plane topic is its sender's identity (a client on stage inputs: the ACL lets a
# client write only its own; nodes forward frames under the client id the first stage checked).
STAGE_IN = TopicSpec("stage_in", _D + "/epoch/{epoch}/stage/{stage}/in/{client_id}", (Activation,), 1, False,
                     (("client_id", "client_id"),))
PART_IN = TopicSpec("part_in", _D + "/epoch/{epoch}/stage/{stage}/part/{node_id}/{lead}", (PartRequest,), 1, False,
                    (("lead", "lead"),))
PART_GATHER = TopicSpec("part_gather", _D + "/epoch/{epoch}/stage/{stage}/gather/{lead}/{node_id}", (PartReply,), 1,
                        False, _NODE)
RESULT = TopicSpec("result", _D + "/result/{client_id}", (Result,), 1, False, (("client_id", "client_id"),))
ERROR = TopicSpec("error", _P + "/error", (ErrorReport,), 1, False)
SLICE_CHUNK = TopicSpec("slice_chunk", _D + "/slice/{slice_hash}/{index}", (SliceChunk,), 1, True,
                        (("slice_hash", "slice_hash"), ("index", "index")))
SLICE_REQUEST = TopicSpec("slice_request", _D + "/slice/request", (SliceRequest,), 1, False)

#: Every topic, by name.
SPECS: Mapping[str, TopicSpec] = MappingProxyType(
    {s.name: s for s in (NODE_STATE, NODE_HEALTH, NODE_ASSIGN, NODE_METRICS, NODE_PROFILE, NODE_CONTROL, PLAN, STAGE_IN,
                         PART_IN, PART_GATHER, RESULT, ERROR, SLICE_CHUNK, SLICE_REQUEST)}
)


def node_state(fleet: str, node_id: str) -> str:
    """Retained birth/death of a node (its last will goes here too)."""
    return NODE_STATE.topic(fleet=fleet, node_id=node_id)


def planner_state(fleet: str) -> str:
    """Retained birth/death of the fleet's planner (``PlannerState``; its last will goes here too)."""
    return NODE_STATE.topic(fleet=fleet, node_id=PLANNER_ID)


def node_health(fleet: str, node_id: str) -> str:
    """Periodic health of a node."""
    return NODE_HEALTH.topic(fleet=fleet, node_id=node_id)


def node_assign(fleet: str, node_id: str) -> str:
    """Retained stage assignment of a node."""
    return NODE_ASSIGN.topic(fleet=fleet, node_id=node_id)


def node_metrics(fleet: str, node_id: str) -> str:
    """Free-form metrics of a node."""
    return NODE_METRICS.topic(fleet=fleet, node_id=node_id)


def node_profile(fleet: str, node_id: str) -> str:
    """Retained per-layer times a node measured on its loaded slice."""
    return NODE_PROFILE.topic(fleet=fleet, node_id=node_id)


def node_control(fleet: str, node_id: str) -> str:
    """Run-time emulation control of one node (benches and tests)."""
    return NODE_CONTROL.topic(fleet=fleet, node_id=node_id)


def plan(fleet: str) -> str:
    """Retained current plan of a fleet."""
    return PLAN.topic(fleet=fleet)


def stage_in(fleet: str, epoch: int, stage: int, client_id: str) -> str:
    """Input activations of pipeline stage ``stage`` under plan ``epoch`` for the frames of ``client_id``.

    The epoch is part of the topic so that replicas of different plans never share a subscription
    group: a frame only reaches a node that holds the slice it was routed for. The client id is the
    last level so that the ACL can let a client submit frames only as itself (nodes subscribe to
    ``stage_in_filter``).
    """
    return STAGE_IN.topic(fleet=fleet, epoch=epoch, stage=stage, client_id=client_id)


def stage_in_filter(fleet: str, epoch: int, stage: int) -> str:
    """Every client's input activations of ``stage`` under ``epoch`` (what a stage's replicas subscribe to)."""
    return STAGE_IN.filter(fleet=fleet, epoch=epoch, stage=stage)


def stage_group(fleet: str, epoch: int, stage: int) -> str:
    """Shared-subscription group name of the replicas of ``stage`` in ``epoch``."""
    return f"{_format('fleet', fleet)}-e{_format('epoch', epoch)}-s{_format('stage', stage)}"


def part_in(fleet: str, epoch: int, stage: int, node_id: str, lead: str) -> str:
    """Part requests of split stage ``stage`` (epoch ``epoch``) from ``lead`` for the part node ``node_id``."""
    return PART_IN.topic(fleet=fleet, epoch=epoch, stage=stage, node_id=node_id, lead=lead)


def part_gather(fleet: str, epoch: int, stage: int, lead: str, node_id: str) -> str:
    """Part replies of split stage ``stage`` (epoch ``epoch``) from part node ``node_id`` for its ``lead``."""
    return PART_GATHER.topic(fleet=fleet, epoch=epoch, stage=stage, lead=lead, node_id=node_id)


def result(fleet: str, client_id: str) -> str:
    """Results for one client."""
    return RESULT.topic(fleet=fleet, client_id=client_id)


def error(fleet: str) -> str:
    """Error reports of a fleet."""
    return ERROR.topic(fleet=fleet)


def slice_chunk(fleet: str, slice_hash: str, index: int) -> str:
    """Retained chunk ``index`` of a model slice."""
    return SLICE_CHUNK.topic(fleet=fleet, slice_hash=slice_hash, index=index)


def slice_request(fleet: str) -> str:
    """Requests for slice chunks."""
    return SLICE_REQUEST.topic(fleet=fleet)


def fleet_filter(fleet: str) -> str:
    """Filter for one fleet's control plane (what a human watches); :func:`data_filter` for the rest."""
    return control_filter(fleet)


def control_filter(fleet: str) -> str:
    """Filter for one fleet's control plane: births, health, metrics, assignments, plan, errors."""
    return f"{PREFIX}/{_format('fleet', fleet)}/#"


def data_filter(fleet: str) -> str:
    """Filter for one fleet's data plane: frames, parts, results and model slices."""
    return f"{DATA_PREFIX}/{_format('fleet', fleet)}/#"


def shared(group: str, topic_filter: str) -> str:
    """Shared subscription ``$share/<group>/<filter>`` (MQTT v5)."""
    if not group or any(c in group for c in "/+#\x00"):
        raise ValueError(f"invalid share group {group!r}")
    validate_filter(topic_filter)
    if topic_filter.startswith("$share/"):
        raise ValueError("cannot nest shared subscriptions")
    return f"$share/{group}/{topic_filter}"


def spec_for(msg: object) -> tuple[TopicSpec, ...]:
    """Specs whose payload type ``msg`` is."""
    return tuple(s for s in SPECS.values() if s.accepts(msg))


def parse(topic: str) -> tuple[TopicSpec, dict[str, Any]]:
    """The spec of a concrete topic and its parameters (``stage`` and ``index`` as int)."""
    validate_topic(topic)
    levels = topic.split("/")
    for spec in SPECS.values():
        pat = spec.pattern.split("/")
        if len(pat) != len(levels):
            continue
        params: dict[str, Any] = {}
        for p, level in zip(pat, levels, strict=True):
            if p.startswith("{"):
                value = _parse_param(p[1:-1], level)
                if value is None:
                    break
                params[p[1:-1]] = value
            elif p != level:
                break
        else:
            return spec, params
    raise ValueError(f"not a fleetpipe topic: {topic!r}")


def check(topic: str, msg: object) -> dict[str, Any]:
    """The parameters of ``topic`` once ``msg`` is shown to belong there; else ValueError.

    ``msg`` must be a payload type of the topic's spec, of the topic's fleet, and every field the spec
    ``binds`` must equal its topic level: a message naming another identity than its topic is refused.
    """
    spec, params = parse(topic)
    if not spec.accepts(msg):
        raise ValueError(f"{type(msg).__name__} does not belong on {topic}")
    fleet = getattr(msg, "fleet", params["fleet"])
    if fleet != params["fleet"]:
        raise ValueError(f"a message of fleet {fleet!r} on {topic}")
    for param, name in spec.binds:
        value = getattr(msg, name)  # PlannerState.node_id is the reserved PLANNER_ID
        if value != params[param]:
            raise ValueError(f"{type(msg).__name__} naming {name}={value!r} on {topic}")
    return params


def matches(topic_filter: str, topic: str) -> bool:
    """Whether a concrete ``topic`` matches an MQTT subscription filter (pure MQTT 3.1.1/5 rules)."""
    validate_filter(topic_filter)
    validate_topic(topic)
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    flevels = topic_filter.split("/")
    tlevels = topic.split("/")
    if topic.startswith("$") and flevels[0] in ("+", "#"):
        return False
    for i, f in enumerate(flevels):
        if f == "#":
            return True  # also matches the parent level: "a/#" matches "a"
        if i >= len(tlevels):
            return False
        if f != "+" and f != tlevels[i]:
            return False
    return len(flevels) == len(tlevels)


def validate_topic(topic: str) -> None:
    """Raise ValueError unless ``topic`` is a valid concrete (publishable) topic name."""
    if not isinstance(topic, str):
        raise TypeError(f"topic must be str, got {type(topic).__name__}")
    if not topic or len(topic.encode()) > 65535 or "\x00" in topic:
        raise ValueError(f"invalid topic {topic!r}")
    if "+" in topic or "#" in topic:
        raise ValueError(f"topic {topic!r} contains a wildcard")


def validate_filter(topic_filter: str) -> None:
    """Raise ValueError unless ``topic_filter`` is a valid subscription filter."""
    if not isinstance(topic_filter, str):
        raise TypeError(f"filter must be str, got {type(topic_filter).__name__}")
    if not topic_filter or len(topic_filter.encode()) > 65535 or "\x00" in topic_filter:
        raise ValueError(f"invalid filter {topic_filter!r}")
    f = topic_filter
    if f.startswith("$share/"):
        parts = f.split("/", 2)
        if len(parts) < 3 or not parts[1] or "+" in parts[1] or "#" in parts[1] or not parts[2]:
            raise ValueError(f"invalid shared subscription {topic_filter!r}")
        f = parts[2]
    levels = f.split("/")
    for i, level in enumerate(levels):
        if level == "#" and i != len(levels) - 1:
            raise ValueError(f"'#' must be the last level in {topic_filter!r}")
        if level not in ("+", "#") and ("+" in level or "#" in level):
            raise ValueError(f"wildcard must fill a whole level in {topic_filter!r}")


# ---------------------------------------------------------------------------------------------- private


def _format(param: str, value: Any) -> str:
    if param in ("stage", "index", "epoch"):
        if type(value) is not int or not 0 <= value < 10**9:
            raise ValueError(f"{param} must be an int in [0, 1e9), got {value!r}")
        return str(value)
    if not isinstance(value, str):
        raise TypeError(f"{param} must be str, got {type(value).__name__}")
    pattern = _HASH if param == "slice_hash" else _NAME
    if not pattern.match(value) or (value == "request" and param == "slice_hash"):
        raise ValueError(f"{param} {value!r} is not allowed in a topic")
    return value


def _parse_param(param: str, level: str) -> Any:
    if param in ("stage", "index", "epoch"):
        return int(level) if _INT.match(level) else None
    pattern = _HASH if param == "slice_hash" else _NAME
    return level if pattern.match(level) else None
