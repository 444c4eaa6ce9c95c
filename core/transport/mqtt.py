"""MqttBus: the single paho-mqtt (2.x, MQTT v5) adapter behind :class:`fleetpipe.transport.Bus`.

Theory of operation
-------------------
paho runs its own network thread (``loop_start``), so socket I/O never blocks the event loop. The paho
callbacks in that thread touch none of our state: they turn paho objects into plain values and hand
them to the loop with ``call_soon_threadsafe``. Everything else (ack futures keyed by message id, the
inbound queue, the set of active filters, the ``connected`` event) is owned by the loop thread.

Connecting. ``__aenter__`` starts the network thread and waits for the first CONNACK. A refused or
failed first connection raises ``BrokerUnavailable`` at once; with ``wait=True`` it is retried with
backoff instead until it succeeds (wrap in ``asyncio.timeout`` to bound it). No CONNACK within
``timing.CONNECT_TIMEOUT_S`` also raises ``BrokerUnavailable``.

Reconnecting. After a lost connection paho reconnects with exponential backoff between
``timing.RECONNECT_MIN_S`` and ``timing.RECONNECT_MAX_S``. After every CONNACK the loop re-subscribes
all active filters (waiting for the SUBACK), sets ``connected``, then awaits the ``on_connect(bus)``
hook so a node can republish its retained birth. QoS >= 1 publishes that were in flight are re-sent by
paho and their ``publish()`` calls still complete (or raise ``AckTimeout``). ``messages()`` is not
ended by a lost connection. With ``clean_start=True`` (default) messages published while we were away
are lost; use ``clean_start=False, session_expiry_s=N`` to have the broker keep them.

Inbound flow control (no loss for QoS >= 1). Messages are acknowledged when the consumer takes them
from ``messages()``, not when they arrive (paho ``manual_ack``), and CONNECT carries the MQTT v5
Receive Maximum = ``queue_maxsize``. The broker therefore never has more than ``queue_maxsize``
unacknowledged QoS 1/2 messages in flight to us: it queues the rest itself (mosquitto
``max_queued_messages``). paho's thread never blocks and our publish acks keep flowing. QoS 0 has no
flow control in MQTT: at most ``queue_maxsize`` QoS 0 messages wait in our queue; beyond that they
are dropped, counted in ``dropped_qos0`` and logged (rate-limited). So the queue holds at most
2 x ``queue_maxsize`` messages.

Closing. ``close()`` / ``__aexit__`` sends DISCONNECT (the broker does not publish the will), stops
the network thread, fails pending ack waits with ``BrokerUnavailable``, and ends every
``messages()`` iterator after the messages already queued have been yielded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from fleetpipe import _compat, timing
from fleetpipe.errors import AckTimeout, BrokerUnavailable, EncodeError, TransportError
from fleetpipe.transport import (
    BrokerUrl,
    Message,
    Payload,
    TLSParameters,
    UserProperties,
    Will,
    _as_bytes,
    _check_expiry,
    _check_filter,
    _check_qos,
    _check_topic,
    _check_user_properties,
    parse_broker_url,
)
from fleetpipe.wire import MAX_PACKET_BYTES

if TYPE_CHECKING:
    from typing import Self

__all__ = ["MqttBus"]

#: Bytes an MQTT v5 PUBLISH spends beside its topic and payload (fixed header, properties: ours stay well under).
_PACKET_HEADROOM = 4096

_log = logging.getLogger(__name__)

OnConnectHook = Callable[["MqttBus"], Awaitable[None]]


class MqttBus:
    """An MQTT v5 connection to one broker; see the module docstring for the semantics."""

    def __init__(
        self,
        url: str | BrokerUrl,
        *,
        client_id: str,
        will: Will | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: TLSParameters | None = None,
        clean_start: bool = True,
        session_expiry_s: int = 0,
        queue_maxsize: int = 100,
        on_connect: OnConnectHook | None = None,
        wait: bool = False,
        keepalive_s: int = 30,
        tcp_nodelay: bool = True,
        max_inflight: int = 100,
        socket_buffer_bytes: int | None = None,
    ) -> None:
        """Configure only; nothing touches the network before ``__aenter__``.

        Args:
            wait: at start, retry a failed connection with backoff instead of raising.
            queue_maxsize: inbound bound (also sent as MQTT v5 Receive Maximum), 1..65535.
            tcp_nodelay: set TCP_NODELAY on the client socket (off costs ~40-90 ms per QoS 1 ack).
            max_inflight: outbound QoS >= 1 messages paho keeps unacknowledged; more are queued.
            socket_buffer_bytes: SO_SNDBUF/SO_RCVBUF; None keeps kernel autotuning.
        """
        self._url = parse_broker_url(url)
        if tls is not None and not self._url.tls:
            raise ValueError("TLS parameters given for a plain mqtt:// URL; use mqtts://")
        if not client_id:
            raise ValueError("client_id must be non-empty")
        if not 1 <= queue_maxsize <= 65535:
            raise ValueError("queue_maxsize must be in 1..65535 (it is the MQTT Receive Maximum)")
        if session_expiry_s < 0:
            raise ValueError("session_expiry_s must be >= 0")
        self._client_id = client_id
        self._will = will
        self._username = username
        self._password = password
        self._tls = tls if tls is not None else (TLSParameters() if self._url.tls else None)
        self._clean_start = clean_start
        self._session_expiry_s = session_expiry_s
        self._queue_maxsize = queue_maxsize
        self._on_connect_hook = on_connect
        self._wait = wait
        self._connect_failures = 0
        self._warned_at = -1e9
        self._keepalive_s = keepalive_s
        self._tcp_nodelay = tcp_nodelay
        self._max_inflight = max_inflight
        self._socket_buffer_bytes = socket_buffer_bytes

        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: paho.Client | None = None
        self._closed = False
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._generation = 0
        self._subscriptions: dict[str, int] = {}
        self._pending_pub: dict[int, asyncio.Future[ReasonCode]] = {}
        self._pending_sub: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._queue: asyncio.Queue[_Inbound | None] = asyncio.Queue()
        self._qos0_queued = 0
        self._first_connect: asyncio.Future[None] | None = None
        self._after_connect: asyncio.Task[None] | None = None
        self._last_drop_log = 0.0
        self.dropped_qos0 = 0
        """QoS 0 messages dropped because the inbound queue was full."""

    # --- public surface ------------------------------------------------------------------------

    @property
    def client_id(self) -> str:
        """The MQTT client identifier."""
        return self._client_id

    @property
    def url(self) -> BrokerUrl:
        """The broker address."""
        return self._url

    @property
    def connected(self) -> bool:
        """True once connected and re-subscribed; False while reconnecting or closed."""
        return self._connected.is_set()

    async def __aenter__(self) -> Self:
        if self._client is not None or self._closed:
            raise RuntimeError("an MqttBus can be entered only once")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._first_connect = loop.create_future()
        self._client = client = self._make_client()
        try:
            client.connect_async(
                self._url.host,
                self._url.port,
                keepalive=self._keepalive_s,
                clean_start=self._clean_start,
                properties=self._connect_properties(),
            )
        except (OSError, ValueError) as exc:
            raise BrokerUnavailable(f"cannot connect to MQTT broker at {self._url}: {exc}") from exc
        client.loop_start()
        try:
            if self._wait:
                await self._first_connect
            else:
                async with _compat.timeout(timing.CONNECT_TIMEOUT_S):
                    await self._first_connect
        except TimeoutError as exc:
            await self.close()
            raise BrokerUnavailable(
                f"no CONNACK from MQTT broker at {self._url} within {timing.CONNECT_TIMEOUT_S} s"
            ) from exc
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """DISCONNECT (no will), stop paho's thread, end ``messages()``. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._connected.clear()
        if self._after_connect is not None and not self._after_connect.done():
            self._after_connect.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # cancelled or already logged
                await self._after_connect
        client = self._client
        if client is not None:
            was_connected = client.is_connected()
            self._disconnected.clear()
            client.disconnect()
            if was_connected:
                try:
                    async with _compat.timeout(2.0):
                        await self._disconnected.wait()
                except TimeoutError:
                    _log.warning("%s: no clean disconnect from %s", self._client_id, self._url)
            await _stop_network_thread(client)
        closed = BrokerUnavailable(f"MqttBus {self._client_id!r} closed")
        for futures in (self._pending_pub, self._pending_sub):
            for fut in futures.values():
                if not fut.done():
                    fut.set_exception(closed)
        if self._first_connect is not None and not self._first_connect.done():
            self._first_connect.cancel()
        self._queue.put_nowait(None)

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until connected and re-subscribed; BrokerUnavailable after ``timeout`` or if closed."""
        self._require_open()
        try:
            async with _compat.timeout(timeout):
                await self._connected.wait()
        except TimeoutError as exc:
            raise BrokerUnavailable(f"not connected to {self._url} within {timeout} s") from exc

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
        """Publish; for qos >= 1 return after the broker's PUBACK (AckTimeout after ACK_TIMEOUT_S).

        QoS 0 while disconnected raises BrokerUnavailable (it would be lost); QoS >= 1 while
        disconnected is queued by paho and sent on reconnect.
        """
        info = self._send_publish(
            topic, payload, qos, retain, response_topic, correlation_data, user_properties, expiry_s
        )
        if qos == 0:
            if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                raise BrokerUnavailable(f"not connected to {self._url}: QoS 0 message to {topic!r} not sent")
            return
        assert self._loop is not None
        fut: asyncio.Future[ReasonCode] = self._loop.create_future()
        self._pending_pub[info.mid] = fut
        try:
            async with _compat.timeout(timing.ACK_TIMEOUT_S):
                reason = await fut
        except TimeoutError as exc:
            raise AckTimeout(
                f"no PUBACK for {topic!r} (mid {info.mid}) within {timing.ACK_TIMEOUT_S} s"
            ) from exc
        finally:
            self._pending_pub.pop(info.mid, None)
        if reason.is_failure:
            raise TransportError(f"broker rejected publish to {topic!r}: {reason}")

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
        """Fire-and-forget publish from any thread (e.g. the inference worker); never waits for acks.

        A QoS 0 message that cannot be sent (disconnected) is logged, not raised.
        """
        info = self._send_publish(
            topic, payload, qos, retain, response_topic, correlation_data, user_properties, expiry_s
        )
        if qos == 0 and info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            _log.warning("%s: not connected, QoS 0 message to %r dropped", self._client_id, topic)

    async def subscribe(self, filter: str, qos: int = 1) -> None:
        """Subscribe (``$share/<group>/...`` allowed) and wait for the SUBACK.

        The filter stays active across reconnects until ``unsubscribe``. If disconnected, this
        waits for the reconnect (which subscribes it); AckTimeout after ACK_TIMEOUT_S, but the
        filter stays registered and will be subscribed on the next connect.
        """
        _check_filter(filter)
        _check_qos(qos)
        self._require_open()
        self._subscriptions[filter] = qos
        try:
            async with _compat.timeout(timing.ACK_TIMEOUT_S):
                while True:
                    if not self._connected.is_set():
                        await self._connected.wait()  # the after-connect step subscribed it
                        return
                    try:
                        reasons = await self._send_subscribe({filter: qos})
                    except _ConnectionLost:
                        continue
                    break
        except TimeoutError as exc:
            raise AckTimeout(f"no SUBACK for {filter!r} within {timing.ACK_TIMEOUT_S} s") from exc
        if reasons and reasons[0].is_failure:
            self._subscriptions.pop(filter, None)
            raise TransportError(f"broker refused subscription {filter!r}: {reasons[0]}")

    async def unsubscribe(self, filter: str) -> None:
        """Remove a filter; waits for the UNSUBACK when connected."""
        _check_filter(filter)
        client = self._require_open()
        self._subscriptions.pop(filter, None)
        if not self._connected.is_set():
            return
        rc, mid = client.unsubscribe(filter)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return  # connection just dropped; with clean_start the broker forgot it anyway
        try:
            async with _compat.timeout(timing.ACK_TIMEOUT_S):
                await self._await_mid(mid)
        except _ConnectionLost:
            return
        except TimeoutError as exc:
            raise AckTimeout(f"no UNSUBACK for {filter!r} within {timing.ACK_TIMEOUT_S} s") from exc

    def messages(self) -> AsyncIterator[Message]:
        """Iterate over received messages; ends when the bus is closed. Use one consumer."""
        return _MessageIterator(self)

    # --- private: paho setup -----------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            reconnect_on_failure=True,
            manual_ack=True,
        )
        client.connect_timeout = timing.CONNECT_TIMEOUT_S
        client.reconnect_delay_set(timing.RECONNECT_MIN_S, timing.RECONNECT_MAX_S)  # type: ignore[arg-type,unused-ignore]
        client.max_inflight_messages_set(self._max_inflight)
        client.max_queued_messages_set(0)
        if self._will is not None:
            client.will_set(self._will.topic, self._will.payload, self._will.qos, self._will.retain)
        if self._username is not None:
            client.username_pw_set(self._username, self._password)
        if self._tls is not None:
            client.tls_set_context(_ssl_context(self._tls))
            if self._tls.insecure:
                client.tls_insecure_set(True)
        client.on_socket_open = self._on_socket_open
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        return client

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.ReceiveMaximum = self._queue_maxsize
        # The broker never forwards us a packet larger than any fleetpipe process accepts (its own max_packet_size).
        props.MaximumPacketSize = MAX_PACKET_BYTES
        if self._session_expiry_s:
            props.SessionExpiryInterval = self._session_expiry_s
        return props

    def _require_open(self) -> paho.Client:
        if self._client is None or self._closed:
            raise BrokerUnavailable(f"MqttBus {self._client_id!r} is not open")
        return self._client

    def _send_publish(
        self,
        topic: str,
        payload: Payload,
        qos: int,
        retain: bool,
        response_topic: str | None,
        correlation_data: bytes | None,
        user_properties: UserProperties,
        expiry_s: int | None,
    ) -> paho.MQTTMessageInfo:
        _check_topic(topic)
        _check_qos(qos)
        client = self._require_open()
        props = _publish_properties(response_topic, correlation_data, user_properties, expiry_s)
        data = _as_bytes(payload)
        if len(data) + len(topic) + _PACKET_HEADROOM > MAX_PACKET_BYTES:  # the broker would disconnect us for it
            raise EncodeError(f"cannot publish {len(data)} bytes to {topic!r}: more than a packet holds "
                              f"(MAX_PACKET_BYTES={MAX_PACKET_BYTES})")
        try:
            info = client.publish(topic, data, qos=qos, retain=retain, properties=props)
        except ValueError as exc:  # paho: bad topic / payload too large
            raise TransportError(f"cannot publish to {topic!r}: {exc}") from exc
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise TransportError(f"cannot publish to {topic!r}: {paho.error_string(info.rc)}")
        return info

    async def _send_subscribe(self, filters: dict[str, int]) -> list[ReasonCode]:
        assert self._client is not None
        rc, mid = self._client.subscribe([(f, SubscribeOptions(qos=q)) for f, q in filters.items()])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise _ConnectionLost(paho.error_string(rc))
        return await self._await_mid(mid)

    async def _await_mid(self, mid: int) -> list[ReasonCode]:
        assert self._loop is not None
        fut: asyncio.Future[list[ReasonCode]] = self._loop.create_future()
        self._pending_sub[mid] = fut
        try:
            return await fut
        finally:
            self._pending_sub.pop(mid, None)

    # --- private: paho callbacks (network thread; hand over to the loop, nothing else) ---------

    def _to_loop(self, fn: Callable[..., object], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed: nobody is listening any more
            loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if self._tcp_nodelay else 0)
            if self._socket_buffer_bytes:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._socket_buffer_bytes)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._socket_buffer_bytes)
        except OSError as exc:
            _log.warning("%s: cannot set socket options: %s", self._client_id, exc)

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        self._to_loop(self._async_on_connect, reason)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self._to_loop(self._async_on_connect_fail)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        self._to_loop(self._async_on_disconnect, reason)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            message = _to_message(msg)
        except (UnicodeDecodeError, ValueError, TypeError) as exc:
            _log.warning("%s: dropping undecodable message: %s", self._client_id, exc)
            message = None
        self._to_loop(self._async_on_message, message, msg.mid, msg.qos)

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        self._to_loop(self._async_on_puback, mid, reason)

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], props: Any
    ) -> None:
        self._to_loop(self._async_on_suback, mid, list(reasons))

    def _on_unsubscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        self._to_loop(self._async_on_suback, mid, list(reasons or []))

    # --- private: loop side of the callbacks --------------------------------------------------

    def _async_on_connect(self, reason: ReasonCode) -> None:
        if self._closed:
            return
        first = self._first_connect
        if reason.is_failure:
            err = BrokerUnavailable(f"MQTT broker at {self._url} refused the connection: {reason}")
            if first is not None and not first.done():
                first.set_exception(err)
            else:
                _log.warning("%s: %s; retrying", self._client_id, err)
            return
        self._generation += 1
        self._after_connect = asyncio.ensure_future(self._async_after_connect(self._generation))

    async def _async_after_connect(self, generation: int) -> None:
        done: dict[str, int] = {}
        try:
            async with _compat.timeout(timing.ACK_TIMEOUT_S):
                while todo := {f: q for f, q in self._subscriptions.items() if done.get(f) != q}:
                    reasons = await self._send_subscribe(todo)
                    for (f, q), reason in zip(todo.items(), reasons, strict=False):
                        if reason.is_failure:
                            _log.error("%s: broker refused subscription %r: %s", self._client_id, f, reason)
                        done[f] = q
        except _ConnectionLost:
            return  # the next CONNACK starts over
        except TimeoutError:
            _log.error("%s: re-subscribing timed out; waiting for the next reconnect", self._client_id)
            return
        if generation != self._generation or self._closed:
            return
        self._connected.set()
        if self._on_connect_hook is not None:
            try:
                await self._on_connect_hook(self)
            except Exception:
                _log.exception("%s: on_connect hook failed", self._client_id)
        if self._first_connect is not None and not self._first_connect.done():
            self._first_connect.set_result(None)

    def _async_on_connect_fail(self) -> None:
        first = self._first_connect
        if self._closed or first is None or first.done():
            return
        if self._wait:
            # paho's back-off: RECONNECT_MIN_S, doubled per failure up to RECONNECT_MAX_S. A WARNING on the first
            # failure and then once a minute (at the default level, so an operator sees what the daemon waits for).
            self._connect_failures += 1
            delay = min(timing.RECONNECT_MIN_S * 2 ** (self._connect_failures - 1), timing.RECONNECT_MAX_S)
            now = time.monotonic()
            level = logging.WARNING if now - self._warned_at >= 60.0 else logging.INFO
            if level == logging.WARNING:
                self._warned_at = now
            _log.log(level, "%s: MQTT broker at %s not reachable (attempt %d); next retry in %.1f s",
                     self._client_id, self._url, self._connect_failures, delay)
            return
        first.set_exception(
            BrokerUnavailable(f"cannot connect to MQTT broker at {self._url} (is mosquitto running there?)")
        )

    def _async_on_disconnect(self, reason: ReasonCode) -> None:
        self._generation += 1  # acks for messages of the old connection are void
        self._connected.clear()
        self._disconnected.set()
        lost = _ConnectionLost(str(reason))
        for fut in self._pending_sub.values():
            if not fut.done():
                fut.set_exception(lost)
        if not self._closed:
            _log.warning("%s: lost connection to %s (%s); reconnecting", self._client_id, self._url, reason)

    def _async_on_message(self, message: Message | None, mid: int, qos: int) -> None:
        if self._closed:
            return
        if message is None:
            self._ack(mid, qos, self._generation)
            return
        if qos == 0:
            if self._qos0_queued >= self._queue_maxsize:
                self._count_drop(message.topic)
                return
            self._qos0_queued += 1
        self._queue.put_nowait(_Inbound(message, mid, qos, self._generation))

    def _async_on_puback(self, mid: int, reason: ReasonCode) -> None:
        fut = self._pending_pub.get(mid)
        if fut is not None and not fut.done():
            fut.set_result(reason)
        elif fut is None and reason.is_failure:
            _log.warning("%s: broker rejected publish_threadsafe (mid %d): %s", self._client_id, mid, reason)

    def _async_on_suback(self, mid: int, reasons: list[ReasonCode]) -> None:
        fut = self._pending_sub.get(mid)
        if fut is not None and not fut.done():
            fut.set_result(reasons)

    def _ack(self, mid: int, qos: int, generation: int) -> None:
        if qos and generation == self._generation and not self._closed and self._client is not None:
            self._client.ack(mid, qos)

    def _count_drop(self, topic: str) -> None:
        self.dropped_qos0 += 1
        now = time.monotonic()
        if now - self._last_drop_log >= 5.0:
            self._last_drop_log = now
            _log.warning(
                "%s: inbound queue full (%d); dropped QoS 0 message on %r (%d dropped so far)",
                self._client_id,
                self._queue_maxsize,
                topic,
                self.dropped_qos0,
            )


# --- private helpers ---------------------------------------------------------------------------


class _ConnectionLost(BrokerUnavailable):
    """Internal: the connection dropped while an ack was pending."""


@dataclass(frozen=True, slots=True)
class _Inbound:
    message: Message
    mid: int
    qos: int
    generation: int


class _MessageIterator:
    """``async for`` over the bus's inbound queue; acks QoS >= 1 as each message is taken."""

    __slots__ = ("_bus",)

    def __init__(self, bus: MqttBus) -> None:
        self._bus = bus

    def __aiter__(self) -> _MessageIterator:
        return self

    async def __anext__(self) -> Message:
        bus = self._bus
        item = await bus._queue.get()
        if item is None:
            bus._queue.put_nowait(None)  # let other iterators end too
            raise StopAsyncIteration
        if item.qos == 0:
            bus._qos0_queued -= 1
        else:
            bus._ack(item.mid, item.qos, item.generation)
        return item.message


def _publish_properties(
    response_topic: str | None,
    correlation_data: bytes | None,
    user_properties: UserProperties,
    expiry_s: int | None,
) -> Properties | None:
    if response_topic is None and correlation_data is None and not user_properties and expiry_s is None:
        return None
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if response_topic is not None:
        _check_topic(response_topic)
        props.ResponseTopic = response_topic
    if correlation_data is not None:
        if not isinstance(correlation_data, bytes):
            raise TypeError("correlation_data must be bytes")
        props.CorrelationData = correlation_data
    if user_properties:
        _check_user_properties(user_properties)
        props.UserProperty = list(user_properties)
    if expiry_s is not None:
        _check_expiry(expiry_s)
        props.MessageExpiryInterval = expiry_s
    return props


def _to_message(msg: paho.MQTTMessage) -> Message:
    props = msg.properties
    correlation = getattr(props, "CorrelationData", None)
    return Message(
        topic=msg.topic,
        payload=bytes(msg.payload),
        qos=msg.qos,
        retain=bool(msg.retain),
        response_topic=getattr(props, "ResponseTopic", None),
        correlation_data=bytes(correlation) if correlation is not None else None,
        user_properties=tuple((str(k), str(v)) for k, v in getattr(props, "UserProperty", None) or ()),
        message_expiry_s=getattr(props, "MessageExpiryInterval", None),
    )


def _ssl_context(tls: TLSParameters) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=tls.ca_certs)
        if tls.certfile is not None:
            ctx.load_cert_chain(tls.certfile, tls.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise TransportError(f"cannot load TLS material: {exc}") from exc
    if tls.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _stop_network_thread(client: paho.Client) -> None:
    """Let paho's thread notice the DISCONNECT and exit without blocking the loop, then join it."""
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        thread = getattr(client, "_thread", None)
        if thread is None or not thread.is_alive():
            break
        await asyncio.sleep(0.01)
    client.loop_stop()  # joins; immediate unless the thread was mid-reconnect
    # loop_start() opened a loopback TCP socket pair to wake the thread, and loop_stop() leaves it open: it is
    # closed only when the Client is finalised, which in a reference cycle may come after the sockets' own
    # finaliser (a ResourceWarning, an error under the test suite's warning filter). Close them now.
    reset = getattr(client, "_reset_sockets", None)
    if reset is not None:
        reset()
