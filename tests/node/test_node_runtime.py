"""Runtime backends: real ONNX and TFLite slices, the fake backend, validation and error translation."""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys

import numpy as np
import pytest

from fleetpipe.errors import InferenceError, RuntimeLoadError
from fleetpipe.node import runtime as rt
from fleetpipe.node.runtime import Runtime, TensorSpec, create_runtime, detect_kind
from fleetpipe.node.runtime.fake import fake_model_bytes, fake_reference

X = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)


@pytest.mark.parametrize(
    "module_name",
    [
        "fleetpipe.node.runtime",
        "fleetpipe.node.runtime.onnx",
        "fleetpipe.node.runtime.tflite",
        "fleetpipe.node.runtime.fake",
        "fleetpipe.node.emulate",
        "fleetpipe.node.executor",
        "fleetpipe.node.lifecycle",
        "fleetpipe.node.profile",
    ],
)
def test_exported_members(module_name: str) -> None:
    module = importlib.import_module(module_name)
    defined_here = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and getattr(value, "__module__", module_name) == module_name
        and (inspect.isclass(value) or inspect.isfunction(value))
    }
    assert defined_here <= set(module.__all__)
    assert all(hasattr(module, name) for name in module.__all__)


def test_importing_runtime_does_not_import_backends() -> None:
    code = (
        "import sys, fleetpipe.node.runtime, fleetpipe.node.executor, fleetpipe.node.lifecycle;"
        "bad = [m for m in ('onnxruntime', 'ai_edge_litert', 'tflite_runtime', 'onnx') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_available_runtimes_and_providers() -> None:
    kinds = rt.available_runtimes()
    assert kinds[-1] == "fake"
    assert set(kinds) <= set(rt.RUNTIME_KINDS)
    assert "onnx" in kinds
    assert "CPUExecutionProvider" in rt.available_providers()


def test_create_runtime_unknown_kind() -> None:
    with pytest.raises(RuntimeLoadError, match="unknown runtime kind 'torch'"):
        create_runtime("torch")
    with pytest.raises(ValueError):
        create_runtime("fake", threads=0)


def test_tensor_spec_validation() -> None:
    with pytest.raises(ValueError):
        TensorSpec("", "float32", (1,))
    with pytest.raises(ValueError):
        TensorSpec("x", "float", (1,))
    with pytest.raises(ValueError):
        TensorSpec("x", "float32", (-2,))


# --- ONNX ---------------------------------------------------------------------------------------


def _onnx(model: bytes, threads: int = 1) -> Runtime:
    runtime = create_runtime("onnx", threads=threads, providers=["CPUExecutionProvider"])
    runtime.load(model)
    return runtime


def test_onnx_output_matches_numpy(onnx_dense) -> None:
    runtime = _onnx(onnx_dense.data)
    assert isinstance(runtime, Runtime)
    assert runtime.input_specs() == (TensorSpec("x", "float32", (-1, 4)),)
    assert runtime.output_specs() == (TensorSpec("y", "float32", (-1, 3)),)
    out = runtime.run({"x": X})
    assert set(out) == {"y"}
    np.testing.assert_allclose(out["y"], onnx_dense.expected(X), rtol=1e-5, atol=1e-6)
    one = runtime.run({"x": X[:1]})["y"]  # dynamic batch
    assert one.shape == (1, 3)


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ({"x": X.astype(np.float64)}, r"'x' has dtype float64, expected float32"),
        ({"x": X[:, :3]}, r"'x' has shape \(5, 3\), expected \(-1, 4\)"),
        ({"x": X[None]}, r"'x' has shape \(1, 5, 4\)"),
        ({"input": X}, r"unknown input tensor 'input'"),
        ({}, r"missing input tensor 'x'"),
        ({"x": X.tolist()}, r"'x' is a list"),
    ],
)
def test_onnx_bad_inputs_name_the_tensor(onnx_dense, inputs, match) -> None:
    runtime = _onnx(onnx_dense.data)
    with pytest.raises(InferenceError, match=match):
        runtime.run(inputs)


def test_onnx_accepts_non_contiguous_input(onnx_dense) -> None:
    runtime = _onnx(onnx_dense.data)
    wide = np.asfortranarray(X)
    np.testing.assert_allclose(runtime.run({"x": wide})["y"], onnx_dense.expected(X), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("data", [b"", b"\x08\x07garbage-not-a-model", b"\x00" * 64])
def test_onnx_corrupt_bytes_raise_load_error(data) -> None:
    runtime = create_runtime("onnx")
    with pytest.raises(RuntimeLoadError) as info:
        runtime.load(data)
    assert info.value.__cause__ is not None


def test_onnx_unknown_provider(onnx_dense) -> None:
    runtime = create_runtime("onnx", providers=["NoSuchExecutionProvider"])
    with pytest.raises(RuntimeLoadError, match="NoSuchExecutionProvider"):
        runtime.load(onnx_dense.data)


def test_run_before_load_raises() -> None:
    for kind in rt.available_runtimes():
        with pytest.raises(InferenceError, match="no slice loaded"):
            create_runtime(kind).run({"x": X})


def test_onnx_threads_option(onnx_dense) -> None:
    out = _onnx(onnx_dense.data, threads=2).run({"x": X})["y"]
    np.testing.assert_allclose(out, onnx_dense.expected(X), rtol=1e-5, atol=1e-6)


# --- detect_kind --------------------------------------------------------------------------------


def test_detect_kind(onnx_dense, tflite_dense) -> None:
    assert detect_kind(onnx_dense.data) == "onnx"
    assert detect_kind(tflite_dense.data) == "tflite"
    assert detect_kind(fake_model_bytes(4, 3)) == "fake"
    for junk in (b"", b"\x00\x01", b"hello world", b'{"format": "other"}', b"\xff" * 32):
        with pytest.raises(RuntimeLoadError, match="unrecognised model format"):
            detect_kind(junk)


# --- TFLite -------------------------------------------------------------------------------------


def test_tflite_output_matches_numpy(tflite_dense) -> None:
    if "tflite" not in rt.available_runtimes():
        pytest.skip("no LiteRT / tflite_runtime installed")
    runtime = create_runtime("tflite")
    runtime.load(tflite_dense.data)
    assert runtime.input_specs() == (TensorSpec("x", "float32", (-1, 4)),)
    assert runtime.output_specs() == (TensorSpec("y", "float32", (-1, 3)),)
    out = runtime.run({"x": X})  # batch 5: resize from the stored batch 1
    np.testing.assert_allclose(out["y"], tflite_dense.expected(X), rtol=1e-5, atol=1e-5)
    again = runtime.run({"x": X[:2]})
    np.testing.assert_allclose(again["y"], tflite_dense.expected(X[:2]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["y"], tflite_dense.expected(X), rtol=1e-5, atol=1e-5)  # not aliased


def test_tflite_bad_input_and_corrupt_bytes(tflite_dense) -> None:
    if "tflite" not in rt.available_runtimes():
        pytest.skip("no LiteRT / tflite_runtime installed")
    runtime = create_runtime("tflite")
    runtime.load(tflite_dense.data)
    with pytest.raises(InferenceError, match="'x' has dtype int32"):
        runtime.run({"x": X.astype(np.int32)})
    broken = create_runtime("tflite")
    with pytest.raises(RuntimeLoadError):
        broken.load(tflite_dense.data[:40])


# --- fake ---------------------------------------------------------------------------------------


def test_fake_is_deterministic() -> None:
    model = fake_model_bytes(4, 6, seed=7)
    a, b = create_runtime("fake"), create_runtime("fake")
    a.load(model)
    b.load(model)
    ya, yb = a.run({"x": X})["y"], b.run({"x": X})["y"]
    assert ya.shape == (5, 6) and ya.dtype == np.float32
    np.testing.assert_array_equal(ya, yb)
    np.testing.assert_array_equal(ya, fake_reference(model, X))
    other = create_runtime("fake")
    other.load(fake_model_bytes(4, 6, seed=8))
    assert not np.array_equal(other.run({"x": X})["y"], ya)


def test_fake_validates_and_rejects_bad_specs() -> None:
    runtime = create_runtime("fake")
    runtime.load(fake_model_bytes(4, 3, input_name="act_in", output_name="act_out"))
    assert set(runtime.run({"act_in": X})) == {"act_out"}
    with pytest.raises(InferenceError, match="'act_in' has shape"):
        runtime.run({"act_in": X[:, :2]})
    bad_specs = [b"not json", b"[]", json.dumps({"format": "fleetpipe-fake"}).encode(), b"\xff\xfe"]
    bad_specs.append(json.dumps({"format": "fleetpipe-fake", "in_features": 0, "out_features": 2}).encode())
    for spec in bad_specs:
        with pytest.raises(RuntimeLoadError):
            create_runtime("fake").load(spec)
