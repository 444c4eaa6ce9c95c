"""fleetpipe.models: model graphs, DAG-aware cuts, slicing, the model zoo and per-layer profiling.

Importing this package is cheap: onnx and onnxruntime are imported inside the functions that need them.
"""

from __future__ import annotations

from fleetpipe.models.graph import Layer, ModelGraph, TensorInfo, split_ranges
from fleetpipe.models.onnx_graph import UnknownOpWarning, load_onnx, read_model
from fleetpipe.models.profile import LayerProfile, profile_layers, profile_tflite_layers
from fleetpipe.models.slicing import content_hash, slice_bytes, slice_model, verify_slices

__all__ = [
    "Layer",
    "LayerProfile",
    "ModelGraph",
    "TensorInfo",
    "UnknownOpWarning",
    "content_hash",
    "load_onnx",
    "profile_layers",
    "profile_tflite_layers",
    "read_model",
    "slice_bytes",
    "slice_model",
    "split_ranges",
    "verify_slices",
]
