"""Transport: move ``(topic, bytes)`` between processes over MQTT v5.

This package is the only place fleetpipe meets a broker. It knows nothing about the wire format
(``fleetpipe.wire``): payloads are opaque bytes. Two implementations share the :class:`Bus` protocol:

- :class:`fleetpipe.transport.mqtt.MqttBus`, the single paho adapter (real broker);
- :class:`fleetpipe.transport.memory.MemoryBus` over a :class:`~fleetpipe.transport.memory.MemoryBroker`,
  an in-process fake for protocol tests (retained, wildcards, ``$share`` groups, wills).

Both are async context managers::

    async with MqttBus("mqtt://127.0.0.1:1883", client_id="node-a") as bus:
        await bus.subscribe("fleetpipe/v1/lab/#")
        await bus.publish("fleetpipe/v1/lab/x", b"...", qos=1)
        async for msg in bus.messages():
            ...

``MqttBus``, ``MemoryBus``, ``MemoryBroker`` and ``topic_matches`` are loaded lazily so that importing
the value types here does not import paho.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from fleetpipe.transport._url import BrokerUrl, parse_broker_url

if TYPE_CHECKING:
    from typing import Self

    from fleetpipe.transport.memory import MemoryBroker, MemoryBus, topic_matches
    from fleetpipe.transport.mqtt import MqttBus

__all__ = [
    "BrokerUrl",
    "Bus",
    "MemoryBroker",
    "MemoryBus",
    "Message",
    "MqttBus",
    "TLSParameters",
    "Will",
    "parse_broker_url",
    "topic_matches",
]

Payload = bytes | bytearray | memoryview
UserProperties = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Message:
    """One received (or to-be-sent) MQTT message with its v5 properties."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: UserProperties = ()
    message_expiry_s: int | None = None

    def __post_init__(self) -> None:
        _check_topic(self.topic)
        if not isinstance(self.payload, bytes):
            raise TypeError(f"payload must be bytes, not {type(self.payload).__name__}")
        _check_qos(self.qos)
        if self.correlation_data is not None and not isinstance(self.correlation_data, bytes):
            raise TypeError("correlation_data must be bytes or None")
        _check_user_properties(self.user_properties)
        _check_expiry(self.message_expiry_s)


@dataclass(frozen=True, slots=True)
class Will:
    """Last will: published by the broker when the client vanishes without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False

    def __post_init__(self) -> None:
        _check_topic(self.topic)
        if not isinstance(self.payload, bytes):
            raise TypeError("will payload must be bytes")
        _check_qos(self.qos)


@dataclass(frozen=True, slots=True)
class TLSParameters:
    """TLS settings for ``mqtts://`` (None ca_certs = system trust store)."""

    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.keyfile is not None and self.certfile is None:
            raise ValueError("keyfile given without certfile")


@runtime_checkable
class Bus(Protocol):
    """What node and planner code need from a broker connection.

    ``publish`` with qos >= 1 returns once the broker acknowledged (``AckTimeout`` otherwise).
    ``messages()`` yields every message matching the active subscriptions, in arrival order, and
    ends (StopAsyncIteration) when the bus is closed; a lost connection does not end it.
    """

    @property
    def client_id(self) -> str: ...

    async def publish(
        self,
        topic: str,
        payload: Payload,
        *,
        qos: int = 0,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        user_properties: UserProperties = (),
        expiry_s: int | None = None,
    ) -> None: ...

    def publish_threadsafe(
        self,
        topic: str,
        payload: Payload,
        *,
        qos: int = 0,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        user_properties: UserProperties = (),
        expiry_s: int | None = None,
    ) -> None: ...

    async def subscribe(self, filter: str, qos: int = 1) -> None: ...

    async def unsubscribe(self, filter: str) -> None: ...

    def messages(self) -> AsyncIterator[Message]: ...

    async def wait_connected(self, timeout: float | None = None) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


_LAZY: dict[str, str] = {
    "MqttBus": "fleetpipe.transport.mqtt",
    "MemoryBroker": "fleetpipe.transport.memory",
    "MemoryBus": "fleetpipe.transport.memory",
    "topic_matches": "fleetpipe.transport.memory",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# --- validation helpers (shared by mqtt.py and memory.py) -------------------------------------


def _check_topic(topic: str) -> None:
    if not isinstance(topic, str) or not topic:
        raise ValueError(f"topic must be a non-empty str, got {topic!r}")
    if "+" in topic or "#" in topic or "\0" in topic:
        raise ValueError(f"topic name may not contain wildcards or NUL: {topic!r}")


def _check_filter(filter: str) -> None:
    if not isinstance(filter, str) or not filter or "\0" in filter:
        raise ValueError(f"topic filter must be a non-empty str, got {filter!r}")
    levels = filter.split("/")
    if filter.startswith("$share/"):
        if len(levels) < 3 or not levels[1] or "+" in levels[1] or "#" in levels[1]:
            raise ValueError(f"shared subscription must be $share/<group>/<filter>: {filter!r}")
        levels = levels[2:]
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"'#' must be a whole last level: {filter!r}")
        if "+" in level and level != "+":
            raise ValueError(f"'+' must be a whole level: {filter!r}")


def _check_qos(qos: int) -> None:
    if qos not in (0, 1, 2):
        raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")


def _check_user_properties(props: UserProperties) -> None:
    if not isinstance(props, tuple) or not all(
        isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], str)
        for p in props
    ):
        raise TypeError("user_properties must be a tuple of (str, str) pairs")


def _check_expiry(expiry_s: int | None) -> None:
    if expiry_s is not None and (not isinstance(expiry_s, int) or not 0 < expiry_s < 2**32):
        raise ValueError(f"expiry_s must be a positive int (seconds), got {expiry_s!r}")


def _as_bytes(payload: Payload) -> bytes | bytearray:
    if isinstance(payload, bytes | bytearray):
        return payload
    if isinstance(payload, memoryview):
        return bytes(payload)  # paho needs bytes; one copy of the raw buffer
    raise TypeError(f"payload must be bytes-like, not {type(payload).__name__}")
