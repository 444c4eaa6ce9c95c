"""In-process broker and bus for protocol tests (the MockTransport / ConnectionPair idea).

``MemoryBroker`` keeps retained messages, matches wildcard filters, splits ``$share/<group>/...``
subscriptions round-robin among the group's members (retained messages are not sent to shared
subscriptions, as in MQTT v5), and publishes a client's will when the test calls ``crash(client_id)``.
``MemoryBus`` implements :class:`fleetpipe.transport.Bus` on top of it. Delivery is synchronous and
in-order inside one event loop; there is no network, so there is no reconnect and no ack timeout.
The inbound queue is unbounded (tests that need backpressure use the real broker).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self

from fleetpipe.errors import BrokerUnavailable
from fleetpipe.transport import (
    Message,
    Payload,
    UserProperties,
    Will,
    _as_bytes,
    _check_filter,
    _check_qos,
)

__all__ = ["MemoryBroker", "MemoryBus", "split_shared", "topic_matches"]


def topic_matches(filter: str, topic: str) -> bool:
    """True if the MQTT topic filter (``+``, ``#``; no ``$share`` prefix) matches the topic name."""
    if topic.startswith("$") and filter[:1] in ("+", "#"):
        return False  # MQTT 4.7.2: wildcards at the first level do not match $-topics
    f_levels = filter.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True  # also matches the parent level ("a/#" matches "a")
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


def split_shared(filter: str) -> tuple[str | None, str]:
    """``$share/g/a/b`` -> ``("g", "a/b")``; a plain filter -> ``(None, filter)``."""
    if filter.startswith("$share/"):
        _, group, rest = filter.split("/", 2)
        return group, rest
    return None, filter


class MemoryBroker:
    """An in-process MQTT broker good enough for protocol tests."""

    def __init__(self) -> None:
        self._buses: dict[str, MemoryBus] = {}
        self._retained: dict[str, Message] = {}
        self._rr = itertools.count()
        self.published: list[Message] = []
        """Every message published through this broker, in order (for assertions)."""

    @property
    def retained(self) -> dict[str, Message]:
        """A copy of the retained messages by topic."""
        return dict(self._retained)

    def crash(self, client_id: str) -> None:
        """Drop a client without DISCONNECT: its will (if any) is published, its bus goes dead."""
        bus = self._buses.pop(client_id, None)
        if bus is None:
            raise KeyError(f"no connected client {client_id!r}")
        bus._on_crash()
        if bus.will is not None:
            w = bus.will
            self.publish(Message(w.topic, w.payload, qos=w.qos, retain=w.retain))

    def publish(self, message: Message) -> None:
        """Store (if retained) and route a message to every matching subscription."""
        self.published.append(message)
        if message.retain:
            if message.payload:
                self._retained[message.topic] = message
            else:
                self._retained.pop(message.topic, None)
        live = replace(message, retain=False)
        groups: dict[tuple[str, str], list[tuple[MemoryBus, int]]] = {}
        for bus in list(self._buses.values()):
            best: int | None = None
            for sub, qos in bus._subscriptions.items():
                group, flt = split_shared(sub)
                if not topic_matches(flt, message.topic):
                    continue
                if group is None:
                    best = qos if best is None else max(best, qos)
                else:
                    groups.setdefault((group, flt), []).append((bus, qos))
            if best is not None:
                bus._deliver(replace(live, qos=min(message.qos, best)))
        for members in groups.values():
            bus, qos = members[next(self._rr) % len(members)]
            bus._deliver(replace(live, qos=min(message.qos, qos)))

    # --- used by MemoryBus ---------------------------------------------------------------------

    def _connect(self, bus: MemoryBus) -> None:
        old = self._buses.get(bus.client_id)
        if old is not None and old is not bus:
            old._on_crash()  # MQTT session takeover: the old connection is dropped
        self._buses[bus.client_id] = bus

    def _disconnect(self, bus: MemoryBus) -> None:
        if self._buses.get(bus.client_id) is bus:
            del self._buses[bus.client_id]

    def _retained_for(self, filter: str) -> list[Message]:
        group, flt = split_shared(filter)
        if group is not None:
            return []
        return [m for t, m in self._retained.items() if topic_matches(flt, t)]


class MemoryBus:
    """A :class:`fleetpipe.transport.Bus` connected to a :class:`MemoryBroker`."""

    def __init__(
        self,
        broker: MemoryBroker,
        client_id: str,
        will: Will | None = None,
        *,
        on_connect: Callable[[MemoryBus], Awaitable[None]] | None = None,
    ) -> None:
        self._broker = broker
        self._client_id = client_id
        self.will = will
        self._on_connect_hook = on_connect
        self._subscriptions: dict[str, int] = {}
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = False
        self._connected = asyncio.Event()

    @property
    def client_id(self) -> str:
        """The client identifier."""
        return self._client_id

    @property
    def connected(self) -> bool:
        """True between ``__aenter__`` and close/crash."""
        return self._open

    async def __aenter__(self) -> Self:
        if self._open or self._loop is not None:
            raise RuntimeError("a MemoryBus can be entered only once")
        self._loop = asyncio.get_running_loop()
        self._broker._connect(self)
        self._open = True
        self._connected.set()
        if self._on_connect_hook is not None:
            await self._on_connect_hook(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Disconnect cleanly (no will) and end ``messages()``. Idempotent."""
        if self._open:
            self._broker._disconnect(self)
            self._on_crash()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Return at once while open; BrokerUnavailable once closed."""
        self._require_open()

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
    ) -> None:
        """Route the message through the broker synchronously."""
        self._require_open()
        self._broker.publish(
            Message(
                topic,
                bytes(_as_bytes(payload)),
                qos,
                retain,
                response_topic,
                correlation_data,
                tuple(user_properties),
                expiry_s,
            )
        )
        await asyncio.sleep(0)  # a publish is a suspension point, as with the real bus

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
    ) -> None:
        """Publish from any thread (hops onto the bus's event loop)."""
        self._require_open()
        assert self._loop is not None
        message = Message(
            topic,
            bytes(_as_bytes(payload)),
            qos,
            retain,
            response_topic,
            correlation_data,
            tuple(user_properties),
            expiry_s,
        )
        self._loop.call_soon_threadsafe(self._publish_if_open, message)

    async def subscribe(self, filter: str, qos: int = 1) -> None:
        """Add a filter; matching retained messages are delivered (retain=True) at once."""
        _check_filter(filter)
        _check_qos(qos)
        self._require_open()
        self._subscriptions[filter] = qos
        for m in self._broker._retained_for(filter):
            self._deliver(replace(m, qos=min(m.qos, qos), retain=True))

    async def unsubscribe(self, filter: str) -> None:
        """Remove a filter."""
        _check_filter(filter)
        self._require_open()
        self._subscriptions.pop(filter, None)

    def messages(self) -> AsyncIterator[Message]:
        """Iterate over received messages; ends when the bus is closed or crashed."""
        return _MemoryIterator(self._queue)

    # --- private -------------------------------------------------------------------------------

    def _require_open(self) -> None:
        if not self._open:
            raise BrokerUnavailable(f"MemoryBus {self._client_id!r} is not open")

    def _publish_if_open(self, message: Message) -> None:
        if self._open:
            self._broker.publish(message)

    def _deliver(self, message: Message) -> None:
        if self._open:
            self._queue.put_nowait(message)

    def _on_crash(self) -> None:
        if self._open:
            self._open = False
            self._connected.clear()
            self._queue.put_nowait(None)


class _MemoryIterator:
    __slots__ = ("_queue",)

    def __init__(self, queue: asyncio.Queue[Message | None]) -> None:
        self._queue = queue

    def __aiter__(self) -> _MemoryIterator:
        return self

    async def __anext__(self) -> Message:
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)
            raise StopAsyncIteration
        return item
