"""Nodes time the layers of the slice they load and publish them (retained); the planner costs its next plan
with them. Real mosquitto, planner and node processes, real onnxruntime profiles."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from fleetpipe import topics, wire
from fleetpipe.client import FleetClient
from tests.integration.fleet_helpers import fleet, tiny_resnet18

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _retained_profile(url: str, fleet_name: str, node: str, timeout_s: float) -> wire.NodeProfile:
    from fleetpipe.transport.mqtt import MqttBus

    async def read() -> wire.NodeProfile:
        deadline = time.monotonic() + timeout_s
        while True:  # retained: a fresh subscription gets it once published
            async with MqttBus(url, client_id=f"profile-reader-{node}") as bus:
                await bus.subscribe(topics.node_profile(fleet_name, node), qos=1)
                it = bus.messages().__aiter__()
                try:
                    message = await asyncio.wait_for(it.__anext__(), 1.0)
                    msg = wire.decode(message.payload)
                    assert isinstance(msg, wire.NodeProfile)
                    return msg
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise
    return asyncio.run(read())


def _slow_down(url: str, fleet_name: str, node: str, factor: float) -> None:
    from fleetpipe.transport.mqtt import MqttBus

    async def send() -> None:
        async with MqttBus(url, client_id="slower") as bus:
            msg = wire.EmulationControl(fleet=fleet_name, node_id=node, ts=time.time(), compute_factor=factor)
            await bus.publish(topics.node_control(fleet_name, node), wire.encode(msg), qos=1)
    asyncio.run(send())


def test_nodes_report_layer_times_and_the_next_plan_uses_them(mosquitto, tmp_path):
    model, shape = tiny_resnet18(tmp_path)
    with fleet(mosquitto.url, "iprof", tmp_path) as f:
        f.planner(model, "--expect-nodes", "1", "--bits", "32")
        f.node("a", "4")
        with FleetClient(mosquitto.url, fleet="iprof", window=2) as client:
            plan = f.wait_plan(client)
            stage = plan.stages[0]
            assert stage.nodes == ("a",)
            try:
                prof = _retained_profile(mosquitto.url, "iprof", "a", 60)
            except TimeoutError:
                pytest.fail("node a published no profile\n" + f.logs())
            assert prof.model_id == plan.model_id
            assert (prof.first_layer, prof.last_layer) == (stage.first_layer, stage.last_layer)
            assert all(ms > 0 for ms in prof.layer_ms) and prof.threads == 1
            # Emulated x4: its times are its host times stretched 4x, close to what the planner predicted.
            ratio = sum(prof.layer_ms) / stage.compute_ms
            assert 0.25 < ratio < 4.0, (prof, stage)
            # A scripted slowdown (x4 -> x8) republishes the profile at the new factor.
            _slow_down(mosquitto.url, "iprof", "a", 8.0)
            deadline = time.monotonic() + 30
            slower = prof
            while slower.ts == prof.ts and time.monotonic() < deadline:
                slower = _retained_profile(mosquitto.url, "iprof", "a", 10)
            assert sum(slower.layer_ms) == pytest.approx(2 * sum(prof.layer_ms), rel=1e-6), (prof, slower)
            # A second node joins: the re-plan costs node a from its report, node b from its factor.
            f.node("b", "2")
            deadline = time.monotonic() + 60
            while (client.plan is None or client.plan.epoch == plan.epoch) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert client.plan.epoch > plan.epoch, f.logs()
            out = client.infer(np.zeros(shape, np.float32), timeout_s=60)
            assert out.shape[-1] == 10
    lines = [ln for ln in (tmp_path / "planner.log").read_text().splitlines() if "layer costs:" in ln]
    assert lines, "the planner never costed layers from reports"
    n_layers = len(prof.layer_ms)  # the first plan ran the whole model on a
    # The re-plan when b joined: a as it measured every layer, b (nothing reported yet) by its factor.
    assert any(f"a {n_layers} reported" in ln and f"b {n_layers} scaled" in ln for ln in lines), lines
