"""Baseline planners to compare against: what simpler systems do.

- :func:`even_split`: every device (in fleet order) gets the same number of layers.
- :func:`neurosurgeon`: Neurosurgeon-style: the best single split of the chain between two devices
  (or everything on one device), chosen like Neurosurgeon by end-to-end latency.
- :func:`memory_split`: exo-style memory-weighted split: devices sorted by memory (largest first)
  get a layer count proportional to their memory.

Each returns a :class:`~fleetpipe.planner.partition.PlanResult` scored by
:func:`~fleetpipe.planner.cost.evaluate` (``exact=False``; the plan may violate memory, in which
case ``report.feasible`` is False).
"""

from __future__ import annotations

import math
import time

import numpy as np

from fleetpipe.errors import InfeasiblePlan
from fleetpipe.planner.cost import Stage, evaluate
from fleetpipe.planner.partition import PlanResult
from fleetpipe.planner.problem import Problem, transfer_ms

__all__ = ["even_split", "memory_split", "neurosurgeon"]


def even_split(problem: Problem) -> PlanResult:
    """Split the layers as evenly as possible over all devices in fleet order."""
    t0 = time.perf_counter()
    n = min(problem.n_devices, problem.n_layers)
    bounds = np.linspace(0, problem.n_layers, n + 1).round().astype(int)
    return _result(problem, _stages(problem, list(range(n)), bounds), t0, "even")


def memory_split(problem: Problem) -> PlanResult:
    """Give each device (largest memory first) a share of layers proportional to its memory."""
    t0 = time.perf_counter()
    order = sorted(range(problem.n_devices), key=lambda d: (-problem.mem_bytes[d], d))
    order = order[: problem.n_layers]
    mem = problem.mem_bytes[order]
    frac = np.concatenate([[0.0], np.cumsum(mem) / mem.sum()])
    bounds = (frac * problem.n_layers).round().astype(int)
    keep = [i for i in range(len(order)) if bounds[i + 1] > bounds[i]]
    devs = [order[i] for i in keep]
    cuts = np.array([bounds[keep[0]], *[bounds[i + 1] for i in keep]])
    return _result(problem, _stages(problem, devs, cuts), t0, "memory")


def neurosurgeon(problem: Problem) -> PlanResult:
    """Best single split between two devices (or none), minimising latency; memory must fit."""
    t0 = time.perf_counter()
    n_l = problem.n_layers
    cum = np.vstack([np.zeros(problem.n_devices), np.cumsum(problem.compute_ms, axis=0)])
    fits = [[[problem.stage_mem_bytes(f, la) < problem.mem_bytes[d] for d in range(problem.n_devices)]
             for la in range(n_l)] for f in (0,)]
    best: tuple[float, tuple[Stage, ...]] = (math.inf, ())
    for a in range(problem.n_devices):
        if fits[0][n_l - 1][a]:
            best = min(best, (float(cum[-1, a]), (Stage((a,), 0, n_l - 1),)), key=lambda x: x[0])
    for cut in range(n_l - 1):
        need_b = problem.stage_mem_bytes(cut + 1, n_l - 1)
        bits = problem.cut_bits(cut)
        for a in range(problem.n_devices):
            if not fits[0][cut][a]:
                continue
            for b in range(problem.n_devices):
                if b == a or need_b >= problem.mem_bytes[b]:
                    continue
                t = transfer_ms(problem.cut_bytes(cut, bits), problem.bw_mbps[a, b])
                lat = float(cum[cut + 1, a] + t + cum[-1, b] - cum[cut + 1, b])
                if lat < best[0]:
                    best = (lat, (Stage((a,), 0, cut, bits), Stage((b,), cut + 1, n_l - 1)))
    if not best[1]:
        raise InfeasiblePlan("no single device or pair of devices can hold the model")
    return _result(problem, best[1], t0, "neurosurgeon")


def _stages(problem: Problem, devices: list[int], bounds: np.ndarray) -> tuple[Stage, ...]:
    out = []
    for i, d in enumerate(devices):
        first, last = int(bounds[i]), int(bounds[i + 1]) - 1
        out.append(Stage((d,), first, last, problem.cut_bits(last)))
    return tuple(out)


def _result(problem: Problem, stages: tuple[Stage, ...], t0: float, method: str) -> PlanResult:
    report = evaluate(problem, stages)
    return PlanResult(stages, report, time.perf_counter() - t0, None, None, False, method)
