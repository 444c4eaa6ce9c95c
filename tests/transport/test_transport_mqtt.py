"""MqttBus against a real mosquitto on 127.0.0.1 (fixtures from tests/conftest.py)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetpipe import _compat, timing
from fleetpipe.errors import AckTimeout, BrokerUnavailable
from fleetpipe.transport import Bus, Message, TLSParameters, Will
from fleetpipe.transport.mqtt import MqttBus
from tests.conftest import Broker, start_broker, unused_tcp_port

pytestmark = pytest.mark.integration


def run(coro: Coroutine[Any, Any, Any], timeout: float = 20) -> Any:
    async def bounded() -> Any:
        async with _compat.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


async def take(bus: MqttBus, n: int, timeout: float = 5) -> list[Message]:
    it = bus.messages()
    async with _compat.timeout(timeout):
        return [await anext(it) for _ in range(n)]


async def eventually(predicate: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def stop(broker: Broker) -> None:
    """Stop a broker and close its stderr pipe (Broker.stop leaves it open: ResourceWarning)."""
    broker.stop()
    if broker.proc.stderr is not None:
        broker.proc.stderr.close()


@pytest.fixture(scope="module")
def shared_mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One broker for this module (shadows conftest's so that its stderr pipe gets closed)."""
    broker = start_broker(tmp_path_factory.mktemp("transport-broker"))
    yield broker
    stop(broker)


@pytest.fixture
def broker(mosquitto: Broker) -> Iterator[Broker]:
    """A private broker that tests may stop; its pipe is closed afterwards."""
    yield mosquitto
    stop(mosquitto)


def test_round_trip_qos1_and_v5_properties(shared_mosquitto: Broker) -> None:
    url = shared_mosquitto.url

    async def main() -> None:
        async with MqttBus(url, client_id="rt-req") as req, MqttBus(url, client_id="rt-srv") as srv:
            assert isinstance(req, Bus)
            assert req.connected
            await srv.subscribe("rt/req/+", qos=1)
            await req.subscribe("rt/resp/req", qos=1)
            await req.publish(
                "rt/req/1",
                b"ping",
                qos=1,
                response_topic="rt/resp/req",
                correlation_data=b"\x00\x07",
                user_properties=(("epoch", "4"), ("epoch", "5"), ("fleet", "lab")),
                expiry_s=60,
            )
            [m] = await take(srv, 1)
            assert (m.topic, m.payload, m.qos, m.retain) == ("rt/req/1", b"ping", 1, False)
            assert m.response_topic == "rt/resp/req"
            assert m.correlation_data == b"\x00\x07"
            assert m.user_properties == (("epoch", "4"), ("epoch", "5"), ("fleet", "lab"))
            assert m.message_expiry_s is not None and 0 < m.message_expiry_s <= 60
            assert m.response_topic is not None
            await srv.publish(
                m.response_topic, memoryview(b"pong"), qos=1, correlation_data=m.correlation_data
            )
            [r] = await take(req, 1)
            assert (r.payload, r.correlation_data) == (b"pong", b"\x00\x07")
            assert (r.response_topic, r.user_properties, r.message_expiry_s) == (None, (), None)

    run(main())


def test_qos0_and_retained(shared_mosquitto: Broker) -> None:
    url = shared_mosquitto.url

    async def main() -> None:
        async with MqttBus(url, client_id="ret-a") as a:
            await a.publish("ret/cap/n1", b"birth", qos=1, retain=True)
            async with MqttBus(url, client_id="ret-b") as b:
                await b.subscribe("ret/cap/+", qos=1)
                [m] = await take(b, 1)
                assert (m.payload, m.retain, m.qos) == (b"birth", True, 1)
                await a.publish("ret/cap/n1", b"live", qos=0)
                [m] = await take(b, 1)
                assert (m.payload, m.retain, m.qos) == (b"live", False, 0)
                await a.publish("ret/cap/n1", b"", qos=1, retain=True)  # clear
                await take(b, 1)

    run(main())


def test_tcp_nodelay_is_set(shared_mosquitto: Broker) -> None:
    async def main() -> None:
        async with (
            MqttBus(shared_mosquitto.url, client_id="nd-on") as on,
            MqttBus(shared_mosquitto.url, client_id="nd-off", tcp_nodelay=False) as off,
        ):
            assert on._client is not None and off._client is not None
            sock_on, sock_off = on._client.socket(), off._client.socket()
            assert sock_on is not None and sock_off is not None
            assert sock_on.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert sock_off.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0

    run(main())


def test_last_will_on_abrupt_disconnect_not_on_close(shared_mosquitto: Broker, quick_timing: None) -> None:
    url = shared_mosquitto.url

    async def main() -> None:
        async with MqttBus(url, client_id="will-watch") as watch:
            await watch.subscribe("will/death/+")
            async with MqttBus(url, client_id="will-clean", will=Will("will/death/clean", b"x")):
                pass
            async with MqttBus(url, client_id="will-n1", will=Will("will/death/n1", b"dead", qos=1)) as n1:
                assert n1._client is not None
                sock = n1._client.socket()
                assert sock is not None
                sock.shutdown(socket.SHUT_RDWR)  # vanish without DISCONNECT, like a killed process
                [m] = await take(watch, 1)
                assert (m.topic, m.payload) == ("will/death/n1", b"dead")
                await n1.wait_connected(timeout=5)  # and it comes back on its own
            await asyncio.sleep(0.2)
            assert watch._queue.empty()  # the clean close published no will

    run(main())


def test_shared_subscription_splits_load(shared_mosquitto: Broker) -> None:
    url = shared_mosquitto.url

    async def main() -> None:
        async with (
            MqttBus(url, client_id="sh-src") as src,
            MqttBus(url, client_id="sh-r1") as r1,
            MqttBus(url, client_id="sh-r2") as r2,
        ):
            await r1.subscribe("$share/stage1/sh/act/#", qos=1)
            await r2.subscribe("$share/stage1/sh/act/#", qos=1)
            n = 40
            for i in range(n):
                await src.publish(f"sh/act/{i}", str(i).encode(), qos=1)
            got: dict[str, list[int]] = {"r1": [], "r2": []}

            async def drain(name: str, bus: MqttBus) -> None:
                async for m in bus.messages():
                    got[name].append(int(m.payload))

            tasks = [asyncio.create_task(drain("r1", r1)), asyncio.create_task(drain("r2", r2))]
            await eventually(lambda: len(got["r1"]) + len(got["r2"]) >= n)
            await asyncio.sleep(0.1)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert sorted(got["r1"] + got["r2"]) == list(range(n))  # each exactly once
            assert got["r1"] and got["r2"]  # both replicas worked

    run(main())


def test_large_payload_8mb(shared_mosquitto: Broker) -> None:
    url = shared_mosquitto.url
    payload = bytes(range(256)) * (8 * 1024 * 1024 // 256)

    async def main() -> None:
        async with MqttBus(url, client_id="big-a") as a, MqttBus(url, client_id="big-b") as b:
            await b.subscribe("big/x")
            for _ in range(2):
                await a.publish("big/x", payload, qos=1)
            got = await take(b, 2, timeout=10)
            assert all(m.payload == payload for m in got)

    run(main())


def test_inbound_backpressure_no_loss_qos1_and_counted_qos0_drops(shared_mosquitto: Broker) -> None:
    url = shared_mosquitto.url

    async def main() -> None:
        async with (
            MqttBus(url, client_id="bp-src") as src,
            MqttBus(url, client_id="bp-slow", queue_maxsize=5) as slow,
        ):
            await slow.subscribe("bp/q1", qos=1)
            await slow.subscribe("bp/q0", qos=0)
            for i in range(50):
                await src.publish("bp/q1", str(i).encode(), qos=1)
            await eventually(lambda: slow._queue.qsize() >= 5)
            await asyncio.sleep(0.2)
            assert slow._queue.qsize() == 5  # broker holds the rest (Receive Maximum)
            got = [int(m.payload) for m in await take(slow, 50)]
            assert got == list(range(50))  # nothing lost, in order
            for i in range(20):
                await src.publish("bp/q0", str(i).encode(), qos=0)
            await eventually(lambda: slow.dropped_qos0 + slow._queue.qsize() >= 20)
            assert slow._queue.qsize() == 5 and slow.dropped_qos0 == 15

    run(main())


def test_publish_threadsafe_from_worker_thread(shared_mosquitto: Broker) -> None:
    url = shared_mosquitto.url

    async def main() -> None:
        async with MqttBus(url, client_id="ts-a") as a:
            await a.subscribe("ts/out")

            def worker() -> None:
                for i in range(10):
                    a.publish_threadsafe("ts/out", str(i).encode(), qos=1)

            t = threading.Thread(target=worker)
            t.start()
            t.join()
            got = [int(m.payload) for m in await take(a, 10)]
            assert got == list(range(10))

    run(main())


def test_messages_end_on_close_and_closed_bus_raises(shared_mosquitto: Broker) -> None:
    async def main() -> None:
        bus = MqttBus(shared_mosquitto.url, client_id="close-a")
        async with bus:
            await bus.subscribe("close/x")
            await bus.publish("close/x", b"1", qos=1)
            await eventually(lambda: not bus._queue.empty())

            async def later() -> None:
                await asyncio.sleep(0.1)
                await bus.close()

            closer = asyncio.create_task(later())
            got = [m.payload async for m in bus.messages()]  # queued message first, then the end
            await closer
            assert got == [b"1"]
        with pytest.raises(BrokerUnavailable):
            await bus.publish("close/x", b"")
        with pytest.raises(BrokerUnavailable):
            await bus.subscribe("close/x")

    run(main())


def test_broker_down_at_start_raises_quickly() -> None:
    port = unused_tcp_port()

    async def main() -> None:
        start = time.monotonic()
        with pytest.raises(BrokerUnavailable, match=f"127.0.0.1:{port}"):
            async with MqttBus(f"mqtt://127.0.0.1:{port}", client_id="down"):
                pass
        assert time.monotonic() - start < 3

    run(main())


def test_no_connack_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timing, "CONNECT_TIMEOUT_S", 0.5)
    with socket.socket() as server:  # accepts TCP but never speaks MQTT
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        async def main() -> None:
            with pytest.raises(BrokerUnavailable, match="no CONNACK"):
                async with MqttBus(f"mqtt://127.0.0.1:{port}", client_id="mute"):
                    pass

        run(main())


def test_wait_true_connects_when_broker_appears(tmp_path: Path, quick_timing: None) -> None:
    port = unused_tcp_port()
    brokers: list[Broker] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(0.5, lambda: brokers.append(start_broker(tmp_path, port=port)))
        async with MqttBus(f"mqtt://127.0.0.1:{port}", client_id="patient", wait=True) as bus:
            assert bus.connected

    try:
        run(main())
    finally:
        for b in brokers:
            stop(b)
    assert brokers


def test_reconnect_after_broker_restart_resubscribes(
    broker: Broker, tmp_path: Path, quick_timing: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(timing, "ACK_TIMEOUT_S", 5.0)
    hook_calls: list[str] = []
    restarted: list[Broker] = []

    async def birth(bus: MqttBus) -> None:
        hook_calls.append(bus.client_id)
        await bus.publish("rc/birth/node", str(len(hook_calls)).encode(), qos=1, retain=True)

    async def main() -> None:
        url = broker.url
        async with (
            MqttBus(url, client_id="rc-node", on_connect=birth) as node,
            MqttBus(url, client_id="rc-planner") as planner,
        ):
            await node.subscribe("rc/assign/node", qos=1)
            await planner.subscribe("rc/birth/+", qos=1)
            [m] = await take(planner, 1)
            assert m.payload == b"1"

            stop(broker)
            await eventually(lambda: not node.connected and not planner.connected)
            # QoS 1 while down: queued by paho, sent after reconnect, publish() still completes.
            pending = asyncio.create_task(node.publish("rc/birth/extra", b"late", qos=1, retain=True))
            restarted.append(start_broker(tmp_path, port=broker.port))
            await node.wait_connected(timeout=5)
            await planner.wait_connected(timeout=5)
            await pending
            await planner.publish("rc/assign/node", b"stage-1", qos=1)
            [m] = await take(node, 1)  # the re-subscription is in place
            assert m.payload == b"stage-1"
            # re-birth + the late one (retained: the planner may re-subscribe after they were sent)
            got = {x.payload for x in await take(planner, 2)}
            assert got == {b"2", b"late"}
        assert hook_calls == ["rc-node", "rc-node"]

    try:
        run(main(), timeout=30)
    finally:
        for b in restarted:
            stop(b)


def test_ack_timeout_when_broker_is_gone(
    broker: Broker, quick_timing: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(timing, "ACK_TIMEOUT_S", 0.3)

    async def main() -> None:
        async with MqttBus(broker.url, client_id="ack-lost") as bus:
            stop(broker)
            await eventually(lambda: not bus.connected)
            with pytest.raises(AckTimeout):
                await bus.publish("x/y", b"1", qos=1)
            with pytest.raises(BrokerUnavailable):
                await bus.publish("x/y", b"1", qos=0)
            with pytest.raises(AckTimeout):
                await bus.subscribe("x/#")

    run(main())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        MqttBus("mqtt://h:1", client_id="x", tls=TLSParameters())
    with pytest.raises(ValueError):
        MqttBus("tcp://h:1", client_id="x")
    with pytest.raises(ValueError):
        MqttBus("mqtt://h:1", client_id="x", queue_maxsize=0)


def test_bad_filter_and_topic(shared_mosquitto: Broker) -> None:
    async def main() -> None:
        async with MqttBus(shared_mosquitto.url, client_id="bad-args") as bus:
            with pytest.raises(ValueError):
                await bus.subscribe("a/#/b")
            with pytest.raises(ValueError):
                await bus.publish("a/+", b"")
            with pytest.raises(TypeError):
                await bus.publish("a", "text")  # type: ignore[arg-type]

    run(main())
