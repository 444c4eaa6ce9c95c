"""The node's frame path: decode, compute and encode of consecutive frames overlap, and order is kept.

Drives a real ``NodeDaemon``'s preparer, worker and finisher tasks (no broker: frames go into its inbox and
are read from its outbox) with a fake slice whose compute is a 40 ms sleep, and a decode slowed to 25 ms.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from fleetpipe import codec, topics, wire
from fleetpipe.config import NodeConfig
from fleetpipe.node import daemon as daemon_mod
from fleetpipe.node.executor import InferenceExecutor
from fleetpipe.node.runtime.fake import FakeRuntime, fake_model_bytes

COMPUTE_MS = 40.0
DECODE_MS = 25.0
FRAMES = 5


def _assign(fleet: str) -> wire.StageAssign:
    return wire.StageAssign(fleet=fleet, node_id="n0", epoch=1, stage=0, n_stages=2, first_layer=0, last_layer=0,
                            model_id="fake", slice_hash="h", slice_size=1, ts=0.0, input_names=("x",),
                            output_names=("y",), bits=8, next_stage=1)


def _frame(fleet: str, i: int) -> wire.Activation:
    x = np.full((1, 16), float(i), np.float32)
    return wire.Activation(fleet=fleet, epoch=1, frame_id=f"f{i}", client_id="c", stage=0,
                           tensors=(("x", codec.encode_tensor(x)),), reply_to=topics.result(fleet, "c"),
                           sent_ts=0.0)


async def _run(monkeypatch: object) -> tuple[list[str], list[tuple[str, float, float]], dict[str, float], float]:
    codec.warmup()  # the numba kernels load once per process (about a second), not inside the timed part
    node = daemon_mod.NodeDaemon(NodeConfig(name="n0", fleet="lab", announce=False, adaptive_bits=False))
    runtime = FakeRuntime()
    runtime.load(fake_model_bytes(16, 8, sleep_ms=COMPUTE_MS))
    executor = InferenceExecutor(runtime)
    node.slots[1] = daemon_mod._Slot(_assign("lab"), runtime, executor, "t")
    decoded: dict[str, float] = {}
    computing: list[tuple[str, float, float]] = []
    real_decode, real_run = codec.decode_tensor, executor.run
    current: list[str] = []

    def slow_decode(t: codec.EncodedTensor) -> np.ndarray:
        out = real_decode(t)
        decoded[f"f{int(out.flat[0])}"] = time.monotonic()
        time.sleep(DECODE_MS / 1e3)  # the loop thread is busy, as with a big tensor
        return out

    async def timed_run(inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        name = f"f{int(inputs['x'].flat[0])}"
        current.append(name)
        t0 = time.monotonic()
        result = await real_run(inputs)
        computing.append((name, t0, time.monotonic()))
        return result

    monkeypatch.setattr(codec, "decode_tensor", slow_decode)  # type: ignore[attr-defined]
    monkeypatch.setattr(executor, "run", timed_run)  # type: ignore[attr-defined]
    tasks = [asyncio.create_task(c) for c in (node._preparer(), node._worker(), node._finisher())]
    t0 = time.monotonic()
    try:
        for i in range(FRAMES):
            await node._inbox.put((_frame("lab", i), time.time()))
        sent = []
        for _ in range(FRAMES):
            topic, payload, _ = await asyncio.wait_for(node._outbox.get(), 10)
            msg = wire.decode(payload)
            assert isinstance(msg, wire.Activation) and topic == topics.stage_in("lab", 1, 1, msg.client_id)
            assert msg.stage == 1 and msg.tensors[0][1].bits == 8
            sent.append(msg.frame_id)
        elapsed = time.monotonic() - t0
        assert node._in_hand == 0
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        executor.shutdown()
    return sent, computing, decoded, elapsed


def test_frames_leave_in_order_with_decode_overlapping_compute(monkeypatch) -> None:
    sent, computing, decoded, elapsed = asyncio.run(_run(monkeypatch))
    assert sent == [f"f{i}" for i in range(FRAMES)]
    assert [c[0] for c in computing] == sent
    # Every frame after the first was decoded while an earlier one computed: the loop did not wait for it.
    for k, name in enumerate(sent[1:], 1):
        assert any(start < decoded[name] < end for _, start, end in computing[:k]), name
    assert all(decoded[name] < start for name, start, _ in computing)
    # Serial would be FRAMES x (decode + compute) = 325 ms; overlapped it is one decode + FRAMES computes.
    serial = FRAMES * (DECODE_MS + COMPUTE_MS) / 1e3
    assert elapsed < serial - 2 * DECODE_MS / 1e3, elapsed
