"""Pure aggregation of fleet telemetry: per-node, per-stage and per-pipeline figures.

Theory of operation. A :class:`FleetView` folds the control-plane messages of one fleet (births, deaths,
health, metrics, plan, errors, and optionally results) into a small state; :meth:`FleetView.snapshot` turns
that state into frozen figures at a given time. Nothing here does I/O or reads a clock unless the caller
leaves ``now`` out. :func:`analyse_hops` computes the same kind of figures exactly from the per-frame hop
timestamps carried by results (what ``fleetpipe timeline`` draws).

Where the inputs come from (all under ``fleetpipe/v1/<fleet>/``, see :mod:`fleetpipe.topics`)::

    node/<id>/state     NodeBirth | NodeDeath (retained)   liveness, device class
    node/<id>/health    NodeHealth, every ~1 s              counters, queue, compute/transfer/idle, bits
    node/<id>/metrics   Metrics (JSON, flat keys below)     what :func:`metrics_payload` computes on the node
    plan                Plan (retained)                     stages, replicas, predicted_ms; epoch = re-plans
    error               ErrorReport                         recent errors
    result/<client>     Result (msgpack)                    hops -> latency (optional)

Metrics topic layout. ``node/<id>/metrics`` carries a :class:`fleetpipe.wire.Metrics` whose ``values`` is a
flat ``{str: float}`` map (the message is JSON, so ``mosquitto_sub``, MQTT Explorer or Node-RED read it as is).
A node publishes :func:`metrics_payload` there; a planner publishes :func:`pipeline_payload` under its own id.
Keys (:data:`NODE_METRIC_KEYS`, :data:`PIPELINE_METRIC_KEYS`)::

    stage                 current stage index, -1 = none          epoch            plan epoch the node runs
    bits                  activation bit-width in use             queue_depth      frames waiting at the node
    frames_in_total       frames received (counter)               frames_out_total frames sent on (counter)
    errors_total          errors (counter)                        window_s         span the rates cover
    fps_in, fps_out       frames/s over the window                load, mem_used_bytes
    compute_ms_avg        mean compute per frame                  transfer_ms_avg  mean send time per frame
    idle_ms_avg           mean wait for work per frame (bubble)   bandwidth_mbps_est  (only when known)
    utilisation           fps_out * compute_ms_avg / 1000, in [0, 1]: the share of time spent computing
    bubble_ratio          idle / (compute + transfer + idle): the share of a frame cycle spent waiting

    pipeline.throughput_fps, pipeline.latency_ms_p50 / _p90 / _p99, pipeline.bottleneck_stage,
    pipeline.bottleneck_utilisation, pipeline.epoch, pipeline.stages, pipeline.nodes_alive,
    pipeline.predicted_fps (the plan's), pipeline.calibrated_fps (the plan re-scored with measured compute),
    stage.<k>.utilisation, stage.<k>.fps_out, stage.<k>.compute_ms_avg, stage.<k>.idle_ms_avg,
    stage.<k>.queue_depth, stage.<k>.bits, stage.<k>.predicted_ms, stage.<k>.replicas

Definitions. Rates come from counter deltas between the oldest and newest health within ``window_s`` (a
counter that goes down means the node restarted: the history restarts). A stage's utilisation is the mean of
its replicas' utilisation; the pipeline's throughput is the sum of the last stage's ``fps_out``; the
bottleneck is the stage with the highest utilisation. Latency percentiles interpolate linearly between
closest ranks (numpy's default) over the recent results; a result's latency is its explicit latency if the
caller has one (client side), else last hop ``send_ts`` - first hop ``recv_ts`` (in-pipeline latency).
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleetpipe import timing, wire
from fleetpipe.errors import WireError

__all__ = [
    "NODE_METRIC_KEYS",
    "PIPELINE_METRIC_KEYS",
    "FleetSnapshot",
    "FleetView",
    "HopStats",
    "NodeFigures",
    "PipelineFigures",
    "Replan",
    "RowStats",
    "StageFigures",
    "analyse_hops",
    "calibrated_period_ms",
    "frames_of",
    "metrics_payload",
    "percentile",
    "pipeline_payload",
]

NODE_METRIC_KEYS: tuple[str, ...] = (
    "stage", "epoch", "bits", "queue_depth", "frames_in_total", "frames_out_total", "errors_total", "window_s",
    "fps_in", "fps_out", "load", "mem_used_bytes", "compute_ms_avg", "transfer_ms_avg", "idle_ms_avg",
    "utilisation", "bubble_ratio", "bandwidth_mbps_est",
)
PIPELINE_METRIC_KEYS: tuple[str, ...] = (
    "pipeline.throughput_fps", "pipeline.latency_ms_p50", "pipeline.latency_ms_p90", "pipeline.latency_ms_p99",
    "pipeline.bottleneck_stage", "pipeline.bottleneck_utilisation", "pipeline.epoch", "pipeline.stages",
    "pipeline.nodes_alive", "pipeline.predicted_fps", "pipeline.calibrated_fps",
)
_EPS_S = 1e-6  # timestamps closer than this are the same instant (float noise of wall-clock seconds)
_STAGE_KEYS = ("utilisation", "fps_out", "compute_ms_avg", "idle_ms_avg", "queue_depth", "bits", "predicted_ms",
               "replicas")


@dataclass(frozen=True, slots=True)
class NodeFigures:
    """What one node looks like right now."""

    node_id: str
    alive: bool
    last_seen: float | None  # receive time (the caller's clock) of the newest message from it
    device_class: str
    stage: int | None
    epoch: int
    bits: int
    queue_depth: int
    frames_in: int
    frames_out: int
    errors: int
    fps_in: float
    fps_out: float
    load: float
    compute_ms: float
    transfer_ms: float
    idle_ms: float
    utilisation: float
    bubble_ratio: float
    bandwidth_mbps: float | None
    death_reason: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StageFigures:
    """One plan stage, aggregated over its replicas."""

    index: int
    nodes: tuple[str, ...]
    alive: int
    predicted_ms: float
    predicted_utilisation: float
    bits: int
    frames_in: int
    frames_out: int
    queue_depth: int
    errors: int
    fps_out: float
    compute_ms: float
    transfer_ms: float
    idle_ms: float
    utilisation: float
    bandwidth_mbps: float | None


@dataclass(frozen=True, slots=True)
class PipelineFigures:
    """Whole-pipeline figures."""

    epoch: int | None
    throughput_fps: float
    latency_ms_p50: float | None
    latency_ms_p90: float | None
    latency_ms_p99: float | None
    bottleneck_stage: int | None
    bottleneck_utilisation: float
    predicted_fps: float | None
    nodes_alive: int
    calibrated_fps: float | None = None  # the plan re-scored with the compute its nodes measure


@dataclass(frozen=True, slots=True)
class Replan:
    """The plan epoch changed."""

    ts: float
    old_epoch: int
    new_epoch: int
    stages: int
    bottleneck_ms: float


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    """Everything ``fleetpipe top`` and the exporter show, at time ``now``."""

    fleet: str
    now: float
    plan: wire.Plan | None
    nodes: tuple[NodeFigures, ...]
    stages: tuple[StageFigures, ...]
    pipeline: PipelineFigures
    errors: tuple[wire.ErrorReport, ...]
    errors_seen: int
    replans: tuple[Replan, ...]
    extra_metrics: Mapping[str, Mapping[str, float]]  # metrics of publishers that are not nodes (planner)


class FleetView:
    """Folds one fleet's messages into figures; call :meth:`apply` per message, :meth:`snapshot` to read."""

    def __init__(self, fleet: str, *, window_s: float = 5.0, lease_s: float | None = None,
                 max_errors: int = 20, max_latencies: int = 1000) -> None:
        self.fleet = fleet
        self.window_s = window_s
        self.lease_s = lease_s
        self.plan: wire.Plan | None = None
        self.errors: deque[wire.ErrorReport] = deque(maxlen=max_errors)
        self.replans: deque[Replan] = deque(maxlen=max_errors)
        self.latencies_ms: deque[float] = deque(maxlen=max_latencies)
        self.metrics: dict[str, wire.Metrics] = {}
        self.errors_seen = 0
        self._nodes: dict[str, _Node] = {}
        # The planner's last PlannerState (birth or death) and when it changed (a will's ts 0: our arrival time).
        self.planner: Any = None
        self.planner_since: float | None = None

    def apply(self, msg: Any, now: float | None = None) -> bool:
        """Fold one decoded message (``now`` = receive time); returns whether it belonged to this view."""
        now = time.time() if now is None else now
        fleet = getattr(msg, "fleet", self.fleet)
        if fleet != self.fleet:
            return False
        match msg:
            case wire.NodeBirth():
                node = self._node(msg.node_id)
                node.birth, node.dead, node.death_reason, node.last_seen = msg, False, "", now
                if node.seq != msg.seq:
                    node.seq, node.history = msg.seq, deque()
            case wire.NodeDeath():
                node = self._node(msg.node_id)
                if node.seq is None or msg.seq >= node.seq:
                    node.dead, node.death_reason = True, msg.reason or "gone"
            case wire.NodeHealth():
                self._apply_health(msg, now)
            case wire.PlannerState():
                if self.planner is None or (msg.planner_id, msg.seq, msg.online) != (
                        self.planner.planner_id, self.planner.seq, self.planner.online):
                    self.planner, self.planner_since = msg, msg.ts or now
            case wire.Metrics():
                self.metrics[msg.node_id] = msg
                if msg.node_id in self._nodes:
                    self._nodes[msg.node_id].last_seen = now
            case wire.Plan():
                old = self.plan
                if old is not None and msg.epoch < old.epoch:
                    return True  # a stale retained plan
                if old is not None and msg.epoch != old.epoch:
                    self.replans.append(Replan(msg.ts, old.epoch, msg.epoch, len(msg.stages), msg.bottleneck_ms))
                self.plan = msg
            case wire.ErrorReport():
                self.errors.append(msg)
                self.errors_seen += 1
            case wire.Result():
                if msg.hops:
                    self.add_latency((msg.hops[-1].send_ts - msg.hops[0].recv_ts) * 1000.0)
            case _:
                return False
        return True

    def apply_payload(self, payload: bytes, now: float | None = None) -> bool:
        """Decode and fold; undecodable payloads are ignored (returns False)."""
        try:
            msg = wire.decode(payload)
        except WireError:
            return False
        return self.apply(msg, now)

    def add_latency(self, latency_ms: float) -> None:
        """Record one end-to-end latency (e.g. ``FrameResult.latency_ms`` on the client)."""
        if math.isfinite(latency_ms) and latency_ms >= 0:
            self.latencies_ms.append(float(latency_ms))

    def node_ids(self) -> list[str]:
        """Ids of every node seen."""
        return sorted(self._nodes)

    def snapshot(self, now: float | None = None) -> FleetSnapshot:
        """Compute all figures at ``now`` (the clock ``apply`` was given)."""
        now = time.time() if now is None else now
        lease = timing.LEASE_S if self.lease_s is None else self.lease_s
        nodes = tuple(self._figures(n, now, lease) for n in sorted(self._nodes.values(), key=lambda n: n.node_id))
        by_id = {n.node_id: n for n in nodes}
        stages = tuple(_stage_figures(st, by_id, self.plan) for st in self.plan.stages) if self.plan else ()
        lat = sorted(self.latencies_ms)
        bottleneck = max(stages, key=lambda s: s.utilisation, default=None)
        predicted = 1000.0 / self.plan.bottleneck_ms if self.plan and self.plan.bottleneck_ms > 0 else None
        calibrated = None
        if self.plan:
            measured = {st.index: [r.compute_ms for r in _replicas(st, by_id)] for st in self.plan.stages}
            period = calibrated_period_ms(self.plan, measured)
            calibrated = 1000.0 / period if period else None
        pipeline = PipelineFigures(
            epoch=self.plan.epoch if self.plan else None,
            throughput_fps=stages[-1].fps_out if stages else 0.0,
            latency_ms_p50=percentile(lat, 50), latency_ms_p90=percentile(lat, 90),
            latency_ms_p99=percentile(lat, 99),
            bottleneck_stage=bottleneck.index if bottleneck and bottleneck.utilisation > 0 else None,
            bottleneck_utilisation=bottleneck.utilisation if bottleneck else 0.0,
            predicted_fps=predicted, nodes_alive=sum(n.alive for n in nodes), calibrated_fps=calibrated,
        )
        extra = {k: dict(m.values) for k, m in self.metrics.items() if k not in self._nodes}
        return FleetSnapshot(self.fleet, now, self.plan, nodes, stages, pipeline, tuple(self.errors),
                             self.errors_seen, tuple(self.replans), extra)

    # -- private -------------------------------------------------------------------------------------

    def _node(self, node_id: str) -> _Node:
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = _Node(node_id)
        return node

    def _apply_health(self, h: wire.NodeHealth, now: float) -> None:
        node = self._node(h.node_id)
        node.last_seen = now
        if node.seq is not None and h.seq != node.seq:
            if h.seq < node.seq:
                return  # health of an older incarnation
            node.history = deque()
        node.seq = h.seq
        if node.dead and node.birth is not None and node.birth.seq == h.seq:
            return  # death was for this incarnation; late health does not resurrect it
        node.dead = False
        _append_health(node.history, h, self.window_s)

    def _figures(self, node: _Node, now: float, lease: float) -> NodeFigures:
        h = node.history[-1] if node.history else None
        pay = metrics_payload(node.history, window_s=self.window_s) if h else {}
        fresh = node.last_seen is not None and now - node.last_seen <= lease
        alive = not node.dead and fresh and (node.birth is not None or h is not None)
        m = self.metrics.get(node.node_id)
        return NodeFigures(
            node_id=node.node_id, alive=alive, last_seen=node.last_seen,
            device_class=node.birth.device_class if node.birth else "?",
            stage=h.stage if h else None, epoch=h.epoch if h else 0, bits=h.bits if h else 32,
            queue_depth=h.queue_depth if h else 0, frames_in=h.frames_in if h else 0,
            frames_out=h.frames_out if h else 0, errors=h.errors if h else 0,
            fps_in=pay.get("fps_in", 0.0), fps_out=pay.get("fps_out", 0.0), load=h.load if h else 0.0,
            compute_ms=h.compute_ms_avg if h else 0.0, transfer_ms=h.transfer_ms_avg if h else 0.0,
            idle_ms=h.idle_ms_avg if h else 0.0, utilisation=pay.get("utilisation", 0.0),
            bubble_ratio=pay.get("bubble_ratio", 0.0),
            bandwidth_mbps=h.bandwidth_mbps_est if h else (node.birth.bandwidth_mbps if node.birth else None),
            death_reason=node.death_reason, metrics=dict(m.values) if m else {},
        )


def metrics_payload(health_history: Iterable[wire.NodeHealth], *, window_s: float | None = None) -> dict[str, float]:
    """The flat ``values`` for ``node/<id>/metrics`` from a node's recent health (oldest first).

    Only the health of the newest incarnation (``seq``) and within ``window_s`` of the newest is used;
    an empty history gives ``{}``.
    """
    hist = list(health_history)
    if not hist:
        return {}
    last = hist[-1]
    usable = [h for h in hist if h.seq == last.seq and (window_s is None or last.ts - h.ts <= window_s)]
    start = 0  # a counter going down means a restart: only use what follows it
    for i in range(1, len(usable)):
        if usable[i].frames_out < usable[i - 1].frames_out or usable[i].frames_in < usable[i - 1].frames_in:
            start = i
    usable = usable[start:]
    first = usable[0]
    span = last.ts - first.ts
    fps_in = (last.frames_in - first.frames_in) / span if span > 0 else 0.0
    fps_out = (last.frames_out - first.frames_out) / span if span > 0 else 0.0
    cycle = last.compute_ms_avg + last.transfer_ms_avg + last.idle_ms_avg
    out: dict[str, float] = {
        "stage": float(-1 if last.stage is None else last.stage), "epoch": float(last.epoch),
        "bits": float(last.bits), "queue_depth": float(last.queue_depth),
        "frames_in_total": float(last.frames_in), "frames_out_total": float(last.frames_out),
        "errors_total": float(last.errors), "window_s": span, "fps_in": fps_in, "fps_out": fps_out,
        "load": last.load, "mem_used_bytes": float(last.mem_used_bytes),
        "compute_ms_avg": last.compute_ms_avg, "transfer_ms_avg": last.transfer_ms_avg,
        "idle_ms_avg": last.idle_ms_avg,
        "utilisation": min(1.0, fps_out * last.compute_ms_avg / 1000.0),
        "bubble_ratio": last.idle_ms_avg / cycle if cycle > 0 else 0.0,
    }
    if last.bandwidth_mbps_est is not None:
        out["bandwidth_mbps_est"] = last.bandwidth_mbps_est
    return out


def pipeline_payload(snapshot: FleetSnapshot) -> dict[str, float]:
    """Flat pipeline and per-stage ``values`` (keys documented above) for a planner's metrics message."""
    p = snapshot.pipeline
    out: dict[str, float] = {
        "pipeline.throughput_fps": p.throughput_fps,
        "pipeline.bottleneck_stage": float(-1 if p.bottleneck_stage is None else p.bottleneck_stage),
        "pipeline.bottleneck_utilisation": p.bottleneck_utilisation,
        "pipeline.epoch": float(-1 if p.epoch is None else p.epoch),
        "pipeline.stages": float(len(snapshot.stages)),
        "pipeline.nodes_alive": float(p.nodes_alive),
    }
    for key, fps in (("predicted_fps", p.predicted_fps), ("calibrated_fps", p.calibrated_fps)):
        if fps is not None:
            out[f"pipeline.{key}"] = fps
    for q, v in (("p50", p.latency_ms_p50), ("p90", p.latency_ms_p90), ("p99", p.latency_ms_p99)):
        if v is not None:
            out[f"pipeline.latency_ms_{q}"] = v
    for s in snapshot.stages:
        vals = (s.utilisation, s.fps_out, s.compute_ms, s.idle_ms, float(s.queue_depth), float(s.bits),
                s.predicted_ms, float(len(s.nodes)))
        out.update({f"stage.{s.index}.{k}": v for k, v in zip(_STAGE_KEYS, vals, strict=True)})
    return out


def calibrated_period_ms(plan: wire.Plan, compute_ms: Mapping[int, Sequence[float]]) -> float | None:
    """The plan's bottleneck with each stage's predicted compute replaced by what its replicas measure.

    ``compute_ms``: stage index -> each replica's measured compute per frame (ms; a replica not measured yet
    is left out, and a stage with none keeps its prediction). Replicas share frames, so a stage's compute
    per frame is ``1 / sum(1 / c)``, as the planner scores it; its period is the larger of that and the
    predicted transfer to the next stage. A stage without the split prediction (``compute_ms == 0``: an
    intra plan, an older planner) counts all of ``predicted_ms`` as compute. None: no stage is measured.

    The ratio of a measured throughput to ``1000 / this`` is what the runtime loses to overheads (codec,
    MQTT, bubbles), free of the profile's error: on a shared host every emulated device runs some 10-30 %
    off the planner's profile, as the host's speed drifts and the nodes contend for its cores.
    """
    worst, any_measured = 0.0, False
    for st in plan.stages:
        measured = [float(c) for c in compute_ms.get(st.index, ()) if c > 0 and math.isfinite(c)]
        split = st.compute_ms > 0 or st.transfer_ms > 0
        compute = st.compute_ms if split else st.predicted_ms
        transfer = st.transfer_ms if split else 0.0
        if measured:
            any_measured = True
            compute = 1.0 / sum(1.0 / c for c in measured)
        worst = max(worst, compute, transfer)
    return worst if any_measured and worst > 0 else None


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of already sorted values, linear interpolation; None if empty."""
    if not sorted_values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True, slots=True)
class RowStats:
    """One timeline row: a (stage, node) pair, with its compute intervals (seconds, wall clock)."""

    stage: int
    node_id: str
    busy: tuple[tuple[float, float], ...]  # merged compute intervals
    waits: tuple[tuple[float, float], ...]  # recv -> compute start (queued, decoding)
    idle: tuple[tuple[float, float], ...]  # gaps without compute inside the window (the bubbles)
    busy_s: float
    frames: int
    compute_ms_avg: float


@dataclass(frozen=True, slots=True)
class HopStats:
    """Exact figures of a recorded window of frames (from their hops)."""

    t0: float
    t1: float
    wall_s: float
    frames: int
    rows: tuple[RowStats, ...]
    stage_utilisation: Mapping[int, float]  # busy / (wall * replicas seen)
    stage_compute_ms: Mapping[int, float]  # mean compute per frame
    stage_transfer_ms: Mapping[int, float]  # mean previous send -> this recv (stage 0: none)
    stage_idle_s: Mapping[int, float]  # summed bubble time over the stage's rows
    predicted_utilisation: Mapping[int, float]  # from the plan: predicted_ms / bottleneck_ms
    latencies_ms: tuple[float, ...]  # per frame: last send - first recv
    throughput_fps: float  # frames / wall_s


def frames_of(results_or_hops: Iterable[Any]) -> list[tuple[wire.Hop, ...]]:
    """Normalise results (anything with ``.hops``), hop sequences or single hops into per-frame hop tuples."""
    frames: list[tuple[wire.Hop, ...]] = []
    for item in results_or_hops:
        if isinstance(item, wire.Hop):
            frames.append((item,))
        elif hasattr(item, "hops"):
            frames.append(tuple(item.hops))
        else:
            frames.append(tuple(item))
    return [f for f in frames if f]


def analyse_hops(results_or_hops: Iterable[Any], plan: wire.Plan | None = None) -> HopStats:
    """Busy, idle, transfer and utilisation per stage from recorded hops (see :func:`frames_of`).

    A hop's compute interval ends at ``send_ts`` and lasts ``compute_ms`` (clamped to start no earlier than
    ``recv_ts``); the time from ``recv_ts`` to compute start is waiting. The window runs from the first
    ``recv_ts`` to the last ``send_ts``; a row's idle time is the part of the window it does not compute.
    """
    frames = frames_of(results_or_hops)
    hops = [h for f in frames for h in f]
    if not hops:
        raise ValueError("no hops to analyse")
    t0 = min(h.recv_ts for h in hops)
    t1 = max(h.send_ts for h in hops)
    wall = t1 - t0
    per_row: dict[tuple[int, str], list[wire.Hop]] = {}
    for h in hops:
        per_row.setdefault((h.stage, h.node_id), []).append(h)
    rows = []
    for (stage, node), hs in sorted(per_row.items()):
        spans = sorted(_compute_span(h) for h in hs)
        busy = _merge(spans)
        idle = _gaps(busy, t0, t1)
        waits = tuple((h.recv_ts, _compute_span(h)[0]) for h in hs if _compute_span(h)[0] > h.recv_ts + _EPS_S)
        rows.append(RowStats(stage, node, tuple(busy), waits, tuple(idle), sum(b - a for a, b in busy), len(hs),
                             sum(h.compute_ms for h in hs) / len(hs)))
    stages = sorted({r.stage for r in rows})
    util = {k: sum(r.busy_s for r in rows if r.stage == k) / (wall * sum(r.stage == k for r in rows))
            if wall > 0 else 0.0 for k in stages}
    comp = {k: _mean([h.compute_ms for h in hops if h.stage == k]) for k in stages}
    transfers: dict[int, list[float]] = {}
    for f in frames:
        for prev, h in itertools.pairwise(f):
            transfers.setdefault(h.stage, []).append((h.recv_ts - prev.send_ts) * 1000.0)
    xfer = {k: _mean(v) for k, v in transfers.items()}
    idle_s = {k: sum(b - a for r in rows if r.stage == k for a, b in r.idle) for k in stages}
    predicted: dict[int, float] = {}
    if plan is not None and plan.stages:
        worst = plan.bottleneck_ms or max(s.predicted_ms for s in plan.stages)
        if worst > 0:
            predicted = {s.index: min(1.0, s.predicted_ms / worst) for s in plan.stages}
    lat = tuple((f[-1].send_ts - f[0].recv_ts) * 1000.0 for f in frames)
    return HopStats(t0, t1, wall, len(frames), tuple(rows), util, comp, xfer, idle_s, predicted, lat,
                    len(frames) / wall if wall > 0 else 0.0)


# ---------------------------------------------------------------------------------------------- private


@dataclass(slots=True)
class _Node:
    node_id: str
    birth: wire.NodeBirth | None = None
    seq: int | None = None
    dead: bool = False
    death_reason: str = ""
    last_seen: float | None = None
    history: deque[wire.NodeHealth] = field(default_factory=deque)


def _append_health(history: deque[wire.NodeHealth], h: wire.NodeHealth, window_s: float) -> None:
    if history and h.ts < history[-1].ts:
        return  # out of order (QoS 0 after a reconnect): keep the newest
    history.append(h)
    while len(history) > 2 and h.ts - history[0].ts > window_s:
        history.popleft()


def _replicas(st: wire.PlanStage, nodes: Mapping[str, NodeFigures]) -> list[NodeFigures]:
    """The stage's nodes that are alive and running it."""
    return [nodes[n] for n in st.nodes if n in nodes and nodes[n].stage == st.index and nodes[n].alive]


def _stage_figures(st: wire.PlanStage, nodes: Mapping[str, NodeFigures], plan: wire.Plan | None) -> StageFigures:
    reps = _replicas(st, nodes)
    worst = (plan.bottleneck_ms or max(s.predicted_ms for s in plan.stages)) if plan else 0.0
    bws = [r.bandwidth_mbps for r in reps if r.bandwidth_mbps is not None]
    return StageFigures(
        index=st.index, nodes=st.nodes, alive=sum(1 for n in st.nodes if n in nodes and nodes[n].alive),
        predicted_ms=st.predicted_ms,
        predicted_utilisation=min(1.0, st.predicted_ms / worst) if worst > 0 else 0.0,
        bits=max((r.bits for r in reps), default=st.bits),
        frames_in=sum(r.frames_in for r in reps), frames_out=sum(r.frames_out for r in reps),
        queue_depth=sum(r.queue_depth for r in reps), errors=sum(r.errors for r in reps),
        fps_out=sum(r.fps_out for r in reps), compute_ms=_mean([r.compute_ms for r in reps]),
        transfer_ms=_mean([r.transfer_ms for r in reps]), idle_ms=_mean([r.idle_ms for r in reps]),
        utilisation=_mean([r.utilisation for r in reps]), bandwidth_mbps=min(bws) if bws else None,
    )


def _compute_span(h: wire.Hop) -> tuple[float, float]:
    return (max(h.recv_ts, h.send_ts - h.compute_ms / 1000.0), h.send_ts)


def _merge(spans: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in spans:
        if out and a <= out[-1][1] + _EPS_S:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _gaps(busy: Sequence[tuple[float, float]], t0: float, t1: float) -> list[tuple[float, float]]:
    out, cur = [], t0
    for a, b in busy:
        if a > cur + _EPS_S:
            out.append((cur, a))
        cur = max(cur, b)
    if t1 > cur + _EPS_S:
        out.append((cur, t1))
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
