"""``fleetpipe exporter``: a Prometheus endpoint whose values are computed from the fleet's MQTT telemetry.

Metrics, by Prometheus' conventions (base units: seconds, bytes; counters end in ``_total``; labels ``fleet``,
plus ``node`` or ``stage``; no label that changes on a re-plan sits on a node's series)::

    fleetpipe_exporter_broker_up                     1 while this exporter is connected to the broker
    fleetpipe_node_up, fleetpipe_node_stage, fleetpipe_node_frames_in_total, fleetpipe_node_frames_out_total,
    fleetpipe_node_errors_total, fleetpipe_node_queue_depth, fleetpipe_node_output_frames_per_second,
    fleetpipe_node_{compute,transfer,idle}_seconds, fleetpipe_node_utilisation_ratio, fleetpipe_node_bubble_ratio,
    fleetpipe_node_activation_bit_width, fleetpipe_node_bandwidth_bytes_per_second, fleetpipe_node_load1,
    fleetpipe_node_seen_age_seconds
    fleetpipe_stage_utilisation_ratio, fleetpipe_stage_predicted_utilisation_ratio,
    fleetpipe_stage_output_frames_per_second, fleetpipe_stage_{compute,predicted,idle}_seconds,
    fleetpipe_stage_queue_depth, fleetpipe_stage_replicas, fleetpipe_stage_activation_bit_width
    fleetpipe_pipeline_output_frames_per_second, fleetpipe_pipeline_latency_{p50,p90,p99}_seconds,
    fleetpipe_pipeline_bottleneck_utilisation_ratio, fleetpipe_plan_epoch, fleetpipe_replans_total,
    fleetpipe_errors_total

Values are computed at scrape time from a :class:`~fleetpipe.metrics.FleetView` snapshot, under a lock shared
with the MQTT loop (the HTTP server answers in its own daemon threads).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from fleetpipe.config import BrokerConfig
from fleetpipe.metrics import FleetView

__all__ = ["FleetCollector", "run_exporter", "serve_exporter"]


class FleetCollector:
    """A prometheus_client collector over a :class:`FleetView` (register it in a ``CollectorRegistry``).

    ``broker_up`` says whether the exporter's own MQTT connection is up (``fleetpipe_exporter_broker_up``):
    without it a dead broker looks like a fleet whose nodes all went down.
    """

    def __init__(self, view: FleetView, lock: threading.Lock, clock: Callable[[], float] = time.time,
                 broker_up: Callable[[], bool] | None = None) -> None:
        self.view = view
        self.lock = lock
        self.clock = clock
        self.broker_up = broker_up

    def collect(self) -> Iterator[Any]:
        """Yield the metric families (called by prometheus_client on every scrape)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self.lock:
            snap = self.view.snapshot(self.clock())
        fleet = snap.fleet

        def gauge(name: str, doc: str, labels: list[str]) -> Any:
            return GaugeMetricFamily(f"fleetpipe_{name}", doc, labels=labels)

        if self.broker_up is not None:
            g = gauge("exporter_broker_up", "1 if this exporter is connected to the fleet's MQTT broker", ["fleet"])
            g.add_metric([fleet], float(self.broker_up()))
            yield g
        # Node families carry fleet and node only: a label that changes on every re-plan (the stage) would start a
        # new series each time; the node's stage is a value of its own (fleetpipe_node_stage, -1 when idle).
        nl = ["fleet", "node"]
        node_gauges = {
            "up": ("1 if the node is alive (birth, no death, health within the lease)", lambda n: float(n.alive)),
            "stage": ("pipeline stage the node runs (-1: none)", lambda n: -1.0 if n.stage is None else n.stage),
            "queue_depth": ("frames waiting at the node", lambda n: n.queue_depth),
            "output_frames_per_second": ("frames per second sent on", lambda n: n.fps_out),
            "compute_seconds": ("mean compute time per frame", lambda n: n.compute_ms / 1e3),
            "transfer_seconds": ("mean send time per frame", lambda n: n.transfer_ms / 1e3),
            "idle_seconds": ("mean wait for work per frame: the bubble", lambda n: n.idle_ms / 1e3),
            "utilisation_ratio": ("share of time computing (frames out per second * compute)", lambda n: n.utilisation),
            "bubble_ratio": ("idle / (compute + transfer + idle)", lambda n: n.bubble_ratio),
            "activation_bit_width": ("activation bit-width in use", lambda n: n.bits),
            "load1": ("1-minute load average", lambda n: n.load),
        }
        fams = {k: gauge(f"node_{k}", doc, nl) for k, (doc, _) in node_gauges.items()}
        counters = {k: CounterMetricFamily(f"fleetpipe_node_{k}", doc, labels=nl) for k, doc in
                    (("frames_in", "frames received"), ("frames_out", "frames sent on"), ("errors", "node errors"))}
        bw = gauge("node_bandwidth_bytes_per_second", "estimated outbound bandwidth", nl)
        age = gauge("node_seen_age_seconds", "seconds since the last message from the node", nl)
        for n in snap.nodes:
            labels = [fleet, n.node_id]
            for k, (_, get) in node_gauges.items():
                fams[k].add_metric(labels, float(get(n)))
            counters["frames_in"].add_metric(labels, n.frames_in)
            counters["frames_out"].add_metric(labels, n.frames_out)
            counters["errors"].add_metric(labels, n.errors)
            if n.bandwidth_mbps is not None:
                bw.add_metric(labels, n.bandwidth_mbps * 1e6 / 8)
            if n.last_seen is not None:
                age.add_metric(labels, max(0.0, snap.now - n.last_seen))
        yield from fams.values()
        yield from counters.values()
        yield from (bw, age)

        sl = ["fleet", "stage"]
        stage_gauges = {
            "utilisation_ratio": ("measured utilisation, mean over replicas", lambda s: s.utilisation),
            "predicted_utilisation_ratio": ("predicted time / plan bottleneck", lambda s: s.predicted_utilisation),
            "output_frames_per_second": ("frames per second out of the stage", lambda s: s.fps_out),
            "compute_seconds": ("mean measured compute per frame", lambda s: s.compute_ms / 1e3),
            "predicted_seconds": ("planned time per frame", lambda s: s.predicted_ms / 1e3),
            "idle_seconds": ("mean wait for work per frame", lambda s: s.idle_ms / 1e3),
            "queue_depth": ("frames waiting at the stage", lambda s: s.queue_depth),
            "replicas": ("nodes assigned to the stage", lambda s: len(s.nodes)),
            "activation_bit_width": ("activation bit-width in use", lambda s: s.bits),
        }
        sfams = {k: gauge(f"stage_{k}", doc, sl) for k, (doc, _) in stage_gauges.items()}
        for s in snap.stages:
            for k, (_, get) in stage_gauges.items():
                sfams[k].add_metric([fleet, str(s.index)], float(get(s)))
        yield from sfams.values()

        p = snap.pipeline
        g = gauge("pipeline_output_frames_per_second", "frames per second out of the last stage", ["fleet"])
        g.add_metric([fleet], p.throughput_fps)
        yield g
        for pct, v in (("p50", p.latency_ms_p50), ("p90", p.latency_ms_p90), ("p99", p.latency_ms_p99)):
            g = gauge(f"pipeline_latency_{pct}_seconds", f"in-pipeline latency, {pct} over recent results", ["fleet"])
            if v is not None:
                g.add_metric([fleet], v / 1e3)
            yield g
        g = gauge("pipeline_bottleneck_utilisation_ratio", "utilisation of the busiest stage", ["fleet"])
        g.add_metric([fleet], p.bottleneck_utilisation)
        yield g
        if p.epoch is not None:
            g = gauge("plan_epoch", "epoch of the current plan", ["fleet"])
            g.add_metric([fleet], p.epoch)
            yield g
        c = CounterMetricFamily("fleetpipe_replans", "plan epoch changes seen", labels=["fleet"])
        c.add_metric([fleet], len(snap.replans))
        yield c
        c = CounterMetricFamily("fleetpipe_errors", "error reports seen on the error topic", labels=["fleet"])
        c.add_metric([fleet], snap.errors_seen)
        yield c


async def serve_exporter(url: str | BrokerConfig, fleet: str, port: int, bind: str = "127.0.0.1", *,
                         stop: asyncio.Event | None = None, started: asyncio.Event | None = None,
                         results: bool = True, listening: Callable[[], None] | None = None) -> None:
    """Serve ``/metrics`` on ``bind:port`` while folding the fleet's telemetry, until ``stop`` is set.

    ``listening`` is called once the HTTP port is bound (OSError before that: the port is taken)."""
    from prometheus_client import CollectorRegistry, start_http_server

    from fleetpipe.observe._collect import watch

    view = FleetView(fleet)
    lock = threading.Lock()
    registry = CollectorRegistry(auto_describe=False)
    buses: list[Any] = []
    registry.register(FleetCollector(view, lock, broker_up=lambda: bool(buses) and bool(buses[0].connected)))
    server, thread = start_http_server(port, addr=bind, registry=registry)
    if listening is not None:
        listening()
    try:
        await watch(url, view, stop=stop, results=results, lock=lock, subscribed=started, on_bus=buses.append)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def run_exporter(args: argparse.Namespace) -> int:
    """The ``exporter`` subcommand: runs until SIGINT/SIGTERM."""
    try:
        import prometheus_client  # noqa: F401
    except ModuleNotFoundError:
        print("fleetpipe exporter needs prometheus-client: pip install 'fleetpipe[observe]'", file=sys.stderr)
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await serve_exporter(args.broker, args.fleet, args.port, args.bind, stop=stop, listening=lambda: print(
            f"serving http://{args.bind}:{args.port}/metrics for fleet {args.fleet!r}", file=sys.stderr))

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        return 130
    except OSError as exc:  # the port is taken, or the address is not this host's
        print(f"fleetpipe exporter: cannot serve on {args.bind}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0
