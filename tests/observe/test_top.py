"""``fleetpipe top``: rendered headless to text, from a snapshot and from a real mosquitto."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import time

import pytest

from fleetpipe import topics, wire
from fleetpipe.observe._top import render_text
from fleetpipe.transport.mqtt import MqttBus
from tests.observe._synth import T, birth, health, plan
from tests.observe.test_metrics import _steady_view


def test_render_text_from_snapshot() -> None:
    view = _steady_view()
    view.apply(plan(epoch=4), now=T + 2)
    view.apply(wire.ErrorReport(fleet="f", source="b", kind="StaleEpoch", detail="frame for epoch 2", ts=T,
                                frame_id="x7"), now=T + 2)
    view.add_latency(35.0)
    text = render_text(view.snapshot(now=T + 2.5), width=160)
    for needle in ("fleet f", "plan epoch 4", "2/2 nodes alive", "throughput 50.0 fps",
                   "(predicted 50.0, 50.0 with measured compute)", "bottleneck stage 1 at 100%", "p50 35.0",
                   "stage 0", "stage 1", "epoch 3 -> 4", "StaleEpoch frame x7", "recent errors (1 seen)"):
        assert needle in text, (needle, text)
    node_rows = [line for line in text.splitlines() if line.lstrip("│ ").startswith(("a ", "b "))]
    assert len(node_rows) == 2 and all("up" in r and "pi4" in r for r in node_rows)
    stage1 = next(line for line in text.splitlines() if "stage 1" in line and "2-3" in line)
    assert "█" * 8 in stage1 and "100%" in stage1  # measured utilisation bar of the bottleneck


def test_render_text_empty_fleet() -> None:
    from fleetpipe.metrics import FleetView

    text = render_text(FleetView("nobody").snapshot(now=T))
    assert "no plan yet" in text and "0/0 nodes alive" in text


@pytest.mark.integration
def test_top_once_against_mosquitto(mosquitto) -> None:
    """Births and plan retained, health streamed while ``fleetpipe top --once`` runs in its own process."""
    fleet = "topf"

    async def feed(proc: subprocess.Popen[str]) -> None:
        async with MqttBus(mosquitto.url, client_id="top-feeder") as bus:
            for node in ("edge-a", "edge-b"):
                await bus.publish(topics.node_state(fleet, node), wire.encode(birth(node, fleet=fleet)), qos=1,
                                  retain=True)
            p = wire.Plan(fleet=fleet, epoch=7, model_id="mlp", ts=T, bottleneck_ms=20.0,
                          stages=(wire.PlanStage(index=0, first_layer=0, last_layer=1, nodes=("edge-a",),
                                                 predicted_ms=10.0),
                                  wire.PlanStage(index=1, first_layer=2, last_layer=3, nodes=("edge-b",),
                                                 predicted_ms=20.0)))
            await bus.publish(topics.plan(fleet), wire.encode(p), qos=1, retain=True)
            k = 0
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline:
                now = T + 0.1 * k  # sender clock: exactly 5 frames per 0.1 s
                for node, stage, comp in (("edge-a", 0, 10.0), ("edge-b", 1, 20.0)):
                    h = health(node, now, 5 * k, stage=stage, compute=comp, fleet=fleet)
                    await bus.publish(topics.node_health(fleet, node), wire.encode(h), qos=0)
                k += 1
                await asyncio.sleep(0.1)

    proc = subprocess.Popen([sys.executable, "-m", "fleetpipe", "top", "--broker", mosquitto.url, "--fleet", fleet,
                             "--once", "--interval", "1.5", "--width", "160"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        asyncio.run(feed(proc))
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "plan epoch 7" in out and "2/2 nodes alive" in out, out
    assert "edge-a" in out and "edge-b" in out
    assert any("stage 0" in line and "2-3" not in line and "0-1" in line and "edge-a" in line
               for line in out.splitlines()), out
    assert any("stage 1" in line and "2-3" in line and "edge-b" in line for line in out.splitlines()), out
    assert "throughput 50.0 fps" in out, out
    assert "bottleneck stage 1 at 100%" in out, out  # 50 fps * 20 ms


def test_top_shows_a_lost_broker_connection() -> None:
    from fleetpipe.metrics import FleetView
    from fleetpipe.observe._top import render

    def text(**kw: object) -> str:
        from rich.console import Console

        console = Console(width=140, record=True, file=io.StringIO(), color_system=None)
        console.print(render(FleetView("f").snapshot(), **kw))
        return console.export_text()

    assert "connection lost" not in text()
    assert "broker connection lost (mqtt://b:1883)" in text(broker_lost="mqtt://b:1883")


def test_top_once_listens_long_enough_for_rates() -> None:
    """Rates need two health reports per node: --once with the default 1 s interval listens 3 health intervals."""
    from fleetpipe import timing
    from fleetpipe.observe._top import once_window_s

    assert once_window_s(1.0) == 3 * timing.HEALTH_INTERVAL_S
    assert once_window_s(10.0) == 10.0
