"""The corpus itself: pinned, varied enough, and present (fetched by scripts/setup)."""

from __future__ import annotations

import hashlib
import re

import pytest

from tests.realmodels import corpus


def test_wheels_and_files_are_pinned() -> None:
    doc = corpus.manifest()
    for key, wheel in doc["wheels"].items():
        assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.]*", wheel["requirement"]), key
        assert re.fullmatch(r"[0-9a-f]{64}", wheel["sha256"]), key
        assert wheel["file"].endswith(".whl"), key
    for m in doc["models"]:
        assert m["wheel"] in doc["wheels"], m["id"]
        assert re.fullmatch(r"[0-9a-f]{64}", m["sha256"]), m["id"]
        assert m["bytes"] < 30_000_000, f"{m['id']} is too big for CI"


def test_corpus_is_varied() -> None:
    models = corpus.corpus()
    wheel_models = [m for m in models if not m.source.startswith("torch export")]
    assert len(wheel_models) >= 12
    assert len({m.exporter for m in wheel_models}) >= 4
    assert {m.kind for m in wheel_models} == {"onnx", "tflite"}
    assert any(m.expected == "negative" for m in models)
    assert len({m.id for m in models}) == len(models)
    opsets = {int(m["opset"]) for m in corpus.torch_manifest()["models"]}
    assert min(opsets) == 11 and max(opsets) == 21 and len(opsets) >= 4


def test_committed_torch_exports_match_their_pins() -> None:
    for m in corpus.torch_manifest()["models"]:
        data = (corpus.TORCH_DIR / m["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == m["sha256"], m["id"]
        assert len(data) < 1_000_000, m["id"]


def test_negatives_name_their_cause() -> None:
    for m in corpus.corpus():
        if m.expected == "negative":
            assert m.reason and m.cause_words, m.id


@pytest.mark.corpus(step="")
def test_file_is_present_and_pinned(realmodel: corpus.RealModel, realmodel_path: object) -> None:
    """Every corpus file is there with its pinned sha256 (a failure under CI when it is missing)."""
    assert realmodel_path == realmodel.path


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_file_fails_under_ci_and_skips_elsewhere(monkeypatch, tmp_path, ci, outcome) -> None:
    monkeypatch.setenv("FLEETPIPE_REALMODELS_DIR", str(tmp_path))
    monkeypatch.setenv("CI", ci)
    model = next(m for m in corpus.corpus() if m.kind == "tflite")
    assert model.path.parent == tmp_path
    with pytest.raises(outcome, match="scripts/fetch-models"):
        corpus.resolve(model)


def test_fetch_script_is_idempotent_and_checks_hashes(tmp_path) -> None:
    """With every file cached, fetch-models downloads nothing; a corrupted file is re-fetched, not trusted."""
    import os
    import shutil
    import subprocess
    import sys

    script = corpus.HERE.parent.parent / "scripts" / "fetch-models"
    model = next(m for m in corpus.corpus() if m.id == "mp_iris_landmark")
    if not model.path.is_file():
        pytest.skip("corpus not fetched")  # test_file_is_present_and_pinned fails for it under CI
    shutil.copy(model.path, tmp_path / model.path.name)
    env = {**os.environ, "FLEETPIPE_REALMODELS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(script), "--only", model.id], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "1 models cached" in done.stdout and "fetched" not in done.stdout
    (tmp_path / model.path.name).write_bytes(b"corrupt")
    listed = subprocess.run([sys.executable, str(script), "--only", model.id, "--list"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert "missing" in listed.stdout
