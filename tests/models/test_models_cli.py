"""``fleetpipe model inspect / slice / zoo``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from fleetpipe.cli import main
from fleetpipe.models.onnx_graph import load_onnx
from fleetpipe.models.profile import random_feeds
from fleetpipe.models.slicing import content_hash, verify_slices
from fleetpipe.models.tflite import load_tflite, run_tflite

from ._helpers import feeds

TINY_R50 = ["--width", "0.0625", "--resolution", "32"]


def test_inspect_resnet50_shows_blocks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "inspect", "zoo:resnet50", *TINY_R50]) == 0
    out = capsys.readouterr().out
    for block in ("stem", "layer1.0", "layer3.5", "layer4.2", "head"):
        assert block in out
    assert "18 layers" in out and "candidate cuts" in out


def test_zoo_then_slice_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r18.onnx"
    assert main(["model", "zoo", "resnet18", "-o", str(path), "--width", "0.125", "--resolution", "32"]) == 0
    out_dir = tmp_path / "slices"
    assert main(["model", "slice", str(path), "--cuts", "3,7", "-o", str(out_dir), "--verify"]) == 0
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert [(s["first_layer"], s["last_layer"]) for s in manifest["stages"]] == [(0, 3), (4, 7), (8, 9)]
    assert manifest["max_rel_diff"] <= 1e-5
    for stage in manifest["stages"]:
        data = (out_dir / stage["file"]).read_bytes()
        assert stage["file"] == f"{content_hash(data)}.onnx" == f"{stage['hash']}.onnx"
    assert manifest["stages"][1]["inputs"][0]["shape"] == manifest["stages"][0]["outputs"][0]["shape"]
    model = onnx.load(str(path))
    assert verify_slices(model, load_onnx(model), [3, 7], feeds("resnet18")) < 1e-4


def test_inspect_dynamic_batch_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "digits.onnx"
    assert main(["model", "zoo", "digits", "-o", str(path)]) == 0
    assert main(["model", "inspect", str(path)]) == 0  # a dynamic batch alone is taken as 1
    assert "input 256B" in capsys.readouterr().out  # 1 x 64 float32
    assert main(["model", "inspect", str(path), "--input-shape", "input=4,64", "--grouping", "nodes"]) == 0
    assert "5 layers" in capsys.readouterr().out


def test_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    assert main(["model", "inspect", str(bad)]) == 1
    assert main(["model", "inspect", "zoo:alexnet"]) == 1
    assert main(["model", "slice", "zoo:vit", "--cuts", "99", "-o", str(tmp_path / "x")]) == 1
    assert main(["model", "zoo", "vit", "-o", str(tmp_path / "v.onnx"), "--set", "nonsense=1"]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 4


def test_tflite_inspect_shows_the_same_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r50.tflite"
    assert main(["model", "zoo", "resnet50", "-o", str(path), *TINY_R50]) == 0
    capsys.readouterr()
    assert main(["model", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for block in ("layer1.0", "layer3.5", "layer4.2", "head", "CONV_2D", "FULLY_CONNECTED"):
        assert block in out
    assert "18 layers" in out and "candidate cuts" in out
    graph = load_tflite(path)
    assert f"{graph.total_flops / 1e9:.3f} GFLOPs" in out
    assert main(["model", "inspect", str(path), "--grouping", "nodes"]) == 0
    assert f"{len(load_tflite(path, grouping='nodes'))} layers" in capsys.readouterr().out


def test_tflite_slice_writes_standalone_verified_stages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "vit.tflite"
    assert main(["model", "zoo", "vit", "-o", str(path), "--resolution", "16", "--depth", "2",
                 "--set", "dim=32", "--set", "heads=2"]) == 0  # fmt: skip
    out_dir = tmp_path / "slices"
    assert main(["model", "slice", str(path), "--cuts", "1,3", "-o", str(out_dir), "--verify"]) == 0
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["format"] == "tflite" and manifest["max_rel_diff"] <= 1e-5
    assert [(s["first_layer"], s["last_layer"]) for s in manifest["stages"]] == [(0, 1), (2, 3), (4, 5)]
    graph = load_tflite(path)
    env = random_feeds(graph)
    for stage in manifest["stages"]:
        data = (out_dir / stage["file"]).read_bytes()
        assert stage["file"] == f"{content_hash(data)}.tflite"
        piece = load_tflite(data)  # standalone: loads and runs on its own
        assert [t.name for t in piece.inputs] == [t["name"] for t in stage["inputs"]]
        assert [list(t.shape) for t in piece.outputs] == [t["shape"] for t in stage["outputs"]]
        env.update(run_tflite(data, {t.name: env[t.name] for t in piece.inputs}))
    want = run_tflite(path.read_bytes(), random_feeds(graph))
    for name, value in want.items():
        np.testing.assert_allclose(env[name], value, atol=1e-5)


def test_tflite_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a flatbuffer")
    assert main(["model", "inspect", str(bad)]) == 1
    assert main(["model", "inspect", str(tmp_path / "missing.tflite")]) == 1
    good = tmp_path / "digits.tflite"
    assert main(["model", "zoo", "digits", "-o", str(good)]) == 0
    assert main(["model", "inspect", str(good), "--input-shape", "input=4,64"]) == 1
    assert main(["model", "slice", str(good), "--cuts", "9", "-o", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 4 and "conflicts with the static dims" in err and "TFL3" in err
