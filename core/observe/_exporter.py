"""``fleetpipe exporter``: a Prometheus endpoint whose values are computed from the fleet's MQTT telemetry.

Metrics (labels: ``fleet``, plus ``node`` and ``stage`` where they apply; ``stage`` is "" for an idle node)::

    fleetpipe_node_up, fleetpipe_node_frames_in_total, fleetpipe_node_frames_out_total,
    fleetpipe_node_errors_total, fleetpipe_node_queue_depth, fleetpipe_node_fps_out, fleetpipe_node_compute_ms,
    fleetpipe_node_transfer_ms, fleetpipe_node_idle_ms, fleetpipe_node_utilisation, fleetpipe_node_bubble_ratio,
    fleetpipe_node_bits, fleetpipe_node_bandwidth_mbps, fleetpipe_node_load, fleetpipe_node_seen_age_seconds,
    fleetpipe_node_metric{key}                  every value of node/<id>/metrics (and of non-node publishers)
    fleetpipe_stage_utilisation, fleetpipe_stage_predicted_utilisation, fleetpipe_stage_fps_out,
    fleetpipe_stage_compute_ms, fleetpipe_stage_predicted_ms, fleetpipe_stage_idle_ms, fleetpipe_stage_queue_depth,
    fleetpipe_stage_replicas, fleetpipe_stage_bits
    fleetpipe_pipeline_throughput_fps, fleetpipe_pipeline_latency_ms{quantile},
    fleetpipe_pipeline_bottleneck_utilisation, fleetpipe_plan_epoch, fleetpipe_replans_total, fleetpipe_errors_total

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
    """A prometheus_client collector over a :class:`FleetView` (register it in a ``CollectorRegistry``)."""

    def __init__(self, view: FleetView, lock: threading.Lock, clock: Callable[[], float] = time.time) -> None:
        self.view = view
        self.lock = lock
        self.clock = clock

    def collect(self) -> Iterator[Any]:
        """Yield the metric families (called by prometheus_client on every scrape)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self.lock:
            snap = self.view.snapshot(self.clock())
        fleet = snap.fleet
        nl = ["fleet", "node", "stage"]

        def gauge(name: str, doc: str, labels: list[str]) -> Any:
            return GaugeMetricFamily(f"fleetpipe_{name}", doc, labels=labels)

        node_gauges = {
            "up": ("1 if the node is alive (birth, no death, health within the lease)", lambda n: float(n.alive)),
            "queue_depth": ("frames waiting at the node", lambda n: n.queue_depth),
            "fps_out": ("frames per second sent on", lambda n: n.fps_out),
            "compute_ms": ("mean compute time per frame (ms)", lambda n: n.compute_ms),
            "transfer_ms": ("mean send time per frame (ms)", lambda n: n.transfer_ms),
            "idle_ms": ("mean wait for work per frame (ms): the bubble", lambda n: n.idle_ms),
            "utilisation": ("share of time computing (fps_out * compute)", lambda n: n.utilisation),
            "bubble_ratio": ("idle / (compute + transfer + idle)", lambda n: n.bubble_ratio),
            "bits": ("activation bit-width in use", lambda n: n.bits),
            "load": ("1-minute load average", lambda n: n.load),
        }
        fams = {k: gauge(f"node_{k}", doc, nl) for k, (doc, _) in node_gauges.items()}
        counters = {k: CounterMetricFamily(f"fleetpipe_node_{k}", doc, labels=nl) for k, doc in
                    (("frames_in", "frames received"), ("frames_out", "frames sent on"), ("errors", "node errors"))}
        bw = gauge("node_bandwidth_mbps", "estimated outbound bandwidth (Mbit/s)", nl)
        age = gauge("node_seen_age_seconds", "seconds since the last message from the node", nl)
        metric = gauge("node_metric", "values published on node/<id>/metrics", ["fleet", "node", "key"])
        for n in snap.nodes:
            labels = [fleet, n.node_id, "" if n.stage is None else str(n.stage)]
            for k, (_, get) in node_gauges.items():
                fams[k].add_metric(labels, float(get(n)))
            counters["frames_in"].add_metric(labels, n.frames_in)
            counters["frames_out"].add_metric(labels, n.frames_out)
            counters["errors"].add_metric(labels, n.errors)
            if n.bandwidth_mbps is not None:
                bw.add_metric(labels, n.bandwidth_mbps)
            if n.last_seen is not None:
                age.add_metric(labels, max(0.0, snap.now - n.last_seen))
            for key, v in sorted(n.metrics.items()):
                metric.add_metric([fleet, n.node_id, key], v)
        for source, values in sorted(snap.extra_metrics.items()):
            for key, v in sorted(values.items()):
                metric.add_metric([fleet, source, key], v)
        yield from fams.values()
        yield from counters.values()
        yield from (bw, age, metric)

        sl = ["fleet", "stage"]
        stage_gauges = {
            "utilisation": ("measured utilisation, mean over replicas", lambda s: s.utilisation),
            "predicted_utilisation": ("predicted_ms / plan bottleneck_ms", lambda s: s.predicted_utilisation),
            "fps_out": ("frames per second out of the stage", lambda s: s.fps_out),
            "compute_ms": ("mean measured compute per frame (ms)", lambda s: s.compute_ms),
            "predicted_ms": ("planned time per frame (ms)", lambda s: s.predicted_ms),
            "idle_ms": ("mean wait for work per frame (ms)", lambda s: s.idle_ms),
            "queue_depth": ("frames waiting at the stage", lambda s: s.queue_depth),
            "replicas": ("nodes assigned to the stage", lambda s: len(s.nodes)),
            "bits": ("activation bit-width in use", lambda s: s.bits),
        }
        sfams = {k: gauge(f"stage_{k}", doc, sl) for k, (doc, _) in stage_gauges.items()}
        for s in snap.stages:
            for k, (_, get) in stage_gauges.items():
                sfams[k].add_metric([fleet, str(s.index)], float(get(s)))
        yield from sfams.values()

        p = snap.pipeline
        g = gauge("pipeline_throughput_fps", "frames per second out of the last stage", ["fleet"])
        g.add_metric([fleet], p.throughput_fps)
        yield g
        g = gauge("pipeline_latency_ms", "in-pipeline latency percentiles over recent results", ["fleet", "quantile"])
        for q, v in (("0.5", p.latency_ms_p50), ("0.9", p.latency_ms_p90), ("0.99", p.latency_ms_p99)):
            if v is not None:
                g.add_metric([fleet, q], v)
        yield g
        g = gauge("pipeline_bottleneck_utilisation", "utilisation of the busiest stage", ["fleet"])
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
    registry.register(FleetCollector(view, lock))
    server, thread = start_http_server(port, addr=bind, registry=registry)
    if listening is not None:
        listening()
    try:
        await watch(url, view, stop=stop, results=results, lock=lock, subscribed=started)
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
