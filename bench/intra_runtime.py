"""End-to-end one-frame latency over MQTT of split stages vs pipeline-only, on an emulated 4-device fleet.

    .venv/bin/python bench/intra_runtime.py [--quick] [--frames 12] [--models resnet50,vit,wideconv]

For each model a private mosquitto runs two fleets side by side, one per planner mode, each of 4
node processes (``--emulate 2.5|3|5|5:bw=940``: rpi5-, jetson-nano- and two rpi4-like devices,
outbound paced to 940 Mbit/s) and ``fleetpipe planner --intra MODE --bits 8``. The client sends one
frame at a time, alternating between the fleets (so both see the same background load on a shared
host), and times each from submit to result (median, p90 over ``--frames`` after 2 warm-up frames).

Both planners read one per-layer host profile (``--profile``, measured by this script before any
fleet runs), so their predictions are comparable.

- ``pipeline``: the min-latency plan with single-device stages only (same planner, same cost model);
- ``split@1ms``: the min-latency plan with single, replicated and split stages (units scattered over
  MQTT by the stage's lead, parts computed by the group, 8-bit exchanges), messages costed 1 ms;
- ``split@learned``: the same, but the planner raises the message cost to what the split leads
  measure and re-plans (frames are sent until no plan changed for 10 s before measuring).

``wideconv`` (one wide 3x3 conv, zoo) runs on its own fleet of 4 rpi3-like devices (x10) on 40 Mbit/s
(Wi-Fi) links, where its split pays only with Galaxy+ tiles: ``pipeline``, ``split`` (``--tiles 1``),
``split+tiles`` (``--tiles 4``, 1 ms per message) and ``tiles@learned`` (message cost learned).

Printed: the planner's predicted latency (``Plan.latency_ms``: stages + transfers between and inside
stages; the client's input and result messages are not in it), the measured latency, measured /
predicted, "in fleet" (first stage's receive to last stage's send, from the result's hops), and
pipeline / split as a ratio measured in the same run; plus the largest relative error
of the outputs vs the local unsplit model (8-bit activations).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from fleetpipe.broker import LocalBroker
from fleetpipe.client import FleetClient
from fleetpipe.models import zoo
from fleetpipe.planner.demo import _processes, _spawn
from fleetpipe.planner.loop import load_model_info

__all__ = ["main"]

DEVICES = ("2.5:bw=940", "3:bw=940", "5:bw=940", "5:bw=940")
# (label, planner flags): pipeline-only; splits costed with the a-priori 1 ms per message; splits with the
# message cost the planner learns from the split leads (re-plans until it stops changing).
MODES: dict[str, tuple[str, ...]] = {
    "pipeline": ("--intra", "pipeline"),
    "split@1ms": ("--intra", "latency", "--msg-ms", "1"),
    "split@learned": ("--intra", "latency"),
}
# Galaxy+ tiling: on 40 Mbit/s (Wi-Fi) links one wide conv's exchanges take half as long as its compute
# (rpi3-like devices, x10 this host).
WIFI_DEVICES = ("10:bw=40",) * 4
TILE_MODES: dict[str, tuple[str, ...]] = {
    "pipeline": ("--intra", "pipeline"),
    "split": ("--intra", "latency", "--msg-ms", "1", "--tiles", "1"),
    "split+tiles": ("--intra", "latency", "--msg-ms", "1", "--tiles", "4"),
    "tiles@learned": ("--intra", "latency", "--tiles", "4"),
}
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    # name: (zoo model, full kwargs, --quick kwargs)
    "resnet50": ("resnet50", {"width": 1.0, "resolution": 160}, {"width": 0.5, "resolution": 96}),
    "vit": ("vit", {"resolution": 64, "patch": 8, "dim": 256, "depth": 4, "heads": 8},
            {"resolution": 64, "patch": 8, "dim": 128, "depth": 2, "heads": 4}),
    "wideconv": ("wideconv", {"channels": 384, "resolution": 32}, {"channels": 256, "resolution": 32}),
}
# Cases on their own fleet and planner modes (default: DEVICES and MODES).
CASE_FLEETS: dict[str, tuple[tuple[str, ...], dict[str, tuple[str, ...]]]] = {"wideconv": (WIFI_DEVICES, TILE_MODES)}


def run_case(model: Path, shape: tuple[int, ...], frames: int, tmp: Path, tag: str,
             devices: tuple[str, ...] | None = None,
             modes: dict[str, tuple[str, ...]] | None = None) -> dict[str, dict[str, Any]]:
    """All fleets at once (one per planner mode), frames alternating between them: the same host load."""
    devices = devices or DEVICES
    modes = modes or MODES
    import onnxruntime as ort

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "fleetpipe", "-vv" if os.environ.get("FP_BENCH_DEBUG") else "-v"]
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(frames + 2)]
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    iname = sess.get_inputs()[0].name
    refs = [sess.run(None, {iname: x})[0] for x in xs]
    out: dict[str, dict[str, Any]] = {}
    with LocalBroker() as broker, _processes() as procs, contextlib.ExitStack() as stack:
        clients = {}
        for mode in modes:
            fleet = _fleet_name(tag, mode)
            logs = tmp / fleet
            logs.mkdir(parents=True, exist_ok=True)
            for i, dev in enumerate(devices):
                procs.append(_spawn([*base, "node", "--broker", broker.url, "--fleet", fleet, "--name", f"d{i}",
                                     "--emulate", dev, "--no-announce", "--cache-dir", str(logs / f"cache{i}")],
                                    logs / f"d{i}.log", env))
            procs.append(_spawn([*base, "planner", "--broker", broker.url, "--model", str(model), "--fleet", fleet,
                                 "--expect-nodes", str(len(devices)), "--bits", "8", *modes[mode], "--no-adapt",
                                 "--no-announce", "--profile", str(model.with_suffix(".profile.json"))],
                                logs / "planner.log", env))
            clients[mode] = stack.enter_context(FleetClient(broker.url, fleet=fleet, window=1))
        for c in clients.values():
            c.wait_plan(900)
        _settle(clients, xs[0])
        plans = {mode: c.plan for mode, c in clients.items()}
        epochs = {mode: int(p.epoch) for mode, p in plans.items()}
        times: dict[str, list[float]] = {m: [] for m in modes}
        inside: dict[str, list[float]] = {m: [] for m in modes}  # first stage's receive to last stage's send
        errs = dict.fromkeys(modes, 0.0)
        order = list(modes)
        for k, (x, ref) in enumerate(zip(xs, refs, strict=True)):
            for mode in order[k % len(order):] + order[:k % len(order)]:
                t0 = time.perf_counter()
                r = clients[mode].infer_result(x, timeout_s=120)
                ms = (time.perf_counter() - t0) * 1000
                y = r.output
                errs[mode] = max(errs[mode], float(np.linalg.norm(y - ref) / np.linalg.norm(ref)))
                if k >= 2:
                    times[mode].append(ms)
                    inside[mode].append((r.hops[-1].send_ts - r.hops[0].recv_ts) * 1000)
    for mode in modes:
        ts = sorted(times[mode])
        out[mode] = {"predicted_ms": float(plans[mode].latency_ms), "median_ms": statistics.median(ts),
                     "p90_ms": ts[min(len(ts) - 1, int(0.9 * len(ts)))], "rel_err": errs[mode],
                     "inside_ms": statistics.median(inside[mode]),
                     "plan": _plan_text(tmp / _fleet_name(tag, mode) / "planner.log"),
                     "epochs": epochs[mode]}
    return out


def _fleet_name(tag: str, mode: str) -> str:
    return f"bench-{tag}-{mode.replace('@', '-').replace('+', '-')}"


def _settle(clients: dict[str, Any], x: np.ndarray, quiet_s: float = 10.0, limit_s: float = 300.0) -> None:
    """Send frames until no planner has changed its plan for ``quiet_s`` (the learning planner re-plans)."""
    last = {m: c.plan.epoch for m, c in clients.items()}
    changed = start = time.monotonic()
    while time.monotonic() - changed < quiet_s and time.monotonic() - start < limit_s:
        for c in clients.values():
            c.infer(x, timeout_s=120)
        now = {m: c.plan.epoch for m, c in clients.items()}
        if now != last:
            last, changed = now, time.monotonic()


def _plan_text(log: Path) -> str:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if "published" in line:
            return line.split("):", 1)[-1].strip() if "):" in line else line.split("published:", 1)[-1].strip()
    return "?"


def main(argv: list[str] | None = None) -> int:
    """Run every case in both modes and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller models")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--models", default="resnet50,vit,wideconv")
    parser.add_argument("--keep", help="keep models and logs in this directory")
    parser.add_argument("--slow", type=float, default=1.0,
                        help="multiply every device's compute factor (slower devices: compute outweighs messages)")
    args = parser.parse_args(argv)
    global DEVICES
    if args.slow != 1.0:
        DEVICES = tuple(f"{float(d.split(':')[0]) * args.slow:g}:{d.split(':', 1)[1]}" for d in DEVICES)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fp-intra-rt-") as d:
        tmp = Path(args.keep or d)
        tmp.mkdir(parents=True, exist_ok=True)
        for name in args.models.split(","):
            zname, full, quick = CASES[name]
            kw = quick if args.quick else full
            path = tmp / f"{name}.onnx"
            onnx.save(zoo.build(zname, **kw), path)
            shape = tuple(zoo.input_shape(zname, **kw))
            # Profile on a quiet host, before any fleet runs; both planners read it.
            load_model_info(str(path), profile=str(path.with_suffix(".profile.json")))
            devices, modes = CASE_FLEETS.get(name, (DEVICES, MODES))
            res = run_case(path, shape, args.frames, tmp, name, devices, modes)
            rows.append((name, kw, res))
            _print(rows[-1:], devices, header=len(rows) == 1 or name in CASE_FLEETS)
    return 0


def _print(rows: list[Any], devices: tuple[str, ...], header: bool) -> None:
    if header:
        factors = ", ".join("x" + d.split(":")[0] for d in devices)
        bw = devices[0].split("bw=")[-1]
        print(f"\n== one-frame latency end to end over MQTT, {len(devices)} emulated devices ({factors} compute; "
              f"{bw} Mbit/s out), 8-bit activations")
        print(f"{'model':9} {'planner':13} {'predicted':>9} {'measured':>9} {'p90':>7} {'meas/pred':>9} "
              f"{'pipe/this':>9} {'in fleet':>8} {'rel err':>8} {'epoch':>5}  plan")
    for name, kw, res in rows:
        base = res["pipeline"]["median_ms"]
        for mode, r in res.items():
            print(f"{name:9} {mode:13} {r['predicted_ms']:9.1f} {r['median_ms']:9.1f} {r['p90_ms']:7.1f} "
                  f"{r['median_ms'] / r['predicted_ms']:9.2f} {base / r['median_ms']:8.2f}x {r['inside_ms']:8.1f} "
                  f"{r['rel_err']:8.1e} "
                  f"{r['epochs']:5d}  {r['plan']}")
        for mode in list(res)[1:]:
            pred = res["pipeline"]["predicted_ms"] / res[mode]["predicted_ms"]
            print(f"  {name} {kw}: {mode} vs pipeline-only {base / res[mode]['median_ms']:.2f}x measured, "
                  f"{pred:.2f}x predicted")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
