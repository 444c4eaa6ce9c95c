"""The control plane a human watches carries no data plane (issue 20 item 9).

A real fleet (mosquitto, a planner and two node processes) streams frames while one watcher subscribes to what the
README tells an operator to watch (``fleetpipe/#``) and another to the data plane (``fleetpipe-data/#``).
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from fleetpipe import topics
from fleetpipe.client import FleetClient
from fleetpipe.transport.mqtt import MqttBus
from tests.integration.fleet_helpers import fleet, tiny_resnet18

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _watch(url: str, topic_filter: str, seen: list[tuple[str, int]], ready: threading.Event,
           stop: threading.Event) -> None:
    async def run() -> None:
        async with MqttBus(url, client_id=f"watch-{len(topic_filter)}") as bus:
            await bus.subscribe(topic_filter, qos=0)
            ready.set()
            it = bus.messages().__aiter__()
            while not stop.is_set():
                try:
                    msg = await asyncio.wait_for(it.__anext__(), 0.2)
                except asyncio.TimeoutError:
                    continue
                seen.append((msg.topic, len(msg.payload)))

    asyncio.run(run())


def test_control_plane_filter_receives_no_data_plane_message(mosquitto, tmp_path):
    model, shape = tiny_resnet18(tmp_path)
    control: list[tuple[str, int]] = []
    data: list[tuple[str, int]] = []
    stop = threading.Event()
    threads = []
    for flt, sink in (("fleetpipe/#", control), ("fleetpipe-data/#", data)):
        ready = threading.Event()
        t = threading.Thread(target=_watch, args=(mosquitto.url, flt, sink, ready, stop))
        t.start()
        threads.append(t)
        assert ready.wait(10)
    try:
        with fleet(mosquitto.url, "planes", tmp_path) as f:
            f.planner(model, "--expect-nodes", "2", "--bits", "8")
            f.node("a", "1")
            f.node("b", "1")
            with FleetClient(mosquitto.url, fleet="planes", window=4) as client:
                f.wait_plan(client)
                xs = [np.random.default_rng(i).standard_normal(shape).astype(np.float32) for i in range(16)]
                assert len(list(client.stream(xs))) == len(xs)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    kinds = {topics.parse(t)[0].name for t, _ in control}
    assert {"node_state", "node_health", "plan", "node_assign"} <= kinds, kinds
    leaked = [t for t, _ in control if topics.parse(t)[0].data_plane]
    assert not leaked, leaked[:5]
    data_kinds = {topics.parse(t)[0].name for t, _ in data}
    assert {"stage_in", "result", "slice_chunk"} <= data_kinds, data_kinds
    control_bytes, data_bytes = sum(n for _, n in control), sum(n for _, n in data)
    print(f"control plane: {len(control)} messages, {control_bytes} B; data plane: {len(data)} messages, "
          f"{data_bytes} B ({data_bytes / max(control_bytes, 1):.0f}x)")
    assert data_bytes > control_bytes
