"""The one exception tree of fleetpipe.

Foreign exceptions (paho, zeroconf, onnxruntime, onnx) are translated at the boundary with
``raise ... from exc``. Bad input that arrives from the network is logged (rate-limited), reported
on the fleet's error topic and dropped; it never crashes a daemon.

    FleetpipeError
    ├── ConfigError                 a config file, env var or flag is invalid
    ├── WireError                   bytes <-> message problems
    │   ├── DecodeError             malformed, truncated, oversize or ill-typed input
    │   │   └── VersionMismatch     a message with an unknown wire version
    │   └── EncodeError             a message that cannot be encoded (local bug)
    ├── TransportError              talking to the broker
    │   ├── BrokerUnavailable       cannot connect / connection lost
    │   └── AckTimeout              an acknowledgement did not arrive in time
    ├── DiscoveryError              zeroconf problems
    ├── ModelError                  model graphs and slicing
    │   ├── UnsupportedModel        corrupt or unsupported file, unknown dynamic shape
    │   └── SliceError              a cut or slice that would be invalid
    ├── PlanningError               the planner
    │   ├── InfeasiblePlan          no plan satisfies the constraints (says what is short)
    │   └── FleetUnavailable        a client's frame cannot run: the planner says the fleet is infeasible now
    ├── StageError                  running a stage on a node
    │   ├── RuntimeLoadError        a slice cannot be loaded
    │   │   └── UntrustedSlice      refused before loading: unsigned or badly signed assignment, external
    │   │                           data, a custom operator domain, oversize tensors, a test-only runtime
    │   └── InferenceError          a slice failed on an input (wrong shape, dtype, ...)
    └── FlowError                   frames and epochs
        ├── StaleEpoch              a frame or plan from an old epoch
        └── DuplicateFrame          a frame id seen before

``remote`` on WireError / FlowError tells whether the peer (True) or we (False) are at fault,
as h11's RemoteProtocolError / LocalProtocolError do.
"""

from __future__ import annotations

__all__ = [
    "AckTimeout",
    "BrokerUnavailable",
    "ConfigError",
    "DecodeError",
    "DiscoveryError",
    "DuplicateFrame",
    "EncodeError",
    "FleetUnavailable",
    "FleetpipeError",
    "FlowError",
    "InfeasiblePlan",
    "InferenceError",
    "ModelError",
    "PlanningError",
    "RuntimeLoadError",
    "SliceError",
    "StageError",
    "StaleEpoch",
    "TransportError",
    "UnsupportedModel",
    "UntrustedSlice",
    "VersionMismatch",
    "WireError",
]


class FleetpipeError(Exception):
    """Base of every error fleetpipe raises on purpose."""


class ConfigError(FleetpipeError):
    """Invalid configuration value."""


class WireError(FleetpipeError):
    """A message could not be converted between bytes and a value."""

    remote: bool = True


class DecodeError(WireError):
    """Input bytes are malformed, truncated, oversize or of the wrong type."""


class VersionMismatch(DecodeError):
    """The message carries a wire version this build does not speak."""


class EncodeError(WireError):
    """A value cannot be encoded; this is a local bug."""

    remote = False


class TransportError(FleetpipeError):
    """Problem talking to the MQTT broker."""


class BrokerUnavailable(TransportError):
    """The broker cannot be reached or the connection was lost."""


class AckTimeout(TransportError):
    """An acknowledgement did not arrive in time."""


class DiscoveryError(FleetpipeError):
    """zeroconf announce/browse failed."""


class ModelError(FleetpipeError):
    """Model graph analysis or slicing failed."""


class UnsupportedModel(ModelError):
    """Corrupt or unsupported model file, or a dynamic shape without a given input shape."""


class SliceError(ModelError):
    """A requested cut or slice would be invalid."""


class PlanningError(FleetpipeError):
    """The planner could not produce a plan."""


class InfeasiblePlan(PlanningError):
    """No plan satisfies the constraints; the message says what is short."""


class FleetUnavailable(PlanningError):
    """The fleet cannot run the model now (the planner published an infeasible plan); says what is short.

    Every pending and new frame of a client fails with it; once the planner publishes a feasible plan again,
    new frames run.
    """


class StageError(FleetpipeError):
    """Running a stage on a node failed."""


class RuntimeLoadError(StageError):
    """A slice could not be loaded by the inference runtime."""


class UntrustedSlice(RuntimeLoadError):
    """A slice or assignment refused before anything was loaded (signature, external data, operators, sizes)."""


class InferenceError(StageError):
    """A slice failed on a given input."""


class FlowError(FleetpipeError):
    """Frame/epoch bookkeeping rejected a frame."""

    remote: bool = True


class StaleEpoch(FlowError):
    """A frame or plan belongs to an older epoch."""


class DuplicateFrame(FlowError):
    """A frame id was seen before."""
