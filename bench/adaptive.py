"""Adaptive bench on a real emulated fleet: COACH bits + ScalPipe fine-tuning vs a fixed plan at fixed 8 bits.

Both runs use the same fleet, model, frames and scripted conditions, one after the other in this process:
a private mosquitto, a planner and 3 node processes running the trained digits MLP (real labels), frames of
120 digits each. Every link follows the bandwidth script 100 -> 50 -> 20 -> 100 Mbit/s (one phase each), and
the node holding the middle stage becomes 4x slower at the start of the third phase.

- adaptive: `fleetpipe planner --calibration calib.json` (calibrated lowest bits per cut, 0.5 % floor)
  with fine-tuning on; nodes choose their bit-width per frame (COACH Eq. 11).
- fixed:    `--bits 8 --no-adapt`, nodes `--fixed-bits`: the plan made at start, 8-bit activations.

Printed per phase and overall: throughput ratio adaptive/fixed, bytes per frame between stages, accuracy on
the real labels vs the full-precision model. Usage: .venv/bin/python bench/adaptive.py [--phase-s 6] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

from fleetpipe import topics, wire
from fleetpipe.broker import LocalBroker
from fleetpipe.client import FleetClient
from fleetpipe.models import zoo
from fleetpipe.planner.demo import _processes, _spawn
from fleetpipe.transport.mqtt import MqttBus

BATCH = 120
PHASES_MBPS = (100.0, 50.0, 20.0, 100.0)
FACTOR = 20.0
SLOWDOWN = 4.0
ENV = {"FLEETPIPE_TIMING_HEALTH_INTERVAL_S": "0.25", "FLEETPIPE_TIMING_REPLAN_DEBOUNCE_S": "0.2"}


def calibrate_digits(model_path: Path, out: Path) -> list[int]:
    from fleetpipe.models.calibrate import calibrate
    from fleetpipe.models.onnx_graph import load_onnx, read_model

    proto = read_model(str(model_path))
    graph = load_onnx(proto, input_shapes={proto.graph.input[0].name: (BATCH, 64)})
    x, y = zoo.digits_test_set()
    n = (len(x) // BATCH) * BATCH
    cal = calibrate(proto, graph, x[:n], y[:n])
    out.write_text(cal.to_json())
    return list(cal.min_bits)


async def _control(url: str, fleet: str, nodes: list[str], **values: float) -> None:
    async with MqttBus(url, client_id=f"bench-ctl-{time.monotonic_ns()}") as bus:
        for node in nodes:
            msg = wire.EmulationControl(fleet=fleet, node_id=node, ts=time.time(), **values)
            await bus.publish(topics.node_control(fleet, node), wire.encode(msg), qos=1)


class Bytes:
    """Sums the nodes' bytes_out from their metrics topic."""

    def __init__(self, url: str, fleet: str) -> None:
        self.url, self.fleet = url, fleet
        self.latest: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with MqttBus(self.url, client_id=f"bench-bytes-{self.fleet}") as bus:
            await bus.subscribe(topics.NODE_METRICS.filter(fleet=self.fleet), qos=0)
            it = bus.messages().__aiter__()
            while not self.stop.is_set():
                try:
                    m = await asyncio.wait_for(it.__anext__(), 0.3)
                except TimeoutError:
                    continue
                msg = wire.decode(m.payload)
                if isinstance(msg, wire.Metrics) and "bytes_out" in msg.values:
                    self.latest[msg.node_id] = msg.values["bytes_out"]

    def total(self) -> float:
        return sum(self.latest.values())


def run_fleet(mode: str, model: Path, calib: Path, tmp: Path, phase_s: float, console: Console) -> dict[str, Any]:
    x_all, y_all = zoo.digits_test_set()
    rng = np.random.default_rng(0)
    env = {**os.environ, **ENV, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "fleetpipe"]
    fleet = f"adapt-{mode}"
    names = ["a", "b", "c"]
    adaptive = mode == "adaptive"
    with LocalBroker() as broker, _processes() as procs:
        planner = [*base, "planner", "--broker", broker.url, "--model", str(model), "--fleet", fleet,
                   "--expect-nodes", "3", "--input-shape", f"{BATCH},64", "--no-announce"]
        planner += ["--calibration", str(calib)] if adaptive else ["--bits", "8", "--no-adapt"]
        procs.append(_spawn(planner, tmp / f"{mode}-planner.log", env))
        for name in names:
            cmd = [*base, "node", "--broker", broker.url, "--fleet", fleet, "--name", name, "--no-announce",
                   "--emulate", f"{FACTOR}:bw={PHASES_MBPS[0]}", "--cache-dir", str(tmp / f"{mode}-{name}")]
            procs.append(_spawn(cmd if adaptive else [*cmd, "--fixed-bits"], tmp / f"{mode}-{name}.log", env))
        counter = Bytes(broker.url, fleet)
        counter.thread.start()
        with FleetClient(broker.url, fleet=fleet, window=8) as client:
            plan = client.wait_plan(120)
            middle = plan.stages[len(plan.stages) // 2].nodes[0]
            stop = threading.Event()
            sent: list[tuple[object, np.ndarray]] = []

            def feed() -> None:
                while not stop.is_set():
                    idx = rng.integers(0, len(x_all), BATCH)
                    fut = client.submit(x_all[idx])
                    sent.append((fut, y_all[idx]))

            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
            t0 = time.monotonic()
            phase_bytes = []
            phase_frames = []
            for k, mbps in enumerate(PHASES_MBPS):
                asyncio.run(_control(broker.url, fleet, names, bandwidth_mbps=mbps))
                if k == 2:
                    asyncio.run(_control(broker.url, fleet, [middle], compute_factor=FACTOR * SLOWDOWN))
                b0, f0 = counter.total(), client.stats.completed
                time.sleep(phase_s)
                phase_bytes.append(counter.total() - b0)
                phase_frames.append(client.stats.completed - f0)
            stop.set()
            feeder.join()
            wall = time.monotonic() - t0
            correct = total = 0
            for fut, labels in sent:
                try:
                    out = fut.result(timeout=60).output
                except Exception:  # counted below
                    continue
                correct += int(np.sum(np.argmax(out, axis=1) == labels))
                total += len(labels)
            epochs = client.plan.epoch
        counter.stop.set()
        counter.thread.join(5)
    frames = [max(f, 1) for f in phase_frames]
    console.print(f"{mode}: {sum(phase_frames)} frames in {wall:.1f} s, final epoch {epochs}")
    return {"fps": [f / phase_s for f in phase_frames],
            "bytes_per_frame": [b / f for b, f in zip(phase_bytes, frames, strict=True)],
            "accuracy": correct / max(total, 1), "epochs": epochs, "lost": len(sent) - total // BATCH}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase-s", type=float, default=6.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="fleetpipe-adaptive-") as tmpdir:
        tmp = Path(tmpdir)
        model = tmp / "digits.onnx"
        onnx.save(zoo.build("digits"), model)
        calib = tmp / "calib.json"
        min_bits = calibrate_digits(model, calib)
        console.print(f"calibrated minimum bits per cut (0.5 % floor, real labels): {min_bits}")
        fixed = run_fleet("fixed", model, calib, tmp, args.phase_s, console)
        adaptive = run_fleet("adaptive", model, calib, tmp, args.phase_s, console)
    x, y = zoo.digits_test_set()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(zoo.DATA_DIR / "digits_mlp.onnx"), providers=["CPUExecutionProvider"])
    float_acc = float(np.mean(np.argmax(sess.run(None, {sess.get_inputs()[0].name: x})[0], axis=1) == y))
    report = {"calibrated_min_bits": min_bits, "phases_mbps": PHASES_MBPS, "fixed": fixed, "adaptive": adaptive,
              "float_accuracy": float_acc,
              "throughput_ratio": sum(adaptive["fps"]) / max(sum(fixed["fps"]), 1e-9)}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    t = Table(title="adaptive (calibrated bits + COACH + fine-tune) vs fixed plan at 8 bits, same fleet and script")
    for col in ("phase", "link Mbit/s", "fixed fps", "adaptive fps", "ratio", "fixed B/frame", "adaptive B/frame"):
        t.add_column(col, justify="right")
    for k, mbps in enumerate(PHASES_MBPS):
        note = f" (+{SLOWDOWN:.0f}x slower node)" if k >= 2 else ""
        t.add_row(f"{k + 1}{note}", f"{mbps:.0f}", f"{fixed['fps'][k]:.1f}", f"{adaptive['fps'][k]:.1f}",
                  f"{adaptive['fps'][k] / max(fixed['fps'][k], 1e-9):.2f}x", f"{fixed['bytes_per_frame'][k]:.0f}",
                  f"{adaptive['bytes_per_frame'][k]:.0f}")
    out = Console(width=160)
    out.print(t)
    out.print(f"overall throughput adaptive/fixed: {report['throughput_ratio']:.2f}x; accuracy on real labels: "
              f"float {float_acc:.4f}, fixed-8 {fixed['accuracy']:.4f}, adaptive {adaptive['accuracy']:.4f}; "
              f"plan epochs: fixed {fixed['epochs']}, adaptive {adaptive['epochs']}; "
              f"frames lost: fixed {fixed['lost']}, adaptive {adaptive['lost']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
