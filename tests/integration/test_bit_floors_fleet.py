"""Bit floors on a real fleet (issue 18.4): mosquitto, a planner and node processes, `fleetpipe infer --check`.

The model's activations are 8-bit-hostile (one channel 1000x the others, then a sigmoid map): at the default
``--bits 8`` the planner must ship 16 bits at its cuts and the fleet's output stays within 1 %; with the
floors turned off the same fleet exceeds it and ``infer --check`` exits 1.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from fleetpipe.client import FleetClient
from tests.bits._outlier import outlier_map
from tests.integration.fleet_helpers import fleet, pinned_profile

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _setup(tmp_path: Path) -> tuple[Path, Path, list[Path]]:
    model = tmp_path / "outlier.onnx"
    onnx.save(outlier_map(64), model)
    # Compute well above message costs, so the plan pipelines the layers over both nodes (has cuts).
    profile = pinned_profile(model, tmp_path / "profile.json", total_ms=120.0)
    rng = np.random.default_rng(5)
    inputs = []
    for i in range(4):
        path = tmp_path / f"x{i}.npy"
        np.save(path, rng.random((1, 3, 64, 64)).astype(np.float32))
        inputs.append(path)
    return model, profile, inputs


def _infer_check(url: str, name: str, model: Path, inputs: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetpipe", "infer", "--broker", url, "--fleet", name,
                           "--input", *map(str, inputs), "--check", str(model), "--timeout", "60"],
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("floors", [True, False], ids=["floors", "no-floors"])
def test_fleet_ships_the_floor_and_infer_check_judges_it(mosquitto, tmp_path, floors):
    model, profile, inputs = _setup(tmp_path)
    name = f"ibits{int(floors)}"
    with fleet(mosquitto.url, name, tmp_path) as f:
        f.planner(model, "--expect-nodes", "2", "--bits", "8", "--profile", str(profile),
                  *([] if floors else ["--no-bit-floors"]))
        f.node("a", "2")
        f.node("b", "2")
        with FleetClient(mosquitto.url, fleet=name, window=2) as client:
            plan = f.wait_plan(client)
        assert len(plan.stages) >= 2, f.logs()
        sent = [s.bits for s in plan.stages[:-1]]
        proc = _infer_check(mosquitto.url, name, model, inputs)
        log = (tmp_path / "planner.log").read_text()
    if floors:
        assert sent == [16] * len(sent) and all(s.min_bits == 16 for s in plan.stages[:-1])
        assert "bit-widths from probe tolerance 1 % rel L2 per output" in log and "raised from 8" in log
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "within the tolerance" in proc.stdout
    else:
        assert sent == [8] * len(sent) and "bit-widths from the request (bit floors off)" in log
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "EXCEEDS the tolerance 0.01" in proc.stdout
    assert "prob (1, 1, 64, 64): rel L2" in proc.stdout and "top-1" not in proc.stdout


def _demo(model: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    import json

    proc = subprocess.run([sys.executable, "-m", "fleetpipe", "demo", "--model", str(model), "--nodes", "3",
                           "--classes", "rpi3", "--frames", "8", "--json", *extra],
                          capture_output=True, text=True, timeout=200, check=False)
    return proc, (json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {})


def test_demo_fails_red_when_the_width_is_forced_below_the_floor(tmp_path):
    """The deep variant pipelines over three emulated Pi 3s; 8 bits forced: non-zero exit, error reported."""
    model = tmp_path / "deep.onnx"
    onnx.save(outlier_map(32, channels=32, depth=8), model)
    proc, report = _demo(model, "--no-bit-floors")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert not report["accuracy_ok"] and report["max_rel_error"] > 0.1
    assert report["top1_agreement"] is None  # a probability map: no argmax "agreement"
    assert [o["name"] for o in report["accuracy"]] == ["prob"]
    assert len(report["stages"]) >= 2 and report["stages"][0]["bits"] == 8
    assert "bit-widths from the request (bit floors off)" in report["bit_widths"]
    proc, report = _demo(model)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert report["accuracy_ok"] and report["max_rel_error"] <= 0.01
    assert "raised from 8" in report["bit_widths"]
    assert all(s["bits"] >= 16 for s in report["stages"][:-1])
