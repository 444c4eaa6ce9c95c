"""Real corpus models streamed through real fleets: mosquitto on 127.0.0.1, a planner and node processes.

A representative subset keeps this file near a minute on 2 cores: one MediaPipe TFLite detector, a torch
export with dynamic batch AND dynamic H/W (``--input-shape``), a torch transformer with a dynamic batch, the
Silero VAD sequence model (three inputs: audio and LSTM state; three outputs), and a paddle2onnx classifier
(dynamic batch, computed Reshape). Two ways in:

- ``test_fleet_equals_whole_model``: planner + 3 node processes from tests/integration/fleet_helpers, 32-bit
  activations; every output of every frame equals the whole model run here by onnxruntime / LiteRT directly
  (max relative difference <= 1e-5), frames in order, each through every stage;
- ``test_demo_streams``: ``fleetpipe demo --model FILE --json`` as a user runs it (default bit-width, the
  planner's bit floors); it must exit 0 with every output within its tolerance, on more than one stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fleetpipe.client import FleetClient
from tests.integration.fleet_helpers import fleet
from tests.realmodels import corpus
from tests.realmodels.corpus import RealModel

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300),
              pytest.mark.filterwarnings("ignore:FLOPs of")]

FLEET_IDS = ["mp_face_detection_short", "cnn_dyn_o11", "transformer_o17", "silero_vad_seq"]
DEMO_IDS = ["ppocr_cls_v2"]  # the others run in bench/realmodels.py
# Emulated nodes this much slower than the host, and (fleet test) a planner profile scaled to PINNED_MS for the
# whole model: compute then outweighs message costs for these small models on any host, so the planner
# pipelines them over several stages (what is under test) instead of keeping them on one node.
SLOW = ("12", "10", "14")
PINNED_MS = 30.0


@pytest.mark.corpus(step="fleet", ids=FLEET_IDS)
def test_fleet_equals_whole_model(realmodel: RealModel, realmodel_path: Path, mosquitto, tmp_path: Path) -> None:
    specs = corpus.model_input_specs(realmodel)
    feeds = [corpus.random_inputs(specs, seed=i) for i in range(8)]
    refs = [corpus.run_file(realmodel.kind, realmodel_path, feed) for feed in feeds]
    # one input: a bare array per frame; several (silero's audio + LSTM state): a dict by input name
    xs = [feed[specs[0][0]] if len(specs) == 1 else feed for feed in feeds]
    fleet_name = f"rm-{realmodel.id.replace('_', '-')}"
    profile = _pinned_profile(realmodel, tmp_path / "profile.json")
    with fleet(mosquitto.url, fleet_name, tmp_path) as f:
        f.planner(realmodel_path, "--expect-nodes", "3", "--bits", "32", "--profile", str(profile),
                  *realmodel.shape_flags)
        for i, cls in enumerate(SLOW):
            f.node(f"n{i}", cls)
        with FleetClient(mosquitto.url, fleet=fleet_name, window=4) as client:
            plan = f.wait_plan(client)
            assert len(plan.stages) >= 2, f"one stage only: {plan}\n{f.logs()}"
            results = list(client.stream(xs))
            assert client.stats.completed == len(xs)
            assert client.stats.duplicates == 0
    assert len(results) == len(xs)
    for k, (result, ref) in enumerate(zip(results, refs, strict=True)):
        assert [h.stage for h in result.hops] == list(range(len(plan.stages)))
        assert set(result.outputs) == set(ref), f"frame {k}: outputs {sorted(result.outputs)} != {sorted(ref)}"
        for out, want in ref.items():
            got = np.asarray(result.outputs[out]).reshape(want.shape)
            rel = corpus.rel_diff(got, want)
            assert rel <= corpus.SLICE_REL_TOL, f"frame {k} output {out!r}: relative difference {rel:.3g}"


@pytest.mark.corpus(step="demo", ids=DEMO_IDS)
def test_demo_streams(realmodel: RealModel, realmodel_path: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "fleetpipe", "demo", "--model", str(realmodel_path), *realmodel.shape_flags,
           "--nodes", "3", "--classes", ",".join(SLOW), "--frames", "12", "--json", "--keep-logs", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["frames"] == 12
    assert report["accuracy_ok"] is True
    assert len(report["stages"]) >= 2, report["stages"]
    assert report["accuracy"], "no output compared"
    for out in report["accuracy"]:
        assert out["frames"] == 12
        assert out["rel_l2"] <= report["tolerance"], out
    assert report["resent"] == 0 and report["duplicates"] == 0


def _pinned_profile(model: RealModel, dest: Path) -> Path:
    """The planner's per-layer host times for ``model``, measured here before any node starts and scaled to
    ``PINNED_MS`` in all (like fleet_helpers.pinned_profile, with the model's --input-shape)."""
    from fleetpipe.planner.loop import load_model_info

    load_model_info(str(model.path), input_shape=list(model.input_shape) or None, profile=str(dest))
    doc = json.loads(dest.read_text())
    host = [float(t) for t in doc["host_ms"]]
    doc["host_ms"] = [t * PINNED_MS / sum(host) for t in host]
    dest.write_text(json.dumps(doc))
    return dest
