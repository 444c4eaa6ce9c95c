"""COACH early exit on a real emulated fleet: exit ratio on a correlated vs a shuffled stream, accuracy, throughput.

A private mosquitto, a planner with ``--calibration`` (exit caches calibrated on one half of the shipped digits
test set, 0.5 % floor) and 2 emulated nodes run the trained digits MLP on single-digit frames from the other
half. Three runs in this process, same fleet shape, same frames:

- baseline:   ``--no-early-exit`` (every frame runs through every stage), shuffled stream;
- shuffled:   early exit on, frames in random order;
- correlated: early exit on, frames sorted by label (temporal locality: runs of the same digit, as from a
  camera that keeps seeing the same object), where the running-mean centres (Eq. 7) follow the context.

Printed: early-exit ratio, accuracy on the real labels vs the full-precision whole model, throughput as a
ratio to the baseline. Usage: .venv/bin/python bench/early_exit.py [--repeat 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from fleetpipe.broker import LocalBroker
from fleetpipe.client import FleetClient
from fleetpipe.models import zoo
from fleetpipe.planner.demo import _processes, _spawn

FACTOR = "20"  # emulated devices 20x slower than this host: the MLP's stages take ~1 ms each
ENV = {"FLEETPIPE_TIMING_HEALTH_INTERVAL_S": "0.25", "FLEETPIPE_TIMING_REPLAN_DEBOUNCE_S": "0.2"}


def calibrate_half(model: Path, out: Path) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Calibrate on the first half of the test set; returns the other half (x, y) and the exit cuts."""
    from fleetpipe.models.calibrate import calibrate
    from fleetpipe.models.onnx_graph import load_onnx, read_model

    proto = read_model(str(model))
    x, y = zoo.digits_test_set()
    half = len(x) // 2
    graph = load_onnx(proto, input_shapes={proto.graph.input[0].name: (1, 64)})
    cal = calibrate(proto, graph, x[:half], y[:half])
    out.write_text(cal.to_json())
    return x[half:], y[half:], sorted(cal.exits)


def run_fleet(mode: str, model: Path, calib: Path, frames: list[np.ndarray], tmp: Path) -> dict[str, Any]:
    env = {**os.environ, **ENV, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "fleetpipe"]
    fleet = f"exit-{mode}"
    with LocalBroker() as broker, _processes() as procs:
        planner = [*base, "planner", "--broker", broker.url, "--model", str(model), "--fleet", fleet,
                   "--expect-nodes", "2", "--input-shape", "1,64", "--no-announce", "--no-adapt",
                   "--calibration", str(calib)]
        if mode == "baseline":
            planner.append("--no-early-exit")
        procs.append(_spawn(planner, tmp / f"{mode}-planner.log", env))
        for name in ("a", "b"):
            procs.append(_spawn([*base, "node", "--broker", broker.url, "--fleet", fleet, "--name", name,
                                 "--no-announce", "--emulate", FACTOR, "--cache-dir", str(tmp / f"{mode}-{name}")],
                                tmp / f"{mode}-{name}.log", env))
        with FleetClient(broker.url, fleet=fleet, window=4) as client:
            client.wait_plan(120)
            list(client.stream(frames[:8]))  # warm-up: sessions loaded, caches JIT-ed
            t0 = time.monotonic()
            results = list(client.stream(frames))
            wall = time.monotonic() - t0
            stats = client.stats
    return {"fps": len(frames) / wall, "exits": sum(r.early_exit for r in results) / len(results),
            "pred": np.array([r.top1 for r in results]), "resent": stats.resent}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="passes over the held-out half per run (default 2)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="fleetpipe-exit-") as tmpdir:
        tmp = Path(tmpdir)
        model = tmp / "digits.onnx"
        onnx.save(zoo.build("digits"), model)
        x, y, cuts = calibrate_half(model, tmp / "calib.json")
        console.print(f"exit caches calibrated at cuts {cuts} on {len(x)} samples (0.5 % floor)")
        sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        shuffled = np.concatenate([rng.permutation(len(x)) for _ in range(args.repeat)])
        correlated = np.concatenate([np.argsort(y, kind="stable")] * args.repeat)
        runs = {}
        for mode, order in (("baseline", shuffled), ("shuffled", shuffled), ("correlated", correlated)):
            frames = [x[i : i + 1] for i in order]
            r = run_fleet(mode, model, tmp / "calib.json", frames, tmp)
            full = np.array([int(np.argmax(sess.run(None, {sess.get_inputs()[0].name: f})[0])) for f in frames])
            truth = y[order]
            r["acc_full"] = float(np.mean(full == truth))
            r["acc"] = float(np.mean(r.pop("pred") == truth))
            runs[mode] = r
            console.print(f"{mode}: {r['fps']:.1f} frames/s, exits {r['exits']:.1%}, accuracy {r['acc']:.4f}")
    base_fps = runs["baseline"]["fps"]
    if args.json:
        print(json.dumps({"runs": runs, "cuts": cuts, "frames": len(shuffled)}, indent=1))
        return 0
    table = Table(title="COACH early exit: digits MLP on 2 emulated nodes, real labels, same frames")
    for col in ("stream", "early exit", "exit ratio", "accuracy (fleet)", "accuracy (whole model)", "loss",
                "frames/s", "vs no exit"):
        table.add_column(col, justify="right")
    for mode, r in runs.items():
        table.add_row("shuffled" if mode != "correlated" else "correlated", "off" if mode == "baseline" else "on",
                      f"{r['exits']:.1%}", f"{r['acc']:.4f}", f"{r['acc_full']:.4f}",
                      f"{100 * (r['acc_full'] - r['acc']):+.2f} %", f"{r['fps']:.1f}", f"{r['fps'] / base_fps:.2f}x")
    Console(width=150).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
