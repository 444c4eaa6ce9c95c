"""The client accepts a result only for a frame id it issued and still waits for (unit, no broker)."""

from __future__ import annotations

import asyncio
import re
import time

import numpy as np

from fleetpipe import codec, wire
from fleetpipe.client import AsyncFleetClient, _Pending


def _result(fid: str) -> wire.Result:
    t = codec.encode_tensor(np.ones(2, np.float32), bits=32)
    return wire.Result(fleet="f", frame_id=fid, client_id="cam-1", epoch=1, tensors=(("y", t),), ts=time.time())


def test_foreign_results_are_dropped_not_counted_as_duplicates() -> None:
    async def main() -> None:
        client = AsyncFleetClient("mqtt://127.0.0.1:1", fleet="f", client_id="cam-1")
        loop = asyncio.get_running_loop()
        mine = _Pending("a" * 32, {}, loop.create_future(), first_sent=time.monotonic(), attempts=1)
        client._pending[mine.frame_id] = mine
        client._on_result(_result("cam-1-0"))  # a guess at the old counter ids: never issued
        assert (client.stats.foreign, client.stats.duplicates, client.stats.completed) == (1, 0, 0)
        client._on_result(_result(mine.frame_id))
        assert mine.future.done() and client.stats.completed == 1
        client._on_result(_result(mine.frame_id))  # a late copy of our own: a duplicate
        assert (client.stats.foreign, client.stats.duplicates) == (1, 1)

    asyncio.run(main())


def test_frame_ids_are_128_random_bits() -> None:
    async def main() -> list[str]:
        client = AsyncFleetClient("mqtt://127.0.0.1:1", fleet="f", client_id="cam-1", window=4)
        stage = wire.PlanStage(index=0, first_layer=0, last_layer=0, nodes=("n1",), input_names=("x",))
        client.plan = wire.Plan(fleet="f", epoch=1, model_id="m", stages=(stage,), ts=0.0)
        client._plan_event.set()

        async def sent(pending: _Pending) -> None:
            pending.attempts += 1

        client._send = sent  # type: ignore[method-assign]
        for _ in range(4):
            await client.submit(np.zeros(2, np.float32))
        return list(client._pending)

    ids = asyncio.run(main())
    assert len(set(ids)) == 4 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), ids
