"""``plan`` / ``planner`` take a user's model the same way ``model inspect`` does (#18 items 1, 2, 5, 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from fleetpipe.config import PlannerConfig, load
from fleetpipe.models.shapes import parse_input_shapes
from fleetpipe.planner.loop import load_model_info
from tests.models._byom import computed_reshape

FLEET = '[[device]]\nname = "a"\nclass = "rpi4"\n[[device]]\nname = "b"\nclass = "rpi5"\n'


def fleetpipe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetpipe", *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_toml_env_and_flag_take_one_syntax(tmp_path: Path) -> None:
    conf = tmp_path / "planner.toml"
    conf.write_text('[planner]\nmodel = "m.onnx"\ninput_shape = ["x=1,3,16,8", "y=1,4"]\n')
    from_file = load(PlannerConfig, file=conf)
    from_env = load(PlannerConfig, env={"FLEETPIPE_MODEL": "m.onnx", "FLEETPIPE_INPUT_SHAPE": "x=1,3,16,8,y=1,4"})
    from_flags = load(PlannerConfig, flags={"model": "m.onnx", "input_shape": ("x=1,3,16,8", "y=1,4")})
    want = {"x": (1, 3, 16, 8), "y": (1, 4)}
    for config in (from_file, from_env, from_flags):
        assert parse_input_shapes(config.input_shape) == want
    assert load(PlannerConfig, flags={"model": "m.onnx"}).input_shape == ()


def test_planner_loads_a_computed_shape_model(tmp_path: Path) -> None:
    path = tmp_path / "user.onnx"
    onnx.save(computed_reshape(), str(path))
    info = load_model_info(str(path), ("x=1,3,16,8",))
    assert info.kind == "onnx" and info.graph.inputs[0].shape == (1, 3, 16, 8)
    assert len(info.host_ms) == len(info.graph.layers)
    data = info.slice(0, len(info.graph.layers) - 1)
    assert onnx.load_from_string(data).graph.output[0].name == "y"


def test_plan_cli_onnx_with_input_shape_zero_based(tmp_path: Path) -> None:
    path = tmp_path / "user.onnx"
    onnx.save(computed_reshape(), str(path))
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET)
    bad = fleetpipe("plan", "--model", str(path), "--fleet", str(fleet), "--json")
    assert bad.returncode == 2 and "--input-shape x=1,3,<H>,8" in bad.stderr and "Traceback" not in bad.stderr
    ok = fleetpipe("plan", "--model", str(path), "--fleet", str(fleet), "--input-shape", "x=1,3,16,8", "--json",
                   "--bits", "32")
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["layer_base"] == 0 and doc["stages"][0]["first_layer"] == 0


def test_plan_cli_tflite_from_the_zoo(tmp_path: Path) -> None:
    path = tmp_path / "r18.tflite"
    made = fleetpipe("model", "zoo", "resnet18", "-o", str(path), "--width", "0.125", "--resolution", "32")
    assert made.returncode == 0, made.stderr
    copy = tmp_path / "model.bin"  # detected by content, not by the name
    copy.write_bytes(path.read_bytes())
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET)
    ok = fleetpipe("plan", "--model", str(copy), "--fleet", str(fleet), "--json", "--bits", "32")
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["stages"][0]["first_layer"] == 0 and doc["feasible"]
    info = load_model_info(str(copy))
    assert info.kind == "tflite" and info.slice(0, 0)[4:8] == b"TFL3"


@pytest.mark.parametrize("command", ["plan", "planner"])
def test_unrunnable_model_fails_before_deploying(tmp_path: Path, command: str) -> None:
    from onnx import TensorProto, helper

    node = helper.make_node("FancyOp", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save(model, str(path))
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET)
    if command == "plan":
        run = fleetpipe("plan", "--model", str(path), "--fleet", str(fleet))
    else:  # no broker is needed to find out: the model is checked first
        run = fleetpipe("planner", "--broker", "mqtt://127.0.0.1:9", "--model", str(path), "--fleet", "t")
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "FancyOp" in run.stderr and "not available in onnxruntime here" in run.stderr
