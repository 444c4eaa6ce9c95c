"""A real fleet: mosquitto on 127.0.0.1, a planner process and node processes, real onnxruntime slices."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from fleetpipe import codec, topics, wire
from fleetpipe.client import FleetClient
from tests.integration.fleet_helpers import fleet, tiny_resnet18

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _reference(path: Path, xs: list[np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return [sess.run(None, {name: x})[0] for x in xs]


def test_fleet_output_equals_local_model(mosquitto, tmp_path):
    model, shape = tiny_resnet18(tmp_path)
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(12)]
    refs = _reference(model, xs)
    with fleet(mosquitto.url, "itest", tmp_path) as f:
        f.planner(model, "--expect-nodes", "3", "--bits", "32")
        for i, cls in enumerate(("2", "1.5", "3")):
            f.node(f"n{i}", cls)
        with FleetClient(mosquitto.url, fleet="itest", window=4) as client:
            plan = f.wait_plan(client)
            assert len({n for s in plan.stages for n in s.nodes}) >= 2, "a 3-node fleet should use >1 stage"
            results = list(client.stream(xs))
            ids = [r.frame_id for r in results]
            assert ids == sorted(set(ids), key=ids.index)
            for result, ref in zip(results, refs, strict=True):
                np.testing.assert_allclose(result.output, ref, rtol=1e-4, atol=1e-4)
                assert [h.stage for h in result.hops] == list(range(len(plan.stages)))
            assert client.stats.completed == len(xs)
            assert client.stats.duplicates == 0


def test_quantized_fleet_stays_within_error_bound(mosquitto, tmp_path):
    model, shape = tiny_resnet18(tmp_path)
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(6)]
    refs = _reference(model, xs)
    with fleet(mosquitto.url, "itest8", tmp_path) as f:
        f.planner(model, "--expect-nodes", "2", "--bits", "8")
        f.node("a", "1.5")
        f.node("b", "1.5")
        with FleetClient(mosquitto.url, fleet="itest8", window=3) as client:
            client.wait_plan(120)
            outs = [r.output for r in client.stream(xs)]
    for out, ref in zip(outs, refs, strict=True):
        rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        assert rel < 0.05, rel
        assert np.argmax(out) == np.argmax(ref)


def test_bad_frames_are_reported_and_node_survives(mosquitto, tmp_path):
    """Malformed, wrong-shape and wrong-stage frames each give an error report; good frames still flow."""
    import asyncio

    from fleetpipe.transport.mqtt import MqttBus

    model, shape = tiny_resnet18(tmp_path)
    with fleet(mosquitto.url, "ibad", tmp_path) as f:
        f.planner(model, "--expect-nodes", "1", "--bits", "32")
        f.node("solo", "1")
        with FleetClient(mosquitto.url, fleet="ibad", window=2) as client:
            plan = client.wait_plan(120)

            async def attack() -> list[wire.ErrorReport]:
                reports: list[wire.ErrorReport] = []
                async with MqttBus(mosquitto.url, client_id="attacker") as bus:
                    await bus.subscribe(topics.error("ibad"), qos=1)
                    stage0 = topics.stage_in("ibad", plan.epoch, 0, "x")
                    await bus.publish(stage0, b"\x92\x01garbage", qos=1)
                    wrong = wire.Activation(fleet="ibad", epoch=plan.epoch, frame_id="bad-shape", client_id="x",
                                            stage=0, tensors=((plan.stages[0].input_names[0],
                                                               codec.encode_tensor(np.zeros((1, 2), np.float32))),),
                                            reply_to=topics.result("ibad", "x"), sent_ts=time.time(), hops=())
                    await bus.publish(stage0, wire.encode(wrong), qos=1)
                    deadline = time.monotonic() + 20
                    async for message in bus.messages():
                        reports.append(wire.decode(message.payload))
                        if len(reports) >= 2 or time.monotonic() > deadline:
                            break
                return reports

            reports = asyncio.run(asyncio.wait_for(attack(), 30))
            kinds = {r.kind for r in reports}
            assert "DecodeError" in kinds, reports
            assert any(r.frame_id == "bad-shape" and r.kind == "InferenceError" for r in reports), reports
            # The node is still alive and serving.
            out = client.infer(np.zeros(shape, np.float32))
            assert out.shape[-1] == 10
        assert f.procs["solo"].poll() is None


def test_sigterm_drains_and_publishes_death(mosquitto, tmp_path):
    import asyncio

    from fleetpipe.transport.mqtt import MqttBus

    tiny_resnet18(tmp_path)
    with fleet(mosquitto.url, "idrain", tmp_path) as f:
        f.node("d1", "1")
        time.sleep(0.5)

        async def state() -> object:
            async with MqttBus(mosquitto.url, client_id="watcher") as bus:
                await bus.subscribe(topics.node_state("idrain", "d1"), qos=1)
                async for message in bus.messages():
                    msg = wire.decode(message.payload)
                    if isinstance(msg, wire.NodeDeath):
                        return msg
                    f.signal("d1", signal.SIGTERM)
            return None

        death = asyncio.run(asyncio.wait_for(state(), 30))
        assert isinstance(death, wire.NodeDeath)
        assert death.reason == "clean shutdown"
        assert f.procs["d1"].wait(15) == 0


def test_node_waits_for_a_broker_that_is_down_at_start(tmp_path):
    """A node started before its broker connects once the broker comes up, and announces itself."""
    import asyncio

    from fleetpipe.broker import LocalBroker, free_port
    from fleetpipe.transport.mqtt import MqttBus

    port = free_port()
    with fleet(f"mqtt://127.0.0.1:{port}", "ilate", tmp_path) as f:
        f.node("late", "1")
        time.sleep(1.5)
        assert f.procs["late"].poll() is None, "node must keep retrying, not exit\n" + f.logs()
        with LocalBroker(port=port) as broker:

            async def birth() -> object:
                async with MqttBus(broker.url, client_id="watcher") as bus:
                    await bus.subscribe(topics.node_state("ilate", "late"), qos=1)
                    async for message in bus.messages():
                        return wire.decode(message.payload)
                return None

            msg = asyncio.run(asyncio.wait_for(birth(), 30))
            assert isinstance(msg, wire.NodeBirth)
