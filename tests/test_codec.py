"""Tensor codec: round trips, error bounds, packing, NaN policy and garbage in."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fleetpipe.codec import (
    EncodedTensor,
    decode_tensor,
    encode_tensor,
    encoded_nbytes,
    from_wire,
    max_abs_error,
    to_wire,
)
from fleetpipe.errors import DecodeError

ALL_DTYPES = ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"]
FLOATS = ["float16", "float32", "float64"]
QBITS = [2, 3, 4, 5, 6, 7, 8]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=7)


def _wire_roundtrip(t: EncodedTensor) -> EncodedTensor:
    return from_wire(msgpack.unpackb(msgpack.packb(to_wire(t), use_bin_type=True), raw=False))


def _tolerance(x: np.ndarray, t: EncodedTensor) -> float:
    """Theoretical bound plus float rounding slack of the arithmetic."""
    top = float(np.max(np.abs(x.astype(np.float64)))) if x.size else 0.0
    eps = float(np.finfo(x.dtype).eps)
    return max_abs_error(t) * (1 + 2.0**-9) + 4 * eps * top + 1e-300


@SETTINGS
@given(st.sampled_from(ALL_DTYPES).flatmap(lambda dt: hnp.arrays(dt, shapes)))
def test_raw_roundtrip_is_exact(x: np.ndarray) -> None:
    t = _wire_roundtrip(encode_tensor(x))
    y = decode_tensor(t)
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(y, x)
    assert max_abs_error(t) == 0.0


finite = {"allow_nan": False, "allow_infinity": False}


def _float_arrays(width_cap: float = 1e6) -> st.SearchStrategy[np.ndarray]:
    def arrays(dt: str) -> st.SearchStrategy[np.ndarray]:
        w = {"float16": 16, "float32": 32, "float64": 64}[dt]
        cap = min(width_cap, 65504.0) if w == 16 else width_cap
        elements = st.floats(-cap, cap, width=w, **finite)
        return hnp.arrays(dt, shapes, elements=elements)

    return st.sampled_from(FLOATS).flatmap(arrays)


@SETTINGS
@given(_float_arrays(), st.sampled_from(QBITS))
def test_quantized_roundtrip_within_bound(x: np.ndarray, bits: int) -> None:
    t = _wire_roundtrip(encode_tensor(x, bits))
    y = decode_tensor(t)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert len(t.data) == math.ceil(x.size * bits / 8)
    if x.size:
        err = np.max(np.abs(y.astype(np.float64) - x.astype(np.float64)))
        assert err <= _tolerance(x, t)


@SETTINGS
@given(_float_arrays(), st.sampled_from(QBITS), st.data())
def test_per_channel_within_bound(x: np.ndarray, bits: int, data: st.DataObject) -> None:
    if x.ndim == 0:
        return
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    t = _wire_roundtrip(encode_tensor(x, bits, axis=axis))
    assert t.axis == axis % x.ndim
    assert isinstance(t.scale, tuple) and len(t.scale) == x.shape[axis]
    y = decode_tensor(t)
    assert y.shape == x.shape
    if x.size:
        assert np.max(np.abs(y.astype(np.float64) - x.astype(np.float64))) <= _tolerance(x, t)


@SETTINGS
@given(_float_arrays(width_cap=60000.0))
def test_float16_within_bound(x: np.ndarray) -> None:
    t = _wire_roundtrip(encode_tensor(x, 16))
    y = decode_tensor(t)
    assert y.dtype == x.dtype and y.shape == x.shape
    if x.size:
        assert np.max(np.abs(y.astype(np.float64) - x.astype(np.float64))) <= _tolerance(x, t)


@pytest.mark.parametrize("bits", [*QBITS, 16, 32])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(), (1,), (3, 5), (2, 3, 7, 1)])
def test_constant_tensor_roundtrips_exactly(bits: int, dtype: str, shape: tuple[int, ...]) -> None:
    x = np.full(shape, -1.375, dtype)
    t = encode_tensor(x, bits)
    if bits <= 8:
        assert t.scale == 0.0
    np.testing.assert_array_equal(decode_tensor(_wire_roundtrip(t)), x)
    if bits <= 8 and x.ndim:
        tc = encode_tensor(x, bits, axis=0)
        np.testing.assert_array_equal(decode_tensor(_wire_roundtrip(tc)), x)


@pytest.mark.parametrize("bits", QBITS)
def test_error_bound_is_step_over_two(bits: int) -> None:
    rng = np.random.default_rng(bits)
    x = rng.standard_normal(10_001).astype(np.float32)
    t = encode_tensor(x, bits)
    step = (float(x.max()) - float(x.min())) / (2**bits - 1)
    assert max_abs_error(t) == pytest.approx(step / 2)
    err = float(np.max(np.abs(decode_tensor(t) - x)))
    assert err <= step / 2 * (1 + 1e-3)
    assert err > step / 2 * 0.9  # a dense sample gets close to the bound: it is tight


@pytest.mark.parametrize("bits", QBITS)
def test_all_codes_pack_and_unpack(bits: int) -> None:
    levels = 2**bits - 1
    codes = np.arange(1000) % (levels + 1)
    x = codes.astype(np.float32)
    x[0], x[1] = 0, levels  # range exactly [0, levels] so the step is 1
    t = encode_tensor(x, bits)
    assert t.scale == 1.0 and t.zero_point == 0.0
    np.testing.assert_array_equal(decode_tensor(t), x)


def test_lsb_first_packing_layout() -> None:
    x = np.array([0, 1, 2, 3], np.float32)
    assert bytes(encode_tensor(x, 2).data) == bytes([0b11100100])
    x4 = np.array([0, 15, 1, 2, 3], np.float32)
    assert bytes(encode_tensor(x4, 4).data) == bytes([0xF0, 0x21, 0x03])


def test_clip_percentile() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(10_000).astype(np.float32)
    x[0] = 1000.0
    t = encode_tensor(x, 4, clip_percentile=99.0)
    assert t.clip is not None
    lo, hi = t.clip
    assert hi < 10.0
    y = decode_tensor(_wire_roundtrip(t))
    inside = (x >= lo) & (x <= hi)
    assert np.max(np.abs(y[inside] - x[inside])) <= max_abs_error(t) * (1 + 1e-3)
    assert y[0] == pytest.approx(hi, abs=max_abs_error(t) * 2)


@pytest.mark.parametrize("bits", [*QBITS])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rejected_when_quantizing(bits: int, bad: float) -> None:
    x = np.array([0.0, bad, 1.0], np.float32)
    with pytest.raises(ValueError, match="non-finite"):
        encode_tensor(x, bits)
    with pytest.raises(ValueError, match="non-finite"):
        encode_tensor(x.reshape(1, 3), bits, axis=1)


@pytest.mark.parametrize("bits", [16, 32])
def test_non_finite_pass_through_float16_and_raw(bits: int) -> None:
    x = np.array([np.nan, np.inf, -np.inf, 1.5], np.float32)
    np.testing.assert_array_equal(decode_tensor(encode_tensor(x, bits)), x)


def test_float16_overflow_rejected() -> None:
    with pytest.raises(ValueError, match="float16"):
        encode_tensor(np.array([1e6], np.float32), 16)


@pytest.mark.parametrize("dtype", ["int8", "int32", "uint8", "bool"])
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_integers_only_raw(dtype: str, bits: int) -> None:
    with pytest.raises(TypeError):
        encode_tensor(np.zeros(4, dtype), bits)


def test_unsupported_inputs() -> None:
    with pytest.raises(TypeError):
        encode_tensor(np.zeros(2, np.complex64))
    with pytest.raises(ValueError):
        encode_tensor(np.zeros(2, np.float32), 9)
    with pytest.raises(ValueError):
        encode_tensor(np.zeros(2, np.float32), 8, axis=3)
    with pytest.raises(ValueError):
        encode_tensor(np.zeros(2, np.float32), 16, axis=0)


def test_raw_decode_is_zero_copy() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = encode_tensor(x)
    assert isinstance(t.data, memoryview)  # no tobytes() on encode
    y = decode_tensor(t)
    assert np.shares_memory(y, x)
    wire = bytes(t.data)
    z = decode_tensor(EncodedTensor("float32", (3, 4), 32, wire))
    assert not z.flags.writeable and z.flags.aligned


def test_non_contiguous_and_big_endian_input() -> None:
    x = np.arange(24, dtype=">f4").reshape(4, 6)[:, ::2]
    y = decode_tensor(_wire_roundtrip(encode_tensor(x)))
    np.testing.assert_array_equal(y, x)
    assert y.dtype == np.float32


def test_encoded_nbytes() -> None:
    assert encoded_nbytes("float32", (2, 3), 32) == 24
    assert encoded_nbytes("float64", (5,), 16) == 10
    assert encoded_nbytes("float32", (5,), 3) == 2
    assert encoded_nbytes("float32", (0, 9), 4) == 0


def test_validation_of_fields() -> None:
    ok = EncodedTensor("float32", (2,), 8, b"\x00\x01", 0.5, -1.0)
    assert ok.nbytes == 2
    bad = [
        dict(dtype="complex64"),
        dict(shape=(-1,)),
        dict(shape=(2**20, 2**20)),
        dict(bits=1),
        dict(data=b"\x00"),
        dict(scale=-1.0),
        dict(scale=float("nan")),
        dict(zero_point=float("inf")),
        dict(axis=1),
        dict(clip=(2.0, 1.0)),
        dict(data="xx"),
        dict(scale=True),
        dict(dtype="int8"),
    ]
    base = dict(dtype="float32", shape=(2,), bits=8, data=b"\x00\x01", scale=0.5, zero_point=-1.0)
    for change in bad:
        with pytest.raises((ValueError, TypeError)):
            EncodedTensor(**{**base, **change})  # type: ignore[arg-type]


def test_from_wire_rejects_bad_dicts() -> None:
    good = to_wire(encode_tensor(np.ones((2, 3), np.float32), 4, axis=1))
    assert from_wire(good).axis == 1
    for change in [
        {"data": b"\x00" * 100},
        {"shape": [2, "3"]},
        {"shape": 5},
        {"dtype": 7},
        {"bits": 2.0},
        {"scale": b"\x00" * 7},
        {"zp": 1.0},
        {"extra": 1},
        {"data": 5},
    ]:
        with pytest.raises(DecodeError):
            from_wire({**good, **change})
    with pytest.raises(DecodeError):
        from_wire({k: v for k, v in good.items() if k != "data"})
    with pytest.raises(DecodeError):
        from_wire([1, 2])


def test_bool_payload_checked() -> None:
    with pytest.raises(DecodeError):
        decode_tensor(EncodedTensor("bool", (2,), 32, b"\x00\x07"))


def test_large_tensor_chunks_consistent() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal(300_001).astype(np.float32) * 5 + 2
    for bits in (8, 4, 5):
        t = encode_tensor(x, bits)
        assert np.max(np.abs(decode_tensor(t) - x)) <= _tolerance(x, t)


def test_extreme_ranges_use_safe_path() -> None:
    x = np.array([-3e38, 3e38, 0.0], np.float32)
    t = encode_tensor(x, 8)
    y = decode_tensor(t)
    assert np.all(np.isfinite(y))
    assert np.max(np.abs(y.astype(np.float64) - x)) <= _tolerance(x, t)
    tiny = np.array([1e-40, 2e-40, 0.0], np.float32)
    y = decode_tensor(encode_tensor(tiny, 8))
    assert np.max(np.abs(y - tiny)) <= 1e-40
    big_offset = np.array([1e6, 1e6 + 1.0, 1e6 + 0.5], np.float64)
    y = decode_tensor(encode_tensor(big_offset, 8))
    assert np.max(np.abs(y - big_offset)) <= 1 / 255 / 2 * 1.001


# ------------------------------------------------------------------------ optional numba kernels (fleetpipe[fast])


@pytest.mark.parametrize("dt", ["float16", "float32", "float64"])
def test_numba_kernels_byte_identical_to_numpy(dt: str) -> None:
    """The fused kernels reproduce the numpy path bit for bit (codes, header, decoded values)."""
    from fleetpipe import codec

    if not codec.warmup():
        pytest.skip("numba not installed")
    rng = np.random.default_rng(7)
    kernels = codec._KERNELS
    for n in (0, 1, 2, 3, 7, 8, 9, 17, 1001, 131073):
        base = rng.standard_normal(n) * 3 + 1
        cases = [base, np.full(n, 2.5), np.maximum(base, 0), np.where(base < 1, -0.0, base), base * 1e-35]
        if dt != "float16":
            cases.append(base * 1e6 + 1e9)
        for x in (c.astype(dt) for c in cases):
            for bits in (2, 3, 4, 5, 6, 7, 8):
                for cp in (None, 99.0):
                    fast = encode_tensor(x, bits, clip_percentile=cp)
                    codec._KERNELS = False
                    try:
                        ref = encode_tensor(x, bits, clip_percentile=cp)
                        ref_y = decode_tensor(ref)
                    finally:
                        codec._KERNELS = kernels
                    assert bytes(fast.data) == bytes(ref.data), (n, bits, cp)
                    assert (fast.scale, fast.zero_point, fast.clip) == (ref.scale, ref.zero_point, ref.clip)
                    assert np.signbit(fast.zero_point) == np.signbit(ref.zero_point)
                    y = decode_tensor(fast)
                    assert y.dtype == ref_y.dtype and y.tobytes() == ref_y.tobytes()
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="non-finite"):
            encode_tensor(np.array([0.0, bad, 1.0], dt), 8)
