"""``fleetpipe ha-discovery``: Home Assistant MQTT discovery configs so node health shows up in HA.

For every node with a retained birth, one sensor per health field is published retained at
``<prefix>/sensor/<object_id>/config`` with ``object_id = fleetpipe_<fleet>_<node>_<field>``. The sensors
read the node's JSON health topic directly (``value_template``), and the node's retained state topic tells
HA whether the node is available (birth = online, death = offline), so nothing else has to publish for HA.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from typing import Any

from fleetpipe import topics
from fleetpipe.metrics import FleetView

__all__ = ["HA_FIELDS", "discovery_configs", "run_ha"]

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
_OBJECT = re.compile(r"[^A-Za-z0-9_-]")


def discovery_configs(fleet: str, node_id: str, device_class: str = "", prefix: str = "homeassistant",
                      ) -> list[tuple[str, dict[str, Any]]]:
    """(config topic, config payload) for each sensor of one node."""
    if not prefix or any(c in prefix for c in "+#\x00") or prefix.endswith("/"):
        raise ValueError(f"invalid discovery prefix {prefix!r}")
    device = {"identifiers": [f"fleetpipe_{fleet}_{node_id}"], "name": f"fleetpipe {node_id}",
              "manufacturer": "fleetpipe", "model": device_class or "node"}
    out = []
    for field, (name, unit, dev_class, state_class) in HA_FIELDS.items():
        object_id = _OBJECT.sub("_", f"fleetpipe_{fleet}_{node_id}_{field}")
        cfg: dict[str, Any] = {
            "name": name, "unique_id": object_id, "object_id": object_id,
            "state_topic": topics.node_health(fleet, node_id),
            "value_template": f"{{{{ value_json.{field} }}}}",
            "availability_topic": topics.node_state(fleet, node_id),
            "availability_template": "{{ 'online' if value_json.type == 'node_birth' else 'offline' }}",
            "expire_after": 30, "device": device,
        }
        for k, v in (("unit_of_measurement", unit), ("device_class", dev_class), ("state_class", state_class)):
            if v is not None:
                cfg[k] = v
        out.append((f"{prefix}/sensor/{object_id}/config", cfg))
    return out


def run_ha(args: argparse.Namespace) -> int:
    """The ``ha-discovery`` subcommand: publish (or remove) configs for every node seen, then exit."""
    try:
        n = asyncio.run(_publish(args.broker, args.fleet, args.seconds, args.prefix, remove=args.remove))
    except KeyboardInterrupt:
        return 130
    if n == 0:
        print(f"no nodes seen in fleet {args.fleet!r}", file=sys.stderr)
        return 1
    print(f"{'removed' if args.remove else 'published'} discovery configs for {n} node(s)")
    return 0


# ---------------------------------------------------------------------------------------------- private


async def _publish(url: Any, fleet: str, seconds: float, prefix: str, *, remove: bool) -> int:
    from fleetpipe.observe._collect import open_bus, watch

    view = FleetView(fleet)
    await watch(url, view, seconds=seconds)
    snap = view.snapshot()
    async with open_bus(url, "ha") as bus:
        for n in snap.nodes:
            for topic, cfg in discovery_configs(fleet, n.node_id, n.device_class, prefix):
                payload = b"" if remove else json.dumps(cfg).encode()
                await bus.publish(topic, payload, qos=1, retain=True)
    return len(snap.nodes)
