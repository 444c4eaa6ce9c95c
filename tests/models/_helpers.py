"""Tiny zoo variants and helpers shared by the model tests."""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

from fleetpipe.models import zoo

TINY: dict[str, dict[str, Any]] = {
    "resnet18": {"width": 0.125, "resolution": 32},
    "resnet50": {"width": 0.0625, "resolution": 32},
    "vgg16": {"width": 0.0625, "resolution": 32, "fc": 64},
    "mobilenetv2": {"width": 0.25, "resolution": 32},
    "inception": {"width": 0.25, "resolution": 32, "blocks": 3},
    "vit": {"resolution": 16, "patch": 4, "dim": 32, "depth": 2, "heads": 2},
    "wideconv": {"channels": 8, "resolution": 32},
}


@cache
def tiny(name: str) -> Any:
    """A tiny zoo model (cached; do not mutate)."""
    return zoo.build(name, **TINY[name])


def feeds(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random input for a tiny zoo model."""
    rng = np.random.default_rng(seed)
    return {"input": rng.standard_normal(zoo.input_shape(name, **TINY[name])).astype(np.float32)}


def tolerance(model: Any, inputs: dict[str, np.ndarray]) -> float:
    """1e-4 relative to the output magnitude (at least 1e-4 absolute)."""
    from fleetpipe.models.slicing import make_session, run_model

    outs = run_model(make_session(model), inputs)
    scale = max(float(np.max(np.abs(v))) for v in outs.values())
    return 1e-4 * max(1.0, scale)
