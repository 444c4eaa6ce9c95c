"""`fleetpipe demo` and `fleetpipe infer` as a user runs them (subprocesses, real mosquitto)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.integration.fleet_helpers import fleet

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def test_demo_json_matches_local_model(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "fleetpipe", "demo", "--model", "resnet18", "--nodes", "3", "--frames", "12",
         "--json", "--plot", str(tmp_path / "timeline.png")],
        capture_output=True, text=True, timeout=280, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["frames"] == 12
    assert report["top1_agreement"] == 1.0
    assert report["max_rel_error"] < 0.05
    assert report["fleet_fps"] > 0 and report["predicted_fps"] > 0
    assert len(report["stages"]) >= 2
    # the plan re-scored with the nodes' measured compute: no faster than its slowest measured stage
    assert report["calibrated_fps"] > 0
    assert 1000 / report["calibrated_fps"] >= max(s["measured_ms"] for s in report["stages"]) - 1e-6
    assert report["node_classes"] == {"jetson-nano-0": "jetson-nano", "rpi5-1": "rpi5", "rpi4-2": "rpi4"}
    assert {s["device"] for s in report["stages"]} <= {"jetson-nano-0", "rpi5-1", "rpi4-2"}
    assert (tmp_path / "timeline.png").stat().st_size > 10_000


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_demo_signal_leaves_no_processes_or_temp_dirs(tmp_path, sig):
    """However the demo is stopped (Ctrl-C, or `kill` / systemd's SIGTERM to its PID), mosquitto, the planner and
    every node end with it, within a bound, and its temp folders are gone."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmpdir)}
    proc = subprocess.Popen([sys.executable, "-m", "fleetpipe", "demo", "--model", "resnet18", "--frames", "2000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 120
        kids: set[int] = set()
        while time.monotonic() < deadline:
            for child in _children(proc.pid):
                kids.add(child)
            if len(kids) >= 6:  # mosquitto + planner + 4 nodes
                break
            time.sleep(0.2)
        assert len(kids) >= 6, kids
        assert any(p.is_dir() for p in tmpdir.iterdir()), "the demo made no temp folder under TMPDIR"
        time.sleep(2)
        t0 = time.monotonic()
        os.kill(proc.pid, sig)  # the demo's PID only, as `kill PID` does (not its process group)
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + sig, out[-2000:]
    assert took < 30, took
    alive = [k for k in kids if os.path.exists(f"/proc/{k}") and "zombie" not in Path(f"/proc/{k}/status").read_text()]
    assert not alive, f"orphans left: {alive}"
    # (a runtime library leaves a small ".ses" file in TMPDIR: not a folder of the demo's)
    assert not [p for p in tmpdir.iterdir() if p.is_dir()], list(tmpdir.iterdir())


def test_infer_cli(mosquitto, tmp_path):
    from fleetpipe.models import zoo

    kw = {"width": 0.25, "resolution": 32, "num_classes": 10}
    model = tmp_path / "m.onnx"
    onnx.save(zoo.build("resnet18", **kw), model)
    x = np.random.default_rng(0).standard_normal(zoo.input_shape("resnet18", **kw)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    with fleet(mosquitto.url, "icli", tmp_path) as f:
        f.planner(model, "--expect-nodes", "2", "--bits", "32")
        f.node("a", "1")
        f.node("b", "1")
        proc = subprocess.run([sys.executable, "-m", "fleetpipe", "infer", "--broker", mosquitto.url, "--fleet", "icli",
                               "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy")],
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr + f.logs()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy")[0], ref, rtol=1e-4, atol=1e-4)
    assert "argmax" in proc.stdout
