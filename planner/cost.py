"""The pipeline cost model: score a plan (a tuple of stages) on a :class:`Problem`.

Classic model (planner-problems/README.md): stage ``k`` computes its layers on its device
(``compute_k``), then sends the last layer's output to the next stage's device (``transfer_k``).
The bottleneck is the largest ``compute_k`` or ``transfer_k``; throughput is ``1000 / bottleneck``
frames per second; latency is the sum of all computes and transfers. Memory: every device must hold
its stage's weights and buffers (``need < mem``).

Replicated stage (ScalPipe): devices ``i = 1..r`` share a stage through a shared subscription with
credit-based flow control, so each replica takes the fraction ``w_i = (1/c_i) / sum_j (1/c_j)`` of the
frames, where ``c_i`` is the stage's compute time on device ``i``. Then

- stage compute (per frame, amortised) = ``1 / sum_i (1/c_i)``; every replica is busy the same
  fraction of time, so it equals each replica's busy time per frame;
- link ``a -> b`` between consecutive stages carries the fraction ``w_a * w_b`` of the frames, so its
  amortised time per frame is ``w_a * w_b * t_ab`` and the cut's transfer time is the max over the
  links (links are independent resources, as in the classic model);
- latency counts the expected time of one frame: ``sum_i w_i c_i`` and ``sum_ab w_a w_b t_ab``.

With one device per stage all of this reduces to the classic model. Bit-widths: the activation
after a stage is sent with ``Stage.bits`` bits (float32 is 32), so the bytes scale by ``bits / 32``.

Messages (problems with ``hop_ms``/``byte_ms``/``client_mbps``, see :mod:`fleetpipe.planner.problem`): a
stage's compute includes what its devices spend per frame on receiving and sending
(``Problem.message_ms``); the first stage's ``input_ms`` is the input's transfer from the client and the last
stage's ``transfer_ms`` the result's transfer to the client, each amortised over replicas like any link.

The period (time between results) adds what no stage owns: the broker relays all of a frame's messages, and
a client keeping ``window`` frames in flight waits a latency per window; throughput is ``1000 / period``.

Utilisation of a device = its stage's compute / bottleneck; predicted bubble of a stage =
bottleneck - its compute (idle time per frame).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fleetpipe.planner.problem import FULL_BITS, Problem, transfer_ms

__all__ = ["PlanReport", "Stage", "StageReport", "evaluate"]

_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Stage:
    """Layers ``first..last`` (0-based, inclusive) on ``devices`` (one, or replicas).

    ``bits`` is the bit-width of the activation this stage sends to the next one.
    """

    devices: tuple[int, ...]
    first: int
    last: int
    bits: int = FULL_BITS

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(int(d) for d in self.devices))
        if not self.devices:
            raise ValueError("a stage needs at least one device")
        if not 0 <= self.first <= self.last:
            raise ValueError(f"bad layer range {self.first}..{self.last}")
        if not 1 <= self.bits <= FULL_BITS:
            raise ValueError(f"bits must be in 1..{FULL_BITS}")


@dataclass(frozen=True, slots=True)
class StageReport:
    """The cost of one stage."""

    stage: Stage
    compute_ms: float        # amortised per frame (replicas combined)
    transfer_ms: float       # amortised per frame, to the next stage (0 for the last stage)
    latency_compute_ms: float
    latency_transfer_ms: float
    mem_need_bytes: float
    mem_free_bytes: float    # smallest headroom over the stage's devices (negative: does not fit)
    utilisation: float       # compute / bottleneck
    bubble_ms: float         # bottleneck - compute
    input_ms: float = 0.0    # amortised per frame, from the client (first stage only)


@dataclass(frozen=True, slots=True)
class PlanReport:
    """The score of a whole plan."""

    stages: tuple[StageReport, ...]
    bottleneck_ms: float
    throughput_per_s: float
    latency_ms: float
    device_utilisation: tuple[float, ...]  # per device of the problem, 0 when unused
    feasible: bool
    reason: str                            # "" when feasible
    broker_ms: float = 0.0                 # the broker's time per frame (all of the frame's messages)
    period_ms: float = 0.0                 # max(bottleneck, broker, latency / window): time between results

    @property
    def plan(self) -> tuple[Stage, ...]:
        return tuple(s.stage for s in self.stages)


def evaluate(problem: Problem, stages: tuple[Stage, ...] | list[Stage]) -> PlanReport:
    """Score ``stages`` on ``problem``.

    Raises ``ValueError`` when the stages do not form a plan (gaps, overlaps, unknown or reused
    devices); constraint violations (memory, pins, replication, bits, latency bound) give
    ``feasible=False`` with a reason.
    """
    stages = tuple(stages)
    _check_structure(problem, stages)
    reasons: list[str] = []
    shares = [_shares(problem, s) for s in stages]
    raw: list[tuple[float, float, float, float, float, float, float]] = []
    last_layer = problem.n_layers - 1
    for k, stage in enumerate(stages):
        bits_in = stages[k - 1].bits if k > 0 else FULL_BITS
        comp_i = np.array([problem.compute_ms[stage.first : stage.last + 1, d].sum()
                           + problem.message_ms(d, stage.first, stage.last, bits_in, stage.bits)
                           for d in stage.devices])
        w = shares[k]
        comp = float(1.0 / np.sum(1.0 / np.maximum(comp_i, 1e-300))) if np.all(comp_i > 0) else 0.0
        lat_comp = float(np.dot(w, comp_i))
        tr = lat_tr = inp = 0.0
        if k + 1 < len(stages):
            nbytes = problem.cut_bytes(stage.last, stage.bits)
            nxt = stages[k + 1]
            for a, wa in zip(stage.devices, w, strict=True):
                for b, wb in zip(nxt.devices, shares[k + 1], strict=True):
                    t = transfer_ms(nbytes, problem.bw_mbps[a, b])
                    tr = max(tr, wa * wb * t)
                    lat_tr += wa * wb * t
        elif problem.client_mbps is not None:  # the result to the client
            for d, wd in zip(stage.devices, w, strict=True):
                t = problem.client_ms(d, float(problem.out_bytes[last_layer]))
                tr = max(tr, wd * t)
                lat_tr += wd * t
        if k == 0 and problem.client_mbps is not None:  # the input from the client
            for d, wd in zip(stage.devices, w, strict=True):
                t = problem.client_ms(d, problem.input_bytes)
                inp = max(inp, wd * t)
                lat_tr += wd * t
        need = problem.stage_mem_bytes(stage.first, stage.last)
        free = min(float(problem.mem_bytes[d]) - need for d in stage.devices)
        if free <= 0:
            short = [problem.device_names[d] for d in stage.devices if problem.mem_bytes[d] <= need]
            have = float(problem.mem_bytes[problem.device_index(short[0])])
            reasons.append(f"stage {k} (layers {stage.first + 1}..{stage.last + 1}) needs {need:.0f} B "
                           f"but {', '.join(short)} has {have:.0f} B")
        if len(stage.devices) > 1 and not problem.allow_replication:
            reasons.append(f"stage {k} is replicated but the problem does not allow replication")
        if k + 1 < len(stages) and stage.bits < problem.cut_bits(stage.last):
            reasons.append(f"stage {k} sends {stage.bits} bits, below the floor "
                           f"{problem.cut_bits(stage.last)} of layer {stage.last + 1}")
        raw.append((comp, tr, lat_comp, lat_tr, need, free, inp))
    reasons.extend(_pin_violations(problem, stages))
    bottleneck = max(max(r[0], r[1], r[6]) for r in raw)
    latency = sum(r[2] + r[3] for r in raw)
    if problem.latency_bound_ms is not None and latency > problem.latency_bound_ms + _EPS:
        reasons.append(f"latency {latency:.2f} ms exceeds the bound {problem.latency_bound_ms:.2f} ms")
    util = [0.0] * problem.n_devices
    reports = []
    for stage, (comp, tr, lc, lt, need, free, inp) in zip(stages, raw, strict=True):
        u = comp / bottleneck if bottleneck > 0 else 1.0
        for d in stage.devices:
            util[d] = u
        reports.append(StageReport(stage, comp, tr, lc, lt, need, free, u, bottleneck - comp, inp))
    broker = 0.0
    if problem.broker_msg_ms or problem.broker_byte_ms:
        wire = problem.input_bytes + float(problem.out_bytes[-1])
        wire += sum(problem.cut_bytes(s.last, s.bits) for s in stages[:-1])
        broker = (len(stages) + 1) * problem.broker_msg_ms + wire * problem.broker_byte_ms
    period = max(bottleneck, broker, latency / problem.window if problem.window else 0.0)
    return PlanReport(
        stages=tuple(reports), bottleneck_ms=bottleneck,
        throughput_per_s=1000.0 / period if period > 0 else math.inf,
        latency_ms=latency, device_utilisation=tuple(util),
        feasible=not reasons, reason="; ".join(reasons), broker_ms=broker, period_ms=period,
    )


def _shares(problem: Problem, stage: Stage) -> np.ndarray:
    comp = np.array([problem.compute_ms[stage.first : stage.last + 1, d].sum() for d in stage.devices])
    if len(comp) == 1:
        return np.ones(1)
    w = (comp <= 0).astype(np.float64) if np.any(comp <= 0) else 1.0 / comp
    return np.asarray(w / w.sum())


def _check_structure(problem: Problem, stages: tuple[Stage, ...]) -> None:
    if not stages:
        raise ValueError("a plan needs at least one stage")
    expect = 0
    seen: set[int] = set()
    for k, stage in enumerate(stages):
        if stage.first != expect:
            raise ValueError(f"stage {k} starts at layer {stage.first}, expected {expect}")
        expect = stage.last + 1
        for d in stage.devices:
            if not 0 <= d < problem.n_devices:
                raise ValueError(f"stage {k} uses unknown device {d}")
            if d in seen:
                raise ValueError(f"device {problem.device_names[d]} hosts more than one stage")
            seen.add(d)
    if expect != problem.n_layers:
        raise ValueError(f"stages cover layers up to {expect}, expected {problem.n_layers}")


def _pin_violations(problem: Problem, stages: tuple[Stage, ...]) -> list[str]:
    out = []
    for pin in problem.pins:
        hosted = (s.first <= pin.first and pin.last <= s.last and s.devices == (pin.device,) for s in stages)
        if not any(hosted):
            out.append(f"layers {pin.first + 1}..{pin.last + 1} are pinned to "
                       f"{problem.device_names[pin.device]} but do not run there")
    return out
