"""Inference runtimes for stage slices: one synchronous ``Runtime`` protocol, three backends.

A runtime is synchronous and not thread-safe; the node calls it only from its single inference
worker thread (``fleetpipe.node.executor``), never from the event loop. Every backend validates
inputs against its specs *before* running (so a bad frame yields an ``InferenceError`` naming the
tensor, never a silently wrong tensor) and translates its library's exceptions at the boundary:
load problems become ``RuntimeLoadError``, run problems ``InferenceError``.

Backends are imported lazily, so importing this package costs neither onnxruntime nor LiteRT.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from fleetpipe.errors import InferenceError, RuntimeLoadError

__all__ = [
    "RUNTIME_KINDS",
    "Runtime",
    "TensorSpec",
    "available_providers",
    "available_runtimes",
    "check_inputs",
    "create_runtime",
    "detect_kind",
]

RUNTIME_KINDS = ("onnx", "tflite", "fake")

TFLITE_IDENTIFIER = b"TFL3"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, numpy dtype name and shape of one model input or output; -1 marks a dynamic dimension."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("TensorSpec.name must be a non-empty string")
        if np.dtype(self.dtype).name != self.dtype:
            raise ValueError(f"TensorSpec.dtype must be a canonical numpy dtype name, got {self.dtype!r}")
        if not all(isinstance(d, int) and d >= -1 for d in self.shape):
            raise ValueError(f"TensorSpec.shape must hold ints >= -1, got {self.shape!r}")

    def mismatch(self, array: np.ndarray) -> str | None:
        """Why ``array`` does not fit this spec, or None if it does."""
        return self.header_mismatch(array.dtype.name, tuple(array.shape))

    def header_mismatch(self, dtype: str, shape: tuple[int, ...]) -> str | None:
        """Why a tensor of ``dtype`` and ``shape`` does not fit this spec, or None (checkable before decoding)."""
        if dtype != self.dtype:
            return f"dtype {dtype}, expected {self.dtype}"
        if len(shape) != len(self.shape) or any(
            want not in (-1, got) for want, got in zip(self.shape, shape, strict=True)
        ):
            return f"shape {tuple(shape)}, expected {self.shape}"
        return None


@runtime_checkable
class Runtime(Protocol):
    """A loaded model slice that maps named input arrays to named output arrays (synchronous)."""

    def load(self, model_bytes: bytes) -> None:
        """Load a serialized model; raises RuntimeLoadError."""
        ...

    def input_specs(self) -> tuple[TensorSpec, ...]:
        """Specs of the model inputs, in model order."""
        ...

    def output_specs(self) -> tuple[TensorSpec, ...]:
        """Specs of the model outputs, in model order."""
        ...

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once; raises InferenceError naming the offending tensor."""
        ...


def check_inputs(specs: Sequence[TensorSpec], inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validate ``inputs`` against ``specs`` (names, dtypes, shapes) and return C-contiguous arrays."""
    if not isinstance(inputs, Mapping):
        raise InferenceError(f"inputs must be a mapping of name -> array, got {type(inputs).__name__}")
    known = {spec.name for spec in specs}
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise InferenceError(f"unknown input tensor {unknown[0]!r}; the slice expects {sorted(known)}")
    checked: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name not in inputs:
            raise InferenceError(f"missing input tensor {spec.name!r}")
        array = inputs[spec.name]
        if not isinstance(array, np.ndarray):
            raise InferenceError(f"input tensor {spec.name!r} is a {type(array).__name__}, not an ndarray")
        problem = spec.mismatch(array)
        if problem is not None:
            raise InferenceError(f"input tensor {spec.name!r} has {problem}")
        checked[spec.name] = np.ascontiguousarray(array)
    return checked


def available_runtimes() -> tuple[str, ...]:
    """Runtime kinds whose backend library is importable here ('fake' always is)."""
    kinds = []
    if importlib.util.find_spec("onnxruntime") is not None:
        kinds.append("onnx")
    if _find_tflite_module() is not None:
        kinds.append("tflite")
    kinds.append("fake")
    return tuple(kinds)


def available_providers() -> tuple[str, ...]:
    """onnxruntime execution providers available here, in onnxruntime's priority order."""
    if importlib.util.find_spec("onnxruntime") is None:
        return ()
    import onnxruntime

    return tuple(onnxruntime.get_available_providers())


def create_runtime(kind: str, *, threads: int = 1, providers: Sequence[str] | None = None) -> Runtime:
    """An unloaded runtime of ``kind`` ('onnx', 'tflite' or 'fake'); raises RuntimeLoadError."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if kind == "onnx":
        from fleetpipe.node.runtime.onnx import OnnxRuntime

        return OnnxRuntime(threads=threads, providers=providers)
    if kind == "tflite":
        from fleetpipe.node.runtime.tflite import TfliteRuntime

        return TfliteRuntime(threads=threads)
    if kind == "fake":
        from fleetpipe.node.runtime.fake import FakeRuntime

        return FakeRuntime()
    raise RuntimeLoadError(f"unknown runtime kind {kind!r}; expected one of {RUNTIME_KINDS}")


def detect_kind(model_bytes: bytes) -> str:
    """The runtime kind that can load ``model_bytes``; raises RuntimeLoadError if none can."""
    head = bytes(model_bytes[:8])
    if len(head) >= 8 and head[4:8] == TFLITE_IDENTIFIER:
        return "tflite"
    if head[:1] == b"{" and _is_fake_spec(model_bytes):
        return "fake"
    # onnx serialises ModelProto in field order, so a model starts with ir_version (field 1, varint).
    if head[:1] == b"\x08" and len(head) >= 2:
        return "onnx"
    raise RuntimeLoadError(f"unrecognised model format (first bytes {head!r})")


def _find_tflite_module() -> str | None:
    """Name of the importable TFLite interpreter package, or None."""
    for name in ("ai_edge_litert", "tflite_runtime"):
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def _is_fake_spec(model_bytes: bytes) -> bool:
    """Whether the bytes are a JSON spec for the fake runtime."""
    try:
        spec = json.loads(model_bytes)
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(spec, dict) and spec.get("format") == "fleetpipe-fake"
