"""Describe a fleet in TOML for ``fleetpipe plan --model FILE --fleet FLEET.toml``.

    [[device]]
    name = "pi-1"
    class = "rpi4"            # an emulation class (its compute factor vs this host), or:
    # factor = 4.0            # how many times slower than this host
    # speed_gflops = 12.5     # the figure `fleetpipe node` reports (measured with the same benchmark)
    mem_bytes = 4_000_000_000 # default: the class's memory
    bandwidth_mbps = 940      # NIC; a link is min(nic_a, nic_b)

    [links]                   # optional, overrides the NIC rule per direction
    "pi-1 -> pi-2" = 300

Per-layer times come from profiling the model on this host, scaled by each device's factor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fleetpipe._compat import tomllib
from fleetpipe.errors import ConfigError

__all__ = ["DeviceSpec", "FleetFile", "load_fleet", "problem_for"]


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One described device; quacks like a node's birth for the planner's problem builder."""

    node_id: str
    device_class: str
    emulate_factor: float
    speed: float
    mem_bytes: int
    bandwidth_mbps: float | None


@dataclass(frozen=True, slots=True)
class FleetFile:
    """Devices plus per-direction link overrides (Mbit/s)."""

    devices: tuple[DeviceSpec, ...]
    links: dict[tuple[str, str], float]


_DEVICE_KEYS = frozenset({"name", "class", "factor", "speed_gflops", "mem_bytes", "bandwidth_mbps"})


def load_fleet(path: str | Path) -> FleetFile:
    """Parse a fleet TOML file; ConfigError names what is wrong."""
    from fleetpipe.node.emulate import CLASSES

    try:
        doc = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read fleet file {path}: {exc}") from exc
    unknown = sorted(set(doc) - {"device", "links"})
    if unknown:
        raise ConfigError(f"{path}: unknown setting {unknown[0]!r} (known: [[device]], [links])")
    raw = doc.get("device", [])
    if not raw or not isinstance(raw, list):
        raise ConfigError(f"{path}: no [[device]] entries")
    devices = []
    for i, d in enumerate(raw):
        bad = sorted(set(d) - _DEVICE_KEYS)
        if bad:
            known = ", ".join(sorted(_DEVICE_KEYS))
            raise ConfigError(f"{path}: device {i}: unknown setting {bad[0]!r} (known: {known})")
        name = str(d.get("name", f"device{i}"))
        cls = CLASSES.get(str(d.get("class", "host")))
        if cls is None:
            raise ConfigError(f"{path}: device {name}: unknown class {d.get('class')!r} ({', '.join(CLASSES)})")
        factor = float(d.get("factor", cls.compute_factor))
        devices.append(DeviceSpec(
            node_id=name, device_class=cls.name, emulate_factor=factor if "speed_gflops" not in d else 1.0,
            speed=float(d.get("speed_gflops", 0.0)), mem_bytes=int(d.get("mem_bytes", cls.mem_bytes or 1 << 40)),
            bandwidth_mbps=float(d.get("bandwidth_mbps", cls.bandwidth_mbps or 1000.0))))
    names = [d.node_id for d in devices]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: device names must be unique")
    links: dict[tuple[str, str], float] = {}
    for key, value in doc.get("links", {}).items():
        a, sep, b = key.partition("->")
        a, b = a.strip(), b.strip()
        if not sep or a not in names or b not in names:
            raise ConfigError(f"{path}: link {key!r} must be 'A -> B' with known device names")
        links[(a, b)] = float(value)
    return FleetFile(tuple(devices), links)


def problem_for(model: Any, fleet: FleetFile, bits: int = 32) -> Any:
    """The planner Problem for a profiled model (``loop.ModelInfo``) on a described fleet."""
    from fleetpipe.planner.loop import build_problem

    nodes = {d.node_id: _View(d) for d in fleet.devices}
    problem = build_problem(model, nodes, bits)
    if not fleet.links:
        return problem
    bw = np.array(problem.bw_mbps, dtype=np.float64)
    index = {n: i for i, n in enumerate(problem.device_names)}
    for (a, b), mbps in fleet.links.items():
        bw[index[a], index[b]] = mbps
    import dataclasses

    return dataclasses.replace(problem, bw_mbps=bw)


@dataclass(frozen=True, slots=True)
class _View:
    birth: DeviceSpec
