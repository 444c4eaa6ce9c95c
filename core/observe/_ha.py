"""``fleetpipe ha-discovery``: Home Assistant MQTT discovery configs so the fleet shows up in HA.

For every node with a retained birth, one sensor per health field is published retained at
``<prefix>/sensor/<id>/config`` with ``id = fleetpipe_<fleet>_<node>_<field>`` (today's schema:
``default_entity_id = sensor.<id>``, not the deprecated ``object_id``; an ``origin`` block naming fleetpipe). The
sensors read the node's JSON health topic directly (``value_template``), and the node's retained state topic tells
HA whether the node is available (birth = online, death = offline), so nothing else has to publish for HA.
A *pipeline* device reads the planner's metrics (throughput, latency, bottleneck stage and utilisation).

The command keeps running: a node that joins later gets its configs when its birth arrives; a node that is removed
(its retained state cleared, or dead for ``--forget-after`` seconds) has its configs deleted (empty retained
publishes), so HA drops its entities. ``--once`` publishes for the nodes seen within ``--seconds`` and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import sys
import time
from typing import Any

from fleetpipe import __version__, topics, wire
from fleetpipe.errors import DecodeError
from fleetpipe.metrics import FleetView

__all__ = ["HA_FIELDS", "PIPELINE_FIELDS", "discovery_configs", "pipeline_configs", "run_ha"]

#: health field -> (name, unit, device_class, state_class)
HA_FIELDS: dict[str, tuple[str, str | None, str | None, str | None]] = {
    "load": ("load", None, None, "measurement"),
    "queue_depth": ("queue depth", "frames", None, "measurement"),
    "frames_out": ("frames out", "frames", None, "total_increasing"),
    "errors": ("errors", None, None, "total_increasing"),
    "compute_ms_avg": ("compute time", "ms", "duration", "measurement"),
    "idle_ms_avg": ("idle time", "ms", "duration", "measurement"),
    "bits": ("bit-width", "bit", None, "measurement"),
    "stage": ("stage", None, None, None),
    "mem_used_bytes": ("memory used", "B", "data_size", "measurement"),
}
#: planner metrics key -> (name, unit, device_class, state_class)
PIPELINE_FIELDS: dict[str, tuple[str, str | None, str | None, str | None]] = {
    "pipeline.throughput_fps": ("throughput", "frames/s", None, "measurement"),
    "pipeline.latency_ms_p50": ("latency p50", "ms", "duration", "measurement"),
    "pipeline.latency_ms_p90": ("latency p90", "ms", "duration", "measurement"),
    "pipeline.bottleneck_stage": ("bottleneck stage", None, None, None),
    "pipeline.bottleneck_utilisation": ("bottleneck utilisation", None, None, "measurement"),
    "pipeline.nodes_alive": ("nodes alive", None, None, "measurement"),
}
ORIGIN = {"name": "fleetpipe", "sw_version": __version__, "support_url": "https://github.com/fleetpipe/fleetpipe"}
_OBJECT = re.compile(r"[^A-Za-z0-9_]")


def discovery_configs(fleet: str, node_id: str, device_class: str = "", prefix: str = "homeassistant",
                      ) -> list[tuple[str, dict[str, Any]]]:
    """(config topic, config payload) for each sensor of one node."""
    _check_prefix(prefix)
    device = {"identifiers": [f"fleetpipe_{fleet}_{node_id}"], "name": f"fleetpipe {node_id}",
              "manufacturer": "fleetpipe", "model": device_class or "node",
              "via_device": f"fleetpipe_{fleet}_pipeline"}
    common = {"state_topic": topics.node_health(fleet, node_id),
              "availability_topic": topics.node_state(fleet, node_id),
              "availability_template": "{{ 'online' if value_json.type == 'node_birth' else 'offline' }}",
              "expire_after": 30, "device": device}
    return [_sensor(prefix, f"fleetpipe_{fleet}_{node_id}_{field}", spec, f"{{{{ value_json.{field} }}}}", common)
            for field, spec in HA_FIELDS.items()]


def pipeline_configs(fleet: str, prefix: str = "homeassistant") -> list[tuple[str, dict[str, Any]]]:
    """(config topic, config payload) for each sensor of the fleet's pipeline device (the planner's metrics)."""
    _check_prefix(prefix)
    device = {"identifiers": [f"fleetpipe_{fleet}_pipeline"], "name": f"fleetpipe {fleet} pipeline",
              "manufacturer": "fleetpipe", "model": "pipeline"}
    # ``values`` is also a method name in HA's templates: index it, do not use the attribute.
    common = {"state_topic": topics.node_metrics(fleet, "planner"), "expire_after": 30, "device": device}
    return [_sensor(prefix, f"fleetpipe_{fleet}_pipeline_{key.split('.', 1)[1]}", spec,
                    f"{{{{ value_json['values']['{key}'] }}}}", common) for key, spec in PIPELINE_FIELDS.items()]


def run_ha(args: argparse.Namespace) -> int:
    """The ``ha-discovery`` subcommand: follow the fleet (or, with ``--once``/``--remove``, publish and exit)."""
    try:
        if args.once or args.remove:
            n = asyncio.run(_publish(args.broker, args.fleet, args.seconds, args.prefix, remove=args.remove))
        else:
            return asyncio.run(_follow(args.broker, args.fleet, args.prefix, args.forget_after))
    except KeyboardInterrupt:
        return 130
    if n == 0:
        print(f"no nodes seen in fleet {args.fleet!r}", file=sys.stderr)
        return 1
    print(f"{'removed' if args.remove else 'published'} discovery configs for {n} node(s)")
    return 0


# ---------------------------------------------------------------------------------------------- private


def _check_prefix(prefix: str) -> None:
    if not prefix or any(c in prefix for c in "+#\x00") or prefix.endswith("/"):
        raise ValueError(f"invalid discovery prefix {prefix!r}")


def _sensor(prefix: str, ident: str, spec: tuple[str, str | None, str | None, str | None], template: str,
            common: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    ident = _OBJECT.sub("_", ident)
    name, unit, dev_class, state_class = spec
    cfg: dict[str, Any] = {"name": name, "unique_id": ident, "default_entity_id": f"sensor.{ident}",
                           "value_template": template, "origin": ORIGIN, **common}
    for k, v in (("unit_of_measurement", unit), ("device_class", dev_class), ("state_class", state_class)):
        if v is not None:
            cfg[k] = v
    return f"{prefix}/sensor/{ident}/config", cfg


async def _publish(url: Any, fleet: str, seconds: float, prefix: str, *, remove: bool) -> int:
    from fleetpipe.observe._collect import open_bus, watch

    view = FleetView(fleet)
    await watch(url, view, seconds=seconds)
    snap = view.snapshot()
    async with open_bus(url, "ha") as bus:
        configs = [c for n in snap.nodes for c in discovery_configs(fleet, n.node_id, n.device_class, prefix)]
        for topic, cfg in configs + pipeline_configs(fleet, prefix):
            payload = b"" if remove else json.dumps(cfg).encode()
            await bus.publish(topic, payload, qos=1, retain=True)
    return len(snap.nodes)


async def _follow(url: Any, fleet: str, prefix: str, forget_after_s: float) -> int:
    """Keep HA's configs in step with the fleet until SIGTERM/SIGINT."""
    from fleetpipe.observe._collect import open_bus

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    published: dict[str, list[str]] = {}  # node -> its config topics
    dead_since: dict[str, float] = {}
    async with open_bus(url, "ha") as bus:
        await bus.subscribe(topics.NODE_STATE.filter(fleet=fleet), qos=1)
        for topic, cfg in pipeline_configs(fleet, prefix):
            await bus.publish(topic, json.dumps(cfg).encode(), qos=1, retain=True)
        print(f"following fleet {fleet!r} for Home Assistant (prefix {prefix!r})", file=sys.stderr)
        it = bus.messages().__aiter__()
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                nxt = asyncio.ensure_future(it.__anext__())
                done, _ = await asyncio.wait({nxt, stopper}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                if nxt in done:
                    try:
                        message = nxt.result()
                    except StopAsyncIteration:
                        break
                    node = topics.parse(message.topic)[1]["node_id"]
                    msg = _decode(message.payload)
                    if isinstance(msg, wire.NodeBirth) and node not in published:
                        configs = discovery_configs(fleet, node, msg.device_class, prefix)
                        for topic, cfg in configs:
                            await bus.publish(topic, json.dumps(cfg).encode(), qos=1, retain=True)
                        published[node] = [t for t, _ in configs]
                    if isinstance(msg, wire.NodeBirth):
                        dead_since.pop(node, None)
                    elif isinstance(msg, wire.NodeDeath):
                        dead_since.setdefault(node, time.monotonic())
                    elif not message.payload:  # the node's retained state was cleared: it is gone
                        dead_since[node] = -float("inf")
                else:
                    nxt.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await nxt
                now = time.monotonic()
                for node in [n for n, t in dead_since.items() if now - t >= forget_after_s and n in published]:
                    for topic in published.pop(node):
                        await bus.publish(topic, b"", qos=1, retain=True)
                    del dead_since[node]
        finally:
            stopper.cancel()
    return 0


def _decode(payload: bytes) -> Any:
    if not payload:
        return None
    try:
        return wire.decode(payload)
    except (DecodeError, ValueError):  # someone else's message on our topic: not ours to act on
        return None
