"""Device capability probe and a short speed benchmark for the node's birth message.

Per-layer profiling of a model lives in ``fleetpipe.models.profile``; this module only describes the
device. When emulating, the emulated class overrides memory and cores and divides the speed figure,
so the planner sees the device being emulated, not the host.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fleetpipe.node.emulate import DeviceClass
from fleetpipe.node.runtime import available_providers, available_runtimes

__all__ = ["host_cores", "host_mem_bytes", "measure_speed", "probe_capability"]

_MATMUL_N = 128


def probe_capability(
    runtimes: Sequence[str] | None = None, *, device: DeviceClass | None = None
) -> dict[str, Any]:
    """Capability of this node: arch, system, cores, mem_bytes, runtimes, providers, emulated class."""
    cores = host_cores()
    mem = host_mem_bytes()
    if device is not None:
        cores = min(cores, device.cores) if device.cores else cores
        mem = device.mem_bytes or mem
    return {
        "arch": platform.machine() or "unknown",
        "system": platform.system() or "unknown",
        "python": platform.python_version(),
        "cores": cores,
        "mem_bytes": mem,
        "runtimes": list(runtimes if runtimes is not None else available_runtimes()),
        "providers": list(available_providers()),
        "emulated": None if device is None else device.name,
        "compute_factor": 1.0 if device is None else device.compute_factor,
        "bandwidth_mbps": None if device is None else device.bandwidth_mbps,
    }


def measure_speed(seconds: float = 0.3, *, factor: float = 1.0, cpu_time: bool = False) -> float:
    """GFLOP/s of a fixed float32 matmul loop run for about ``seconds``, divided by the emulation factor.

    ``cpu_time``: time the loop by this process's CPU time instead of the wall clock. Emulated nodes use it:
    their compute is stretched by CPU time too, so the figure stays that of the emulated device when several
    node processes start together on one host and steal cycles from each other.
    """
    clock = time.process_time if cpu_time else time.perf_counter
    rng = np.random.default_rng(0)
    a = rng.standard_normal((_MATMUL_N, _MATMUL_N)).astype(np.float32)
    b = rng.standard_normal((_MATMUL_N, _MATMUL_N)).astype(np.float32)
    out = np.empty_like(a)
    np.matmul(a, b, out=out)  # warm-up: page in, pick the BLAS kernel
    flops_per_call = 2.0 * _MATMUL_N**3
    calls = 0
    start = clock()
    deadline = start + seconds
    while True:
        for _ in range(8):
            np.matmul(a, b, out=out)
        calls += 8
        now = clock()
        if now >= deadline:
            break
    return flops_per_call * calls / (now - start) / 1e9 / max(factor, 1.0)


def host_cores() -> int:
    """CPUs this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def host_mem_bytes() -> int:
    """Total physical memory in bytes (/proc/meminfo, else sysconf, else 0)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return 0
