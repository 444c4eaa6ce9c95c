"""The Prometheus exporter scraped over HTTP on loopback; Home Assistant discovery configs."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from fleetpipe import topics, wire
from fleetpipe.cli import main
from fleetpipe.observe._exporter import serve_exporter
from fleetpipe.observe._ha import HA_FIELDS, PIPELINE_FIELDS, discovery_configs, pipeline_configs
from fleetpipe.transport.mqtt import MqttBus
from tests.conftest import unused_tcp_port
from tests.observe._synth import T, birth, health, plan

pytest.importorskip("prometheus_client")


async def _scrape(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], head
    return body.decode()


def _value(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        m = re.match(rf"{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    return None


@pytest.mark.integration
def test_exporter_scraped_over_http(mosquitto) -> None:
    fleet, port = "prom", unused_tcp_port()

    async def run() -> str:
        stop, started = asyncio.Event(), asyncio.Event()
        server = asyncio.create_task(serve_exporter(mosquitto.url, fleet, port, stop=stop, started=started))
        try:
            await asyncio.wait_for(started.wait(), 10)
            async with MqttBus(mosquitto.url, client_id="prom-pub") as bus:
                await bus.publish(topics.plan(fleet), wire.encode(plan(fleet=fleet)), qos=1, retain=True)
                for node in ("a", "b"):
                    await bus.publish(topics.node_state(fleet, node), wire.encode(birth(node, fleet=fleet)), qos=1)
                for k in range(3):  # sender clock 1 s apart: 40 fps exactly
                    for node, stage, comp in (("a", 0, 10.0), ("b", 1, 20.0)):
                        h = health(node, T + k, 40 * k, stage=stage, compute=comp, fleet=fleet, queue=k,
                                   errors=1 if node == "b" else 0)
                        await bus.publish(topics.node_health(fleet, node), wire.encode(h), qos=1)
                await bus.publish(topics.node_metrics(fleet, "a"),
                                  wire.encode(wire.Metrics(fleet=fleet, node_id="a", ts=T, values={"fps_out": 40.0})),
                                  qos=1)
                await bus.publish(topics.error(fleet), wire.encode(
                    wire.ErrorReport(fleet=fleet, source="b", kind="InferenceError", detail="x", ts=T)), qos=1)
            text = ""
            for _ in range(100):
                text = await _scrape(port)
                if _value(text, "fleetpipe_errors_total") == 1.0 and _value(
                        text, "fleetpipe_node_frames_out_total", node="b") == 80.0:
                    break
                await asyncio.sleep(0.05)
            return text
        finally:
            stop.set()
            await server

    text = asyncio.run(run())
    assert _value(text, "fleetpipe_exporter_broker_up", fleet="prom") == 1.0, text
    assert _value(text, "fleetpipe_node_up", fleet="prom", node="a") == 1.0, text
    assert 'stage="' not in next(line for line in text.splitlines() if line.startswith("fleetpipe_node_up{"))
    assert _value(text, "fleetpipe_node_stage", node="b") == 1.0
    assert _value(text, "fleetpipe_node_output_frames_per_second", node="a") == pytest.approx(40.0)
    assert _value(text, "fleetpipe_node_frames_out_total", node="b") == 80.0
    assert _value(text, "fleetpipe_node_queue_depth", node="b") == 2.0
    assert _value(text, "fleetpipe_node_errors_total", node="b") == 1.0
    assert _value(text, "fleetpipe_node_compute_seconds", node="a") == pytest.approx(0.010)
    assert _value(text, "fleetpipe_node_utilisation_ratio", node="a") == pytest.approx(0.4)  # 40 fps * 10 ms
    assert "fleetpipe_node_metric{" not in text  # no catch-all family
    assert _value(text, "fleetpipe_stage_utilisation_ratio", stage="1") == pytest.approx(0.8)
    assert _value(text, "fleetpipe_stage_predicted_seconds", stage="1") == pytest.approx(0.020)
    assert _value(text, "fleetpipe_pipeline_output_frames_per_second", fleet="prom") == pytest.approx(40.0)
    assert _value(text, "fleetpipe_pipeline_bottleneck_utilisation_ratio") == pytest.approx(0.8)
    assert _value(text, "fleetpipe_plan_epoch") == 3.0
    assert _value(text, "fleetpipe_errors_total") == 1.0
    _promtool_clean(text)


def _promtool_clean(text: str) -> None:
    """``promtool check metrics`` finds no problem (skipped without promtool, a failure under CI)."""
    import os
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not installed; under CI scripts/setup installs it (Debian package prometheus)")
        pytest.skip("promtool not installed")
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30,
                          check=False)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr


def test_ha_discovery_configs_are_valid() -> None:
    cfgs = discovery_configs("f", "edge.1", "pi4")
    assert len(cfgs) == len(HA_FIELDS)
    topic, cfg = cfgs[0]
    assert topic == "homeassistant/sensor/fleetpipe_f_edge_1_load/config"
    assert cfg["state_topic"] == topics.node_health("f", "edge.1")
    assert cfg["availability_topic"] == topics.node_state("f", "edge.1")
    assert cfg["value_template"] == "{{ value_json.load }}"
    assert {c["unique_id"] for _, c in cfgs} == {f"fleetpipe_f_edge_1_{k}" for k in HA_FIELDS}
    assert all(k in wire.NodeHealth.__dataclass_fields__ for k in HA_FIELDS)  # templates read real fields
    with pytest.raises(ValueError):
        discovery_configs("f", "n", prefix="home/#")


def test_ha_configs_follow_todays_schema() -> None:
    """default_entity_id (object_id is deprecated, gone in HA 2026.4), an origin block, a pipeline device."""
    from fleetpipe.metrics import FleetView, pipeline_payload

    cfgs = discovery_configs("f", "edge.1", "pi4") + pipeline_configs("f")
    for _, cfg in cfgs:
        assert "object_id" not in cfg
        assert cfg["default_entity_id"] == f"sensor.{cfg['unique_id']}"
        assert cfg["origin"]["name"] == "fleetpipe" and cfg["origin"]["sw_version"]
    topic, pipe = pipeline_configs("f")[0]
    assert topic == "homeassistant/sensor/fleetpipe_f_pipeline_throughput_fps/config"
    assert pipe["state_topic"] == topics.node_metrics("f", "planner")
    assert pipe["device"]["identifiers"] == ["fleetpipe_f_pipeline"]
    assert discovery_configs("f", "n")[0][1]["device"]["via_device"] == "fleetpipe_f_pipeline"
    # the templates read keys the planner really publishes
    latency = {"pipeline.latency_ms_p50", "pipeline.latency_ms_p90"}  # published once results were seen
    published = set(pipeline_payload(FleetView("f").snapshot())) | latency
    assert set(PIPELINE_FIELDS) <= published
    assert {"throughput", "latency p50", "bottleneck stage"} <= {c["name"] for _, c in pipeline_configs("f")}


@pytest.mark.integration
def test_ha_discovery_keeps_following_the_fleet(mosquitto, tmp_path) -> None:
    """Nodes that join after the start appear; a node that dies is removed after --forget-after; SIGTERM stops it."""
    import signal
    import subprocess
    import sys
    import time

    fleet = "hafollow"
    proc = subprocess.Popen([sys.executable, "-m", "fleetpipe", "ha-discovery", "--broker", mosquitto.url, "--fleet",
                             fleet, "--forget-after", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    async def scenario() -> tuple[dict[str, bytes], dict[str, bytes]]:
        configs: dict[str, bytes] = {}
        async with MqttBus(mosquitto.url, client_id="ha-watch") as watcher, \
                MqttBus(mosquitto.url, client_id="ha-nodes") as nodes:
            await watcher.subscribe("homeassistant/#", 1)
            it = watcher.messages().__aiter__()

            async def until(pred: object, timeout: float = 20.0) -> None:
                deadline = time.monotonic() + timeout
                while not pred():  # type: ignore[operator]
                    msg = await asyncio.wait_for(it.__anext__(), max(deadline - time.monotonic(), 0.01))
                    configs[msg.topic] = msg.payload

            def of(node: str) -> dict[str, bytes]:
                return {t: p for t, p in configs.items() if f"fleetpipe_{fleet}_{node}_" in t}

            await until(lambda: len(of("pipeline")) == len(PIPELINE_FIELDS))
            for node in ("n1", "n2"):  # both join after ha-discovery started
                await nodes.publish(topics.node_state(fleet, node), wire.encode(birth(node, fleet=fleet)), qos=1,
                                    retain=True)
                await until(lambda n=node: len(of(n)) == len(HA_FIELDS) and all(of(n).values()))
            joined = dict(configs)
            death = wire.NodeDeath(fleet=fleet, node_id="n1", seq=1, ts=T + 1, reason="clean shutdown")
            await nodes.publish(topics.node_state(fleet, "n1"), wire.encode(death), qos=1, retain=True)
            await until(lambda: len(of("n1")) == len(HA_FIELDS) and not any(of("n1").values()))
            for node in ("n1", "n2"):
                await nodes.publish(topics.node_state(fleet, node), b"", qos=1, retain=True)
            return joined, dict(configs)

    try:
        joined, after = asyncio.run(scenario())
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=20)[0].decode()
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    n2 = {t: p for t, p in after.items() if "_n2_" in t}
    assert len(n2) == len(HA_FIELDS) and all(n2.values())  # the live node stays
    cfg = json.loads(joined[f"homeassistant/sensor/fleetpipe_{fleet}_n2_load/config"])
    assert cfg["default_entity_id"] == f"sensor.fleetpipe_{fleet}_n2_load" and "object_id" not in cfg


@pytest.mark.integration
def test_ha_discovery_publishes_retained(mosquitto, capsys) -> None:
    fleet = "ha"

    async def publish_birth() -> None:
        async with MqttBus(mosquitto.url, client_id="ha-pub") as bus:
            await bus.publish(topics.node_state(fleet, "n1"), wire.encode(birth("n1", fleet=fleet)), qos=1,
                              retain=True)

    async def read_configs() -> dict[str, dict[str, object]]:
        got: dict[str, dict[str, object]] = {}
        async with MqttBus(mosquitto.url, client_id="ha-sub") as bus:
            await bus.subscribe("homeassistant/#", 1)
            it = bus.messages().__aiter__()
            while len(got) < len(HA_FIELDS) + len(PIPELINE_FIELDS):
                msg = await asyncio.wait_for(it.__anext__(), 5)
                assert msg.retain
                got[msg.topic] = json.loads(msg.payload)
        return got

    asyncio.run(publish_birth())
    assert main(["ha-discovery", "--broker", mosquitto.url, "--fleet", fleet, "--seconds", "0.5", "--once"]) == 0
    assert "1 node" in capsys.readouterr().out
    got = asyncio.run(read_configs())
    cfg = got["homeassistant/sensor/fleetpipe_ha_n1_queue_depth/config"]
    assert cfg["device"]["model"] == "pi4" and cfg["state_topic"] == topics.node_health(fleet, "n1")  # type: ignore[index]
