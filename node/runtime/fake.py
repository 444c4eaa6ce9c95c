"""Deterministic numpy backend for tests: ``y = tanh(x @ W)`` with ``W`` drawn from a seeded generator.

The "model" is a small JSON document (see ``fake_model_bytes``), so tests and emulated fleets need no
model files. An optional ``sleep_ms`` makes each run occupy the worker for a fixed time without
burning CPU, which keeps timing tests stable on a shared machine.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from fleetpipe.errors import InferenceError, RuntimeLoadError
from fleetpipe.node.runtime import TensorSpec, check_inputs

__all__ = ["FAKE_FORMAT", "FakeRuntime", "fake_model_bytes", "fake_reference"]

FAKE_FORMAT = "fleetpipe-fake"


def fake_model_bytes(
    in_features: int,
    out_features: int,
    *,
    seed: int = 0,
    dtype: str = "float32",
    input_name: str = "x",
    output_name: str = "y",
    sleep_ms: float = 0.0,
) -> bytes:
    """Serialized spec of a fake slice mapping (batch, in_features) to (batch, out_features)."""
    spec = {
        "format": FAKE_FORMAT,
        "in_features": in_features,
        "out_features": out_features,
        "seed": seed,
        "dtype": dtype,
        "input": input_name,
        "output": output_name,
        "sleep_ms": sleep_ms,
    }
    return json.dumps(spec, sort_keys=True).encode()


def fake_reference(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    """What a fake slice returns for ``x``, computed without a runtime (for test oracles)."""
    runtime = FakeRuntime()
    runtime.load(model_bytes)
    return runtime.compute(x)


class FakeRuntime:
    """Runtime computing ``tanh(x @ W)``; same spec bytes give bit-identical outputs."""

    kind = "fake"

    def __init__(self) -> None:
        self._weights: np.ndarray | None = None
        self._inputs: tuple[TensorSpec, ...] = ()
        self._outputs: tuple[TensorSpec, ...] = ()
        self._sleep_s = 0.0

    def load(self, model_bytes: bytes) -> None:
        """Parse the JSON spec and draw the weights; raises RuntimeLoadError."""
        try:
            spec: dict[str, Any] = json.loads(model_bytes)
            if not isinstance(spec, dict) or spec.get("format") != FAKE_FORMAT:
                raise ValueError(f"not a {FAKE_FORMAT} spec")
            n_in, n_out = int(spec["in_features"]), int(spec["out_features"])
            if n_in < 1 or n_out < 1:
                raise ValueError("feature counts must be >= 1")
            dtype = np.dtype(spec.get("dtype", "float32"))
            if dtype.kind != "f":
                raise ValueError(f"dtype must be a float type, got {dtype.name}")
            sleep_ms = float(spec.get("sleep_ms", 0.0))
            rng = np.random.default_rng(int(spec.get("seed", 0)))
            weights = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(dtype)
            inputs = (TensorSpec(str(spec.get("input", "x")), dtype.name, (-1, n_in)),)
            outputs = (TensorSpec(str(spec.get("output", "y")), dtype.name, (-1, n_out)),)
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
            raise RuntimeLoadError(f"invalid fake model spec: {exc}") from exc
        self._weights, self._inputs, self._outputs = weights, inputs, outputs
        self._sleep_s = max(0.0, sleep_ms) / 1e3

    def input_specs(self) -> tuple[TensorSpec, ...]:
        """Specs of the model inputs."""
        return self._inputs

    def output_specs(self) -> tuple[TensorSpec, ...]:
        """Specs of the model outputs."""
        return self._outputs

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate, compute ``tanh(x @ W)`` and sleep ``sleep_ms``; raises InferenceError."""
        if self._weights is None:
            raise InferenceError("no slice loaded")
        feed = check_inputs(self._inputs, inputs)
        y = self.compute(feed[self._inputs[0].name])
        if self._sleep_s:
            time.sleep(self._sleep_s)
        return {self._outputs[0].name: y}

    def compute(self, x: np.ndarray) -> np.ndarray:
        """The pure function of the slice, without validation or sleep."""
        if self._weights is None:
            raise InferenceError("no slice loaded")
        y: np.ndarray = np.tanh(x @ self._weights)
        return y
