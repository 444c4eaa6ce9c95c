"""Faults at default settings (issue 21, issue 20 items 7 and 13), with real mosquitto, node and planner processes.

* 21.4: a node checks an activation's declared dtype/shape against its slice before decoding; a claim that would
  decode past ``codec.MAX_DECODED_BYTES`` is refused on the header (the node's peak RSS stays flat).
* 21.5: the shipped broker configs bound the packet size to ``wire.MAX_PACKET_BYTES``, the bound clients announce.
* 20.7: a frame a node rejects (wrong shape) fails at the client with the node's typed error; ``fleetpipe infer``
  prints it in one line and exits non-zero; ``--timeout`` bounds the whole call.
* 21.6 / 20.13: the planner's birth and death on ``node/planner/state`` (a death carries its time), a forged retained
  plan, retained junk on the plan topic and an empty message on a node's assign topic change nothing.
* 21.3: a fleet that becomes infeasible fails every pending and new frame with ``FleetUnavailable`` and resumes
  when nodes return.
* 21.1: a node that joins and dies while loading the epoch that includes it does not stop the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from fleetpipe import topics, wire
from fleetpipe.client import FleetClient
from fleetpipe.errors import FleetUnavailable, InferenceError
from fleetpipe.transport.mqtt import MqttBus
from tests.integration.fleet_helpers import fleet, pinned_profile, tiny_resnet18

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

QUICK = {
    "FLEETPIPE_TIMING_HEALTH_INTERVAL_S": "0.3",
    "FLEETPIPE_TIMING_LEASE_S": "1.5",
    "FLEETPIPE_TIMING_REPLAN_DEBOUNCE_S": "0.2",
    "FLEETPIPE_TIMING_RECONNECT_MIN_S": "0.1",
    "FLEETPIPE_TIMING_RECONNECT_MAX_S": "0.5",
}


def _fleet_name(base: str) -> str:
    """A fleet name of this run alone: zeroconf adverts are machine-wide, and another checkout running the same
    test at the same time would otherwise advertise the same node ids (duplicate-id refusal)."""
    import uuid

    return f"{base}-{uuid.uuid4().hex[:6]}"


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key}")


class Watch:
    """A bus client that records error reports and planner states (with arrival time)."""

    def __init__(self, url: str, fleet_name: str) -> None:
        self.url, self.fleet = url, fleet_name
        self.reports: list[wire.ErrorReport] = []
        self.states: list[tuple[float, wire.PlannerState]] = []
        self.bus: MqttBus | None = None

    async def run(self, body) -> None:  # type: ignore[no-untyped-def]
        async with MqttBus(self.url, client_id="fp-watch") as bus:
            self.bus = bus
            await bus.subscribe(topics.error(self.fleet), qos=1)
            await bus.subscribe(topics.planner_state(self.fleet), qos=1)
            task = asyncio.create_task(self._collect(bus))
            try:
                await body(self)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _collect(self, bus: MqttBus) -> None:
        async for message in bus.messages():
            with contextlib.suppress(Exception):
                msg = wire.decode(message.payload)
                if isinstance(msg, wire.ErrorReport):
                    self.reports.append(msg)
                elif isinstance(msg, wire.PlannerState):
                    self.states.append((time.time(), msg))

    async def report(self, pred, timeout_s: float = 10.0) -> wire.ErrorReport:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for r in self.reports:
                if pred(r):
                    return r
            await asyncio.sleep(0.05)
        raise AssertionError(f"no matching report in {timeout_s} s: {self.reports[-5:]}")


def _activation(fleet_name: str, epoch: int, name: str, tensor: dict, fid: str) -> bytes:
    body = {"v": wire.WIRE_VERSION, "type": "activation", "fleet": fleet_name, "epoch": epoch, "frame_id": fid,
            "client_id": "mallory", "stage": 0, "tensors": [[name, tensor]],
            "reply_to": topics.result(fleet_name, "mallory"), "sent_ts": time.time(), "hops": []}
    return msgpack.packb(body, use_bin_type=True)


def test_one_node_fleet_survives_bad_frames_forgeries_and_shows_its_planner(mosquitto, tmp_path):
    """21.4, 20.7, 21.6 and 20.13 on a planner + one node fleet."""
    model, shape = tiny_resnet18(tmp_path)
    name = _fleet_name("fitems")
    with fleet(mosquitto.url, name, tmp_path) as f:
        f.env.update(QUICK)
        f.planner(model, "--bits", "32")
        node = f.node("solo")
        with FleetClient(mosquitto.url, fleet=name) as client:
            plan = f.wait_plan(client)
            x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            ref = client.infer(x, timeout_s=60)
            input_name = plan.stages[0].input_names[0]

            async def attacks(w: Watch) -> None:
                assert w.bus is not None
                # 20.13: the planner's birth names the session id its plans carry.
                deadline = time.monotonic() + 10
                while not w.states and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert w.states and w.states[-1][1].online and w.states[-1][1].planner_id == plan.planner_id

                # 21.4: a 2-bit tensor of the right name claiming 2**26 elements (16 MiB on the wire, 256 MiB
                # decoded): refused on its header against the slice's input spec, before any decode.
                peak = _status(node.pid, "VmHWM")
                n = 1 << 26
                big = {"dtype": "float32", "shape": [1, 4, 4096, 4096], "bits": 2, "data": bytes(n // 4),
                       "scale": 1.0, "zp": 0.0}
                await w.bus.publish(topics.stage_in(name, plan.epoch, 0, "mallory"),
                                    _activation(name, plan.epoch, input_name, big, "amp-0"), qos=1)
                r = await w.report(lambda r: r.frame_id == "amp-0", 20)
                assert r.kind == "InferenceError" and "expected" in r.detail, r
                # Receiving 16 MiB costs a few copies of it (~50-150 MiB transient); decoding would add 256 MiB.
                grew = _status(node.pid, "VmHWM") - peak
                assert grew < 200 * 1024 * 1024, f"node peak RSS grew by {grew / 2**20:.0f} MiB"
                # A claim past MAX_DECODED_BYTES (512 MiB decoded from 32 MiB) is refused by the codec itself.
                huge = dict(big, shape=[1, 8, 4096, 4096], data=bytes(n // 2))
                await w.bus.publish(topics.stage_in(name, plan.epoch, 0, "mallory"),
                                    _activation(name, plan.epoch, input_name, huge, "amp-huge"), qos=1)
                r = await w.report(lambda r: r.frame_id == "amp-huge" or "MAX_DECODED_BYTES" in r.detail, 20)
                assert r.kind == "DecodeError" and "MAX_DECODED_BYTES" in r.detail, r

                # 21.6: a forged retained plan at a high epoch, then junk, on the plan topic: the planner puts
                # its own plan back; an empty message on the node's assign topic does not take the node out.
                forged = wire.Plan(fleet=name, epoch=101, model_id=plan.model_id, stages=plan.stages, ts=time.time(),
                                   planner_id="mallory")
                await w.bus.publish(topics.plan(name), wire.encode(forged), qos=1, retain=True)
                await asyncio.sleep(1.5)
                await w.bus.publish(topics.plan(name), b"\x00junk", qos=1, retain=True)
                await asyncio.sleep(1.5)
                await w.bus.publish(topics.node_assign(name, "solo"), b"", qos=1, retain=True)

            asyncio.run(Watch(mosquitto.url, name).run(attacks))
            # A new client still starts on the legitimate plan (the retained junk was replaced).
            with FleetClient(mosquitto.url, fleet=name) as fresh:
                p2 = fresh.wait_plan(20)
                assert p2 is not None and p2.planner_id == plan.planner_id and p2.epoch < 101, p2
                np.testing.assert_allclose(fresh.infer(x, timeout_s=60), ref, rtol=1e-5, atol=1e-5)
            # 20.7: a frame of the wrong shape fails at the client with the node's typed error, promptly.
            start = time.monotonic()
            with pytest.raises(InferenceError, match="shape"):
                client.infer(np.zeros((1, 3, 8, 8), np.float32), timeout_s=60)
            assert time.monotonic() - start < 20
            bad = tmp_path / "bad.npy"
            np.save(bad, np.zeros((1, 3, 8, 8), np.float32))
            out = subprocess.run([sys.executable, "-m", "fleetpipe", "infer", "--broker", mosquitto.url, "--fleet",
                                  name, "--input", str(bad), "--timeout", "30"], capture_output=True, text=True,
                                 timeout=60)
            assert out.returncode != 0
            lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
            assert len(lines) == 1 and "InferenceError" in lines[0] and "shape" in lines[0], out.stderr
            # The empty assignment was more than EPOCH_GRACE_S (15 s) ago by now or soon: the node still serves.
            time.sleep(max(0.0, 17 - (time.monotonic() - start)))
            np.testing.assert_allclose(client.infer(x, timeout_s=60), ref, rtol=1e-5, atol=1e-5)
            assert client.plan.epoch == plan.epoch, "forgeries and junk must not cause a re-plan"

        # 20.13: a killed planner's death (its last will) is visible, stamped with the time it arrived.
        async def kill_planner(w: Watch) -> None:
            deadline = time.monotonic() + 10
            while not w.states and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            killed = time.time()
            f.signal("planner", signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any(not s.online for _, s in w.states):
                await asyncio.sleep(0.05)
            deaths = [(t, s) for t, s in w.states if not s.online]
            assert deaths, f"no planner death within 10 s: {w.states}"
            arrived, death = deaths[-1]
            assert death.planner_id == plan.planner_id and arrived - killed < 5
            assert death.ts == 0.0 or abs(death.ts - killed) < 5, "a will carries no connect time"

        asyncio.run(Watch(mosquitto.url, name).run(kill_planner))


def test_infer_timeout_bounds_the_whole_call(mosquitto, tmp_path):
    """20.7: no planner, no plan: ``infer --timeout 3`` returns non-zero in about 3 s, with one line."""
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 3, 32, 32), np.float32))
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "fleetpipe", "infer", "--broker", mosquitto.url, "--fleet", "nobody",
                          "--input", str(x), "--timeout", "3"], capture_output=True, text=True, timeout=60)
    took = time.monotonic() - start
    assert out.returncode != 0 and took < 15, (took, out.stderr)
    assert len([ln for ln in out.stderr.splitlines() if ln.strip()]) == 1, out.stderr


def test_shipped_broker_configs_bound_packets_to_the_client_limit(mosquitto, tmp_path):
    """21.5: lab.conf (as the fixture renders it), secure.conf and `broker config` set max_packet_size to the
    bound every MqttBus announces; the lab broker relays a 1 MiB message and refuses one past the bound."""
    from fleetpipe.deploy import broker_config

    for conf in ("lab.conf", "secure.conf"):
        text = broker_config.render(conf, port=1883, bind="127.0.0.1", dir="/x")
        assert f"\nmax_packet_size {wire.MAX_PACKET_BYTES}\n" in text and "message_size_limit 0" not in text
    out = subprocess.run([sys.executable, "-m", "fleetpipe", "broker", "config"], capture_output=True, text=True,
                         timeout=60, check=True)
    assert f"max_packet_size {wire.MAX_PACKET_BYTES}" in out.stdout

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    got: list[int] = []
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="sub", protocol=MQTTProtocolVersion.MQTTv5)
    sub.on_message = lambda _c, _u, m: got.append(len(m.payload))
    sub.connect("127.0.0.1", mosquitto.port)
    sub.subscribe("big/#", qos=1)
    sub.loop_start()
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="pub", protocol=MQTTProtocolVersion.MQTTv5)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    try:
        time.sleep(0.5)
        pub.publish("big/ok", bytes(1 << 20), qos=1).wait_for_publish(10)
        with contextlib.suppress(Exception):
            pub.publish("big/huge", bytes(wire.MAX_PACKET_BYTES + 1024), qos=1).wait_for_publish(10)
        time.sleep(1.0)
    finally:
        for c in (pub, sub):
            c.loop_stop()
            c.disconnect()
    assert got == [1 << 20], got

    async def local() -> None:
        async with MqttBus(mosquitto.url, client_id="fp-local") as bus:
            from fleetpipe.errors import EncodeError

            with pytest.raises(EncodeError, match="MAX_PACKET_BYTES"):
                await bus.publish("big/huge", bytes(wire.MAX_PACKET_BYTES), qos=1)

    asyncio.run(local())


def _param_bytes(model: Path) -> float:
    import onnx

    from fleetpipe.models.onnx_graph import load_onnx

    return float(sum(layer.param_bytes for layer in load_onnx(onnx.load(str(model))).layers))


def test_an_infeasible_fleet_fails_frames_with_fleet_unavailable_and_resumes(mosquitto, tmp_path):
    """21.3: three memory-limited nodes; kill two: every pending and new frame fails with FleetUnavailable (no
    endless re-sends), the retained plan says infeasible; restart them: new frames run again."""
    model, shape = tiny_resnet18(tmp_path)
    name = _fleet_name("finfeas")
    with fleet(mosquitto.url, name, tmp_path) as f:
        f.env.update(QUICK)
        f.planner(model, "--bits", "32", "--expect-nodes", "3", "--profile",
                  str(pinned_profile(model, tmp_path / "p.json")))
        spec = f"2:mem={int(0.6 * _param_bytes(model))}"
        for i in range(3):
            f.node(f"m{i}", spec)
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        with FleetClient(mosquitto.url, fleet=name, window=4) as client:
            plan = f.wait_plan(client)
            assert len(plan.stages) >= 2, plan
            client.infer(x, timeout_s=60)
            futures = [client.submit(x) for _ in range(4)]
            for i in (1, 2):
                f.signal(f"m{i}", signal.SIGKILL)
            start = time.monotonic()
            outcomes = []
            for fut in futures:
                try:
                    outcomes.append(fut.result(timeout=60))
                except FleetUnavailable as exc:
                    outcomes.append(exc)
            deadline = time.monotonic() + 30
            while client._client.unavailable is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert client._client.unavailable is not None, "no infeasible plan\n" + f.logs()
            assert time.monotonic() - start < 40
            with pytest.raises(FleetUnavailable, match="alive"):
                client.infer(x, timeout_s=10)
            # A stream that yields errors rides the outage out: every frame fails at once, typed.
            start = time.monotonic()
            during = list(client.stream([x] * 3, timeout_s=30, errors="yield"))
            assert all(isinstance(o, FleetUnavailable) for o in during) and time.monotonic() - start < 10, during
            assert all(isinstance(o, FleetUnavailable) or o.output.shape for o in outcomes)
            for i in (1, 2):
                f.procs[f"m{i}-old"] = f.procs.pop(f"m{i}")
                f.node(f"m{i}", spec)
            deadline = time.monotonic() + 90
            while client._client.unavailable is not None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert client._client.unavailable is None, "the fleet did not come back\n" + f.logs()
            assert client.infer(x, timeout_s=60).shape
            after = list(client.stream([x] * 3, timeout_s=60, errors="yield"))
            assert all(not isinstance(o, Exception) and o.output.shape for o in after), after


def test_a_node_killed_while_loading_the_epoch_it_joins_does_not_stop_the_stream(mosquitto, tmp_path):
    """21.1: three nodes serve; a fourth joins and is killed as soon as its assignment arrives. The others keep
    serving the committed epoch past their 15 s grace (the new epoch is abandoned whole), and the stream goes on."""
    model, shape = tiny_resnet18(tmp_path)
    name = _fleet_name("fjoin")
    with fleet(mosquitto.url, name, tmp_path) as f:
        f.env.update(QUICK)
        f.planner(model, "--bits", "32", "--expect-nodes", "3", "--profile",
                  str(pinned_profile(model, tmp_path / "p.json")))
        for i in range(3):
            f.node(f"j{i}", "3")
        x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
        with FleetClient(mosquitto.url, fleet=name, window=2) as client:
            plan = f.wait_plan(client)
            ref = client.infer(x, timeout_s=60)
            done: list[float] = []
            stop = threading.Event()

            def pump() -> None:
                while not stop.is_set():
                    with contextlib.suppress(Exception):
                        client.infer(x, timeout_s=10)
                        done.append(time.monotonic())

            thread = threading.Thread(target=pump, daemon=True)
            thread.start()

            async def join_and_kill() -> None:
                async with MqttBus(mosquitto.url, client_id="fp-spy") as bus:
                    await bus.subscribe(topics.node_assign(name, "j3"), qos=1)
                    f.node("j3", "3", env={"FLEETPIPE_TIMING_HEALTH_INTERVAL_S": "0.3"})
                    async with asyncio.timeout(90):
                        async for message in bus.messages():
                            if message.payload:
                                f.signal("j3", signal.SIGKILL)
                                return

            asyncio.run(join_and_kill())
            killed = time.monotonic()
            time.sleep(22)  # past the nodes' 15 s grace of the epoch they were serving
            stop.set()
            thread.join(30)
            late = [t for t in done if t > killed + 17]
            assert late, f"no result after the grace period ({len(done)} in all)\n" + f.logs()
            np.testing.assert_allclose(client.infer(x, timeout_s=60), ref, rtol=1e-5, atol=1e-5)
            assert client.plan.epoch >= plan.epoch

            # A restarted planner checks the retained plan against the live fleet: one of its members died
            # while no planner ran, so it re-plans instead of resuming a plan that can never run.
            plan = client.plan
            f.signal("planner", signal.SIGKILL)
            f.procs["planner-old"] = f.procs.pop("planner")
            victim = plan.stages[-1].nodes[0]
            f.signal(victim, signal.SIGKILL)
            time.sleep(1.0)
            f.planner(model, "--bits", "32", "--profile", str(tmp_path / "p.json"))
            deadline = time.monotonic() + 90
            while client.plan.epoch == plan.epoch and time.monotonic() < deadline:
                time.sleep(0.2)
            assert client.plan.epoch > plan.epoch, "resumed a plan naming a dead node\n" + f.logs()
            assert victim not in {n for st in client.plan.stages for n in st.nodes}
            np.testing.assert_allclose(client.infer(x, timeout_s=60), ref, rtol=1e-5, atol=1e-5)
