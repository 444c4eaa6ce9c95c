"""Every corpus model through ``fleetpipe model inspect`` and ``model slice``, as a user would run them.

Runnable models: inspect prints the layer table; slices at several cuts, run by onnxruntime or LiteRT
directly (not by fleetpipe), equal the whole model to ``SLICE_REL_TOL`` max relative difference on every
final output. Negative models: inspect and slice exit non-zero with one error line naming the cause and
no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fleetpipe.cli import main as fleetpipe_main
from tests.realmodels import corpus
from tests.realmodels.corpus import RealModel

# An op the FLOPs estimator does not know (LRN, LSTM, RESIZE_BILINEAR, custom ops) is a warning, not a failure.
pytestmark = pytest.mark.filterwarnings("ignore:FLOPs of")


@pytest.mark.corpus(step="inspect", expected="runnable")
def test_inspect(realmodel: RealModel, realmodel_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = fleetpipe_main(["model", "inspect", str(realmodel_path), *realmodel.shape_flags])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "layers" in out and "candidate cuts" in out, out


@pytest.mark.corpus(step="slice", expected="runnable")
def test_slices_equal_whole_model(
    realmodel: RealModel, realmodel_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    feeds = corpus.random_inputs(corpus.model_input_specs(realmodel))
    want = corpus.run_file(realmodel.kind, realmodel_path, feeds)
    grouping = ["--grouping", "blocks"]
    n = _slice(realmodel, tmp_path / "whole", "", capsys, grouping)["layers"]
    if n < 3:  # blocks merged the model (a stateful model's state input is live across every cut): per node
        grouping = ["--grouping", "nodes"]
        n = _slice(realmodel, tmp_path / "whole", "", capsys, grouping)["layers"]
    _slice(realmodel, tmp_path / "a", "0", capsys, grouping)
    assert n >= 3, f"{realmodel.id}: only {n} layers even with --grouping nodes, nothing to pipeline"
    cuts = sorted({min(max(c, 0), n - 2) for c in (n // 4, n // 2, (3 * n) // 4)})
    second = _slice(realmodel, tmp_path / "b", ",".join(map(str, cuts)), capsys, grouping)
    assert len(second["stages"]) == len(cuts) + 1
    for stage_dir in (tmp_path / "a", tmp_path / "b"):
        got = corpus.run_stages(realmodel.kind, stage_dir, feeds)
        for name, value in want.items():
            assert name in got, f"{stage_dir.name}: final output {name!r} is produced by no stage"
            rel = corpus.rel_diff(got[name], value)
            assert rel <= corpus.SLICE_REL_TOL, f"{stage_dir.name}: output {name!r} differs by {rel:.3g} (relative)"


@pytest.mark.corpus(step="negative", expected="negative")
@pytest.mark.parametrize("action", ["inspect", "slice", pytest.param("plan", marks=pytest.mark.slow),
                                    pytest.param("demo", marks=pytest.mark.slow)])
def test_negative_fails_with_one_line(realmodel: RealModel, realmodel_path: Path, action: str, tmp_path: Path) -> None:
    """Rejected before anything is deployed: one line naming the cause, no traceback, no files left."""
    model = [str(realmodel_path), *realmodel.shape_flags]
    fleet_file = tmp_path / "fleet.toml"
    fleet_file.write_text('[[device]]\nname = "a"\nclass = "rpi4"\n\n[[device]]\nname = "b"\nclass = "rpi5"\n')
    args = [sys.executable, "-m", "fleetpipe", *{
        "inspect": ["model", "inspect", *model],
        "slice": ["model", "slice", *model, "--cuts", "0", "-o", str(tmp_path / "out")],
        "plan": ["plan", "--model", *model, "--fleet", str(fleet_file)],
        "demo": ["demo", "--model", *model, "--nodes", "2", "--frames", "2"],
    }[action]]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, env={**os.environ, "NO_COLOR": "1"})
    assert done.returncode != 0, done.stdout
    lines = [ln for ln in done.stderr.splitlines() if ln.strip() and not ln.startswith("INFO: ")]
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1, done.stderr
    for word in realmodel.cause_words:
        assert word in lines[0], lines[0]
    if action == "slice":
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "files left behind"


def _slice(model: RealModel, out: Path, cuts: str, capsys: pytest.CaptureFixture[str], grouping: list[str]) -> dict:
    args = ["model", "slice", str(model.path), *model.shape_flags, *grouping, "--cuts", cuts, "-o", str(out)]
    rc = fleetpipe_main(args)
    _, err = capsys.readouterr()
    assert rc == 0, f"model slice --cuts {cuts}: {err}"
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.corpus(step="slice-nodes", ids=["mp_face_detection_full_sparse", "mp_pose_detection", "caffe2_squeezenet"])
def test_node_grouping_slices_equal_whole_model(
    realmodel: RealModel, realmodel_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--grouping nodes`` with a cut every ~n/12 nodes, in models full of weight-only nodes (TFLite DENSIFY /
    DEQUANTIZE of constant buffers, ONNX ConstantOfShape weights): no stage may receive a weight from another
    (LiteRT's XNNPACK then fails to set up the stage), and the stages equal the whole model."""
    grouping = ["--grouping", "nodes"]
    n = _slice(realmodel, tmp_path / "whole", "", capsys, grouping)["layers"]
    cuts = sorted({min(c, n - 2) for c in range(0, n - 1, max(1, n // 12))})
    doc = _slice(realmodel, tmp_path / "cut", ",".join(map(str, cuts)), capsys, grouping)
    assert len(doc["stages"]) == len(cuts) + 1
    feeds = corpus.random_inputs(corpus.model_input_specs(realmodel))
    want = corpus.run_file(realmodel.kind, realmodel_path, feeds)
    got = corpus.run_stages(realmodel.kind, tmp_path / "cut", feeds)
    for name, value in want.items():
        assert corpus.rel_diff(got[name], value) <= corpus.SLICE_REL_TOL, name
