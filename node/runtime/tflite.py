"""LiteRT (TFLite) backend: loads a .tflite flatbuffer from bytes, resizing inputs for the batch given."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fleetpipe.errors import InferenceError, RuntimeLoadError
from fleetpipe.node.runtime import TensorSpec, check_inputs

__all__ = ["TfliteRuntime"]


class TfliteRuntime:
    """Runtime backed by the LiteRT interpreter (``ai_edge_litert``, else ``tflite_runtime``)."""

    kind = "tflite"

    def __init__(self, *, threads: int = 1) -> None:
        self.threads = threads
        self._interpreter: Any = None
        self._inputs: tuple[TensorSpec, ...] = ()
        self._outputs: tuple[TensorSpec, ...] = ()
        self._input_index: dict[str, int] = {}
        self._output_index: dict[str, int] = {}
        self._current_shape: dict[str, tuple[int, ...]] = {}

    def load(self, model_bytes: bytes) -> None:
        """Build the interpreter from flatbuffer bytes and allocate tensors; raises RuntimeLoadError."""
        interpreter_cls = _interpreter_class()
        try:
            interpreter = interpreter_cls(model_content=bytes(model_bytes), num_threads=self.threads)
            interpreter.allocate_tensors()
            in_details = interpreter.get_input_details()
            out_details = interpreter.get_output_details()
            inputs = tuple(_spec(d) for d in in_details)
            outputs = tuple(_spec(d) for d in out_details)
        except Exception as exc:  # LiteRT raises ValueError/RuntimeError with C++ messages
            raise RuntimeLoadError(f"LiteRT cannot load the slice: {exc}") from exc
        self._interpreter, self._inputs, self._outputs = interpreter, inputs, outputs
        self._input_index = {d["name"]: int(d["index"]) for d in in_details}
        self._output_index = {d["name"]: int(d["index"]) for d in out_details}
        self._current_shape = {d["name"]: tuple(int(x) for x in d["shape"]) for d in in_details}

    def input_specs(self) -> tuple[TensorSpec, ...]:
        """Specs of the model inputs (dynamic dimensions from the shape signature)."""
        return self._inputs

    def output_specs(self) -> tuple[TensorSpec, ...]:
        """Specs of the model outputs (dynamic dimensions from the shape signature)."""
        return self._outputs

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Resize if the input shapes changed, then invoke once; raises InferenceError."""
        interpreter = self._interpreter
        if interpreter is None:
            raise InferenceError("no slice loaded")
        feed = check_inputs(self._inputs, inputs)
        try:
            resized = False
            for name, array in feed.items():
                if self._current_shape[name] != array.shape:
                    interpreter.resize_tensor_input(self._input_index[name], list(array.shape), strict=True)
                    self._current_shape[name] = array.shape
                    resized = True
            if resized:
                interpreter.allocate_tensors()
            for name, array in feed.items():
                interpreter.set_tensor(self._input_index[name], array)
            interpreter.invoke()
            # get_tensor copies, so results stay valid after the next invoke.
            return {name: interpreter.get_tensor(index) for name, index in self._output_index.items()}
        except Exception as exc:
            raise InferenceError(f"LiteRT failed: {exc}") from exc


def _interpreter_class() -> Any:
    """The LiteRT Interpreter class; raises RuntimeLoadError if neither package is installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError as exc:
            raise RuntimeLoadError("no TFLite runtime installed (pip install ai-edge-litert)") from exc
    return Interpreter


def _spec(detail: Mapping[str, Any]) -> TensorSpec:
    """TensorSpec of a LiteRT tensor detail, using shape_signature for dynamic dimensions."""
    signature = detail.get("shape_signature")
    shape = signature if signature is not None and len(signature) == len(detail["shape"]) else detail["shape"]
    return TensorSpec(str(detail["name"]), np.dtype(detail["dtype"]).name, tuple(int(d) for d in shape))
