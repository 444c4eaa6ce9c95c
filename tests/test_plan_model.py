"""`fleetpipe plan --model FILE --fleet FLEET.toml`: plan a real model for a described fleet."""

from __future__ import annotations

import json

import onnx
import pytest

from fleetpipe.cli import main
from fleetpipe.errors import ConfigError
from fleetpipe.planner.fleetfile import load_fleet

FLEET = """
[[device]]
name = "fast"
class = "jetson-nano"
[[device]]
name = "slow"
class = "rpi4"
[[device]]
name = "wifi"
class = "rpi4-wifi"
[links]
"fast -> slow" = 5
"""


def test_plan_model_for_fleet(tmp_path, capsys):
    from fleetpipe.models import zoo

    model = tmp_path / "m.onnx"
    onnx.save(zoo.build("resnet18", width=0.25, resolution=32), model)
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET)
    assert main(["plan", "--model", str(model), "--fleet", str(fleet), "--bits", "8", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["exact"] is True
    assert doc["layer_base"] == 0 and doc["stages"][0]["first_layer"] == 0  # as model inspect/slice number them
    assert doc["stages"][-1]["last_layer"] == 9
    used = [d for st in doc["stages"] for d in st["devices"]]
    assert len(used) == len(set(used)) and set(used) <= {"fast", "slow", "wifi"}
    # The 5 Mbit/s link override is honoured: fast never feeds slow directly.
    for a, b in zip(doc["stages"], doc["stages"][1:], strict=False):
        assert (a["device"], b["device"]) != ("fast", "slow")
    # --bits 8 at every cut, or the cut's bit floor above it (fleetpipe.planner.bitwidth), as bit_widths says
    floors = {c["after_layer"]: c["bits"] for c in doc["bit_widths"]["cuts"]}
    assert all(st["bits"] == floors.get(st["last_layer"], 8) >= 8 for st in doc["stages"])


def test_fleet_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[device]]\nname = "a"\nclass = "toaster"\n')
    with pytest.raises(ConfigError, match="unknown class"):
        load_fleet(bad)
    bad.write_text('[[device]]\nname = "a"\n[links]\n"a -> zz" = 3\n')
    with pytest.raises(ConfigError, match="known device names"):
        load_fleet(bad)
    assert main(["plan", "--model", "zoo:resnet18"]) == 2


def test_plan_intra_for_fleet(tmp_path, capsys):
    """``--intra latency`` prints split stages (units with kinds and tiles) against the pipeline-only plan."""
    from fleetpipe.models import zoo

    model = tmp_path / "v.onnx"
    onnx.save(zoo.build("vgg16", width=0.25, resolution=64, fc=64, num_classes=10), model)
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[device]]\nname = "a"\nclass = "rpi3"\n[[device]]\nname = "b"\nclass = "rpi3"\n')
    args = ["plan", "--model", str(model), "--fleet", str(fleet), "--bits", "8", "--intra", "latency"]
    assert main([*args, "--msg-ms", "0", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    split = [st for st in doc["stages"] if st["mode"] == "split"]
    assert doc["split_units"] >= 1 and split and set(split[0]["devices"]) == {"a", "b"}
    assert doc["latency_ms"] < doc["pipeline_latency_ms"]
    units = split[0]["units"]
    assert units[0]["first_layer"] == split[0]["first_layer"] and units[-1]["last_layer"] == split[0]["last_layer"]
    assert {u["kind"] for u in units} <= {"lead", "spatial", "channel", "tensor"}
    assert all(u["tiles"] >= 1 for u in units)
    assert main([*args, "--msg-ms", "1000", "--json"]) == 0  # messages that cost a second: no split pays
    assert json.loads(capsys.readouterr().out)["split_units"] == 0
    assert main([*args[:-1], "pipeline"]) == 0
    assert "pipeline-only" in capsys.readouterr().out
    assert main(["plan", "--problem", str(fleet), "--intra", "latency"]) == 2
    assert main([*args, "--tiles", "0"]) == 2
