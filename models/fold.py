"""Fold constant sub-graphs of an ONNX model whose inputs are pinned, with onnxruntime's own optimiser.

Why onnxruntime: it is already the runtime every node runs, so what it folds is exactly what it would
fold in each node's session anyway (no new numerics, no new dependency), and its ``ORT_ENABLE_BASIC``
level writes a plain ONNX model (standard-domain ops only: constant folding including ``Shape`` of
static tensors, redundant-node elimination, semantics-preserving fusions) through
``SessionOptions.optimized_model_filepath``. onnx's own ``infer_shapes(data_prop=True)`` is run first
(``fleetpipe.models.onnx_graph``) but stops at shape arithmetic it cannot propagate (a ``Cast`` or
``Mul`` on a shape, an ``If`` on it); onnxslim would do the same folding as a new dependency.
Creating the session is also the check that this onnxruntime can run the model at all.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from fleetpipe.errors import UnsupportedModel

if TYPE_CHECKING:
    import onnx

__all__ = ["NotRunnable", "fold_constants", "ort_check", "ort_reason"]


# Basic-level rewrites that change the graph's structure rather than fold it: MatMul + Add becomes
# Reshape -> Gemm -> Reshape on 3-D activations (a ViT's attention and MLP), which the split planner's
# tensor-parallel patterns and the layer grouping would no longer recognise.
KEEP_STRUCTURE = ("MatMulAddFusion",)


class NotRunnable(UnsupportedModel):
    """The local runtime (onnxruntime or LiteRT) cannot run the model (an op it lacks, ...)."""


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with constant sub-graphs folded by onnxruntime (``ORT_ENABLE_BASIC``); raises NotRunnable."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="fleetpipe-fold-") as tmp:
        path = Path(tmp) / "folded.onnx"
        ort_check(model, optimized_path=path)
        try:
            folded = onnx.load(str(path))
        except Exception as exc:  # pragma: no cover - onnxruntime wrote it a moment ago
            raise UnsupportedModel(f"cannot read the folded model: {exc}") from exc
    return _drop_unused_opsets(folded, model)


def _drop_unused_opsets(folded: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime writes opset imports for every domain it registers (``ai.onnx.training``,
    ``com.microsoft`` ...): keep only the domains the original imports or a node uses, so a slice names no
    domain its model did not (nodes refuse slices importing foreign domains, fleetpipe.node.runtime.verify)."""
    used = {n.domain for n in folded.graph.node} | {o.domain for o in original.opset_import}
    keep = [o for o in folded.opset_import if o.domain in used]
    if len(keep) != len(folded.opset_import):
        del folded.opset_import[:]
        folded.opset_import.extend(keep)
    return folded


def ort_check(model: onnx.ModelProto, *, optimized_path: Path | None = None) -> None:
    """Create one onnxruntime session for ``model`` (CPU); raises NotRunnable with a one-line reason."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    try:
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=list(KEEP_STRUCTURE))
    except Exception as exc:
        raise NotRunnable(ort_reason(exc)) from exc


def ort_reason(exc: BaseException) -> str:
    """One line saying why onnxruntime refused a model."""
    text = str(exc)
    m = re.search(r"implementation for (\S+?)\((\d+)\) node with name '([^']*)'", text)
    if m:
        return (f"op {m.group(1)} (opset {m.group(2)}, node {m.group(3)!r}) is not available in onnxruntime "
                "here")
    m = re.search(r"(?:^|\s)([\w.]+):(\w+)\(-?\d+\) is not a registered function/op", text)
    if m:
        return f"custom op {m.group(2)} (domain {m.group(1)}) is not available in onnxruntime here"
    m = re.search(r"Op type not registered '([^']+)'(?: in domain '([^']*)')?", text)
    if m:
        domain = f" (domain {m.group(2)})" if m.group(2) else ""
        return f"custom op {m.group(1)}{domain} is not available in onnxruntime here"
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return f"onnxruntime here cannot run the model: {line[:300]}"
