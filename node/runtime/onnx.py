"""onnxruntime backend: loads an ONNX slice from bytes and runs it on the chosen execution providers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fleetpipe.errors import InferenceError, RuntimeLoadError
from fleetpipe.node.runtime import TensorSpec, check_inputs

__all__ = ["OnnxRuntime"]

# onnxruntime reports types as "tensor(<onnx type>)".
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


class OnnxRuntime:
    """Runtime backed by an onnxruntime InferenceSession (graph optimisation on)."""

    kind = "onnx"

    def __init__(self, *, threads: int = 1, providers: Sequence[str] | None = None) -> None:
        self.threads = threads
        self.providers = tuple(providers) if providers is not None else None
        self._session: Any = None
        self._inputs: tuple[TensorSpec, ...] = ()
        self._outputs: tuple[TensorSpec, ...] = ()

    def load(self, model_bytes: bytes) -> None:
        """Create the session from serialized ONNX bytes; raises RuntimeLoadError."""
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeLoadError("onnxruntime is not installed (pip install fleetpipe[onnx])") from exc
        providers = self.providers if self.providers is not None else tuple(ort.get_available_providers())
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise RuntimeLoadError(f"execution provider {missing[0]!r} is not available here")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(
                bytes(model_bytes), sess_options=options, providers=list(providers)
            )
            inputs = tuple(_spec(arg) for arg in session.get_inputs())
            outputs = tuple(_spec(arg) for arg in session.get_outputs())
        except RuntimeLoadError:
            raise
        except Exception as exc:  # onnxruntime raises its own pybind classes (Fail, InvalidProtobuf, ...)
            raise RuntimeLoadError(f"onnxruntime cannot load the slice: {exc}") from exc
        self._session, self._inputs, self._outputs = session, inputs, outputs

    def input_specs(self) -> tuple[TensorSpec, ...]:
        """Specs of the model inputs, in model order."""
        return self._inputs

    def output_specs(self) -> tuple[TensorSpec, ...]:
        """Specs of the model outputs, in model order."""
        return self._outputs

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session once on validated inputs; raises InferenceError."""
        if self._session is None:
            raise InferenceError("no slice loaded")
        feed = check_inputs(self._inputs, inputs)
        names = [spec.name for spec in self._outputs]
        try:
            values = self._session.run(names, feed)
        except Exception as exc:
            raise InferenceError(f"onnxruntime failed: {exc}") from exc
        return dict(zip(names, values, strict=True))


def _spec(arg: Any) -> TensorSpec:
    """TensorSpec of an onnxruntime NodeArg; symbolic or unknown dimensions become -1."""
    dtype = _ORT_DTYPES.get(arg.type)
    if dtype is None:
        raise RuntimeLoadError(f"tensor {arg.name!r} has unsupported type {arg.type}")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(arg.name, dtype, shape)
