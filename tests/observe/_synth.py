"""Synthetic fleets with known timings, shared by the observe tests."""

from __future__ import annotations

from fleetpipe import wire

T = 1000.0  # wall-clock origin of the synthetic runs (seconds)


def plan(fleet: str = "f", epoch: int = 3, replicas: tuple[str, ...] = ("b",)) -> wire.Plan:
    """Two stages: stage 0 on node a (10 ms predicted), stage 1 on ``replicas`` (20 ms predicted)."""
    return wire.Plan(fleet=fleet, epoch=epoch, model_id="mlp", ts=T, bottleneck_ms=20.0, latency_ms=35.0,
                     stages=(wire.PlanStage(index=0, first_layer=0, last_layer=1, nodes=("a",), bits=8,
                                            predicted_ms=10.0),
                             wire.PlanStage(index=1, first_layer=2, last_layer=3, nodes=replicas, bits=32,
                                            predicted_ms=20.0)))


def frames(n: int = 5, period_ms: float = 20.0, c0_ms: float = 10.0, c1_ms: float = 20.0,
           xfer_ms: float = 5.0) -> list[tuple[wire.Hop, ...]]:
    """Frames entering stage 0 every ``period_ms``; stage 1 queues a frame while it is busy (one node each)."""
    out = []
    free1 = 0.0
    for i in range(n):
        r0 = i * period_ms
        s0 = r0 + c0_ms
        r1 = s0 + xfer_ms
        start1 = max(r1, free1)
        s1 = free1 = start1 + c1_ms
        out.append((wire.Hop(stage=0, node_id="a", recv_ts=T + r0 / 1000, compute_ms=c0_ms, send_ts=T + s0 / 1000),
                    wire.Hop(stage=1, node_id="b", recv_ts=T + r1 / 1000, compute_ms=c1_ms, send_ts=T + s1 / 1000)))
    return out


def health(node: str, ts: float, frames_out: int, *, stage: int | None, compute: float, idle: float = 0.0,
           transfer: float = 0.0, seq: int = 1, fleet: str = "f", queue: int = 0, errors: int = 0,
           bits: int = 8) -> wire.NodeHealth:
    return wire.NodeHealth(fleet=fleet, node_id=node, seq=seq, ts=ts, load=0.5, queue_depth=queue,
                           frames_in=frames_out, frames_out=frames_out, errors=errors, stage=stage, epoch=3,
                           compute_ms_avg=compute, transfer_ms_avg=transfer, idle_ms_avg=idle, bits=bits,
                           bandwidth_mbps_est=100.0)


def birth(node: str, seq: int = 1, fleet: str = "f", ts: float = T) -> wire.NodeBirth:
    return wire.NodeBirth(fleet=fleet, node_id=node, seq=seq, ts=ts, arch="x86_64", cores=2, mem_bytes=1 << 30,
                          runtimes=("onnx",), providers=("cpu",), device_class="pi4", speed=1.0)
