"""Hostile input against a real node process: junk on every topic it subscribes to, forged frames and assignments.

One fleet (mosquitto, planner, one node serving the whole tiny model) takes a storm: targeted cases, a
hypothesis-driven fuzz of each subscribed topic and a bounded random-bytes loop. Every hostile message
must come back as an ``ErrorReport`` of a sensible kind on the error topic; afterwards the node is
alive, still answers a valid frame exactly like onnxruntime on the whole model, and its RSS stayed
bounded.

Replays are a choice, documented and tested here: the node processes a replayed frame id again
(frames are at-least-once: the client re-sends the same id after a timeout, and an MQTT QoS 1
re-delivery looks the same), and the client de-duplicates results by frame id. Dropping replays at
the node would lose a frame whose first result was lost downstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetpipe import codec, topics, wire
from fleetpipe.client import FleetClient
from fleetpipe.slices import content_hash
from fleetpipe.transport.mqtt import MqttBus
from tests.integration.fleet_helpers import fleet

from . import forged

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

FLEET = "hostile"
NODE = "victim"
REPORT_WAIT_S = 5.0
# Kinds a hostile frame may legitimately produce (anything else, e.g. KeyError, means an unguarded path).
FRAME_KINDS = {"DecodeError", "VersionMismatch", "StaleEpoch", "StageError", "InferenceError"}


def _tiny_model(tmp_path: Path) -> tuple[Path, tuple[int, ...]]:
    from fleetpipe.models import zoo

    kw = {"width": 0.25, "resolution": 32, "num_classes": 10}
    path = tmp_path / "resnet18.onnx"
    onnx.save(zoo.build("resnet18", **kw), path)
    return path, tuple(zoo.input_shape("resnet18", **kw))


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _tensor(dtype: str, shape: list[int], data: bytes, bits: int = 32, **extra: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "bits": bits, "data": data, **extra}


class Attack:
    """An attacker client on the fleet's broker that publishes and matches the node's error reports."""

    def __init__(self, bus: MqttBus, epoch: int, input_name: str) -> None:
        self.bus = bus
        self.epoch = epoch
        self.input_name = input_name
        self.stage_in = topics.stage_in(FLEET, epoch, 0, "mallory")
        self.reports: list[wire.ErrorReport] = []
        self.results: list[wire.Result] = []
        self.seen = 0  # reports already attributed to a case
        self.table: list[tuple[str, str]] = []  # (case, what it produced)
        self.never_sent = 0.0  # when the never-loading assignment went out
        self._new = asyncio.Event()

    async def collect(self) -> None:
        async for message in self.bus.messages():
            msg = wire.decode(message.payload)
            if isinstance(msg, wire.ErrorReport) and msg.source == NODE:
                self.reports.append(msg)
                self._new.set()
            elif isinstance(msg, wire.Result):
                self.results.append(msg)
                self._new.set()

    def body(self, **over: Any) -> dict[str, Any]:
        """A well-formed activation for stage 0 (as a wire dict), with fields replaced by ``over``."""
        body = {"v": wire.WIRE_VERSION, "type": "activation", "fleet": FLEET, "epoch": self.epoch,
                "frame_id": "f-ok", "client_id": "mallory", "stage": 0,
                "tensors": [[self.input_name, _tensor("float32", [1, 3, 32, 32], bytes(4 * 3 * 32 * 32))]],
                "reply_to": topics.result(FLEET, "mallory"), "sent_ts": time.time(), "hops": []}
        body.update(over)
        return body

    def frame(self, **over: Any) -> bytes:
        return msgpack.packb(self.body(**over), use_bin_type=True)

    async def wait_for(self, pred: Callable[[wire.ErrorReport], bool],
                       timeout: float = REPORT_WAIT_S) -> wire.ErrorReport:
        deadline = time.monotonic() + timeout
        while True:
            for r in self.reports[self.seen:]:
                if pred(r):
                    return r
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching error report; new ones: {self.reports[self.seen:]}")
            self._new.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new.wait(), left)

    async def expect(self, case: str, topic: str, payload: bytes, kinds: set[str], *, frame_id: str | None = None,
                     retain: bool = False, about: str = "") -> wire.ErrorReport:
        """Publish one hostile message; the node's next report must have one of ``kinds``."""
        start = len(self.reports)
        self.seen = start
        await self.bus.publish(topic, payload, qos=1, retain=retain)

        def pred(r: wire.ErrorReport) -> bool:
            return (frame_id is None or r.frame_id == frame_id) and about in r.detail

        report = await self.wait_for(pred)
        assert report.kind in kinds, (case, report)
        assert frame_id is None or report.frame_id == frame_id, (case, report)
        self.table.append((case, f"{report.kind}: {report.detail[:90]}"))
        return report

    async def expect_count(self, n: int, timeout: float) -> None:
        """Wait until the node has sent ``n`` more reports than were attributed so far."""
        target = self.seen + n
        deadline = time.monotonic() + timeout
        while len(self.reports) < target and time.monotonic() < deadline:
            self._new.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new.wait(), max(deadline - time.monotonic(), 0.01))
        got = self.reports[self.seen:]
        assert len(got) >= n, f"{len(got)} reports for {n} hostile messages"
        self.seen = len(self.reports)


def _would_run(data: bytes, attack: Attack) -> bool:
    """Whether the node would accept and run this frame (a fuzz example that is accidentally valid)."""
    try:
        msg = wire.decode(data)
        (name, tensor), = msg.tensors
        arr = codec.decode_tensor(tensor)
    except Exception:
        return False
    return (msg.epoch, msg.stage, msg.fleet, name, arr.shape, arr.dtype) == (
        attack.epoch, 0, FLEET, attack.input_name, (1, 3, 32, 32), np.float32) and msg.reply_to == topics.result(
        FLEET, msg.client_id)


def _junk_bytes(rng: random.Random) -> bytes:
    """Random bytes, biased to the JSON and msgpack-map paths of the decoder; never empty."""
    n = rng.choice((1, 2, 7, 64, 300, 4096))
    body = rng.randbytes(n)
    return rng.choice((b"", b"{", b"\x8a", b"\x89\xa1v\x01")) + body


def test_hostile_storm_node_survives_reports_and_stays_bounded(mosquitto, tmp_path):
    model, shape = _tiny_model(tmp_path)
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]

    with fleet(mosquitto.url, FLEET, tmp_path) as f:
        f.planner(model, "--expect-nodes", "1", "--bits", "32")
        node = f.node(NODE, "1")
        with FleetClient(mosquitto.url, fleet=FLEET, window=2) as client:
            try:
                plan = client.wait_plan(60)
            except TimeoutError:
                pytest.fail("no plan\n" + f.logs())
            assert len(plan.stages) == 1 and plan.stages[0].nodes == (NODE,)
            np.testing.assert_allclose(client.infer(x), ref, rtol=1e-4, atol=1e-4)
            rss_before = _rss_bytes(node.pid)

            attack = asyncio.run(asyncio.wait_for(_storm(mosquitto.url, plan), 110))

            assert node.poll() is None, "node died\n" + f.logs()
            np.testing.assert_allclose(client.infer(x), ref, rtol=1e-4, atol=1e-4)
            rss_after = _rss_bytes(node.pid)
        assert rss_after < 2 * rss_before + 100 * 2**20, (rss_before, rss_after)
        print(f"\nRSS before {rss_before / 2**20:.0f} MiB, after {rss_after / 2**20:.0f} MiB; "
              f"{len(attack.reports)} error reports")
        for case, outcome in attack.table:
            print(f"  {case:<44} {outcome}")
    assert node.returncode == 0, "node did not drain cleanly after the storm\n" + f.logs()


async def _storm(url: str, plan: Any) -> Attack:
    async with MqttBus(url, client_id="mallory-bus") as bus:
        # The node's retained assignment, to learn its slice and to restore it after retained junk.
        assign_topic = topics.node_assign(FLEET, NODE)
        await bus.subscribe(assign_topic, qos=1)
        original = await asyncio.wait_for(anext(bus.messages()), 10)
        assert original.retain
        await bus.unsubscribe(assign_topic)
        assign = wire.decode(original.payload)
        assert isinstance(assign, wire.StageAssign)

        attack = Attack(bus, plan.epoch, plan.stages[0].input_names[0])
        await bus.subscribe(topics.error(FLEET), qos=1)
        await bus.subscribe(topics.result(FLEET, "mallory"), qos=1)
        collector = asyncio.create_task(attack.collect())
        try:
            await _assignment_that_never_loads(attack, assign)  # its 30 s fetch timeout runs under the rest
            await _frame_cases(attack, assign)
            await _topic_cases(attack, assign, original.payload)
            await asyncio.to_thread(_hypothesis_fuzz, attack, asyncio.get_running_loop())
            await _random_bytes(attack)
            await _never_arrives(attack)
            await _slice_cases(attack, assign)
        finally:
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
        return attack


NEVER_HASH = "never-" + "0" * 40


async def _assignment_that_never_loads(attack: Attack, assign: Any) -> None:
    """A newer assignment whose slice never arrives: the node must keep serving the old one meanwhile."""
    never = _reassign(assign, epoch=assign.epoch + 1, slice_hash=NEVER_HASH, slice_size=1000)
    await attack.bus.publish(topics.node_assign(FLEET, NODE), wire.encode(never), qos=1)
    attack.never_sent = time.monotonic()
    await asyncio.sleep(0.5)  # the node subscribes to the slice's chunk topics
    # Junk on those chunk topics while the fetch waits: each is reported, none completes the slice.
    rng = random.Random(7)
    for i in range(20):
        await attack.bus.publish(topics.slice_chunk(FLEET, NEVER_HASH, i), _junk_bytes(rng), qos=1)
    await attack.expect_count(20, 10)
    attack.table.append(("20 random-byte payloads on slice/<hash>/<i>", "20 x DecodeError"))
    other = wire.SliceChunk(slice_hash="someone-else", index=0, count=1, data=b"x")
    await attack.expect("SliceChunk of another hash on our chunk topic", topics.slice_chunk(FLEET, NEVER_HASH, 0),
                        wire.encode(other), {"DecodeError"})
    shifted = wire.SliceChunk(slice_hash=NEVER_HASH, index=1, count=2, data=b"x")
    await attack.expect("SliceChunk index != topic index", topics.slice_chunk(FLEET, NEVER_HASH, 0),
                        wire.encode(shifted), {"DecodeError"})


async def _never_arrives(attack: Attack) -> None:
    left = 35 - (time.monotonic() - attack.never_sent)
    attack.seen = 0
    report = await attack.wait_for(lambda r: NEVER_HASH in r.detail and r.kind == "RuntimeLoadError", max(left, 1))
    attack.table.append(("assignment whose slice chunks never arrive", f"{report.kind}: {report.detail[:90]}"))
    attack.seen = len(attack.reports)


async def _frame_cases(attack: Attack, assign: Any) -> None:
    a, stage_in, name = attack, attack.stage_in, attack.input_name

    async def frame_case(case: str, kinds: set[str], fid: str, *, topic: str = stage_in, about: str = "",
                         **over: Any) -> None:
        await a.expect(case, topic, a.frame(frame_id=fid, **over), kinds, frame_id=fid, about=about)

    async def bad_tensor(case: str, tensor: dict[str, Any], tname: str = name) -> None:
        await a.expect(case, stage_in, a.frame(tensors=[[tname, tensor]]), {"DecodeError"}, about="tensor")

    # Shapes that would exhaust memory if anything allocated from them, with tiny data.
    await bad_tensor("shape (2**31, 2**31), 4 bytes of data", _tensor("float32", [2**31, 2**31], b"\0" * 4))
    await bad_tensor("shape (2**28 + 1,) (MAX_ELEMENTS + 1)", _tensor("uint8", [codec.MAX_ELEMENTS + 1], b"\0"))
    await bad_tensor("shape (0, 2**64 - 1) (zero-size, huge dim)", _tensor("float32", [0, 2**64 - 1], b""))
    await bad_tensor("shape (0, 2**62, 4) 8-bit quantized", _tensor("float32", [0, 2**62, 4], b"", 8, scale=1.0))
    await bad_tensor("negative dim (-1, 4)", _tensor("float32", [-1, 4], b"\0" * 16))
    await bad_tensor("dim 2**63 (overflows int64)", _tensor("float32", [2**63], b"\0" * 4))
    await bad_tensor("33 dimensions", _tensor("float32", [1] * 33, b"\0" * 4))
    for dtype in ("object", "complex128", "<U8", "V8", "float32 ", ">f4"):
        await bad_tensor(f"dtype {dtype!r}", _tensor(dtype, [1], b"\0" * 16))
    await bad_tensor("byte count mismatch (100 bytes for 3072 floats)", _tensor("float32", [1, 3, 32, 32], b"\0" * 100))
    await bad_tensor("bits=3 for an int32 tensor", _tensor("int32", [8], b"\0" * 3, 3, scale=1.0))
    # The slice takes float32: the header check refuses a bool tensor before its bytes are even looked at
    # (the codec's own check of bool bytes is in tests/test_codec.py).
    await a.expect("bool tensor holding 0x02", stage_in, a.frame(tensors=[[name, _tensor("bool", [2], b"\x00\x02")]]),
                   {"InferenceError"}, about="dtype bool, expected float32")
    await bad_tensor("per-channel scale with NaN", _tensor("float32", [2], b"\0\0", 8, axis=0,
                                                           scale=np.array([np.nan, 1.0]).tobytes(),
                                                           zp=bytes(16)))

    # Frames that decode but must not run (each report carries the frame id).
    good_tensor = a.body()["tensors"][0][1]
    await frame_case("wrong tensor name", {"InferenceError"}, "f-name", tensors=[["evil", good_tensor]])
    await frame_case("float64 tensor where float32 is expected", {"InferenceError"}, "f-f64",
                     tensors=[[name, _tensor("float64", [1, 3, 32, 32], bytes(8 * 3 * 32 * 32))]])
    await frame_case("wrong shape (1, 2)", {"InferenceError"}, "f-shape",
                     tensors=[[name, _tensor("float32", [1, 2], bytes(8))]])
    await frame_case("stage 3 on this node's stage-0 topic", {"StageError"}, "f-stage", stage=3)
    if a.epoch > 0:
        await frame_case("older epoch", {"StaleEpoch"}, "f-old", epoch=a.epoch - 1)
    await frame_case("far-future epoch (10**9 - 1)", {"StaleEpoch"}, "f-future", epoch=10**9 - 1)
    await frame_case("frame of another fleet", {"DecodeError"}, "f-fleet", fleet="otherfleet")
    await frame_case("reply_to another client's result topic", {"DecodeError"}, "f-victim",
                     reply_to=topics.result(FLEET, "victim-client"))
    await frame_case("client_id of another client on our own topic", {"DecodeError"}, "f-as-victim",
                     client_id="victim-client", reply_to=topics.result(FLEET, "victim-client"), about="client_id")
    await frame_case("reply_to another fleet's result topic", {"DecodeError"}, "f-xfleet",
                     reply_to=topics.result("otherfleet", "mallory"))
    await frame_case("reply_to the retained plan topic", {"DecodeError"}, "f-plan", reply_to=topics.plan(FLEET))
    await a.expect("unknown wire version 2", stage_in, msgpack.packb({**a.body(), "v": 2}, use_bin_type=True),
                   {"VersionMismatch"})
    await a.expect("truncated msgpack (valid frame, last 10 bytes cut)", stage_in, a.frame()[:-10], {"DecodeError"})
    await a.expect("JSON activation (must be msgpack)", stage_in, b'{"v":1,"type":"activation"}', {"DecodeError"})
    await a.expect("StageAssign on the stage topic", stage_in, wire.encode(assign), {"DecodeError"})
    await a.expect("oversize payload (64 MiB + 1)", stage_in, b"\x80" + bytes(wire.DEFAULT_MAX_BYTES),
                   {"DecodeError"}, about="max_bytes")

    # Replay: the same frame id twice is processed twice; both results go to the sender's own topic.
    a.results.clear()
    replay = a.frame(frame_id="f-replay")
    for _ in range(2):
        await a.bus.publish(stage_in, replay, qos=1)
    deadline = time.monotonic() + REPORT_WAIT_S
    while len(a.results) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert [r.frame_id for r in a.results] == ["f-replay", "f-replay"], a.results
    outs = [codec.decode_tensor(r.tensors[0][1]) for r in a.results]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not [r for r in a.reports if r.frame_id == "f-replay"]
    a.table.append(("replayed frame id (same frame twice)", "processed twice, 2 identical Results, no report"))


def _reassign(assign: Any, **over: Any) -> Any:
    return dataclasses.replace(assign, ts=time.time(), **over)


async def _topic_cases(attack: Attack, assign: Any, original: bytes) -> None:
    a = attack
    assign_topic = topics.node_assign(FLEET, NODE)
    await a.expect("StageAssign for another node on our topic", assign_topic,
                   wire.encode(_reassign(assign, node_id="intruder", epoch=assign.epoch + 5)), {"DecodeError"})
    await a.expect("StageAssign of another fleet", assign_topic,
                   wire.encode(_reassign(assign, fleet="otherfleet", epoch=assign.epoch + 5)), {"DecodeError"})
    await a.expect("Activation on the assign topic", assign_topic, a.frame(), {"DecodeError"})
    await a.expect("retained junk on the assign topic", assign_topic, b"{not json", {"DecodeError"}, retain=True)
    # Restore the planner's retained assignment; the node already holds that epoch and ignores it.
    await a.bus.publish(assign_topic, original, qos=1, retain=True)
    a.table.append(("valid assignment restored (retained)", "ignored: same epoch already loaded"))

    plan_topic = topics.plan(FLEET)
    # Epoch 0: FleetClient does not check a plan's fleet (reported to the lead); a newer epoch would hijack
    # the test's own client. The node is what is under test here, and it refuses the plan either way.
    other_plan = wire.Plan(fleet="otherfleet", epoch=0, model_id="m", stages=(), ts=time.time())
    await a.expect("Plan of another fleet on our plan topic", plan_topic, wire.encode(other_plan), {"DecodeError"})
    await a.expect("junk JSON on the plan topic", plan_topic, b'{"v":1,"type":"plan","epoch":-1}', {"DecodeError"})
    control = topics.node_control(FLEET, NODE)
    ctl = wire.EmulationControl(fleet=FLEET, node_id="intruder", ts=time.time(), compute_factor=1000.0)
    await a.expect("EmulationControl for another node", control, wire.encode(ctl), {"DecodeError"})
    await a.expect("NaN compute_factor on the control topic", control,
                   b'{"v":1,"type":"emulation_control","fleet":"hostile","node_id":"victim","ts":1,'
                   b'"compute_factor":NaN}', {"DecodeError"})


def _hypothesis_fuzz(attack: Attack, loop: asyncio.AbstractEventLoop) -> None:
    """Structured fuzz, one example per publish; each must give exactly one report of a frame-ish kind."""
    topics_by_name = {
        "stage": attack.stage_in,
        "assign": topics.node_assign(FLEET, NODE),
        "plan": topics.plan(FLEET),
        "control": topics.node_control(FLEET, NODE),
    }
    ints = st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**64 - 1]))
    junk_value = st.one_of(st.none(), st.booleans(), ints, st.floats(), st.text(max_size=20), st.binary(max_size=64))
    tensor = st.fixed_dictionaries(
        {"dtype": st.one_of(st.sampled_from([*sorted(codec.SUPPORTED_DTYPES), "object", "complex128", "<U8"]),
                            junk_value),
         "shape": st.one_of(st.lists(ints, max_size=5), junk_value),
         "bits": st.one_of(st.sampled_from([2, 3, 4, 8, 16, 32]), junk_value),
         "data": st.one_of(st.binary(max_size=256), junk_value)},
        optional={"scale": junk_value, "zp": junk_value, "axis": junk_value, "clip": junk_value},
    )
    frame_over = st.fixed_dictionaries({}, optional={
        "tensors": st.lists(st.tuples(st.text(max_size=8), tensor), max_size=3),
        "epoch": ints, "stage": ints, "frame_id": st.one_of(st.text(max_size=130), junk_value),
        "reply_to": st.one_of(st.text(max_size=40), junk_value), "fleet": junk_value, "hops": junk_value,
        "extra": junk_value,
    })
    payload = st.one_of(
        st.tuples(st.just("stage"), frame_over.map(lambda o: ("frame", o))),
        st.tuples(st.sampled_from(sorted(topics_by_name)),
                  st.binary(min_size=1, max_size=512).map(lambda b: ("raw", b))),
        st.tuples(st.sampled_from(sorted(topics_by_name)),
                  st.dictionaries(st.text(max_size=10), junk_value, max_size=6).map(lambda d: ("json", d))),
    )

    def send(topic_name: str, item: tuple[str, Any]) -> wire.ErrorReport:
        how, value = item
        if how == "frame":
            over = {k: (v if not isinstance(v, tuple) else list(v)) for k, v in value.items()}
            if "tensors" in over:
                over["tensors"] = [list(t) for t in over["tensors"]]
            data = attack.frame(**over)
            if _would_run(data, attack):  # the overrides happened to leave a valid frame: make it stale
                data = attack.frame(**{**over, "epoch": 10**9 - 1})
        elif how == "json":
            data = json.dumps({"v": 1, "type": "stage_assign", **value}, default=repr).encode()
        else:
            data = value
        coro = attack.expect(f"hypothesis {topic_name}/{how}", topics_by_name[topic_name], data, FRAME_KINDS)
        return asyncio.run_coroutine_threadsafe(coro, loop).result(REPORT_WAIT_S + 5)

    @settings(max_examples=40, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(payload)
    def fuzz(case: tuple[str, tuple[str, Any]]) -> None:
        send(*case)

    before = len(attack.table)
    fuzz()
    n = len(attack.table) - before
    kinds = sorted({outcome.split(":")[0] for _, outcome in attack.table[before:]})
    del attack.table[before:]
    attack.table.append((f"hypothesis: {n} structured examples, 4 topics", " / ".join(kinds)))


async def _random_bytes(attack: Attack) -> None:
    """300 random-byte messages (fixed seed) round-robin over the subscribed topics; 300 reports back."""
    rng = random.Random(20240611)
    targets = [attack.stage_in, topics.node_assign(FLEET, NODE), topics.plan(FLEET), topics.node_control(FLEET, NODE)]
    attack.seen = len(attack.reports)
    for i in range(300):
        await attack.bus.publish(targets[i % len(targets)], _junk_bytes(rng), qos=1, retain=i == 1)
    await attack.expect_count(300, 30)
    # (The retained junk stays until _slice_cases restores the assignment: an empty retained message
    # would clear it, but an empty payload on the assign topic means "unassign" to the node.)
    attack.table.append(("300 random-byte payloads (4 topics, 1 retained)", "300 x DecodeError"))


async def _slice_cases(attack: Attack, assign: Any) -> None:
    """Assignments whose slices are bad: each is one RuntimeLoadError; the old slice keeps serving."""
    a, epoch = attack, assign.epoch + 10

    async def load_case(case: str, data: bytes, *, size: int | None = None, slice_hash: str | None = None,
                        chunks: list[tuple[int, int, bytes]] | None = None, why: str = "") -> None:
        nonlocal epoch
        epoch += 1
        h = slice_hash or content_hash(data)
        for index, count, part in chunks or [(0, 1, data)]:
            chunk = wire.SliceChunk(slice_hash=h, index=index, count=count, data=part)
            await a.bus.publish(topics.slice_chunk(FLEET, h, index), wire.encode(chunk), qos=1, retain=True)
        bad = _reassign(assign, epoch=epoch, slice_hash=h, slice_size=len(data) if size is None else size)
        report = await a.expect(case, topics.node_assign(FLEET, NODE), wire.encode(bad), {"RuntimeLoadError"}, about=h)
        assert why in report.detail, report

    await load_case("slice chunks hash-valid but junk (not a model)", b"\x08\x07" + bytes(range(200)))
    await load_case("slice chunks that are random non-model bytes", b"\xde\xad" * 300)
    await load_case("slice chunk content does not match its hash", b"\x08junk", slice_hash="bogus-hash-1")
    await load_case("slice size != assignment's slice_size", b"\x08size", size=10**6)
    await load_case("chunks larger than the assigned size", b"\x08" * 100, size=50)
    # Chunks that disagree on count: 0 of 2 next to 2 of 3 once made the node index a missing chunk (KeyError).
    await load_case("chunks disagreeing on count (0 of 2, 1 of 3, 2 of 3)", b"\x08counts",
                    slice_hash="bogus-hash-2", chunks=[(2, 3, b"a"), (0, 2, b"b"), (1, 3, b"c")])
    # Self-contained, standard, bounded: refused before a session exists (a lab node has no planner key).
    await load_case("ONNX slice with external data (a file under the node's cwd)", forged.external_data_slice(),
                    why="external data")
    await load_case("fake-runtime JSON slice from the network", forged.fake_runtime_slice(), why="fake-runtime")
    await load_case("ONNX slice with a custom operator domain", forged.custom_domain_slice(), why="com.evil")
    await a.expect("assignment naming no slice (empty hash)", topics.node_assign(FLEET, NODE),
                   wire.encode(_reassign(assign, epoch=epoch + 1, slice_hash="")), {"RuntimeLoadError"})
    # Put the planner's assignment back as the retained one (the node ignores its own epoch again).
    await a.bus.publish(topics.node_assign(FLEET, NODE), wire.encode(assign), qos=1, retain=True)
