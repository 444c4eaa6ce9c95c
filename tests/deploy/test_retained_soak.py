"""Soak: 20 re-plans leave the broker's retained bytes and mosquitto's RSS flat (issue 20 item 3).

A real mosquitto and a real planner process (a zoo ResNet-18, so every epoch's slices are real ONNX files); the
fleet is two scripted peers speaking the node protocol over MQTT (birth, health, "loaded" health on their
assignment, death). Each round one peer leaves and a new one with another speed joins, so each epoch cuts the
model elsewhere and publishes new slices. Retained bytes are counted by a fresh subscriber to the fleet's topics
of both planes (every retained message is delivered on subscribe), RSS read from /proc/<pid>/status.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from fleetpipe import topics, wire
from fleetpipe.transport.mqtt import MqttBus
from tests.integration.fleet_helpers import fleet, tiny_resnet18

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROUNDS = 20
FLEET = "soak"


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def retained(url: str, quiet_s: float = 0.6) -> tuple[int, int]:
    """(messages, payload bytes) retained under the fleet's prefixes, as a new subscriber receives them.

    mosquitto sends them right after the SUBACK; done once no retained message came for ``quiet_s`` (live
    health and metrics keep flowing meanwhile and are not counted).
    """
    count = size = 0
    async with MqttBus(url, client_id=f"retained-{time.monotonic_ns()}") as bus:
        await bus.subscribe(topics.control_filter(FLEET), qos=1)
        await bus.subscribe(topics.data_filter(FLEET), qos=1)
        it = bus.messages().__aiter__()
        deadline = time.monotonic() + quiet_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await asyncio.wait_for(it.__anext__(), left)
            except asyncio.TimeoutError:
                break
            if msg.retain and msg.payload:
                count += 1
                size += len(msg.payload)
                deadline = time.monotonic() + quiet_s
    return count, size


class Peers:
    """Scripted nodes: a birth each, health, and a "loaded" health for every assignment they get."""

    def __init__(self, bus: MqttBus) -> None:
        self.bus = bus
        self.seq = 0
        self.alive: dict[str, int] = {}  # node -> seq
        self.plans: asyncio.Queue[wire.Plan] = asyncio.Queue()

    async def join(self, name: str, factor: float) -> None:
        self.seq += 1
        self.alive[name] = self.seq
        birth = wire.NodeBirth(fleet=FLEET, node_id=name, seq=self.seq, ts=time.time(), arch="x86_64", cores=2,
                               mem_bytes=1 << 30, runtimes=("onnx",), providers=("CPUExecutionProvider",),
                               device_class="emulated", speed=1.0, emulate_factor=factor)
        await self.bus.publish(topics.node_state(FLEET, name), wire.encode(birth), qos=1, retain=True)
        await self.health(name)

    async def leave(self, name: str) -> None:
        seq = self.alive.pop(name)
        death = wire.NodeDeath(fleet=FLEET, node_id=name, seq=seq, ts=time.time(), reason="clean shutdown")
        await self.bus.publish(topics.node_state(FLEET, name), wire.encode(death), qos=1, retain=True)

    async def health(self, name: str, stage: int | None = None, epoch: int = 0) -> None:
        msg = wire.NodeHealth(fleet=FLEET, node_id=name, seq=self.alive[name], ts=time.time(), stage=stage,
                              epoch=epoch)
        await self.bus.publish(topics.node_health(FLEET, name), wire.encode(msg), qos=0)

    async def serve(self) -> None:
        async for message in self.bus.messages():
            if not message.payload:
                continue
            msg = wire.decode(message.payload)
            if isinstance(msg, wire.StageAssign) and msg.node_id in self.alive:
                await self.health(msg.node_id, msg.stage, msg.epoch)
            elif isinstance(msg, wire.Plan):
                await self.plans.put(msg)

    async def heartbeat(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for name in list(self.alive):
                await self.health(name)


async def soak(url: str, rounds: int, broker_pid: int) -> list[tuple[int, int, int, int, int]]:
    """(epoch, distinct slices in its plan, retained messages, retained bytes, broker RSS kB) after each re-plan."""
    figures = []
    async with MqttBus(url, client_id="peers") as bus:
        peers = Peers(bus)
        await bus.subscribe(topics.NODE_ASSIGN.filter(fleet=FLEET), qos=1)
        await bus.subscribe(topics.plan(FLEET), qos=1)
        tasks = [asyncio.create_task(peers.serve()), asyncio.create_task(peers.heartbeat())]
        try:
            await peers.join("p0", 1.0)
            await peers.join("p1", 2.0)
            epoch = 0
            for i in range(rounds + 1):
                while True:  # the plan that covers the current members
                    plan = await asyncio.wait_for(peers.plans.get(), 60)
                    if plan.epoch > epoch and {n for s in plan.stages for n in s.nodes} <= set(peers.alive):
                        break
                epoch = plan.epoch
                await asyncio.sleep(0.5)  # the planner clears old slices right after publishing the plan
                count, size = await retained(url)
                figures.append((epoch, len({s.slice_hash for s in plan.stages}), count, size, _rss_kb(broker_pid)))
                if i == rounds:
                    break
                # One peer leaves, a new one with another speed joins: the next epoch cuts elsewhere.
                await peers.leave(sorted(peers.alive)[0])
                await peers.join(f"p{i + 2}", 1.0 + ((i * 0.7) % 3.0))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return figures


def test_replans_leave_retained_bytes_and_broker_rss_flat(mosquitto, tmp_path, capsys):
    model, _ = tiny_resnet18(tmp_path, width=0.5)
    with fleet(mosquitto.url, FLEET, tmp_path) as f:
        f.planner(model, "--bits", "8", "--min-nodes", "2", "--no-adapt",
                  env={"FLEETPIPE_TIMING_REPLAN_DEBOUNCE_S": "0.1"})
        rss0 = _rss_kb(mosquitto.proc.pid)
        try:
            figures = asyncio.run(soak(mosquitto.url, ROUNDS, mosquitto.proc.pid))
        except (asyncio.TimeoutError, TimeoutError):
            pytest.fail("no plan in time\n" + f.logs())
    assert len({fig[0] for fig in figures}) == ROUNDS + 1, figures
    first, last = figures[0], figures[-1]
    peak = max(fig[3] for fig in figures)
    with capsys.disabled():
        print(f"\nretained after epoch {first[0]}: {first[2]} msgs {first[3]} B, mosquitto RSS {first[4]} kB; "
              f"after {ROUNDS} re-plans (epoch {last[0]}): {last[2]} msgs {last[3]} B ({last[3] / first[3]:.2f}x), "
              f"RSS {last[4]} kB ({last[4] / first[4]:.2f}x); peak retained {peak / first[3]:.2f}x; "
              f"RSS before the first plan {rss0} kB; RSS kB per epoch {[fig[4] for fig in figures]}")
    # Only the live epoch's slices stay: retained bytes are those of one model, not twenty-one.
    model_bytes = model.stat().st_size
    assert peak < 1.5 * model_bytes, (model_bytes, figures)
    assert last[3] < 1.1 * first[3], figures
    # The broker's heap holds at most the live model and one being replaced, not one model per epoch.
    assert (last[4] - first[4]) * 1024 < 2 * model_bytes, (model_bytes, figures)
    rss = [fig[4] for fig in figures]
    assert max(rss[ROUNDS // 2:]) * 1024 <= max(rss[:ROUNDS // 2]) * 1024 + model_bytes // 2, figures  # a plateau
