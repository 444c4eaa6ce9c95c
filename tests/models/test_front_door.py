"""The front door for a user's own model (#18): input shapes, folding, formats, runnability, verify."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from fleetpipe.errors import UnsupportedModel
from fleetpipe.models.onnx_graph import load_onnx
from fleetpipe.models.profile import random_feeds
from fleetpipe.models.shapes import InputShapeError, parse_input_shapes, resolve_input_shapes
from fleetpipe.models.source import open_model

from ._byom import (
    computed_reshape,
    custom_op_onnx,
    custom_op_tflite,
    ir3_model,
    tflite_fp16_mlp,
    with_constant_chain,
)


def fleetpipe(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real ``fleetpipe`` command (this interpreter's package)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "fleetpipe", *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=cwd)


# --- item 2: one --input-shape syntax, dynamic batch as 1 ------------------------------------------


def test_parse_input_shapes_one_syntax() -> None:
    assert parse_input_shapes(["x=1,3,224,224", "mask=1,10"]) == {"x": (1, 3, 224, 224), "mask": (1, 10)}
    assert parse_input_shapes("x=1,3,224,224;mask=1,10") == parse_input_shapes(["x=1,3,224,224", "mask=1,10"])
    # what a comma-split env var gives (FLEETPIPE_INPUT_SHAPE through the config loader)
    assert parse_input_shapes(("x=1", "3", "8", "8", "y.0=2")) == {"x": (1, 3, 8, 8), "y.0": (2,)}
    assert parse_input_shapes(None) == {} == parse_input_shapes([])
    for bad in ("1,3,224,224", "x=", "x=1,a", "=1,2", "x=0,3", ["x=1", "x=2"]):
        with pytest.raises(InputShapeError, match="--input-shape"):
            parse_input_shapes(bad)


@pytest.mark.parametrize("batch", ["N", "batch", None, "d0", "p2o.DynamicDimension.0", "?"])
def test_dynamic_batch_is_one_with_one_log_line(batch: object, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="fleetpipe.models"):
        assert resolve_input_shapes({"x": [batch, 3, 32, 32]}) == {"x": (1, 3, 32, 32)}
    lines = [r for r in caplog.records if r.name == "fleetpipe.models"]
    assert len(lines) == 1 and "batch" in lines[0].getMessage() and "taken as 1" in lines[0].getMessage()


def test_dynamic_batch_minus_one_in_a_file(caplog: pytest.LogCaptureFixture) -> None:
    model = computed_reshape(height=8)
    model.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    with caplog.at_level(logging.WARNING, logger="fleetpipe.models"):
        loaded = open_model(model)
    assert loaded.graph.inputs[0].shape == (1, 3, 8, 8)
    assert sum("taken as 1" in r.getMessage() for r in caplog.records) == 1


def test_other_dynamic_dim_needs_the_flag() -> None:
    with pytest.raises(InputShapeError) as err:
        open_model(computed_reshape())  # x: [N, 3, H, 8]
    text = str(err.value)
    assert "'x'" in text and "[N, 3, H, 8]" in text and "--input-shape x=1,3,<H>,8" in text
    with pytest.raises(InputShapeError, match="rank 3"):
        open_model(computed_reshape(), {"x": (1, 3, 8)})
    with pytest.raises(InputShapeError, match="static dims"):
        open_model(computed_reshape(), {"x": (1, 4, 8, 8)})
    with pytest.raises(InputShapeError, match="not model inputs"):
        open_model(computed_reshape(), {"z": (1, 3, 8, 8)})


# --- item 3: shapes computed inside the graph ------------------------------------------------------


@pytest.mark.parametrize("kind", ["cast", "mul"])
def test_computed_reshape_folds_and_slices_exactly(kind: str) -> None:
    model = computed_reshape(kind)
    with pytest.raises(UnsupportedModel, match="shape of tensor 'flat'"):
        load_onnx(model, {"x": (1, 3, 16, 8)})  # onnx shape inference alone cannot tell
    loaded = open_model(model, {"x": (1, 3, 16, 8)}, grouping="nodes")
    assert loaded.graph.outputs[0].shape == ((1, 4, 128) if kind == "cast" else (1, 8, 64))
    assert not {"Shape", "Cast", "Concat"} & {op for la in loaded.graph.layers for op in la.op_types}
    n = len(loaded.graph.layers)
    assert n >= 4
    feeds = random_feeds(loaded.graph)
    for cuts in ([0], [1, 2], list(range(n - 1))):
        assert loaded.verify(cuts, feeds) <= 1e-5
    # the reference is the user's model as given (not the folded one) run by onnxruntime
    import onnxruntime as ort

    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(loaded.run(feeds)["y"], want, rtol=1e-6)


def test_cli_input_shape_and_folding_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "user.onnx"
    onnx.save(computed_reshape(), str(path))
    bad = fleetpipe("model", "inspect", str(path))
    assert bad.returncode == 1
    err = bad.stderr.strip().splitlines()
    assert len(err) == 1 and "--input-shape x=1,3,<H>,8" in err[0] and "Traceback" not in bad.stderr
    ok = fleetpipe("model", "inspect", str(path), "--input-shape", "x=1,3,16,8", "--grouping", "nodes")
    assert ok.returncode == 0, ok.stderr
    out = tmp_path / "slices"
    sliced = fleetpipe("model", "slice", str(path), "--input-shape", "x=1,3,16,8", "--grouping", "nodes",
                       "--cuts", "0,2", "-o", str(out), "--verify")
    assert sliced.returncode == 0, sliced.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["max_rel_diff"] <= 1e-5 and manifest["input_shapes"] == {"x": [1, 3, 16, 8]}
    assert len(manifest["stages"]) == 3


# --- item 6: weight-only nodes travel with their consumer --------------------------------------------


@pytest.mark.parametrize("grouping", ["nodes", "blocks"])
def test_onnx_identity_chains_of_weights_are_never_cut(grouping: str) -> None:
    loaded = open_model(with_constant_chain(), grouping=grouping)
    weight_tensors = {"wi", "w2i", "w2ii"}
    for layer in loaded.graph.layers:
        assert not weight_tensors & set(layer.out_tensors), layer
        assert layer.op_types[-1] != "Identity", layer
    n = len(loaded.graph.layers)
    assert n == (4 if grouping == "nodes" else n)  # Conv, Relu, Conv, Relu: the Identity chains ride along
    feeds = random_feeds(loaded.graph)
    for cut in range(n - 1):
        assert loaded.verify([cut], feeds) <= 1e-5
    assert loaded.verify(list(range(n - 1)), feeds) <= 1e-5


def test_tflite_dequantized_weights_are_never_cut() -> None:
    from fleetpipe.models.tflite import load_tflite

    data = tflite_fp16_mlp()
    graph = load_tflite(data, grouping="nodes")
    assert [la.op_types for la in graph.layers] == [("DEQUANTIZE", "FULLY_CONNECTED"),
                                                     ("DEQUANTIZE", "FULLY_CONNECTED"), ("FULLY_CONNECTED",)]
    assert not {"w0", "w1"} & {t for la in graph.layers for t in la.out_tensors}
    loaded = open_model(data, grouping="nodes")
    feeds = random_feeds(loaded.graph)
    for cuts in ([0], [1], [0, 1]):
        assert loaded.verify(cuts, feeds) <= 1e-5  # the last slice recomputes fc0's shared weight itself


# --- item 7: IR < 4, initializers listed as inputs ----------------------------------------------------


def test_ir3_initializers_in_inputs_load_and_slice(tmp_path: Path) -> None:
    model = ir3_model()
    assert model.ir_version == 3 and len(model.graph.input) == 3
    loaded = open_model(model, grouping="nodes")
    assert [t.name for t in loaded.graph.inputs] == ["x"]
    feeds = random_feeds(loaded.graph)
    assert loaded.verify([0, 1, 2], feeds) <= 1e-5
    for first, last in ((0, 1), (2, 3)):
        piece = onnx.load_from_string(loaded.slice(first, last))
        onnx.checker.check_model(piece)
        assert piece.ir_version >= 4
    path = tmp_path / "old.onnx"
    onnx.save(model, str(path))
    run = fleetpipe("model", "slice", str(path), "--grouping", "nodes", "--cuts", "1", "-o", str(tmp_path / "s"),
                    "--verify")
    assert run.returncode == 0, run.stderr


# --- item 5: runnability is found before anything is deployed ----------------------------------------


def test_custom_ops_fail_inspect_and_slice_with_one_line(tmp_path: Path) -> None:
    from fleetpipe.models.fold import NotRunnable

    with pytest.raises(NotRunnable, match=r"custom op FancyOp .*not available in onnxruntime here"):
        open_model(custom_op_onnx())
    with pytest.raises(NotRunnable, match="custom op MyFancyOp is not available in LiteRT here"):
        open_model(custom_op_tflite())
    onnx_path, tfl_path = tmp_path / "custom.onnx", tmp_path / "custom.tflite"
    onnx.save(custom_op_onnx(), str(onnx_path))
    tfl_path.write_bytes(custom_op_tflite())
    for path, runtime in ((onnx_path, "onnxruntime"), (tfl_path, "LiteRT")):
        for args in (["model", "inspect", str(path)], ["model", "slice", str(path), "--cuts", "0", "-o",
                                                        str(tmp_path / "out")]):
            run = fleetpipe(*args)
            lines = [ln for ln in run.stderr.splitlines() if "error" in ln]
            assert run.returncode == 1 and len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
            assert f"not available in {runtime} here" in lines[0]
    assert not (tmp_path / "out").exists()


# --- item 8: --verify with a relative tolerance; a manifest or no files -------------------------------


def test_verify_is_relative_and_a_failure_leaves_no_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fleetpipe.cli import main
    from fleetpipe.models.source import LoadedModel

    path = tmp_path / "r18.onnx"
    assert main(["model", "zoo", "resnet18", "-o", str(path), "--width", "0.125", "--resolution", "32"]) == 0
    out = tmp_path / "slices"
    ok = fleetpipe("model", "slice", str(path), "--cuts", "3,7", "-o", str(out), "--verify")
    assert ok.returncode == 0, ok.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["max_rel_diff"] <= manifest["rtol"] == 1e-5
    assert {p.name for p in out.iterdir()} == {"manifest.json", *(s["file"] for s in manifest["stages"])}
    # A slicer that got it wrong (the slices 2 % off the whole model): exit 1, one line, and no files at all.
    monkeypatch.setattr(LoadedModel, "verify", lambda self, cuts, feeds: 0.02)
    bad = tmp_path / "bad"
    assert main(["model", "slice", str(path), "--cuts", "3,7", "-o", str(bad), "--verify"]) == 1
    err = capsys.readouterr().err
    assert "verify failed" in err and "0.02" in err and "--rtol 1e-05" in err
    assert not bad.exists() or not any(bad.iterdir())
    assert main(["model", "slice", str(path), "--cuts", "3,7", "-o", str(bad), "--verify", "--rtol", "0.05"]) == 0
    assert json.loads((bad / "manifest.json").read_text())["max_rel_diff"] == 0.02


def test_tflite_dynamic_batch_signature_is_one_other_dims_refused(caplog: pytest.LogCaptureFixture) -> None:
    from ai_edge_litert import schema_py_generated as schema

    from fleetpipe.models.tflite import pack_model

    def with_signature(sig: list[int]) -> bytes:
        model = schema.ModelT.InitFromPackedBuf(tflite_fp16_mlp(), 0)
        sub = model.subgraphs[0]
        sub.tensors[sub.inputs[0]].shapeSignature = sig
        return pack_model(model)

    with caplog.at_level(logging.WARNING, logger="fleetpipe.models"):
        loaded = open_model(with_signature([-1, 16]))
    assert loaded.input_shapes == {"input": (1, 16)}
    assert sum("taken as 1" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(InputShapeError, match=r"'input' has dynamic dims \[1, \?\]"):
        open_model(with_signature([1, -1]))
    with pytest.raises(InputShapeError, match="conflicts with the static dims"):
        open_model(tflite_fp16_mlp(), {"input": (2, 16)})
    with pytest.raises(InputShapeError, match="sliced at its static shape"):
        open_model(with_signature([-1, 16]), {"input": (2, 16)})


def test_folding_keeps_the_graph_structure_of_a_static_model() -> None:
    """Folding rewrites constants and fuses what sessions fuse, but a ViT's MatMul + Add stay (split patterns)."""
    from collections import Counter

    from fleetpipe.models import zoo

    model = zoo.build("vit", resolution=16, patch=4, dim=32, depth=2, heads=2)
    loaded = open_model(model)
    assert Counter(n.op_type for n in loaded.model.graph.node) == Counter(n.op_type for n in model.graph.node)


def test_unknown_ops_are_one_log_line_not_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    from onnx import TensorProto, helper

    node = helper.make_node("LRN", ["x"], ["y"], name="lrn", size=3)
    graph = helper.make_graph([node], "lrn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with caplog.at_level(logging.WARNING, logger="fleetpipe.models"):
        loaded = open_model(model)  # the suite turns warnings into errors: none may escape
    assert loaded.graph.layers[0].unknown_ops == ("LRN",)
    lines = [r.getMessage() for r in caplog.records if "unknown to the estimator" in r.getMessage()]
    assert len(lines) == 1 and "LRN" in lines[0]


def test_a_node_profiles_a_tflite_slice_layer_by_layer() -> None:
    from fleetpipe.models.tflite import load_tflite
    from fleetpipe.node.profile import slice_layer_ms

    loaded = open_model(tflite_fp16_mlp(), grouping="blocks")
    data = loaded.slice(0, len(loaded.graph.layers) - 1)
    ms = slice_layer_ms(data, runs=2)
    assert len(ms) == len(load_tflite(data).layers) and all(t >= 0 for t in ms)
