"""resolve_broker: discovered mosquitto, dead adverts skipped, plain _mqtt._tcp, static fallback, failure."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from fleetpipe.config import BrokerConfig, NodeConfig, PlannerConfig
from fleetpipe.discovery import Announcer, async_resolve_broker, resolve_broker
from fleetpipe.errors import DiscoveryError
from tests.conftest import Broker, unused_tcp_port

from .conftest import LOOPBACK, announce_broker

pytestmark = pytest.mark.integration


def _node(fleet: str, *fallback: str) -> NodeConfig:
    return NodeConfig(name="n1", fleet=fleet, broker=BrokerConfig(static_fallback=fallback))


def test_given_url_skips_discovery() -> None:
    config = NodeConfig(name="n1", broker=BrokerConfig(url="mqtt://10.1.2.3:1883"))
    started = time.monotonic()
    assert resolve_broker(config) is config
    assert time.monotonic() - started < 0.1


def test_finds_real_mosquitto_announced_by_another_process(
        fleet: str, mosquitto: Broker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "fleetpipe.discovery")
    with announce_broker(mosquitto.url, fleet):
        resolved = resolve_broker(_node(fleet), timeout_s=10, interfaces=LOOPBACK)
    assert resolved.broker.url == mosquitto.url
    assert resolved.name == "n1" and resolved.fleet == fleet  # a copy, everything else kept
    assert "found by zeroconf in" in caplog.text


def test_dead_advert_is_skipped_and_time_to_discovery(fleet: str, mosquitto: Broker) -> None:
    dead = unused_tcp_port()

    async def scenario() -> tuple[PlannerConfig, float]:
        async with Announcer("broker", "dead", fleet, dead, {"broker": f"mqtt://127.0.0.1:{dead}"},
                             interfaces=LOOPBACK):
            started = time.monotonic()
            async with Announcer("broker", "live", fleet, mosquitto.port, {"broker": mosquitto.url},
                                 interfaces=LOOPBACK):
                config = PlannerConfig(model="m", fleet=fleet)
                resolved = await async_resolve_broker(config, timeout_s=10, interfaces=LOOPBACK)
                return resolved, time.monotonic() - started

    resolved, elapsed = asyncio.run(scenario())
    assert resolved.broker.url == mosquitto.url
    print(f"\ntime to discovery (announce start -> resolve_broker result, in process): {elapsed:.2f} s")
    assert elapsed < 5


def test_plain_mqtt_service_is_a_fleetless_broker(fleet: str, mosquitto: Broker) -> None:
    import ipaddress

    from zeroconf import ServiceInfo, Zeroconf

    zc = Zeroconf(interfaces=LOOPBACK)
    try:
        loopback = ipaddress.ip_address("127.0.0.1").packed
        info = ServiceInfo("_mqtt._tcp.local.", f"mosq {fleet}._mqtt._tcp.local.", port=mosquitto.port,
                           server=f"mosq-{fleet}.local.", addresses=[loopback])
        zc.register_service(info, cooperating_responders=True)
        resolved = resolve_broker(_node(fleet), timeout_s=1.5, interfaces=LOOPBACK)
    finally:
        zc.close()
    assert resolved.broker.url == mosquitto.url


def test_static_fallback_when_discovery_finds_nothing(
        fleet: str, mosquitto: Broker, caplog: pytest.LogCaptureFixture) -> None:
    dead = f"mqtt://127.0.0.1:{unused_tcp_port()}"
    started = time.monotonic()
    resolved = resolve_broker(_node(fleet, dead, mosquitto.url), timeout_s=1.0, interfaces=LOOPBACK)
    assert resolved.broker.url == mosquitto.url
    assert 1.0 <= time.monotonic() - started < 4
    assert "static fallback" in caplog.text


def test_other_fleets_broker_is_not_used(fleet: str, mosquitto: Broker) -> None:
    with Announcer("broker", "theirs", fleet + "-b", mosquitto.port, {"broker": mosquitto.url},
                   interfaces=LOOPBACK), pytest.raises(DiscoveryError, match="no broker for fleet"):
        resolve_broker(_node(fleet), timeout_s=1.0, interfaces=LOOPBACK)


def test_raises_when_nothing_works(fleet: str) -> None:
    dead = f"mqtt://127.0.0.1:{unused_tcp_port()}"
    with pytest.raises(DiscoveryError, match=rf"no broker for fleet '{fleet}'.*tried {dead}.*--broker"):
        resolve_broker(_node(fleet, dead), timeout_s=0.5, interfaces=LOOPBACK)
    with pytest.raises(DiscoveryError, match="static_fallback"):
        resolve_broker(_node(fleet), timeout_s=0.5, interfaces=LOOPBACK)
