"""``fleetpipe demo --model FILE`` with a user's own model (#18 items 1, 2, 3, 5): real mosquitto, planner, nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from tests.models._byom import computed_reshape

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "fleetpipe", "demo", *args], capture_output=True, text=True,
                          timeout=280, env=env, check=False)


def test_demo_streams_a_zoo_tflite_checked_in_litert(tmp_path: Path) -> None:
    path = tmp_path / "r18.tflite"
    made = subprocess.run([sys.executable, "-m", "fleetpipe", "model", "zoo", "resnet18", "-o", str(path), "--width",
                           "0.25", "--resolution", "32"], capture_output=True, text=True, timeout=120, check=False)
    assert made.returncode == 0, made.stderr
    proc = _demo("--model", str(path), "--nodes", "2", "--frames", "6", "--json", "--bits", "32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["frames"] == 6 and len(report["stages"]) == 2 and report["accuracy_ok"]
    assert report["stages"][0]["layers"].startswith("0-")
    assert report["max_rel_error"] <= 1e-5  # 32 bits between LiteRT slices: the whole model's outputs


def test_demo_dynamic_dims_and_computed_shapes(tmp_path: Path) -> None:
    path = tmp_path / "user.onnx"
    onnx.save(computed_reshape(), str(path))
    missing = _demo("--model", str(path), "--nodes", "2", "--frames", "4")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "--input-shape x=1,3,<H>,8" in missing.stderr.strip().splitlines()[-1]
    proc = _demo("--model", str(path), "--input-shape", "x=1,3,16,8", "--nodes", "2", "--frames", "6", "--json",
                 "--bits", "32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["frames"] == 6 and report["accuracy_ok"] and report["max_rel_error"] <= 1e-5
