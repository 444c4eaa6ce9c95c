"""Pure ModelGraph values, the package surface and import cost."""

from __future__ import annotations

import subprocess
import sys

import pytest

import fleetpipe.models
from fleetpipe.errors import SliceError
from fleetpipe.models.graph import Layer, ModelGraph, TensorInfo, split_ranges


def _graph() -> ModelGraph:
    def layer(i: int, outs: tuple[str, ...]) -> Layer:
        return Layer(i, f"l{i}", (f"n{i}",), ("Conv",), 10 * (i + 1), 4, outs, 8 * len(outs))

    x = TensorInfo("x", "float32", (1, 2), 8)
    y = TensorInfo("y", "float32", (1, 2), 8)
    return ModelGraph(
        "g",
        (layer(0, ("a",)), layer(1, ("a", "b")), layer(2, ("y",))),
        (x,),
        (y,),
        8,
        {"a": 8, "b": 8, "y": 8},
    )


def test_crossing_and_inputs_of() -> None:
    g = _graph()
    assert g.crossing(1) == ("a", "b")
    assert g.crossing_bytes(1) == 16
    assert g.inputs_of(0) == ("x",)
    assert g.inputs_of(2) == ("a", "b")
    assert g.total_flops == 60
    assert g.candidate_cuts() == ((0, 8), (1, 16))
    with pytest.raises(IndexError):
        g.crossing(3)


def test_graph_is_immutable() -> None:
    g = _graph()
    with pytest.raises(AttributeError):
        g.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        g.tensor_bytes["a"] = 1  # type: ignore[index]


def test_split_ranges() -> None:
    assert split_ranges(5, [1, 3]) == [(0, 1), (2, 3), (4, 4)]
    assert split_ranges(3, []) == [(0, 2)]
    for bad in ([3, 1], [1, 1], [4], [-1]):
        with pytest.raises(SliceError):
            split_ranges(5, bad)


def test_layer_validation() -> None:
    with pytest.raises(ValueError):
        Layer(0, "empty", (), (), 0, 0, (), 0)


def test_package_exports() -> None:
    for name in fleetpipe.models.__all__:
        assert hasattr(fleetpipe.models, name), name


def test_cli_and_graph_import_cheaply() -> None:
    code = (
        "import sys, fleetpipe.models.cli, fleetpipe.models.graph, fleetpipe.models;"
        "heavy = [m for m in ('onnx', 'onnxruntime', 'rich', 'sklearn') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
