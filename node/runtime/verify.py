"""Refuse a slice from the network before any runtime sees it: self-contained, standard operators, bounded sizes.

A slice's hash proves it is the slice the assignment names, not that it is harmless. Runtimes read
more than the bytes they are given: ONNX tensors may live in *external data* files (a path that
onnxruntime resolves against the working directory, so a slice could pull any readable file into a
result), TFLite buffers may point at offsets outside the file or at external buffer files, custom
operator domains run code the model chooses, and declared tensor sizes drive allocations. So before a
session is created :func:`verify_slice` checks, without running anything:

* the size of the slice (``SliceLimits.max_bytes``);
* ONNX: every tensor (initializers, sparse initializers, ``Constant``-style attribute tensors, in the
  main graph and every subgraph) has its data inline: ``data_location`` is not EXTERNAL and there is no
  ``external_data`` entry (no ``location``); operator domains and opset imports are ``ai.onnx`` (``""``)
  and ``ai.onnx.ml`` only; no model-local functions; every declared tensor (initializer dims, static
  input/output/value_info shapes) is at most ``max_tensor_bytes``. The default domains have no operator
  that reads files;
* TFLite: no external buffers, every buffer's offset and size inside the file, no custom operators,
  declared tensor shapes bounded likewise;
* the test-only fake runtime is refused unless the local configuration allows it (never the network).

Any failure raises :class:`~fleetpipe.errors.UntrustedSlice` with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fleetpipe.errors import UntrustedSlice

__all__ = ["ONNX_DOMAINS", "SliceLimits", "checked_kind", "verify_slice"]

#: Operator domains a slice may use (``""`` is ai.onnx).
ONNX_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})


@dataclass(frozen=True, slots=True)
class SliceLimits:
    """Bounds a node puts on a slice before loading it."""

    max_bytes: int = 1 << 30
    max_tensor_bytes: int = 1 << 30  # any one declared tensor
    allow_fake: bool = False  # the test-only fake runtime (a local test-harness setting, never from the network)


def verify_slice(data: bytes, kind: str, limits: SliceLimits) -> None:
    """Raise UntrustedSlice unless the ``kind`` slice ``data`` passes every check of the module docstring."""
    if len(data) > limits.max_bytes:
        raise UntrustedSlice(f"slice of {len(data)} bytes exceeds the node's limit of {limits.max_bytes}")
    if kind == "onnx":
        _check_onnx(data, limits)
    elif kind == "tflite":
        _check_tflite(data, limits)
    elif kind == "fake":
        if not limits.allow_fake:
            raise UntrustedSlice("a fake-runtime (test-only) slice; this node does not load those")
    else:
        raise UntrustedSlice(f"unknown slice kind {kind!r}")


# --- ONNX -------------------------------------------------------------------------------------------


def _check_onnx(data: bytes, limits: SliceLimits) -> None:
    import onnx

    model = onnx.ModelProto()
    try:
        model.ParseFromString(bytes(data))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise UntrustedSlice(f"not a parsable ONNX model: {exc}") from None
    if len(model.functions):
        raise UntrustedSlice(f"the slice defines {len(model.functions)} model-local function(s)")
    for opset in model.opset_import:
        if opset.domain not in ONNX_DOMAINS:
            raise UntrustedSlice(f"the slice imports operator domain {opset.domain!r}")
    _check_graph(model.graph, limits, onnx)


def _check_graph(graph: Any, limits: SliceLimits, onnx: Any) -> None:
    for t in graph.initializer:
        _check_tensor(t, limits, onnx)
    for st in graph.sparse_initializer:
        _check_tensor(st.values, limits, onnx)
        _check_tensor(st.indices, limits, onnx)
    for vi in (*graph.input, *graph.output, *graph.value_info):
        _check_value_info(vi, limits, onnx)
    for node in graph.node:
        if node.domain not in ONNX_DOMAINS:
            raise UntrustedSlice(f"operator {node.op_type!r} of domain {node.domain!r}")
        for attr in node.attribute:
            for t in (*([attr.t] if attr.HasField("t") else []), *attr.tensors):
                _check_tensor(t, limits, onnx)
            for st in (*([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []), *attr.sparse_tensors):
                _check_tensor(st.values, limits, onnx)
                _check_tensor(st.indices, limits, onnx)
            for g in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                _check_graph(g, limits, onnx)


def _check_tensor(t: Any, limits: SliceLimits, onnx: Any) -> None:
    if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
        where = next((e.value for e in t.external_data if e.key == "location"), "?")
        raise UntrustedSlice(f"tensor {t.name!r} has external data (location {where!r}); slices must be "
                             f"self-contained")
    _bounded(f"tensor {t.name!r}", list(t.dims), _itemsize(t.data_type, onnx), limits)


def _check_value_info(vi: Any, limits: SliceLimits, onnx: Any) -> None:
    tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
    if tt is None or not tt.HasField("shape"):
        return
    dims = [d.dim_value for d in tt.shape.dim if d.HasField("dim_value")]
    _bounded(f"value {vi.name!r}", dims, _itemsize(tt.elem_type, onnx), limits)


def _itemsize(data_type: int, onnx: Any) -> int:
    try:
        return max(int(onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize), 1)
    except Exception:  # unknown or string types: count 8 bytes an element
        return 8


def _bounded(what: str, dims: list[int], itemsize: int, limits: SliceLimits) -> None:
    if any(d < 0 for d in dims):
        raise UntrustedSlice(f"{what} declares a negative dimension {dims}")
    nbytes = math.prod(dims) * itemsize
    if nbytes > limits.max_tensor_bytes:
        raise UntrustedSlice(f"{what} declares {nbytes} bytes (shape {dims}), over the node's limit of "
                             f"{limits.max_tensor_bytes}")


# --- TFLite -----------------------------------------------------------------------------------------


def _check_tflite(data: bytes, limits: SliceLimits) -> None:
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        raise UntrustedSlice("cannot verify a TFLite slice here (ai-edge-litert's schema is missing)") from None
    try:
        model = schema.Model.GetRootAs(bytes(data), 0)
        if model.ExternalBuffersLength() or model.ExternalBufferGroupsLength():
            raise UntrustedSlice("the slice uses TFLite external buffers; slices must be self-contained")
        for i in range(model.BuffersLength()):
            buf = model.Buffers(i)
            offset, size = int(buf.Offset()), int(buf.Size())
            if offset > 1 and offset + size > len(data):
                raise UntrustedSlice(f"TFLite buffer {i} (offset {offset}, {size} bytes) lies outside the "
                                     f"{len(data)}-byte file")
        for i in range(model.OperatorCodesLength()):
            custom = model.OperatorCodes(i).CustomCode()
            if custom:
                raise UntrustedSlice(f"the slice uses the custom TFLite operator {custom.decode(errors='replace')!r}")
        for s in range(model.SubgraphsLength()):
            sg = model.Subgraphs(s)
            for j in range(sg.TensorsLength()):
                tensor = sg.Tensors(j)
                dims = [int(tensor.Shape(k)) for k in range(tensor.ShapeLength())]
                _bounded(f"TFLite tensor {j} of subgraph {s}", [max(d, 0) for d in dims], 8, limits)
    except UntrustedSlice:
        raise
    except Exception as exc:  # garbage offsets surface as IndexError/struct.error/ValueError/...
        raise UntrustedSlice(f"corrupt TFLite flatbuffer: {type(exc).__name__}: {exc}") from None


def checked_kind(data: bytes, limits: SliceLimits) -> str:
    """The runtime kind of ``data`` once :func:`verify_slice` passed it; raises RuntimeLoadError/UntrustedSlice."""
    from fleetpipe.node.runtime import detect_kind

    kind = detect_kind(data)
    verify_slice(data, kind, limits)
    return kind
