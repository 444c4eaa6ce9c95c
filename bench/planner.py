"""Planner benchmark: exact solve time vs fleet size and model depth, and plan quality of the
heuristic and the baselines as a ratio to the optimum (or to the proven lower bound).

    .venv/bin/python bench/planner.py [--quick] [--json OUT.json] [--time-limit S]

Fleets are generated (seeded): mixed device types (Pi 3/4, Jetson Nano, Xavier NX, laptops) with
per-type speed and per-layer variation (layers are not equally suited to every device), spread
over 2-4 switches (GbE inside a switch, slower asymmetric uplinks between switches), and some
Wi-Fi devices whose every link has its own bandwidth, so one bandwidth per device cannot
describe the network. Models are chains of 24..200 layers with ViT-, ResNet- and VGG-like
activation and weight sizes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from fleetpipe.planner import baselines, heuristic, partition
from fleetpipe.planner.problem import Problem

__all__ = ["generate", "main"]

# type: (ms per unit of work, memory bytes, NIC Mbit/s)
TYPES = {
    "rpi3": (11.0, 0.6e9, 220.0),
    "rpi4": (4.0, 2.5e9, 900.0),
    "jetson_nano": (1.0, 2.2e9, 900.0),
    "xavier_nx": (0.28, 5.5e9, 900.0),
    "laptop": (0.4, 8.0e9, 900.0),
}
TYPE_MIX = ("rpi4", "rpi4", "rpi4", "jetson_nano", "jetson_nano", "rpi3", "xavier_nx", "laptop")


def generate(n_devices: int, n_layers: int, seed: int) -> Problem:
    """A seeded fleet/model problem with mixed device types and a link matrix."""
    rng = np.random.default_rng(seed)
    types = [TYPE_MIX[int(i)] for i in rng.integers(0, len(TYPE_MIX), n_devices)]
    kind = rng.integers(0, 3)
    work = rng.uniform(0.5, 1.5, n_layers) * 20.0 * 48 / n_layers * 12
    flavour = rng.uniform(0.8, 1.25, (n_layers, len(TYPES)))  # per-layer suitability per type
    tidx = {t: i for i, t in enumerate(TYPES)}
    compute = np.array([[work[i] * TYPES[t][0] / 12 * flavour[i, tidx[t]] for t in types]
                        for i in range(n_layers)])
    compute = compute.round(3)
    if kind == 0:   # ViT-like: constant activation
        out = np.full(n_layers, 1_210_368.0)
        params = np.full(n_layers, 7.0e6 * 48 / n_layers)
    elif kind == 1:  # ResNet-like: shrinking activations, growing weights
        out = (3.2e6 * np.geomspace(1.0, 0.02, n_layers)).round()
        params = (1.0e8 / n_layers * np.geomspace(0.1, 3.0, n_layers)).round()
    else:            # VGG-like: big early activations, huge late weights
        out = (12.8e6 * np.geomspace(1.0, 0.003, n_layers)).round()
        params = (5.5e8 / n_layers * np.geomspace(0.02, 6.0, n_layers) / 2).round()
    n_sites = int(rng.integers(2, 5))
    site = rng.integers(0, n_sites, n_devices)
    uplink = rng.choice([50.0, 100.0, 200.0, 400.0], (n_sites, n_sites))
    wifi = rng.random(n_devices) < 0.15
    nic = np.array([TYPES[t][2] for t in types])
    bw = np.minimum(nic[:, None], nic[None, :])
    bw = np.where(site[:, None] == site[None, :], bw, np.minimum(bw, uplink[site][:, site]))
    for d in np.nonzero(wifi)[0]:
        row = rng.uniform(15.0, 120.0, n_devices).round()
        col = rng.uniform(15.0, 120.0, n_devices).round()
        bw[d, :] = np.minimum(bw[d, :], row)
        bw[:, d] = np.minimum(bw[:, d], col)
    mem = np.array([TYPES[t][1] for t in types])
    return Problem(
        layer_names=tuple(f"l{i}" for i in range(n_layers)), compute_ms=compute, out_bytes=out,
        param_bytes=params, input_bytes=602112, device_names=tuple(f"{t}-{i}" for i, t in enumerate(types)),
        mem_bytes=mem, bw_mbps=bw, name=f"gen-d{n_devices}-l{n_layers}-s{seed}", device_types=tuple(types),
    )


def run_case(n_devices: int, n_layers: int, seed: int, time_limit: float) -> dict[str, object]:
    problem = generate(n_devices, n_layers, seed)
    exact = partition.solve(problem, time_limit_s=time_limit)
    row: dict[str, object] = {
        "devices": n_devices, "layers": n_layers, "seed": seed,
        "classes": len(partition.device_classes(problem)),
        "solve_s": round(exact.solve_s, 3), "exact": exact.exact, "gap": round(exact.gap or 0.0, 4),
        "bottleneck_ms": round(exact.bottleneck_ms, 3), "stages": len(exact.stages),
    }
    ref = exact.bottleneck_ms
    heur = heuristic.refine(problem, None)  # its default budget (0.2 s)
    row["heuristic"] = round(heur.bottleneck_ms / ref, 3)
    row["heuristic_ms"] = round(heur.solve_s * 1000, 1)
    for name, fn in (("even", baselines.even_split), ("neurosurgeon", baselines.neurosurgeon),
                     ("memory", baselines.memory_split)):
        try:
            res = fn(problem)
            row[name] = round(res.bottleneck_ms / ref, 2) if res.report.feasible else "mem!"
        except Exception:  # a baseline that cannot place the model at all
            row[name] = "n/a"
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases")
    parser.add_argument("--json", default="bench/planner-results.json", help="where to write the rows")
    parser.add_argument("--time-limit", type=float, default=8.0, help="exact solver time limit per case")
    args = parser.parse_args(argv)
    if args.quick:
        cases = [(4, 24), (8, 48), (16, 48), (32, 96), (64, 96)]
        seeds = [1]
    else:
        cases = [(4, 24), (8, 48), (16, 48), (16, 100), (32, 96), (32, 200), (64, 96), (64, 200)]
        seeds = [1, 2]
    rows = []
    cols = ["devices", "layers", "seed", "classes", "solve_s", "exact", "gap", "bottleneck_ms", "stages",
            "heuristic", "heuristic_ms", "even", "neurosurgeon", "memory"]
    print(" ".join(f"{c:>12}" for c in cols))
    t0 = time.perf_counter()
    for n_dev, n_lay in cases:
        for seed in seeds:
            row = run_case(n_dev, n_lay, seed, args.time_limit)
            rows.append(row)
            print(" ".join(f"{row[c]!s:>12}" for c in cols), flush=True)
    print(f"total {time.perf_counter() - t0:.1f} s; ratios are bottleneck / exact bottleneck "
          "(lower is better, 1 = optimal)")
    Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
