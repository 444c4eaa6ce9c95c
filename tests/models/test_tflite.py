"""TFLite side of fleetpipe.models: models built in code, graph analysis, slicing, bad input."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema

from fleetpipe.errors import SliceError, UnsupportedModel
from fleetpipe.models import build_tflite, tflite
from fleetpipe.models.build_tflite import (
    CnnSpec,
    TFLiteBuilder,
    build_cnn,
    build_mlp,
    cnn_weights,
    load_mlp_weights,
    mlp_reference,
)
from fleetpipe.models.onnx_graph import UNKNOWN_FLOPS_PER_ELEMENT, UnknownOpWarning
from fleetpipe.models.tflite import load_tflite, run_tflite, slice_tflite, verify_tflite_slices

DATA = Path(build_tflite.__file__).parent / "data"
DIGITS_NPZ = DATA / "digits_mlp.npz"
DIGITS_TFLITE = DATA / "digits_mlp.tflite"
DIGITS_ONNX = DATA / "digits_mlp.onnx"
SPEC = CnnSpec(size=8, channels=4, blocks=2, classes=5, seed=3)
TOL = 1e-5

needs_digits = pytest.mark.skipif(not DIGITS_NPZ.exists(), reason="digits_mlp.npz not generated")


@pytest.fixture(scope="module")
def cnn() -> bytes:
    return build_cnn(SPEC)


@pytest.fixture(scope="module")
def cnn_input() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((1, SPEC.size, SPEC.size, SPEC.in_channels), np.float32)


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    if not DIGITS_NPZ.exists():
        pytest.skip("digits_mlp.npz not generated")
    with np.load(DIGITS_NPZ) as npz:
        return {k: np.asarray(npz[k]) for k in ("x_test", "y_test")}


# --------------------------------------------------------------------------- the digits MLP


@needs_digits
def test_digits_tflite_file_is_built_from_the_npz() -> None:
    assert DIGITS_TFLITE.read_bytes() == build_mlp(load_mlp_weights(DIGITS_NPZ)), (
        "stale digits_mlp.tflite: run python -m fleetpipe.models.build_tflite"
    )


def test_digits_tflite_matches_numpy_and_is_accurate(digits: dict[str, np.ndarray]) -> None:
    weights = load_mlp_weights(DIGITS_NPZ)
    logits = run_tflite(DIGITS_TFLITE.read_bytes(), {"input": digits["x_test"]})["logits"]
    np.testing.assert_allclose(logits, mlp_reference(weights, digits["x_test"]), atol=1e-4, rtol=1e-5)
    assert (logits.argmax(axis=1) == digits["y_test"]).mean() > 0.9


@pytest.mark.skipif(not DIGITS_ONNX.exists(), reason="digits_mlp.onnx not generated")
def test_digits_tflite_agrees_with_onnx(digits: dict[str, np.ndarray]) -> None:
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(DIGITS_ONNX), opts, providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {session.get_inputs()[0].name: digits["x_test"]})[0]
    tfl_logits = run_tflite(DIGITS_TFLITE.read_bytes(), {"input": digits["x_test"]})["logits"]
    np.testing.assert_allclose(tfl_logits, onnx_logits, atol=1e-4, rtol=1e-5)
    assert (tfl_logits.argmax(axis=1) == onnx_logits.argmax(axis=1)).all()


@needs_digits
@pytest.mark.parametrize("grouping", ["blocks", "nodes"])
def test_digits_slices_at_every_cut(grouping: str, digits: dict[str, np.ndarray]) -> None:
    model = DIGITS_TFLITE.read_bytes()
    graph = load_tflite(model, grouping=grouping)  # type: ignore[arg-type]
    assert [layer.op_types for layer in graph.layers] == [("FULLY_CONNECTED",)] * 3
    feeds = {"input": digits["x_test"][:16]}
    for cut, _ in graph.candidate_cuts():
        assert verify_tflite_slices(model, graph, [cut], feeds) < TOL
    assert verify_tflite_slices(model, graph, [c for c, _ in graph.candidate_cuts()], feeds) < TOL


def test_mlp_graph_counts_flops_params_and_bytes() -> None:
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((6, 4), np.float32), rng.standard_normal(4, np.float32))]
    weights.append((rng.standard_normal((4, 3), np.float32), rng.standard_normal(3, np.float32)))
    graph = load_tflite(build_mlp(weights, batch=2), name="mlp")
    assert graph.name == "mlp"
    assert [t.name for t in graph.inputs] == ["input"] and graph.inputs[0].shape == (2, 6)
    assert graph.input_bytes == 2 * 6 * 4
    assert [layer.flops for layer in graph.layers] == [2 * 2 * 4 * 6 + 2 * 4, 2 * 2 * 3 * 4 + 2 * 3]
    assert [layer.param_bytes for layer in graph.layers] == [(24 + 4) * 4, (12 + 3) * 4]
    assert graph.crossing(0) == ("fc0",) and graph.crossing_bytes(0) == 2 * 4 * 4
    assert graph.crossing(1) == ("logits",)
    assert "fc0/W" not in graph.tensor_bytes  # constants are parameters, not activations
    x = rng.standard_normal((2, 6), np.float32)
    np.testing.assert_allclose(run_tflite(build_mlp(weights, batch=2), {"input": x})["logits"],
                               mlp_reference(weights, x), atol=1e-5)  # fmt: skip


# --------------------------------------------------------------------------- the residual CNN


def test_cnn_matches_numpy_reference(cnn: bytes, cnn_input: np.ndarray) -> None:
    got = run_tflite(cnn, {"input": cnn_input})["probs"]
    np.testing.assert_allclose(got, _cnn_reference(SPEC, cnn_input), atol=1e-5)
    assert got.shape == (1, SPEC.classes)


def test_cnn_is_deterministic() -> None:
    assert build_cnn(SPEC) == build_cnn(SPEC)
    assert build_cnn(SPEC) != build_cnn(CnnSpec(size=8, channels=4, blocks=2, classes=5, seed=4))


@pytest.mark.parametrize("grouping", ["blocks", "nodes"])
def test_cnn_slices_at_every_candidate_cut(grouping: str, cnn: bytes, cnn_input: np.ndarray) -> None:
    graph = load_tflite(cnn, grouping=grouping)  # type: ignore[arg-type]
    cuts = [c for c, _ in graph.candidate_cuts()]
    feeds = {"input": cnn_input}
    for cut in cuts:
        assert verify_tflite_slices(cnn, graph, [cut], feeds) < TOL, f"cut after layer {cut}"
    assert verify_tflite_slices(cnn, graph, cuts, feeds) < TOL


def test_blocks_grouping_gives_stem_blocks_head(cnn: bytes) -> None:
    graph = load_tflite(cnn)
    assert [layer.name for layer in graph.layers] == ["stem", "block0", "block1", "logits"]
    assert graph.layers[1].op_types == ("DEPTHWISE_CONV_2D", "CONV_2D", "ADD")
    assert graph.layers[2].op_types[-3:] == ("AVERAGE_POOL_2D", "MEAN", "RESHAPE")
    assert all(len(graph.crossing(i)) == 1 for i in range(len(graph)))


def test_residual_cut_crosses_two_tensors(cnn: bytes, cnn_input: np.ndarray) -> None:
    graph = load_tflite(cnn, grouping="nodes")
    dw = next(layer.index for layer in graph.layers if layer.op_types == ("DEPTHWISE_CONV_2D",))
    assert graph.crossing(dw) == ("stem", "block0/dw")
    plane = SPEC.size * SPEC.size * SPEC.channels * 4
    assert graph.crossing_bytes(dw) == 2 * plane
    # The slice holding only the pointwise conv passes the skip tensor through unchanged.
    piece = slice_tflite(cnn, graph, dw + 1, dw + 1)
    sub = load_tflite(piece)
    assert [t.name for t in sub.inputs] == ["stem", "block0/dw"]
    assert [t.name for t in sub.outputs] == ["stem", "block0/pw"]
    assert verify_tflite_slices(cnn, graph, [dw, dw + 1], {"input": cnn_input}) < TOL


def test_cnn_flops(cnn: bytes) -> None:
    graph = load_tflite(cnn, grouping="nodes")
    s, c = SPEC.size, SPEC.channels
    stem, dw, pw = graph.layers[0], graph.layers[1], graph.layers[2]
    assert stem.flops == 2 * s * s * c * 9 * SPEC.in_channels + s * s * c
    assert dw.flops == 2 * s * s * c * 9 + s * s * c
    assert pw.flops == 2 * s * s * c * c + s * s * c
    assert graph.layers[3].flops == s * s * c  # ADD
    weight_bytes = sum(w.nbytes for w in cnn_weights(SPEC).values())
    assert graph.total_param_bytes == weight_bytes + 8 + 8  # + MEAN axes, RESHAPE shape (int32 x 2)
    assert not any(layer.unknown_ops for layer in graph.layers)


def test_slice_keeps_only_what_it_uses(cnn: bytes) -> None:
    graph = load_tflite(cnn)
    piece = slice_tflite(cnn, graph, 1, 1)
    model = schema.ModelT.InitFromPackedBuf(piece, 0)
    sub = model.subgraphs[0]
    assert len(sub.operators) == 3 and len(model.operatorCodes) == 3  # DEPTHWISE_CONV_2D, CONV_2D, ADD
    assert len(model.buffers) == 1 + 4  # the empty sentinel + dw/pw weights and biases
    assert load_tflite(piece).total_param_bytes == graph.layers[1].param_bytes
    assert len(piece) < len(cnn)


def test_slice_buffers_are_aligned(cnn: bytes) -> None:
    piece = slice_tflite(cnn, load_tflite(cnn), 0, 1)
    model = schema.Model.GetRootAs(piece, 0)
    for i in range(1, model.BuffersLength()):
        buf = model.Buffers(i)
        offset = buf._tab.Vector(buf._tab.Offset(4))  # start of the data vector
        assert offset % 16 == 0


# --------------------------------------------------------------------------- names and unknown ops


def test_duplicate_and_empty_tensor_names_are_made_unique() -> None:
    b = TFLiteBuilder()
    x = b.tensor("x", (1, 4))
    h1, h2, y = b.tensor("", (1, 4)), b.tensor("", (1, 4)), b.tensor("y", (1, 4))
    b.op(schema.BuiltinOperator.RELU, [x], [h1])
    b.op(schema.BuiltinOperator.TANH, [h1], [h2])
    b.op(schema.BuiltinOperator.ADD, [h2, h1], [y], schema.AddOptionsT())
    model = b.finish([x], [y])
    graph = load_tflite(model, grouping="nodes")
    assert graph.crossing(0) == ("tensor#1",)
    assert graph.crossing(1) == ("tensor#1", "tensor#2")
    feeds = {"x": np.linspace(-1, 1, 4, dtype=np.float32).reshape(1, 4)}
    assert verify_tflite_slices(model, graph, [0, 1], feeds) < TOL


def test_unknown_op_is_estimated_conservatively_and_reported() -> None:
    b = TFLiteBuilder()
    x, y = b.tensor("x", (1, 10)), b.tensor("y", (1, 10))
    axis = b.const("axis", np.array(1, np.int32))
    b.op(schema.BuiltinOperator.CUMSUM, [x, axis], [y])
    with pytest.warns(UnknownOpWarning, match="CUMSUM"):
        graph = load_tflite(b.finish([x], [y]))
    assert graph.layers[0].unknown_ops == ("CUMSUM",)
    assert graph.layers[0].flops == UNKNOWN_FLOPS_PER_ELEMENT * (10 + 1 + 10)


# --------------------------------------------------------------------------- bad input


def test_corrupt_bytes_raise_unsupported_model(cnn: bytes, tmp_path: Path) -> None:
    for bad in (b"", b"TFL3", b"\x00" * 64, b"not a model at all" * 10, cnn[: len(cnn) // 3]):
        with pytest.raises(UnsupportedModel):
            load_tflite(bad)
    with pytest.raises(UnsupportedModel):
        load_tflite(tmp_path / "missing.tflite")
    header_only = bytearray(cnn)
    header_only[0:4] = b"\xff\xff\xff\x7f"  # root table offset far past the end
    with pytest.raises(UnsupportedModel):
        load_tflite(bytes(header_only))


@pytest.mark.filterwarnings("ignore::fleetpipe.models.onnx_graph.UnknownOpWarning")
def test_mutated_bytes_never_raise_anything_else(cnn: bytes) -> None:
    rng = np.random.default_rng(1)
    for k in range(300):
        data = bytearray(cnn)
        for pos in rng.integers(0, len(cnn) if k % 2 else 1024, 4):
            data[pos] = int(rng.integers(0, 256))
        with contextlib.suppress(UnsupportedModel):
            load_tflite(bytes(data), grouping="nodes")


def test_invalid_slice_ranges(cnn: bytes) -> None:
    graph = load_tflite(cnn)
    for first, last in ((2, 1), (-1, 0), (0, len(graph)), (len(graph), len(graph))):
        with pytest.raises(SliceError, match="invalid layer range"):
            slice_tflite(cnn, graph, first, last)
    with pytest.raises(SliceError):
        verify_tflite_slices(cnn, graph, [2, 1], {})
    with pytest.raises(SliceError):
        verify_tflite_slices(cnn, graph, [len(graph) - 1], {})


def test_cut_that_leaves_a_tensor_undeclared_is_rejected(cnn: bytes) -> None:
    graph = load_tflite(cnn, grouping="nodes")
    dw = graph.layers[1]
    assert dw.out_tensors == ("stem", "block0/dw")
    broken = dataclasses.replace(dw, out_tensors=("block0/dw",))  # forgets the skip tensor
    bad = dataclasses.replace(graph, layers=(graph.layers[0], broken, *graph.layers[2:]))
    with pytest.raises(SliceError, match="'stem'"):
        slice_tflite(cnn, bad, 2, len(bad) - 1)


def test_slices_are_deterministic(cnn: bytes) -> None:
    graph = load_tflite(cnn)
    assert slice_tflite(cnn, graph, 1, 2) == slice_tflite(bytes(cnn), graph, 1, 2)


def test_graph_of_another_model_is_rejected(cnn: bytes) -> None:
    other = load_tflite(build_cnn(CnnSpec(size=8, channels=4, blocks=3, classes=5)), grouping="nodes")
    with pytest.raises(SliceError, match="does not describe this model"):
        slice_tflite(cnn, other, len(other) - 2, len(other) - 1)


def test_load_from_path(tmp_path: Path, cnn: bytes) -> None:
    path = tmp_path / "net.tflite"
    path.write_bytes(cnn)
    assert load_tflite(path).name == "net"


# --------------------------------------------------------------------------- numpy reference


def _conv_same(x: np.ndarray, w: np.ndarray, b: np.ndarray, *, depthwise: bool = False) -> np.ndarray:
    """Stride-1 SAME conv of NHWC ``x``; ``w`` is [out, kh, kw, in] (or [1, kh, kw, c] depthwise)."""
    _, kh, kw, _ = w.shape
    n, h, wd, _ = x.shape
    padded = np.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
    out = np.zeros((n, h, wd, w.shape[-1] if depthwise else w.shape[0]), np.float64)
    for i in range(kh):
        for j in range(kw):
            patch = padded[:, i : i + h, j : j + wd, :].astype(np.float64)
            out += patch * w[0, i, j, :] if depthwise else patch @ w[:, i, j, :].T.astype(np.float64)
    return out + b


def _cnn_reference(spec: CnnSpec, x: np.ndarray) -> np.ndarray:
    w = cnn_weights(spec)
    h = np.maximum(_conv_same(x, w["stem/W"], w["stem/b"]), 0)
    for i in range(spec.blocks):
        d = np.maximum(_conv_same(h, w[f"block{i}/dw/W"], w[f"block{i}/dw/b"], depthwise=True), 0)
        p = _conv_same(d, w[f"block{i}/pw/W"], w[f"block{i}/pw/b"])
        h = np.maximum(h + p, 0)
    n, s, _, c = h.shape
    pooled = h.reshape(n, s // 2, 2, s // 2, 2, c).mean(axis=(2, 4))
    feat = pooled.mean(axis=(1, 2))
    logits = feat @ w["head/W"].T + w["head/b"]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def test_public_surface() -> None:
    assert set(tflite.__all__) == {
        "load_tflite", "op_name", "pack_model", "run_tflite", "slice_tflite", "verify_tflite_slices",
    }  # fmt: skip
    for name in tflite.__all__ + build_tflite.__all__:
        assert hasattr(tflite, name) or hasattr(build_tflite, name)
