"""Slices are valid standalone models that reproduce the whole model at every cut."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import onnx
import pytest

from fleetpipe.errors import SliceError
from fleetpipe.models import zoo
from fleetpipe.models.onnx_graph import load_onnx
from fleetpipe.models.slicing import (
    content_hash,
    make_session,
    run_model,
    slice_bytes,
    slice_model,
    slice_models,
    verify_slices,
)

from ._helpers import TINY, feeds, tiny, tolerance


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_candidate_cut(name: str) -> None:
    model, x = tiny(name), feeds(name)
    g = load_onnx(model)
    tol = tolerance(model, x)
    cuts = [i for i, _ in g.candidate_cuts()]
    assert verify_slices(model, g, cuts, x) < tol  # every layer its own slice: every cut at once
    for cut in cuts:
        assert verify_slices(model, g, [cut], x) < tol, cut


@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_every_node_level_cut_in_dag_models(name: str) -> None:
    model, x = tiny(name), feeds(name)
    g = load_onnx(model, grouping="nodes")
    assert any(len(la.out_tensors) > 1 for la in g.layers)
    assert verify_slices(model, g, [i for i, _ in g.candidate_cuts()], x) < tolerance(model, x)


def test_pairs_of_cuts() -> None:
    model, x = tiny("resnet50"), feeds("resnet50")
    g = load_onnx(model)
    tol = tolerance(model, x)
    for pair in itertools.combinations(range(0, len(g.layers) - 1, 4), 2):
        assert verify_slices(model, g, list(pair), x) < tol, pair


def test_slices_are_not_trivial() -> None:
    model, x = tiny("resnet50"), feeds("resnet50")
    g = load_onnx(model)
    first = slice_model(model, g, 0, 8)
    mid = run_model(make_session(first), x)
    act = next(iter(mid.values()))
    assert np.isfinite(act).all() and act.std() > 1e-2 and (act != 0).mean() > 0.1


def test_slice_interfaces_and_initializers() -> None:
    model = tiny("resnet18")
    g = load_onnx(model)
    part = slice_model(model, g, 2, 4)
    onnx.checker.check_model(part, full_check=True)
    assert [i.name for i in part.graph.input] == list(g.inputs_of(2))
    assert [o.name for o in part.graph.output] == list(g.crossing(4))
    used = {t for n in part.graph.node for t in n.input}
    assert {t.name for t in part.graph.initializer} <= used
    sizes = [len(slice_bytes(model, g, i, i)) for i in range(len(g.layers))]
    assert sum(sizes) < 1.1 * len(model.SerializeToString())


def test_passthrough_tensor_is_input_and_output() -> None:
    model, x = tiny("resnet18"), feeds("resnet18")
    g = load_onnx(model, grouping="nodes")
    # a slice inside a residual block whose skip tensor just passes through
    idx = next(la.index for la in g.layers if la.nodes[0] == "layer1.0/conv1/Relu")
    part = slice_model(model, g, idx, idx)
    ins = {i.name for i in part.graph.input}
    outs = {o.name for o in part.graph.output}
    assert ins & outs
    assert verify_slices(model, g, [idx - 1, idx], x) < tolerance(model, x)


def test_content_hash_is_stable() -> None:
    a = zoo.build("resnet18", **TINY["resnet18"])
    b = zoo.build("resnet18", **TINY["resnet18"])
    ga, gb = load_onnx(a), load_onnx(b)
    ha = [content_hash(slice_bytes(a, ga, i, i)) for i in range(3)]
    hb = [content_hash(slice_bytes(b, gb, i, i)) for i in range(3)]
    assert ha == hb
    assert len(set(ha)) == 3 and all(len(h) >= 16 and int(h, 16) >= 0 for h in ha)
    assert content_hash(b"x") == "2d711642b726b04401627ca9fbac32f5"


def test_invalid_ranges() -> None:
    model = tiny("resnet18")
    g = load_onnx(model)
    for first, last in ((-1, 2), (3, 2), (0, len(g.layers))):
        with pytest.raises(SliceError):
            slice_model(model, g, first, last)
    with pytest.raises(SliceError):
        slice_models(model, g, [5, 2])


def test_graph_of_another_model() -> None:
    with pytest.raises(SliceError, match="not in the model"):
        slice_model(tiny("resnet18"), load_onnx(tiny("vgg16")), 0, 1)


def test_undeclared_crossing_tensor_is_an_error() -> None:
    model = tiny("resnet18")
    g = load_onnx(model, grouping="nodes")
    idx = next(la.index for la in g.layers if len(la.out_tensors) == 2)
    bad_layer = dataclasses.replace(g.layers[idx], out_tensors=g.layers[idx].out_tensors[1:])
    bad = dataclasses.replace(g, layers=(*g.layers[:idx], bad_layer, *g.layers[idx + 1 :]))
    with pytest.raises(SliceError, match="neither produced"):
        slice_model(model, bad, idx + 1, len(g.layers) - 1)


def test_digits_slices_keep_predictions() -> None:
    x, y = zoo.digits_test_set()
    model = zoo.build("digits")
    g = load_onnx(model, {"input": x.shape})
    assert len(g.layers) == 3
    for cuts in ([0], [1], [0, 1]):
        assert verify_slices(model, g, cuts, {"input": x}) < 1e-4
    env = {"input": x}
    for part in slice_models(model, g, [0, 1]):
        env.update(run_model(make_session(part), env))
    assert (env["logits"].argmax(1) == y).mean() > 0.9
