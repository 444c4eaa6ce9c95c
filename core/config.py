"""Explicit, frozen configuration values.

Only the CLI (the composition root) reads files, environment variables and flags; it builds these
objects with :func:`load` (TOML file, then ``FLEETPIPE_*`` env vars, then flags) and passes them
down. No module reads ``os.environ`` at import time.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fleetpipe._compat import tomllib
from fleetpipe.errors import ConfigError

__all__ = ["DEFAULT_FLEET", "BrokerConfig", "NodeConfig", "PlannerConfig", "load", "validate_name"]

DEFAULT_FLEET = "default"
_SECTIONS = ("node", "planner")  # the tables one config file may hold
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def validate_name(kind: str, value: str) -> str:
    """Return ``value`` if it is usable inside an MQTT topic, else raise ConfigError."""
    if not _NAME.match(value):
        raise ConfigError(f"{kind} {value!r} must match [A-Za-z0-9_.-]{{1,64}}")
    return value


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """How to reach the MQTT broker. ``url`` None means: discover it with zeroconf."""

    url: str | None = None
    username: str | None = None
    password_file: str | None = None
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    static_fallback: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from fleetpipe.transport import parse_broker_url

        for url in (self.url, *self.static_fallback):
            if url is None:
                continue
            try:
                parse_broker_url(url)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc

    def tls(self) -> Any:
        """``TLSParameters`` when a CA bundle is configured (or the URL is mqtts://), else None."""
        from fleetpipe.transport import TLSParameters

        if self.ca_certs or self.certfile:
            return TLSParameters(ca_certs=self.ca_certs, certfile=self.certfile, keyfile=self.keyfile)
        if self.url and self.url.startswith("mqtts://"):
            return TLSParameters()
        return None

    def password(self) -> str | None:
        """Read the password from its file (never from argv, where ``ps`` shows it)."""
        if self.password_file is None:
            return None
        try:
            return Path(self.password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read password file {self.password_file}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """A node daemon's configuration."""

    name: str
    fleet: str = DEFAULT_FLEET
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    emulate: str | None = None
    cache_dir: str = "~/.cache/fleetpipe/slices"
    threads: int = 1
    queue_limit: int = 64
    drain_timeout_s: float = 10.0
    # zeroconf: advertise on these interfaces (addresses or names; empty = all), or not at all.
    interfaces: tuple[str, ...] = ()
    announce: bool = True
    # COACH online bit-width; off = always send at the assigned (calibrated or configured) bits.
    adaptive_bits: bool = True
    # Time every layer of each loaded ONNX slice once and publish it (wire.NodeProfile) for the planner.
    report_profile: bool = True
    # The planner's Ed25519 public key (base64, `broker gen-creds` writes it to planner.pub): when set, an
    # assignment must carry the planner's signature or it is refused before anything is fetched or loaded.
    planner_key: str | None = None
    # Bounds on a slice before a session is created (fleetpipe.node.runtime.verify).
    max_slice_bytes: int = 1 << 30
    max_tensor_bytes: int = 1 << 30
    # Test harnesses only: accept slices for the test-only fake runtime (never set on a real node).
    allow_fake_runtime: bool = False

    def __post_init__(self) -> None:
        validate_name("node name", self.name)
        validate_name("fleet", self.fleet)
        if self.threads < 1:
            raise ConfigError("threads must be >= 1")
        if self.queue_limit < 1:
            raise ConfigError("queue_limit must be >= 1")


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    """The planner service's configuration."""

    model: str
    fleet: str = DEFAULT_FLEET
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    bits: int = 8
    min_nodes: int = 1
    expect_nodes: int = 0
    # Static shapes for model inputs with dynamic dims, "NAME=D,D,..." each (fleetpipe.models.shapes parses them):
    # TOML input_shape = ["x=1,3,224,224"]; a dynamic batch dim alone is taken as 1 without any.
    input_shape: tuple[str, ...] = ()
    replan_threshold: float = 0.2
    time_limit_s: float = 5.0
    calibration: str | None = None
    # ScalPipe fine-tuning when stages drift from their predictions; off = re-plan only on membership changes.
    adapt: bool = True
    # COACH early exit at calibrated cuts (needs a calibration with exit caches); off = every frame runs to the end.
    early_exit: bool = True
    interfaces: tuple[str, ...] = ()
    announce: bool = True
    # Parallelism inside stages (fleetpipe.planner.intra): "" = pipeline stages only (the default),
    # "latency" = minimise one frame's latency with single, replicated and split stages; "pipeline" = the
    # same objective and cost model with single-device stages only (the baseline split stages are measured against).
    intra: str = ""
    # Intra plans: fixed cost of one message in ms; None = start at 1 ms and raise it to what split leads measure.
    intra_msg_ms: float | None = None
    # Intra plans: at most this many row tiles per device of a spatial split unit (Galaxy+ overlap of its
    # messages with compute); the planner picks 1, 2, 4, ... per unit where it pays. 1 = no tiling.
    intra_tiles: int = 4
    # Intra plans: cost split units from their part slices timed on the planner's host (halo rows, smaller
    # kernels), not only from the cost model's share; off = the model alone.
    intra_measure_parts: bool = True
    # JSON file of per-layer host times: read when it matches the model, else profiled and written.
    profile: str | None = None
    # Ed25519 private key file (PEM, `broker gen-creds` writes planner.key): sign every assignment with it.
    signing_key: str | None = None
    # Bit floors: without a calibration, each cut ships at least the lowest width whose end-to-end output error
    # on probe inputs stays within bit_tolerance (relative L2 per output; fleetpipe.planner.bitwidth). Off:
    # every cut ships ``bits`` as given (experiments only: accuracy is then unchecked).
    bit_tolerance: float = 0.01
    bit_floors: bool = True

    def __post_init__(self) -> None:
        validate_name("fleet", self.fleet)
        if self.bits not in (2, 3, 4, 5, 6, 7, 8, 16, 32):
            raise ConfigError(f"bits must be 2..8, 16 or 32, not {self.bits}")
        if self.intra_msg_ms is not None and not (self.intra_msg_ms >= 0 and self.intra_msg_ms < 1e6):
            raise ConfigError(f"intra_msg_ms must be >= 0, not {self.intra_msg_ms}")
        if self.intra not in ("", "latency", "pipeline"):
            raise ConfigError(f"intra must be '', 'latency' or 'pipeline', not {self.intra!r}")
        if not 1 <= self.intra_tiles <= 16:
            raise ConfigError(f"intra_tiles must be 1..16, not {self.intra_tiles}")
        if not (0 < self.bit_tolerance < 1e6):
            raise ConfigError(f"bit_tolerance must be > 0, not {self.bit_tolerance}")


T = TypeVar("T")


def load(
    cls: type[T],
    *,
    file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> T:
    """Build ``cls`` from defaults, a TOML file, ``FLEETPIPE_<FIELD>`` env vars, then flags (later wins).

    Broker settings live in a ``[broker]`` table / ``FLEETPIPE_BROKER_<FIELD>`` / ``broker_<field>`` flags.
    ``None`` flag values mean "not given". ``defaults`` are computed fallbacks that every other source
    beats (the node's host name as its name).
    """
    values: dict[str, Any] = dict(defaults or {})
    broker: dict[str, Any] = {}
    if file is not None:
        try:
            data = tomllib.loads(Path(file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {file}: {exc}") from exc
        own = cls.__name__.removesuffix("Config").lower()
        section = data.get(own, data)
        tables = sorted(k for k, v in data.items() if isinstance(v, dict) and k not in (own, "broker", *_SECTIONS))
        if tables:
            raise ConfigError(f"{file}: unknown table [{tables[0]}] (known: [{own}], [broker])")
        broker.update(data.get("broker", {}))
        values.update({k: v for k, v in section.items() if k != "broker" and not isinstance(v, dict)})
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    broker_names = {f.name for f in dataclasses.fields(BrokerConfig)}
    for key, raw in (env or {}).items():
        if not key.startswith("FLEETPIPE_"):
            continue
        name = key.removeprefix("FLEETPIPE_").lower()
        if name.startswith("broker_") and name.removeprefix("broker_") in broker_names:
            broker[name.removeprefix("broker_")] = raw
        elif name in names:
            values[name] = raw
    for name, value in (flags or {}).items():
        if value is None:
            continue
        if name.startswith("broker_") and name.removeprefix("broker_") in broker_names:
            broker[name.removeprefix("broker_")] = value
        elif name in names:
            values[name] = value
    unknown = set(values) - set(names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} settings: {sorted(unknown)}")
    if "broker" in names:
        values["broker"] = _coerce_fields(BrokerConfig, broker)
    return cls(**_coerce_fields_dict(cls, values))  # type: ignore[arg-type]


def _coerce_fields(cls: type[T], values: dict[str, Any]) -> T:
    return cls(**_coerce_fields_dict(cls, values))


def _coerce_fields_dict(cls: type[Any], values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in values.items():
        f = defaults.get(name)
        if f is None:
            raise ConfigError(f"unknown {cls.__name__} setting {name!r}")
        out[name] = _coerce(name, value, str(f.type))
    return out


def _coerce(name: str, value: Any, annotation: str) -> Any:
    if not isinstance(value, str) or annotation.startswith("str"):
        if annotation.startswith("tuple") and isinstance(value, list):
            return tuple(value)
        return value
    try:
        if annotation.startswith("int"):
            return int(value)
        if annotation.startswith("float"):
            return float(value)
        if annotation.startswith("bool"):
            return value.lower() in ("1", "true", "yes", "on")
        if annotation.startswith("tuple[int"):
            return tuple(int(v) for v in value.replace("x", ",").split(",") if v)
        if annotation.startswith("tuple"):
            return tuple(v for v in value.split(",") if v)
    except ValueError as exc:
        raise ConfigError(f"{name}: cannot parse {value!r} as {annotation}") from exc
    return value
