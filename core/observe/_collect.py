"""Subscribe to a fleet's telemetry and fold it into a :class:`fleetpipe.metrics.FleetView` (async shell)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from fleetpipe import topics, wire
from fleetpipe.config import BrokerConfig
from fleetpipe.errors import WireError
from fleetpipe.metrics import FleetView

__all__ = ["client_id", "open_bus", "telemetry_filters", "watch"]


def client_id(role: str) -> str:
    """A unique MQTT client id for an observer process."""
    return f"fleetpipe-{role}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def open_bus(broker: str | BrokerConfig, role: str, **kwargs: Any) -> Any:
    """An (unentered) ``MqttBus`` for an observer: a URL, or a ``BrokerConfig`` with credentials and TLS."""
    from fleetpipe.transport.mqtt import MqttBus

    b = BrokerConfig(url=broker) if isinstance(broker, str) else broker
    return MqttBus(b.url or "", client_id=client_id(role), username=b.username, password=b.password(),
                   tls=b.tls(), **kwargs)


def telemetry_filters(fleet: str, *, results: bool) -> list[tuple[str, int]]:
    """(filter, qos) pairs an observer subscribes to; results at QoS 0 so a slow observer never holds them up."""
    out = [
        (topics.NODE_STATE.filter(fleet=fleet), 1),
        (topics.NODE_HEALTH.filter(fleet=fleet), 0),
        (topics.NODE_METRICS.filter(fleet=fleet), 0),
        (topics.plan(fleet), 1),
        (topics.error(fleet), 1),
    ]
    if results:
        out.append((topics.RESULT.filter(fleet=fleet), 0))
    return out


async def watch(url: str | BrokerConfig, view: FleetView, *, seconds: float | None = None,
                stop: asyncio.Event | None = None, results: bool = False, lock: threading.Lock | None = None,
                on_message: Callable[[wire.Message], None] | None = None,
                subscribed: asyncio.Event | None = None, on_bus: Callable[[Any], None] | None = None) -> None:
    """Fold the fleet's messages into ``view`` for ``seconds`` (or until ``stop`` is set).

    ``on_bus`` is given the connected ``MqttBus`` (its ``connected`` tells whether the broker is still there)."""
    deadline = None if seconds is None else time.monotonic() + seconds
    async with open_bus(url, "observe", queue_maxsize=1000) as bus:
        if on_bus is not None:
            on_bus(bus)
        for flt, qos in telemetry_filters(view.fleet, results=results):
            await bus.subscribe(flt, qos)
        if subscribed is not None:
            subscribed.set()
        it = bus.messages().__aiter__()
        stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return
                nxt = asyncio.ensure_future(it.__anext__())
                waiting = {nxt} if stopper is None else {nxt, stopper}
                done, _ = await asyncio.wait(waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await nxt
                    return
                try:
                    message = nxt.result()
                except StopAsyncIteration:
                    return
                _fold(view, message.topic, message.payload, lock, on_message)
        finally:
            if stopper is not None:
                stopper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stopper


# ---------------------------------------------------------------------------------------------- private


def _fold(view: FleetView, topic: str, payload: bytes, lock: threading.Lock | None,
          on_message: Callable[[wire.Message], None] | None) -> None:
    try:
        msg = wire.decode(payload)
        topics.check(topic, msg)  # a node's health or metrics naming another node than its topic: not shown
    except (WireError, ValueError):
        return  # not ours to judge: the nodes report bad input on the error topic
    now = time.time()
    if lock is None:
        view.apply(msg, now)
    else:
        with lock:
            view.apply(msg, now)
    if on_message is not None:
        on_message(msg)
