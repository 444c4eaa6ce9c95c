"""Scaling: the EdgePipe metric (throughput of the fleet / throughput of one device), predicted and measured.

    .venv/bin/python bench/scale.py [--quick] [--json] [--frames N] [--skip-8]

Part 1 (EdgePipe metric, 16 devices). A zoo ViT (ViT-Small-like by default: 64x64 input, patch 8 -> 65 tokens,
dim 384, depth 12, 6 heads; fleetpipe groups it into 2 + 2 x depth = 26 layers) on an emulated 16-device fleet
of mixed classes, all much slower than this host (4 x 16x, 6 x 24x, 6 x 32x; links unpaced loopback), so the
real compute of the whole fleet stays under ~0.7 core of this 2-core machine:

- PREDICTED: the planner's cost model on a described fleet (``fleetfile.problem_for`` + ``partition.solve``,
  layer times profiled on this host and scaled by each class's factor); one device = the best single device of
  the fleet running the whole model (sum of its layer times). Also for 1, 2, 4, 8 devices (prefixes of the mix).
- MEASURED: ``run_demo(nodes=16)`` through the real path (private mosquitto, 16 node processes, onnxruntime
  slices, 8-bit activations); one device = a 1-node fleet of the best class streaming the same model over the
  same MQTT path (``--quick``: the demo's local single-device figure instead, whole model timed on this host x
  the class factor). The plan is fixed during measured runs (the planner's fine-tuning is off through
  ``FLEETPIPE_ADAPT=0`` unless ``--adapt``); nodes keep their default adaptive bit-width. CPU (cores used by
  this process tree) and RSS of the fleet are sampled from /proc.

Part 2 (8 devices, skipped with ``--skip-8``; ``--quick`` runs MobileNetV2 only): ResNet-50, VGG16, MobileNetV2
(the demo's default sizes) on 8 emulated devices (the demo's classes slowed 4x: 12x, 10x, 20x, 20x, twice):
measured vs predicted throughput, per-stage utilisation (busy fraction of the measured period:
stage compute ms x fleet frames/s / 1000, ScalPipe's figure) and bytes per frame between stages at the planned
8 bits vs float32 (computed from the crossing tensors; measured adaptive-vs-fixed bytes are in bench/adaptive.py).

Every speedup is a ratio of two figures from this run. Absolute frames/s on a shared 2-core host are noise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["main"]

VIT_KW = {"resolution": 64, "patch": 8, "dim": 384, "depth": 12, "heads": 6}
CLASSES16 = ["16"] * 4 + ["24"] * 6 + ["32"] * 6
# Interleaved so that every prefix (1, 2, 4, 8 devices) is itself a mixed fleet.
ORDER16 = [0, 4, 10, 1, 5, 11, 2, 6, 12, 3, 7, 13, 8, 14, 9, 15]
# The demo classes (jetson-nano, rpi5, rpi4, rpi4-wifi) slowed 4x. Plain factors only: run_demo names a node after
# its class, and node names may not contain ":" (so no ":bw=" link overrides; links are loopback-fast).
CLASSES8 = ["12", "10", "20", "20"]
MODELS8 = ("resnet50", "vgg16", "mobilenetv2")


# -- /proc sampling ---------------------------------------------------------------------------------


class TreeSampler:
    """Sample CPU seconds and RSS of this process and all its descendants every ``period`` s."""

    def __init__(self, period: float = 1.0) -> None:
        self.period = period
        self.samples: list[tuple[float, float, int, int]] = []  # (t, cpu_s, rss_bytes, nprocs)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._dead_cpu: dict[int, float] = {}

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _snapshot(self) -> tuple[float, int, int]:
        stats: dict[int, tuple[int, float, int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    raw = f.read().decode(errors="replace")
            except OSError:
                continue
            rest = raw[raw.rfind(")") + 2 :].split()
            # fields after comm: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14) ... rss(21)
            stats[int(entry)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / self._tick, int(rest[21]) * self._page)
        me = os.getpid()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        tree, todo = [], [me]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, []))
        cpu = 0.0
        for pid in tree:
            self._dead_cpu[pid] = stats[pid][1]  # last seen CPU of every member (exited ones keep counting)
        cpu = sum(self._dead_cpu.values())
        return cpu, sum(stats[p][2] for p in tree if p in stats), len(tree)

    def _run(self) -> None:
        while not self._stop.is_set():
            cpu, rss, n = self._snapshot()
            self.samples.append((time.monotonic(), cpu, rss, n))
            self._stop.wait(self.period)

    def summary(self, window_s: float = 5.0) -> dict[str, float]:
        s = self.samples
        if len(s) < 2:
            return {}
        mean = (s[-1][1] - s[0][1]) / max(s[-1][0] - s[0][0], 1e-9)
        peak = 0.0
        j = 0
        for i in range(len(s)):
            while s[i][0] - s[j][0] > window_s:
                j += 1
            if s[i][0] - s[j][0] >= window_s * 0.6:
                peak = max(peak, (s[i][1] - s[j][1]) / (s[i][0] - s[j][0]))
        return {"mean_cores": round(mean, 2), f"peak_cores_{window_s:g}s": round(peak, 2),
                "peak_rss_mb": round(max(x[2] for x in s) / 2**20), "max_procs": max(x[3] for x in s),
                "seconds": round(s[-1][0] - s[0][0], 1)}


# -- prediction -------------------------------------------------------------------------------------


def predict(model_path: Path, classes: list[str], counts: list[int], bits: int = 8) -> dict[str, Any]:
    """Planner cost model on described fleets: predicted fleet and best-single-device frames/s per fleet size."""
    from fleetpipe.node.emulate import parse_emulate
    from fleetpipe.planner import partition
    from fleetpipe.planner.fleetfile import DeviceSpec, FleetFile, problem_for
    from fleetpipe.planner.loop import load_model_info

    info = load_model_info(str(model_path))
    rows = []
    for n in counts:
        devices = []
        for i in range(n):
            cls = parse_emulate(classes[i])
            devices.append(DeviceSpec(node_id=f"d{i:02d}-{cls.name}", device_class=cls.name,
                                      emulate_factor=cls.compute_factor, speed=0.0,
                                      mem_bytes=int(cls.mem_bytes or 1 << 40),
                                      bandwidth_mbps=float(cls.bandwidth_mbps or 1000.0)))
        problem = problem_for(info, FleetFile(tuple(devices), {}), bits=bits)
        res = partition.solve(problem, time_limit_s=10.0)
        single_ms = float(problem.compute_ms.sum(axis=0).min())
        rows.append({"devices": n, "stages": len(res.stages), "exact": bool(res.exact),
                     "solve_s": round(res.solve_s, 3), "bottleneck_ms": round(res.bottleneck_ms, 2),
                     "fleet_fps": 1000.0 / res.bottleneck_ms, "single_fps": 1000.0 / single_ms,
                     "speedup": single_ms / res.bottleneck_ms})
    return {"layers": len(info.graph.layers), "host_ms": round(float(info.host_ms.sum()), 2), "rows": rows}


# -- measurement ------------------------------------------------------------------------------------


def _stage_util(rep: Any) -> list[dict[str, Any]]:
    period_ms = 1000.0 / rep.fleet_fps if rep.fleet_fps else float("nan")
    bottleneck = max((s["measured_ms"] for s in rep.stages), default=float("nan"))
    out = []
    for s in rep.stages:
        out.append({"stage": s["stage"], "device": s["device"], "layers": s["layers"],
                    "predicted_ms": round(s["predicted_ms"], 1), "measured_ms": round(s["measured_ms"], 1),
                    "util": round(s["measured_ms"] / period_ms, 3),
                    "vs_bottleneck": round(s["measured_ms"] / bottleneck, 3), "wire_bytes": s["wire_bytes"]})
    return out


def _bytes_per_frame(stages: list[dict[str, Any]], bits: int) -> dict[str, int]:
    inner = stages[:-1]  # the last stage returns the float32 result to the client at any bit-width
    planned = sum(s["wire_bytes"] for s in inner)
    return {"planned_bits": bits, "between_stages_bytes": planned,
            "float32_bytes": int(sum(s["wire_bytes"] * 32 / max(bits, 1) for s in inner))}


def measure(model: str, nodes: int, classes: list[str], frames: int, fleet: str, console: Console,
            bits: int = 8, adapt: bool = False) -> dict[str, Any]:
    """One run_demo with /proc sampling; the figures scale.py reports."""
    from fleetpipe.planner.demo import run_demo

    t0 = time.monotonic()
    # A fixed plan by default (FLEETPIPE_ADAPT=0 reaches the planner through run_demo's environment): on a
    # contended host the planner's fine-tuning re-plans mid-run, and the stage table would describe a dead plan.
    saved = os.environ.get("FLEETPIPE_ADAPT")
    if not adapt:
        os.environ["FLEETPIPE_ADAPT"] = "0"
    try:
        with TreeSampler() as sampler:
            # window: enough frames to fill every stage, few enough that queueing stays under the client's
            # 5 s re-send timeout (the demo's 3 per node re-sends at these frame rates).
            rep = run_demo(model=model, nodes=nodes, classes=classes, frames=frames, bits=bits, console=console,
                           fleet=fleet, window=nodes + 4)
    finally:
        if saved is None:
            os.environ.pop("FLEETPIPE_ADAPT", None)
        else:
            os.environ["FLEETPIPE_ADAPT"] = saved
    stages = _stage_util(rep)
    utils = [s["util"] for s in stages if s["util"] == s["util"]]  # NaN: a stage no frame went through
    return {"model": rep.model, "nodes": nodes, "frames": rep.frames, "fleet_fps": rep.fleet_fps,
            "predicted_fps": rep.predicted_fps, "local_single_fps": rep.single_fps,
            "best_single_node": rep.best_single_node, "fleet_latency_ms": rep.fleet_latency_ms,
            "single_latency_ms": rep.single_latency_ms, "measured_vs_predicted": rep.fleet_fps / rep.predicted_fps,
            "top1_agreement": rep.top1_agreement, "max_rel_error": rep.max_rel_error, "resent": rep.resent,
            "plan_s": rep.plan_s, "stages": stages, "min_util": min(utils, default=float("nan")),
            "mean_util": sum(utils) / max(len(utils), 1), "stages_without_frames": len(stages) - len(utils),
            "fine_tuning": adapt,
            "bytes": _bytes_per_frame(rep.stages, bits), "host": sampler.summary(),
            "wall_s": round(time.monotonic() - t0, 1)}


def _best_class(classes: list[str]) -> str:
    from fleetpipe.node.emulate import parse_emulate

    return min(classes, key=lambda c: parse_emulate(c).compute_factor)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer frames, local single-device baseline, "
                                                             "8-device part on MobileNetV2 only")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--frames", type=int, default=0, help="frames for the 16-device run (default 120, quick 40)")
    parser.add_argument("--skip-8", action="store_true", help="skip the 8-device part")
    parser.add_argument("--skip-measure", action="store_true", help="prediction only (no fleet)")
    parser.add_argument("--adapt", action="store_true", help="keep the planner's fine-tuning on during the runs")
    args = parser.parse_args(argv)
    frames = args.frames or (40 if args.quick else 120)
    console = Console(stderr=True)
    t_start = time.monotonic()
    import onnx

    from fleetpipe.models import zoo

    classes16 = [CLASSES16[i] for i in ORDER16]
    best16 = _best_class(classes16)
    report: dict[str, Any] = {"machine": {"python": sys.version.split()[0], "machine": platform.machine(),
                                          "cpus": len(os.sched_getaffinity(0)),
                                          "loadavg_at_start": os.getloadavg()[0]},
                              "vit": dict(VIT_KW), "classes16": classes16, "classes8": CLASSES8 * 2}
    with tempfile.TemporaryDirectory(prefix="fleetpipe-scale-") as tmpdir:
        path = Path(tmpdir) / "vit.onnx"
        onnx.save(zoo.build("vit", **VIT_KW), path)
        console.print("[bold]predict[/]: profiling the ViT on this host, solving 1..16 devices")
        pred = predict(path, classes16, [1, 2, 4, 8, 16])
        report["predicted"] = pred
        p16 = pred["rows"][-1]
        edge: dict[str, Any] = {"devices": 16, "layers": pred["layers"], "best_single_class": best16,
                                "predicted_speedup": p16["speedup"], "predicted_fleet_fps": p16["fleet_fps"],
                                "predicted_single_fps": p16["single_fps"]}
        if not args.skip_measure:
            console.print(f"[bold]measure[/]: 16 emulated nodes, {frames} frames")
            m16 = measure(str(path), 16, classes16, frames, "scale16", console, adapt=args.adapt)
            report["measured16"] = m16
            edge.update({"measured_fleet_fps": m16["fleet_fps"], "runtime_predicted_fps": m16["predicted_fps"],
                         "measured_vs_predicted": m16["measured_vs_predicted"]})
            if args.quick:
                single = m16["local_single_fps"]
                edge["single_baseline"] = "local: whole model on this host x class factor (no MQTT)"
            else:
                console.print(f"[bold]measure[/]: 1 node ({best16}) over the same MQTT path")
                m1 = measure(str(path), 1, [best16], max(frames // 8, 8), "scale1", console, adapt=args.adapt)
                report["measured1"] = m1
                single = m1["fleet_fps"]
                edge["single_baseline"] = "1-node fleet over MQTT"
                edge["local_single_fps"] = m16["local_single_fps"]
            edge["measured_single_fps"] = single
            edge["measured_speedup"] = m16["fleet_fps"] / single
        report["edgepipe"] = edge
    if not args.skip_8 and not args.skip_measure:
        rows8 = []
        for model in (("mobilenetv2",) if args.quick else MODELS8):
            console.print(f"[bold]measure[/]: {model} on 8 emulated nodes")
            try:
                rows8.append(measure(model, 8, CLASSES8 * 2, 24 if args.quick else 60, f"scale8-{model}", console,
                                     adapt=args.adapt))
            except Exception as exc:
                rows8.append({"model": model, "error": f"{type(exc).__name__}: {exc}"[:2000]})
        report["fleet8"] = rows8
    report["seconds"] = round(time.monotonic() - t_start, 1)
    if args.json:
        print(json.dumps(report, indent=1, default=float))
        return 0
    _print(report)
    return 0


def _print(report: dict[str, Any]) -> None:
    out = Console(width=170)
    e = report["edgepipe"]
    t = Table(title=f"EdgePipe metric: ViT {report['vit']} ({e['layers']} layers) on 16 emulated devices / one "
                    f"device ({e['best_single_class']}); EdgePipe: up to 10.59x (ViT-Large, 16 devices)")
    for col in ("", "fleet frames/s", "one device frames/s", "speedup"):
        t.add_column(col, justify="right")
    t.add_row("predicted (planner cost model)", f"{e['predicted_fleet_fps']:.2f}", f"{e['predicted_single_fps']:.2f}",
              f"{e['predicted_speedup']:.2f}x")
    if "measured_speedup" in e:
        t.add_row(f"measured ({e['single_baseline']})", f"{e['measured_fleet_fps']:.2f}",
                  f"{e['measured_single_fps']:.2f}", f"{e['measured_speedup']:.2f}x")
    out.print(t)
    p = Table(title="predicted speedup vs fleet size (prefixes of the 16-device mix)")
    for col in ("devices", "stages", "bottleneck ms", "speedup", "solve s", "exact"):
        p.add_column(col, justify="right")
    for r in report["predicted"]["rows"]:
        p.add_row(str(r["devices"]), str(r["stages"]), f"{r['bottleneck_ms']:.1f}", f"{r['speedup']:.2f}x",
                  f"{r['solve_s']:.2f}", str(r["exact"]))
    out.print(p)
    for key in ("measured16", "measured1"):
        if key in report:
            m = report[key]
            out.print(f"{key}: {m['frames']} frames at {m['fleet_fps']:.2f} fps (runtime plan predicted "
                      f"{m['predicted_fps']:.2f}); host {m['host']}; min/mean stage utilisation "
                      f"{m['min_util']:.2f}/{m['mean_util']:.2f}")
    if report.get("fleet8"):
        f = Table(title="8 emulated devices: measured vs predicted, stage utilisation, bytes per frame")
        for col in ("model", "measured fps", "predicted fps", "meas/pred", "vs local single", "util min", "util mean",
                    "B/frame 8-bit", "B/frame fp32", "cores mean"):
            f.add_column(col, justify="right")
        for m in report["fleet8"]:
            if "error" in m:
                f.add_row(m["model"], "failed: " + m["error"][:60], *[""] * 8)
                continue
            f.add_row(m["model"], f"{m['fleet_fps']:.2f}", f"{m['predicted_fps']:.2f}",
                      f"{m['measured_vs_predicted']:.2f}", f"{m['fleet_fps'] / m['local_single_fps']:.2f}x",
                      f"{m['min_util']:.2f}", f"{m['mean_util']:.2f}", str(m["bytes"]["between_stages_bytes"]),
                      str(m["bytes"]["float32_bytes"]), str(m["host"].get("mean_cores", "")))
        out.print(f)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
