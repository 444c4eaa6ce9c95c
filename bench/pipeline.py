"""Pipeline benchmark: an emulated heterogeneous fleet vs the best single node vs the planner's prediction.

Everything is measured in one run on this machine, through the real path (mosquitto, node processes,
onnxruntime slices, emulated device classes):

- fleet: the default 4-node heterogeneous demo fleet (jetson-nano, rpi5, rpi4, rpi4-wifi) streaming frames;
- best single node: a 1-node fleet of the fastest class streaming the same frames (same MQTT path);
- prediction: the planner's bottleneck for the 4-node plan;
- per-hop overhead: for each stage boundary, the time between a node publishing and the next node
  receiving (from the frame's hop timestamps), vs a raw TCP loopback ping for the same payload size.

Usage: .venv/bin/python bench/pipeline.py [--model resnet50] [--frames 40] [--json]
Absolute times on a shared 2-core machine are noise; read the ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fleetpipe.planner.demo import DEFAULT_CLASSES, run_demo


def _raw_tcp_oneway_ms(size: int, rounds: int = 20) -> float:
    """Half of a raw TCP loopback ping-pong for ``size`` bytes (bench/transport.py's implementation)."""
    spec = importlib.util.spec_from_file_location("bench_transport", Path(__file__).with_name("transport.py"))
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return float(mod.raw_pingpong(size, rounds)) * 1000 / 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    console = Console(stderr=True)
    classes = list(DEFAULT_CLASSES)
    fleet = run_demo(model=args.model, nodes=len(classes), classes=classes, frames=args.frames, bits=args.bits,
                     console=console, fleet="bench4")
    best_class = min(classes, key=lambda c: _factor(c))
    single = run_demo(model=args.model, nodes=1, classes=[best_class], frames=max(args.frames // 2, 8),
                      bits=args.bits, console=console, fleet="bench1")
    hops = _hop_overheads(fleet.results, {st["stage"]: st["wire_bytes"] for st in fleet.stages})
    rows = []
    for size, ms in hops:
        raw = _raw_tcp_oneway_ms(max(size, 1))
        rows.append({"payload_bytes": size, "mqtt_hop_ms": ms, "raw_tcp_ms": raw, "ratio": ms / raw})
    report = {
        "machine": {"python": sys.version.split()[0], "machine": platform.machine(), "cpus": _cpus()},
        "model": fleet.model,
        "fleet_fps": fleet.fleet_fps,
        "predicted_fps": fleet.predicted_fps,
        "single_node_fps": single.fleet_fps,
        "single_node_class": best_class,
        "fleet_vs_single": fleet.fleet_fps / single.fleet_fps,
        "measured_vs_predicted": fleet.fleet_fps / fleet.predicted_fps,
        "fleet_latency_ms": fleet.fleet_latency_ms,
        "single_latency_ms": single.fleet_latency_ms,
        "stages": fleet.stages,
        "hops": rows,
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    out = Console(width=160)
    t = Table(title=f"pipeline: {report['model']}, 4 emulated nodes vs 1 ({best_class})")
    for col in ("", "fleet (4 nodes)", f"single ({best_class})", "ratio"):
        t.add_column(col, justify="right")
    t.add_row("throughput frames/s", f"{report['fleet_fps']:.2f}", f"{report['single_node_fps']:.2f}",
              f"{report['fleet_vs_single']:.2f}x")
    t.add_row("latency ms (one frame)", f"{report['fleet_latency_ms']:.0f}", f"{report['single_latency_ms']:.0f}",
              f"{report['fleet_latency_ms'] / report['single_latency_ms']:.2f}x")
    t.add_row("planner prediction frames/s", f"{report['predicted_fps']:.2f}", "",
              f"measured/predicted {report['measured_vs_predicted']:.2f}")
    out.print(t)
    h = Table(title="per-hop overhead: MQTT (publish -> next node receives) vs raw TCP one-way, same payload")
    for col in ("payload", "MQTT hop ms", "raw TCP ms", "ratio"):
        h.add_column(col, justify="right")
    for r in rows:
        h.add_row(f"{r['payload_bytes'] / 1024:.0f} KB", f"{r['mqtt_hop_ms']:.2f}", f"{r['raw_tcp_ms']:.3f}",
                  f"{r['ratio']:.1f}x")
    out.print(h)
    return 0


def _factor(cls: str) -> float:
    from fleetpipe.node.emulate import parse_emulate

    return parse_emulate(cls).compute_factor


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _hop_overheads(results: list, sizes: dict[int, int]) -> list[tuple[int, float]]:
    """(payload bytes, median ms from a stage's send to the next stage's receive) per stage boundary."""
    per: dict[int, list[float]] = {}
    for r in results:
        for a, b in zip(r.hops, r.hops[1:], strict=False):
            per.setdefault(a.stage, []).append((b.recv_ts - a.send_ts) * 1000)
    return [(sizes.get(k, 0), statistics.median(v)) for k, v in sorted(per.items())]


if __name__ == "__main__":
    sys.exit(main())
