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

__all__ = ["host_cores", "host_mem_bytes", "measure_speed", "probe_capability", "slice_layer_ms"]

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

    The loop is an onnxruntime MatMul on one intra-op thread, i.e. the way a node runs its slices (and the
    planner profiles layers). numpy's matmul would measure the BLAS instead: it uses every core unless the
    environment pins it (``OMP_NUM_THREADS``), so a node started without that pin reported its cores' sum
    by wall clock, and by CPU time (summed over BLAS threads that spin while they wait) a figure 30x low.

    ``cpu_time``: time the loop by this thread's CPU time instead of the wall clock. Emulated nodes use it:
    their compute is stretched by CPU time too, so the figure stays that of the emulated device when several
    node processes start together on one host and steal cycles from each other.
    """
    session, feeds = _matmul_session()
    clock = time.thread_time if cpu_time else time.perf_counter
    session.run(None, feeds)  # warm-up: page in, pick the kernel
    flops_per_call = 2.0 * _MATMUL_N**3
    calls = 0
    start = clock()
    deadline = start + seconds
    while True:
        for _ in range(8):
            session.run(None, feeds)
        calls += 8
        now = clock()
        if now >= deadline:
            break
    return flops_per_call * calls / (now - start) / 1e9 / max(factor, 1.0)


def _matmul_session() -> tuple[Any, dict[str, np.ndarray]]:
    """A one-thread onnxruntime session of ``Y = A @ B`` (B constant) and its feed."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a = rng.standard_normal((_MATMUL_N, _MATMUL_N)).astype(np.float32)
    b = rng.standard_normal((_MATMUL_N, _MATMUL_N)).astype(np.float32)
    shape = [_MATMUL_N, _MATMUL_N]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["Y"])], "speed",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, shape)],
        initializer=[numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session, {"A": a}


def slice_layer_ms(data: bytes, threads: int = 1, runs: int = 5) -> tuple[float, ...]:
    """Per-layer times (ms, medians over ``runs``) of an ONNX (or TFLite) slice, grouped into layers like the
    planner groups the whole model (so layer ``i`` is the slice's ``first_layer + i`` when the counts agree)."""
    from fleetpipe.models.onnx_graph import load_onnx, read_model
    from fleetpipe.models.profile import profile_layers, profile_tflite_layers
    from fleetpipe.node.runtime import detect_kind

    cpu, wall = time.thread_time(), time.perf_counter()
    if detect_kind(data) == "tflite":
        from fleetpipe.models.tflite import load_tflite

        ms = profile_tflite_layers(data, load_tflite(data), runs=runs, threads=threads, warmup=2).per_layer_ms
    else:
        proto = read_model(data)
        ms = profile_layers(proto, load_onnx(proto), runs=runs, threads=threads, warmup=2).per_layer_ms
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    # One thread runs on this one: the profiler's kernel times are wall clock, and where other processes took
    # the core from it (nodes loading together on a shared host) its CPU share says by how much.
    scale = min(1.0, cpu / wall) if threads == 1 and wall > 0 else 1.0
    return tuple(t * scale for t in ms)


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
