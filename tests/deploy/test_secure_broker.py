"""secure.conf + gen-creds ACL + gen-certs CA against a real mosquitto: what the broker refuses."""

from __future__ import annotations

import asyncio
import gc
import warnings
from pathlib import Path

import pytest

from fleetpipe import timing, topics
from fleetpipe.errors import BrokerUnavailable, TransportError
from fleetpipe.transport import TLSParameters
from fleetpipe.transport.mqtt import MqttBus
from tests.deploy.conftest import FLEET, SecureBroker, run, start_secure_broker

pytestmark = pytest.mark.integration


async def _receive(bus: MqttBus, timeout: float) -> list[tuple[str, bytes]]:
    """Everything ``bus`` receives within ``timeout`` s."""
    got: list[tuple[str, bytes]] = []
    it = bus.messages()
    try:
        async with asyncio.timeout(timeout):
            while True:
                msg = await anext(it)
                got.append((msg.topic, bytes(msg.payload)))
    except TimeoutError:
        pass
    return got


def test_node_publishes_only_its_own_health_and_no_assignment(secure_broker: SecureBroker) -> None:
    async def main() -> tuple[list[tuple[str, bytes]], list[str]]:
        refused: list[str] = []
        async with secure_broker.bus("planner") as planner, secure_broker.bus("n1") as n1:
            await planner.subscribe(topics.NODE_HEALTH.filter(fleet=FLEET), qos=1)
            await planner.subscribe(topics.NODE_STATE.filter(fleet=FLEET), qos=1)
            await n1.publish(topics.node_health(FLEET, "n1"), b"own", qos=1)
            forged = [topics.node_health(FLEET, "n2"), topics.node_state(FLEET, "n2"),
                      topics.node_assign(FLEET, "n1"), topics.node_assign(FLEET, "n2"), topics.plan(FLEET),
                      topics.slice_chunk(FLEET, "abc", 0), topics.node_health("otherfleet", "n1")]
            for topic in forged:
                with pytest.raises(TransportError, match="rejected publish") as info:
                    await n1.publish(topic, b"forged", qos=1)
                assert "authori" in str(info.value).lower()  # PUBACK reason 0x87 Not authorized
                refused.append(topic)
            # QoS 0 has no PUBACK: the broker drops it silently; the planner must never see it.
            await n1.publish(topics.node_health(FLEET, "n2"), b"forged-qos0", qos=0)
            await n1.publish(topics.node_health(FLEET, "n1"), b"own-2", qos=1)
            return await _receive(planner, 0.5), refused

    got, refused = run(main())
    assert got == [(topics.node_health(FLEET, "n1"), b"own"), (topics.node_health(FLEET, "n1"), b"own-2")]
    assert len(refused) == 7


def test_planner_assigns_and_node_reads_only_its_own_assignment(secure_broker: SecureBroker) -> None:
    async def main() -> list[tuple[str, bytes]]:
        async with secure_broker.bus("planner") as planner, secure_broker.bus("n1") as n1:
            await n1.subscribe(topics.node_assign(FLEET, "n1"), qos=1)
            # mosquitto 2.0 grants any SUBSCRIBE and applies the read ACL per message on delivery:
            # these succeed, but nothing the ACL does not let n1 read ever arrives (checked below).
            await n1.subscribe(topics.node_assign(FLEET, "n2"), qos=1)
            await n1.subscribe(topics.fleet_filter(FLEET), qos=1)
            await n1.subscribe(topics.data_filter(FLEET), qos=1)
            await planner.publish(topics.node_assign(FLEET, "n1"), b"stage-0", qos=1, retain=True)
            await planner.publish(topics.node_assign(FLEET, "n2"), b"stage-1", qos=1, retain=True)
            await planner.publish(topics.plan(FLEET), b"plan", qos=1, retain=True)
            await planner.publish(topics.slice_chunk(FLEET, "abc", 0), b"chunk", qos=1, retain=True)
            got = await _receive(n1, 0.5)
            for topic in (topics.node_assign(FLEET, "n1"), topics.node_assign(FLEET, "n2"), topics.plan(FLEET),
                          topics.slice_chunk(FLEET, "abc", 0)):
                await planner.publish(topic, b"", qos=1, retain=True)  # clear the retained messages
            with pytest.raises(TransportError, match="rejected publish"):
                await planner.publish(topics.node_health(FLEET, "n1"), b"forged", qos=1)
            return got

    # (n1's own assignment arrives once per matching subscription; slices and the plan, which every node
    # subscribes to, are readable by every node)
    assert set(run(main())) == {(topics.node_assign(FLEET, "n1"), b"stage-0"), (topics.plan(FLEET), b"plan"),
                                (topics.slice_chunk(FLEET, "abc", 0), b"chunk")}


def test_pipeline_topics_for_nodes_and_clients(secure_broker: SecureBroker) -> None:
    s0 = topics.stage_in(FLEET, 1, 0, "c1")
    s1 = topics.stage_in(FLEET, 1, 1, "c1")

    async def main() -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
        async with secure_broker.bus("n1") as n1, secure_broker.bus("n2") as n2, \
                secure_broker.bus("c1") as c1:
            for bus, stage in ((n1, 0), (n2, 1)):
                group = topics.stage_group(FLEET, 1, stage)
                await bus.subscribe(topics.shared(group, topics.stage_in_filter(FLEET, 1, stage)), qos=1)
            await c1.subscribe(topics.result(FLEET, "c1"), qos=1)
            # granted, but the read ACL filters on delivery: c1 never sees c2's results nor frames
            await c1.subscribe(topics.result(FLEET, "c2"), qos=1)
            await c1.subscribe(s0, qos=1)
            await c1.publish(s0, b"frame", qos=1)
            with pytest.raises(TransportError, match="rejected publish"):
                await c1.publish(s1, b"skip-stage-0", qos=1)  # clients may only feed the first stage
            with pytest.raises(TransportError, match="rejected publish"):
                await c1.publish(topics.stage_in(FLEET, 1, 0, "c2"), b"as-c2", qos=1)  # ... and only as themselves
            with pytest.raises(TransportError, match="rejected publish"):
                await c1.publish(topics.result(FLEET, "c2"), b"forged", qos=1)
            await n2.publish(topics.result(FLEET, "c2"), b"for-c2", qos=1)
            await n1.publish(s1, b"activation", qos=1)
            await n2.publish(topics.result(FLEET, "c1"), b"result", qos=1)
            await n2.publish(topics.error(FLEET), b"report", qos=1)
            return await _receive(n1, 0.3) + await _receive(n2, 0.1), await _receive(c1, 0.1)

    nodes_got, client_got = run(main())
    assert nodes_got == [(s0, b"frame"), (s1, b"activation")]
    assert client_got == [(topics.result(FLEET, "c1"), b"result")]


def test_observer_reads_the_control_plane_only_and_publishes_nothing(secure_broker: SecureBroker) -> None:
    """An observer sees health and metrics, never frames, part messages, results or slices (model weights)."""
    async def main() -> list[tuple[str, bytes]]:
        async with secure_broker.bus("obs") as obs, secure_broker.bus("n2") as n2, \
                secure_broker.bus("planner") as planner:
            await obs.subscribe(topics.fleet_filter(FLEET), qos=1)
            with pytest.raises(TransportError, match="rejected publish"):
                await obs.publish(topics.node_health(FLEET, "n2"), b"x", qos=1)
            await n2.publish(topics.node_metrics(FLEET, "n2"), b"m", qos=1)
            await n2.publish(topics.stage_in(FLEET, 1, 1, "c1"), b"frame", qos=1)
            await n2.publish(topics.result(FLEET, "c1"), b"result", qos=1)
            await n2.publish(topics.part_gather(FLEET, 1, 1, "n1", "n2"), b"part", qos=1)
            await planner.publish(topics.slice_chunk(FLEET, "w", 0), b"weights", qos=1)
            await n2.publish(topics.node_health(FLEET, "n2"), b"h", qos=1)
            return await _receive(obs, 0.3)

    assert run(main()) == [(topics.node_metrics(FLEET, "n2"), b"m"), (topics.node_health(FLEET, "n2"), b"h")]


@pytest.mark.parametrize("identity, password", [(None, None), ("n1", "wrong"), ("nobody", "x"), ("n1", "")])
def test_login_is_required(secure_broker: SecureBroker, identity: str | None, password: str | None) -> None:
    async def main() -> None:
        async with secure_broker.bus(identity, password=password):
            pass

    with pytest.raises(BrokerUnavailable, match="refused the connection"):
        run(main())


def test_tls_is_required_and_verified(secure_broker: SecureBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    async def connect(bus: MqttBus) -> None:
        async with bus:
            pass

    run(connect(secure_broker.bus("n1")))  # the test CA: fine
    # The system trust store does not know the fleet's CA: the handshake fails.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # paho leaks the SSLSocket of a failed handshake
        bus = secure_broker.bus("n1", tls=TLSParameters())
        with pytest.raises(BrokerUnavailable):
            run(connect(bus))
        del bus
        gc.collect()
    # Plain MQTT to the TLS listener: mosquitto drops it, no CONNACK ever comes.
    monkeypatch.setattr(timing, "CONNECT_TIMEOUT_S", 1.0)
    plain = MqttBus(f"mqtt://127.0.0.1:{secure_broker.port}", client_id="t-plain", username="n1",
                    password=secure_broker.password("n1"))
    with pytest.raises(BrokerUnavailable, match="no CONNACK"):
        run(connect(plain))


def test_builtin_hashes_are_accepted_by_mosquitto(tmp_path: Path) -> None:
    broker = start_secure_broker(tmp_path, builtin_hash=True)
    try:
        passwd = (tmp_path / "mosquitto" / "passwd").read_text()
        assert passwd.count(":$7$101$") == 6

        async def main() -> None:
            async with broker.bus("n1") as n1:
                await n1.publish(topics.node_health(FLEET, "n1"), b"ok", qos=1)

        run(main())
        with pytest.raises(BrokerUnavailable):
            run(main_wrong(broker))
    finally:
        broker.stop()


async def main_wrong(broker: SecureBroker) -> None:
    async with broker.bus("n1", password=broker.password("n2")):
        pass
