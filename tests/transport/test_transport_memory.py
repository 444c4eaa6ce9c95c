"""MemoryBroker / MemoryBus: the Bus semantics without a network, plus the pure helpers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

import pytest

import fleetpipe.transport as transport
from fleetpipe import _compat
from fleetpipe.errors import BrokerUnavailable
from fleetpipe.transport import BrokerUrl, Bus, Message, TLSParameters, Will, parse_broker_url
from fleetpipe.transport.memory import MemoryBroker, MemoryBus, split_shared, topic_matches


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    async def bounded() -> Any:
        async with _compat.timeout(10):
            return await coro

    return asyncio.run(bounded())


async def take(bus: MemoryBus, n: int) -> list[Message]:
    it = bus.messages()
    return [await anext(it) for _ in range(n)]


# --- pure helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flt", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/+/c", "a/b/c", True),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("+/+", "a/b", True),
        ("+", "a/b", False),
        ("a/b", "a/b/", False),
        ("a/+", "a/", True),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
    ],
)
def test_topic_matches(flt: str, topic: str, expected: bool) -> None:
    assert topic_matches(flt, topic) is expected


def test_split_shared() -> None:
    assert split_shared("$share/g/a/+") == ("g", "a/+")
    assert split_shared("a/b") == (None, "a/b")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://127.0.0.1:1884", BrokerUrl("mqtt", "127.0.0.1", 1884)),
        ("mqtt://broker", BrokerUrl("mqtt", "broker", 1883)),
        ("mqtts://broker.lan", BrokerUrl("mqtts", "broker.lan", 8883)),
        ("MQTTS://h:9", BrokerUrl("mqtts", "h", 9)),
        ("mqtt://[::1]:1883", BrokerUrl("mqtt", "::1", 1883)),
    ],
)
def test_parse_broker_url(url: str, expected: BrokerUrl) -> None:
    parsed = parse_broker_url(url)
    assert parsed == expected
    assert parse_broker_url(str(parsed)) == parsed
    assert parsed.tls is (expected.scheme == "mqtts")


@pytest.mark.parametrize(
    "url", ["http://h:1", "h:1883", "mqtt://", "mqtt://h:99999", "mqtt://u:p@h", "mqtt://h/x", "mqtt://h:x"]
)
def test_parse_broker_url_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        parse_broker_url(url)


def test_value_objects_validate() -> None:
    with pytest.raises(ValueError):
        Message("a/+", b"")
    with pytest.raises(TypeError):
        Message("a", "text")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Message("a", b"", qos=3)
    with pytest.raises(TypeError):
        Message("a", b"", user_properties=[("k", "v")])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Message("a", b"", message_expiry_s=0)
    with pytest.raises(ValueError):
        Will("", b"")
    with pytest.raises(ValueError):
        TLSParameters(keyfile="k.pem")
    m = Message("a", b"x")
    with pytest.raises(AttributeError):
        m.topic = "b"  # type: ignore[misc]


def test_exports() -> None:
    for name in transport.__all__:
        assert getattr(transport, name) is not None, name
    assert isinstance(MemoryBus(MemoryBroker(), "x"), Bus)


# --- MemoryBus semantics -----------------------------------------------------------------------


def test_round_trip_with_properties() -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with MemoryBus(broker, "a") as a, MemoryBus(broker, "b") as b:
            await b.subscribe("req/+", qos=1)
            await a.publish(
                "req/1",
                b"ping",
                qos=1,
                response_topic="resp/a",
                correlation_data=b"\x01",
                user_properties=(("epoch", "3"),),
                expiry_s=5,
            )
            [m] = await take(b, 1)
            assert m == Message("req/1", b"ping", 1, False, "resp/a", b"\x01", (("epoch", "3"),), 5)

    run(main())


def test_qos_is_min_of_publish_and_subscription() -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with MemoryBus(broker, "a") as a, MemoryBus(broker, "b") as b:
            await b.subscribe("x", qos=0)
            await b.subscribe("#", qos=1)  # overlapping: one copy, highest qos
            await a.publish("x", b"1", qos=1)
            await a.publish("y", b"2", qos=1)
            got = await take(b, 2)
            assert [(m.topic, m.qos) for m in got] == [("x", 1), ("y", 1)]

    run(main())


def test_retained_delivered_on_subscribe_and_cleared() -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with MemoryBus(broker, "a") as a:
            await a.publish("cap/n1", b"birth", qos=1, retain=True)
            async with MemoryBus(broker, "b") as b:
                await b.subscribe("cap/+")
                [m] = await take(b, 1)
                assert (m.payload, m.retain) == (b"birth", True)
                await a.publish("cap/n1", b"", retain=True)  # clears
                [m] = await take(b, 1)
                assert (m.payload, m.retain) == (b"", False)
            assert broker.retained == {}

    run(main())


def test_will_on_crash_not_on_close() -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with MemoryBus(broker, "watch") as w:
            await w.subscribe("death/#")
            n1 = MemoryBus(broker, "n1", Will("death/n1", b"dead", qos=1, retain=True))
            await n1.__aenter__()
            broker.crash("n1")
            [m] = await take(w, 1)
            assert (m.topic, m.payload) == ("death/n1", b"dead")
            assert [x async for x in n1.messages()] == []  # crashed bus: iterator ends
            with pytest.raises(BrokerUnavailable):
                await n1.publish("x", b"")
            async with MemoryBus(broker, "n2", Will("death/n2", b"dead")):
                pass
            await w.publish("death/marker", b"")
            [m] = await take(w, 1)
            assert m.topic == "death/marker"  # no will from n2's clean close

    run(main())


def test_shared_subscription_round_robin() -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with (
            MemoryBus(broker, "src") as src,
            MemoryBus(broker, "r1") as r1,
            MemoryBus(broker, "r2") as r2,
        ):
            await src.publish("act/r", b"retained", retain=True)
            await r1.subscribe("$share/stage1/act/#")
            await r2.subscribe("$share/stage1/act/#")  # no retained delivery for shared subs
            for i in range(10):
                await src.publish("act/f", str(i).encode(), qos=1)
            a = [int(m.payload) for m in await take(r1, 5)]
            b = [int(m.payload) for m in await take(r2, 5)]
            assert sorted(a + b) == list(range(10))
            assert {a[0] % 2, b[0] % 2} == {0, 1}  # alternating, each exactly once
            assert r1._queue.empty() and r2._queue.empty()

    run(main())


def test_messages_end_on_close_and_threadsafe_publish() -> None:
    async def main() -> None:
        broker = MemoryBroker()
        async with MemoryBus(broker, "a") as a:
            await a.subscribe("t")
            t = threading.Thread(target=a.publish_threadsafe, args=("t", b"from-thread"))
            t.start()
            t.join()
            [m] = await take(a, 1)
            assert m.payload == b"from-thread"
            await a.unsubscribe("t")
            await a.publish("t", b"ignored")
        assert [m async for m in a.messages()] == []

    run(main())


def test_on_connect_hook_and_bad_filter() -> None:
    calls: list[str] = []

    async def hook(bus: MemoryBus) -> None:
        calls.append(bus.client_id)
        await bus.publish("birth", b"1", retain=True)

    async def main() -> None:
        broker = MemoryBroker()
        async with MemoryBus(broker, "n", on_connect=hook) as n:
            assert broker.retained["birth"].payload == b"1"
            for bad in ("a/#/b", "a/b+", "$share/g", "$share//x", ""):
                with pytest.raises(ValueError):
                    await n.subscribe(bad)

    run(main())
    assert calls == ["n"]
