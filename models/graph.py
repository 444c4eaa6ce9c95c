"""The model graph as the planner sees it: a chain of layers with FLOPs, parameters and crossing tensors.

Pure data, no onnx import: ``fleetpipe.models.onnx_graph`` (and the TFLite loader) build these values.

Theory of operation: a model is a DAG of nodes. A *cut* is a prefix of one topological order of
its nodes; what must be sent across the cut is every tensor produced before it (or a model input)
and consumed after it, plus any model output already produced. Nodes are grouped into *layers* so
that the cut after each layer is cheap (usually one activation crosses); the planner places
contiguous ranges of layers on devices, and ``Layer.out_tensors`` is exactly what a stage ending at
that layer publishes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from fleetpipe.errors import SliceError

__all__ = ["Layer", "ModelGraph", "TensorInfo", "split_ranges"]


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A named tensor with a static numpy dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("tensor name must not be empty")
        if any(d < 0 for d in self.shape):
            raise ValueError(f"tensor {self.name!r} has a negative dimension: {self.shape}")
        if self.nbytes < 0:
            raise ValueError(f"tensor {self.name!r} has negative nbytes")


@dataclass(frozen=True, slots=True)
class Layer:
    """A group of consecutive nodes; ``out_tensors`` cross the cut right after it."""

    index: int
    name: str
    nodes: tuple[str, ...]
    op_types: tuple[str, ...]
    flops: int
    param_bytes: int
    out_tensors: tuple[str, ...]
    out_bytes: int
    unknown_ops: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ValueError("layer index must be >= 0")
        if not self.nodes:
            raise ValueError(f"layer {self.index} has no nodes")
        if self.flops < 0 or self.param_bytes < 0 or self.out_bytes < 0:
            raise ValueError(f"layer {self.index} has a negative cost")


@dataclass(frozen=True, slots=True)
class ModelGraph:
    """A model as a chain of layers; every tensor's byte size is in ``tensor_bytes``."""

    name: str
    layers: tuple[Layer, ...]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    input_bytes: int
    tensor_bytes: Mapping[str, int]
    tensors: Mapping[str, TensorInfo] = field(default_factory=dict)
    order: str = "file"

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a model graph needs at least one layer")
        for i, layer in enumerate(self.layers):
            if layer.index != i:
                raise ValueError(f"layer at position {i} has index {layer.index}")
        object.__setattr__(self, "tensor_bytes", MappingProxyType(dict(self.tensor_bytes)))
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def total_flops(self) -> int:
        """FLOPs of one inference (sum over layers)."""
        return sum(layer.flops for layer in self.layers)

    @property
    def total_param_bytes(self) -> int:
        """Parameter bytes summed over layers (a weight shared by two layers counts twice)."""
        return sum(layer.param_bytes for layer in self.layers)

    def crossing(self, after_layer: int) -> tuple[str, ...]:
        """Tensors that cross the cut after ``after_layer`` (the model outputs after the last layer)."""
        self._check_index(after_layer)
        return self.layers[after_layer].out_tensors

    def crossing_bytes(self, after_layer: int) -> int:
        """Bytes that cross the cut after ``after_layer``."""
        self._check_index(after_layer)
        return self.layers[after_layer].out_bytes

    def inputs_of(self, first_layer: int) -> tuple[str, ...]:
        """Tensors a slice starting at ``first_layer`` needs."""
        self._check_index(first_layer)
        if first_layer == 0:
            return tuple(t.name for t in self.inputs)
        return self.crossing(first_layer - 1)

    def candidate_cuts(self) -> tuple[tuple[int, int], ...]:
        """``(after_layer, crossing_bytes)`` for every cut between two layers."""
        return tuple((layer.index, layer.out_bytes) for layer in self.layers[:-1])

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self.layers):
            raise IndexError(f"layer {index} out of range 0..{len(self.layers) - 1}")


def split_ranges(n_layers: int, cuts: tuple[int, ...] | list[int]) -> list[tuple[int, int]]:
    """Turn cut points (cut after these layers) into inclusive ``(first, last)`` layer ranges."""
    points = list(cuts)
    if points != sorted(set(points)):
        raise SliceError(f"cuts must be strictly increasing: {points}")
    if points and (points[0] < 0 or points[-1] >= n_layers - 1):
        raise SliceError(f"cuts must lie in 0..{n_layers - 2} for {n_layers} layers: {points}")
    ranges, first = [], 0
    for cut in points:
        ranges.append((first, cut))
        first = cut + 1
    ranges.append((first, n_layers - 1))
    return ranges
