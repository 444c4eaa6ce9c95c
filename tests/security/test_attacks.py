"""Attacks on a live secure fleet with only the credentials a deployment hands out (issue 22's red team).

One fleet for the module: a real mosquitto from secure.conf with the gen-creds ACL and passwords over
TLS, a planner that signs its assignments (planner.key), a node ``n1`` configured with the planner's
public key, and an honest client ``cam-1``. The attacker holds the other identities gen-creds made: a
node ``n0`` (a compromised device), a client ``cam-2``, an observer ``obs2`` and, in one test, the
planner's own password. Every test asserts that its attack fails AND that the fleet still answers
cam-1's frames exactly like onnxruntime on the whole model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from fleetpipe import codec, signing, topics, wire
from fleetpipe.client import FleetClient
from fleetpipe.errors import BrokerUnavailable, TransportError
from fleetpipe.slices import content_hash
from fleetpipe.transport import TLSParameters
from fleetpipe.transport.mqtt import MqttBus
from tests.deploy.conftest import SecureBroker, start_secure_broker
from tests.integration.fleet_helpers import Fleet, tiny_resnet18

from . import forged

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

FLEET = "atk"
NODE = "n1"
EVIL_SEQ = 2**62  # newer than any real birth: a death with it would end n1's membership


@dataclass
class Live:
    broker: SecureBroker
    fleet: Fleet
    client: FleetClient
    model: Path
    shape: tuple[int, ...]
    plan: Any
    sess: ort.InferenceSession = field(init=False)

    def __post_init__(self) -> None:
        self.sess = ort.InferenceSession(str(self.model), providers=["CPUExecutionProvider"])

    def check(self, n: int = 4, seed: int = 0) -> list[Any]:
        """cam-1 streams ``n`` frames: every result is its own frame's, equal to the whole model's output."""
        rng = np.random.default_rng(seed)
        frames = [rng.standard_normal(self.shape).astype(np.float32) for _ in range(n)]
        results = list(self.client.stream(frames))
        assert len(results) == n
        for x, r in zip(frames, results, strict=True):
            want = self.sess.run(None, {self.sess.get_inputs()[0].name: x})[0]
            np.testing.assert_allclose(r.output, want, rtol=1e-4, atol=1e-4)
        assert self.client.plan.epoch == self.plan.epoch, "the plan changed under attack"
        return results

    def bus(self, identity: str, **kw: Any) -> MqttBus:
        return self.broker.bus(identity, **kw)

    def log(self, name: str) -> str:
        return (self.fleet.logdir / f"{name}.log").read_text(errors="replace")


def _toml(broker: SecureBroker, path: Path, identity: str, section: str, extra: str = "") -> Path:
    path.write_text(f"[{section}]\nfleet = \"{FLEET}\"\n{extra}\n[broker]\nurl = \"{broker.url}\"\n"
                    f"username = \"{identity}\"\npassword_file = \"{broker.out / (identity + '.password')}\"\n"
                    f"ca_certs = \"{broker.ca}\"\n")
    return path


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    out = tmp_path_factory.mktemp("attacks")
    broker = start_secure_broker(out, fleet=FLEET, nodes=("n0", NODE), clients=("cam-1", "cam-2"),
                                 observers=("obs", "obs2"))
    logs = out / "logs"
    logs.mkdir()
    model, shape = tiny_resnet18(out)
    public = (out / "planner.pub").read_text().strip()
    key = out / "planner.key"
    planner_conf = _toml(broker, logs / "planner.toml", "planner", "planner", f"signing_key = \"{key}\"")
    node_conf = _toml(broker, logs / "n1.toml", NODE, "node", f"planner_key = \"{public}\"")
    fleet = Fleet(broker.url, FLEET, logs)
    client = None
    try:
        fleet.spawn("planner", ["planner", "--config", str(planner_conf), "--model", str(model), "--bits", "32",
                                "--no-announce", "--expect-nodes", "1"])
        fleet.spawn(NODE, ["node", "--config", str(node_conf), "--name", NODE, "--no-announce",
                           "--cache-dir", str(logs / "cache")])
        client = FleetClient(broker.url, fleet=FLEET, client_id="cam-1", username="cam-1",
                             password=broker.password("cam-1"), tls=TLSParameters(ca_certs=broker.ca), window=4)
        plan = fleet.wait_plan(client, 90)
        assert [s.nodes for s in plan.stages] == [(NODE,)]
        live = Live(broker, fleet, client, model, shape, plan)
        live.check(2)
        yield live
    finally:
        if client is not None:
            client.close()
        fleet.stop()
        broker.stop()


def run(coro: Any, timeout: float = 30) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


async def _collect(bus: MqttBus, seconds: float) -> list[tuple[str, Any]]:
    """(topic, decoded message or raw bytes) of what arrives on ``bus`` within ``seconds``."""
    got: list[tuple[str, Any]] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for m in bus.messages():
                try:
                    got.append((m.topic, wire.decode(m.payload) if m.payload else b""))
                except Exception:
                    got.append((m.topic, bytes(m.payload)))
    return got


async def _refused(bus: MqttBus, topic: str, payload: bytes = b"x") -> None:
    with pytest.raises(TransportError, match="rejected publish"):
        await bus.publish(topic, payload, qos=1)


# --- refusals that held before this issue -------------------------------------------------------------


def test_connection_and_topic_refusals_still_hold(live: Live) -> None:
    """Anonymous or wrong-password logins fail; an identity cannot publish on another identity's topics."""
    async def main() -> None:
        for identity, password in ((None, None), ("n0", "wrong"), ("nobody", "x")):
            with pytest.raises(BrokerUnavailable, match="refused the connection"):
                async with live.broker.bus(identity, password=password):
                    pass
        async with live.bus("n0") as n0, live.bus("cam-2") as cam2:
            for topic in (topics.node_state(FLEET, NODE), topics.node_health(FLEET, NODE), topics.plan(FLEET),
                          topics.node_assign(FLEET, NODE), topics.slice_chunk(FLEET, "abc", 0)):
                await _refused(n0, topic)
            for topic in (topics.result(FLEET, "cam-1"), topics.stage_in(FLEET, live.plan.epoch, 1, "cam-2"),
                          topics.node_health(FLEET, "n0")):
                await _refused(cam2, topic)
            await cam2.subscribe(topics.result(FLEET, "cam-1"), qos=1)  # granted, filtered on delivery
            feeder = asyncio.create_task(asyncio.to_thread(live.check, 2, 1))
            stolen = await _collect(cam2, 4)
            await feeder
            assert stolen == []

    run(main())
    live.check()


# --- item 1: a node speaks only for itself -------------------------------------------------------------


def test_node_cannot_speak_for_another_node(live: Live) -> None:
    """n0 publishes, on its own topics, a death naming n1, a ghost birth and health, and n1's profile and
    metrics (before: n1 dropped 4.8 s later; a ghost birth + health caused a permanent outage)."""
    now = time.time()
    lies = [
        (topics.node_state(FLEET, "n0"), wire.NodeDeath(FLEET, NODE, EVIL_SEQ, now, "forged by n0"), True),
        (topics.node_state(FLEET, "n0"), wire.NodeBirth(FLEET, "ghost", EVIL_SEQ, now, "x86_64", 64, 2**36,
                                                         ("onnx",), ("CPUExecutionProvider",), "ghost", 1e6), True),
        (topics.node_health(FLEET, "n0"), wire.NodeHealth(FLEET, "ghost", EVIL_SEQ, now), False),
        (topics.node_health(FLEET, "n0"), wire.NodeHealth(FLEET, NODE, EVIL_SEQ, now, load=99.0), False),
        (topics.node_profile(FLEET, "n0"), wire.NodeProfile(FLEET, NODE, now, live.plan.model_id, 0, 0, (1e6,)),
         True),
        (topics.node_metrics(FLEET, "n0"), wire.Metrics(FLEET, NODE, now, {"frames_in": 1e9}), False),
    ]

    async def main() -> list[tuple[str, Any]]:
        async with live.bus("n0") as n0, live.bus("obs") as obs:
            await obs.subscribe(topics.NODE_STATE.filter(fleet=FLEET), qos=1)
            await obs.subscribe(topics.plan(FLEET), qos=1)
            for _ in range(3):
                for topic, msg, retain in lies:
                    await n0.publish(topic, wire.encode(msg), qos=1, retain=retain)
                await asyncio.sleep(1.0)
            seen = await _collect(obs, 4.0)  # > lease (3.5 s) + debounce after the last lie
            for topic in (topics.node_state(FLEET, "n0"), topics.node_profile(FLEET, "n0")):
                await n0.publish(topic, b"", qos=1, retain=True)  # the retained lies go
            return seen

    seen = run(main())
    plans = [m for _, m in seen if isinstance(m, wire.Plan)]
    assert all(p.epoch == live.plan.epoch and [s.nodes for s in p.stages] == [(NODE,)] for p in plans), plans
    assert not [m for t, m in seen if isinstance(m, wire.NodeDeath) and t == topics.node_state(FLEET, NODE)]
    planner_log = live.log("planner")
    for what in ("NodeDeath naming node_id='n1'", "NodeBirth naming node_id='ghost'",
                 "NodeHealth naming node_id='ghost'", "NodeProfile naming node_id='n1'"):
        assert what in planner_log, planner_log[-3000:]
    live.check()


# --- item 2: a client gets only its own results ---------------------------------------------------------


def test_client_cannot_take_another_clients_results(live: Live) -> None:
    """cam-2 submits frames labelled cam-1 (before: 12 of cam-1's 16 results were cam-2's output, with ids
    predicted from cam-1's counter); n0 forges results for cam-1. cam-1 gets exactly its own 16."""
    epoch = live.plan.epoch
    name = live.plan.stages[0].input_names[0]
    x = codec.encode_tensor(np.ones(live.shape, np.float32), bits=32)
    stats0 = dataclasses.replace(live.client.stats, errors=[])

    def frame(fid: str, client: str) -> bytes:
        return wire.encode(wire.Activation(FLEET, epoch, fid, client, 0, ((name, x),), topics.result(FLEET, client),
                                           time.time()))

    async def main() -> tuple[list[str], list[wire.ErrorReport], int]:
        async with live.bus("cam-2") as cam2, live.bus("n0") as n0:
            await cam2.subscribe(topics.error(FLEET), qos=1)
            # The ACL: cam-2 cannot submit on cam-1's input topic at all.
            await _refused(cam2, topics.stage_in(FLEET, epoch, 0, "cam-1"), frame("f", "cam-1"))
            done = threading.Event()
            results: list[Any] = []
            feeder = threading.Thread(target=lambda: (results.extend(live.check(16, 2)), done.set()))
            feeder.start()
            ids = [secrets.token_hex(16) for _ in range(8)]
            forged_results = 0
            while not done.is_set():
                for fid in ids:  # on its own topic, labelled cam-1: the node refuses it by the topic
                    await cam2.publish(topics.stage_in(FLEET, epoch, 0, "cam-2"), frame(fid, "cam-1"), qos=1)
                for _ in range(2):  # results for frame ids cam-1 never sent
                    res = wire.Result(FLEET, secrets.token_hex(16), "cam-1", epoch, ((name, x),), time.time())
                    await n0.publish(topics.result(FLEET, "cam-1"), wire.encode(res), qos=1)
                    forged_results += 1
                await asyncio.sleep(0.1)
            await asyncio.to_thread(feeder.join)
            reports = [m for _, m in await _collect(cam2, 2.0) if isinstance(m, wire.ErrorReport)]
            return [r.frame_id for r in results], reports, forged_results

    fids, reports, n_forged = run(main(), 60)
    assert len(set(fids)) == 16 and all(re.fullmatch(r"[0-9a-f]{32}", f) for f in fids), fids  # 128 random bits
    refused = [r for r in reports if r.kind == "DecodeError" and "client_id='cam-1'" in r.detail]
    assert refused, reports
    stats = live.client.stats
    deadline = time.monotonic() + 5
    while stats.foreign - stats0.foreign < n_forged and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats.foreign - stats0.foreign == n_forged  # dropped, logged ...
    assert stats.duplicates == stats0.duplicates  # ... and never counted as duplicates of cam-1's frames
    live.check()


# --- item 3: only the planner's signed assignments are loaded -------------------------------------------


def test_forged_assignments_are_refused_without_the_planners_key(live: Live) -> None:
    """With the planner's password (its key stays on the planner host), an attacker deploys the 204-byte
    external-data slice and a fake-runtime slice to n1 (before: n1 returned its own broker password in
    a result; the fake slice took it from 0.29 to 1.9 GB). Unsigned or wrongly signed: refused."""
    epoch, stage = live.plan.epoch, live.plan.stages[0]
    other_key_file = live.fleet.logdir / "other.key"
    other_key_file.write_bytes(signing.generate_keypair()[0])
    other = signing.load_private_key(other_key_file)
    cases = [(forged.external_data_slice(f"{NODE}.password"), False), (forged.fake_runtime_slice(), True)]
    live.fleet.signal("planner", signal.SIGSTOP)  # the thief's session would otherwise fight the planner's
    try:
        async def main() -> list[wire.ErrorReport]:
            async with live.bus("planner") as thief, live.bus("obs") as obs:
                await obs.subscribe(topics.error(FLEET), qos=1)
                for i, (data, sign) in enumerate(cases):
                    h = content_hash(data)
                    chunk = wire.SliceChunk(slice_hash=h, index=0, count=1, data=data)
                    await thief.publish(topics.slice_chunk(FLEET, h, 0), wire.encode(chunk), qos=1, retain=True)
                    bad = wire.StageAssign(fleet=FLEET, node_id=NODE, epoch=epoch + 10 + i, stage=0, n_stages=1,
                                           first_layer=stage.first_layer, last_layer=stage.last_layer,
                                           model_id=live.plan.model_id, slice_hash=h, slice_size=len(data),
                                           ts=time.time(), input_names=stage.input_names,
                                           output_names=stage.output_names)
                    if sign:
                        bad = signing.sign_assign(bad, other)
                    await thief.publish(topics.node_assign(FLEET, NODE), wire.encode(bad), qos=1)
                got = await _collect(obs, 3.0)
                for data, _ in cases:
                    await thief.publish(topics.slice_chunk(FLEET, content_hash(data), 0), b"", qos=1, retain=True)
                return [m for _, m in got if isinstance(m, wire.ErrorReport) and m.source == NODE]

        reports = run(main())
    finally:
        live.fleet.signal("planner", signal.SIGCONT)
    details = " | ".join(f"{r.kind}: {r.detail}" for r in reports)
    assert "UntrustedSlice: unsigned assignment" in details and "UntrustedSlice: assignment of epoch" in details, \
        details
    node_log = live.log(NODE)
    assert node_log.count("UntrustedSlice") == 2, node_log[-2000:]
    assert f"epoch {epoch + 10} stage" not in node_log and f"epoch {epoch + 11} stage" not in node_log  # not loaded
    time.sleep(1.0)  # the planner reconnects (the thief's login took its session) and carries on
    live.check()


# --- item 4: nobody takes over another identity's MQTT session -----------------------------------------


def test_observer_with_n1s_client_id_does_not_kick_n1(live: Live) -> None:
    """obs2 connects again and again with n1's MQTT client id (before: n1 kicked 26 times in 30 s, a death
    published each time); use_username_as_clientid makes obs2's session id its own username."""
    async def main() -> list[tuple[str, Any]]:
        async with live.bus("obs") as obs:
            await obs.subscribe(topics.node_state(FLEET, NODE), qos=1)
            await _collect(obs, 0.5)  # the retained birth
            for client_id in (f"fp-{FLEET}-{NODE}", NODE) * 3:
                async with live.bus("obs2", client_id=client_id):
                    await asyncio.sleep(0.2)
            return await _collect(obs, 1.5)

    seen = run(main())
    assert not [m for _, m in seen if isinstance(m, wire.NodeDeath | wire.NodeBirth)], seen  # n1 never left
    assert "lost connection" not in live.log(NODE)
    live.check()


# --- item 5: least privilege as the code uses it ---------------------------------------------------------


def test_observer_reads_the_control_plane_only_and_nodes_read_the_plan(live: Live) -> None:
    """An observer sees health, metrics and the plan but no frame, result or slice (model weights); a node
    identity reads the plan (nodes subscribe to it; it was denied, so secure nodes adapted unlike lab ones);
    a node sends part messages only as itself."""
    async def main() -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
        async with live.bus("obs") as obs, live.bus("n0") as n0:
            await obs.subscribe(topics.fleet_filter(FLEET), qos=1)
            await n0.subscribe(topics.plan(FLEET), qos=1)
            feeder = asyncio.create_task(asyncio.to_thread(live.check, 4, 3))
            watched = await _collect(obs, 3.0)
            await feeder
            e = live.plan.epoch
            await _refused(n0, topics.part_in(FLEET, e, 0, NODE, "n2"))  # a part request as lead n2
            await _refused(n0, topics.part_gather(FLEET, e, 0, NODE, "n2"))  # a part reply as node n2
            await n0.publish(topics.part_in(FLEET, e, 0, NODE, "n0"), b"", qos=1)  # as itself: allowed
            return watched, await _collect(n0, 0.5)

    watched, node_got = run(main())
    names = {topics.parse(t)[0].name for t, _ in watched}
    assert {"node_state", "node_health", "node_metrics", "plan"} <= names, names
    assert not names & {"stage_in", "result", "slice_chunk", "part_in", "part_gather"}, names
    assert [m.epoch for _, m in node_got if isinstance(m, wire.Plan)] == [live.plan.epoch]
    live.check()


def test_secure_and_lab_fleets_make_the_same_decisions(live: Live, mosquitto: Any, tmp_path: Path) -> None:
    """The same model and node on the lab broker (anonymous, no keys: documented to keep working) gives the
    same plan and the same outputs as on the secure broker."""
    fleet = Fleet(mosquitto.url, FLEET, tmp_path)
    try:
        fleet.spawn("planner", ["planner", "--broker", mosquitto.url, "--fleet", FLEET, "--model", str(live.model),
                                "--bits", "32", "--no-announce", "--expect-nodes", "1"])
        fleet.spawn(NODE, ["node", "--broker", mosquitto.url, "--fleet", FLEET, "--name", NODE, "--no-announce",
                           "--cache-dir", str(tmp_path / "cache")])
        with FleetClient(mosquitto.url, fleet=FLEET, client_id="cam-1", window=4) as lab:
            plan = fleet.wait_plan(lab, 90)
            x = np.random.default_rng(5).standard_normal(live.shape).astype(np.float32)
            lab_out = lab.infer(x, timeout_s=60)
    finally:
        fleet.stop()

    def decisions(p: Any) -> list[tuple[Any, ...]]:
        return [(s.first_layer, s.last_layer, s.nodes, s.bits, s.slice_hash, s.input_names, s.output_names)
                for s in p.stages]

    assert plan.model_id == live.plan.model_id and decisions(plan) == decisions(live.plan)
    np.testing.assert_allclose(lab_out, live.client.infer(x, timeout_s=60), rtol=1e-6, atol=1e-6)
    live.check()

