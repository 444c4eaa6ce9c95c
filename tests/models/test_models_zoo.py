"""The zoo: deterministic, sized by options, numerically healthy; the shipped digits model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from fleetpipe.models import zoo
from fleetpipe.models.slicing import make_session, run_model

from ._helpers import TINY, feeds, tiny


def test_names() -> None:
    assert zoo.names() == ["digits", "inception", "mobilenetv2", "resnet18", "resnet50", "vgg16", "vit", "wideconv"]
    with pytest.raises(KeyError):
        zoo.build("alexnet")
    with pytest.raises(KeyError):
        zoo.input_shape("alexnet")


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_models_are_valid_and_healthy(name: str) -> None:
    model = tiny(name)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == zoo.OPSET
    x = feeds(name)
    assert x["input"].shape == zoo.input_shape(name, **TINY[name])
    out = next(iter(run_model(make_session(model), x).values()))
    assert np.isfinite(out).all()
    assert out.std() > 1e-2  # not degenerate
    other = next(iter(run_model(make_session(model), feeds(name, seed=1)).values()))
    assert np.abs(out - other).max() > 1e-3  # depends on the input


def test_deterministic_and_seeded() -> None:
    a = zoo.build("vit", **TINY["vit"]).SerializeToString()
    assert a == zoo.build("vit", **TINY["vit"]).SerializeToString()
    assert a != zoo.build("vit", **TINY["vit"], seed=1).SerializeToString()


def test_options_change_size() -> None:
    small = zoo.build("resnet18", width=0.125, resolution=32)
    wide = zoo.build("resnet18", width=0.25, resolution=32)
    assert len(wide.SerializeToString()) > 3 * len(small.SerializeToString())
    assert zoo.input_shape("resnet18", resolution=48, batch=2) == (2, 3, 48, 48)
    vit = zoo.build("vit", resolution=16, patch=4, dim=16, depth=3, heads=2)
    assert sum(n.op_type == "Softmax" for n in vit.graph.node) == 3


def test_digits_model_and_test_set() -> None:
    x, y = zoo.digits_test_set()
    assert x.shape == (360, 64) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
    assert y.shape == (360,) and set(np.unique(y)) == set(range(10))
    model = zoo.build("digits")
    logits = run_model(make_session(model), {"input": x})["logits"]
    accuracy = float((logits.argmax(1) == y).mean())
    assert accuracy > 0.95
    with np.load(zoo.DIGITS_NPZ) as data:
        assert float(data["accuracy"]) == pytest.approx(accuracy)
        h = np.maximum(x @ data["W0"] + data["b0"], 0)
        h = np.maximum(h @ data["W1"] + data["b1"], 0)
        np.testing.assert_allclose(h @ data["W2"] + data["b2"], logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError):
        zoo.build("digits", width=2)
