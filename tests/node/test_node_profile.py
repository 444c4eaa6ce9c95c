"""Capability probe and speed benchmark."""

from __future__ import annotations

import platform

from fleetpipe.node.emulate import CLASSES, parse_emulate
from fleetpipe.node.profile import host_cores, host_mem_bytes, measure_speed, probe_capability
from fleetpipe.node.runtime import available_runtimes


def test_probe_capability_fields_are_sane() -> None:
    cap = probe_capability()
    assert cap["arch"] == platform.machine()
    assert 1 <= cap["cores"] <= 4096
    assert cap["mem_bytes"] > 64 * 2**20
    assert cap["runtimes"] == list(available_runtimes())
    assert "CPUExecutionProvider" in cap["providers"]
    assert cap["emulated"] is None and cap["compute_factor"] == 1.0


def test_probe_capability_when_emulating() -> None:
    cap = probe_capability(["fake"], device=CLASSES["rpi3"])
    assert cap["runtimes"] == ["fake"]
    assert cap["mem_bytes"] == CLASSES["rpi3"].mem_bytes
    assert cap["cores"] == min(host_cores(), 4)
    assert (cap["emulated"], cap["compute_factor"], cap["bandwidth_mbps"]) == (
        "rpi3", CLASSES["rpi3"].compute_factor, 94.0)
    plain = probe_capability(device=parse_emulate("2.5"))
    assert plain["mem_bytes"] == host_mem_bytes()


def test_measure_speed_is_positive_and_divided_by_factor() -> None:
    fast = measure_speed(0.05)
    slow = measure_speed(0.05, factor=1000.0)
    assert 0.01 < fast < 100_000
    assert slow < fast  # shared, noisy machine: a huge factor keeps this robust
