"""COACH early exit with real processes: calibrated exit caches travel in the assignments, clearly separable
frames are answered by the first stage, and the accuracy on the real digits labels stays within the floor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fleetpipe.client import FleetClient
from tests.integration.fleet_helpers import fleet

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _calibrated_digits(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    from fleetpipe.models import zoo
    from fleetpipe.models.calibrate import calibrate
    from fleetpipe.models.onnx_graph import load_onnx

    proto = zoo.build("digits")
    model = tmp_path / "digits.onnx"
    onnx.save(proto, model)
    x, y = zoo.digits_test_set()
    half = len(x) // 2  # calibrate on one half, stream the other
    graph = load_onnx(proto, input_shapes={proto.graph.input[0].name: (1, 64)})
    cal = calibrate(proto, graph, x[:half], y[:half])
    assert cal.exits, "the digits model should have calibrated exit caches"
    calib = tmp_path / "calib.json"
    calib.write_text(cal.to_json())
    return model, calib, x[half:], y[half:]


def test_separable_frames_exit_early_within_the_floor(tmp_path: Path, mosquitto) -> None:
    model, calib, x, y = _calibrated_digits(tmp_path)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    full = np.array([int(np.argmax(sess.run(None, {name: x[i : i + 1]})[0])) for i in range(len(x))])
    with fleet(mosquitto.url, "exit", tmp_path) as f:
        f.planner(model, "--calibration", str(calib), "--input-shape", "input=1,64", "--expect-nodes", "2",
                  "--no-adapt")
        for name in ("a", "b"):
            f.node(name, "20")
        with FleetClient(mosquitto.url, fleet="exit", window=6) as client:
            plan = client.wait_plan(90)
            assert len(plan.stages) == 2, plan
            results = list(client.stream([x[i : i + 1] for i in range(len(x))]))
            stats = client.stats
    assert len(results) == len(x) and stats.completed == len(x)  # every frame answered exactly once
    exited = [r for r in results if r.early_exit]
    assert 0 < len(exited) < len(x), f"{len(exited)} of {len(x)} exited\n{f.logs()}"
    assert all(r.hops[-1].stage == 0 and r.label is not None for r in exited)
    assert stats.early_exits == len(exited)
    pred = np.array([r.top1 for r in results])
    loss = float(np.mean(full == y) - np.mean(pred == y))
    print(f"\nearly exits {len(exited)}/{len(x)}; accuracy full {np.mean(full == y):.4f}, "
          f"fleet {np.mean(pred == y):.4f}")
    assert loss <= 0.02, loss  # the calibrated 0.5 % floor, with room for 180 held-out frames (1 frame = 0.56 %)
