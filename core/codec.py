"""Tensor codec: raw passthrough, float16, and 2..8-bit uniform affine quantization with bit-packing.

Theory of operation. A tensor becomes an :class:`EncodedTensor`: the original dtype and shape, the bit
width, the quantization parameters and one flat little-endian byte string.

* ``bits=32``: raw passthrough of any supported dtype (floats, ints, bool); decode is a zero-copy
  ``np.frombuffer`` view (read-only) when the buffer is aligned.
* ``bits=16``: floats are rounded to float16; values that overflow float16 raise ``ValueError``;
  NaN and inf pass through unchanged.
* ``bits=2..8``: ``code = round((x - zero_point) / scale)`` in ``[0, 2**bits - 1]`` and
  ``x' = code * scale + zero_point``; ``zero_point`` is the real value of code 0 (the range minimum or
  the lower clip bound). Per-channel: ``scale`` and ``zero_point`` are tuples along ``axis``. Codes are
  packed LSB-first into ``ceil(n * bits / 8)`` bytes with numpy shifts (8 bits: one byte per code).
  Non-finite inputs are rejected with ``ValueError``: a NaN has no code, and a silently wrong tensor is
  worse than an error. A constant tensor (or channel) gets ``scale == 0`` and decodes exactly.

The hot loops work in chunks that stay in L2 and reuse one scratch buffer, so encode costs about two
float passes plus a min/max scan, and decode about one.

Optional fast path: with numba installed (the ``fast`` extra) the per-tensor 2..8-bit range scan,
quantize+pack and unpack+dequantize run as fused single-pass kernels (:mod:`fleetpipe._codec_numba`)
whose output is byte-identical to the numpy path. numba is imported on first use; call :func:`warmup`
at process start so the JIT (or on-disk cache load) does not land in a hot path. Without numba, or if a
kernel fails, the numpy path runs; ``FLEETPIPE_CODEC_NUMBA=0`` forces it.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fleetpipe.errors import DecodeError

__all__ = [
    "MAX_DECODED_BYTES",
    "MAX_ELEMENTS",
    "SUPPORTED_BITS",
    "SUPPORTED_DTYPES",
    "EncodedTensor",
    "decode_tensor",
    "encode_tensor",
    "encoded_nbytes",
    "from_wire",
    "max_abs_error",
    "to_wire",
    "warmup",
]

#: Largest element count a tensor may have (2**28, i.e. 1 GiB of float32).
MAX_ELEMENTS = 2**28
#: Largest size a tensor may decode to: a 2-bit tensor expands 16x (float32) or 32x (float64), so the packet limit
#: alone does not bound a node's memory. Checked on the header, before anything is allocated.
MAX_DECODED_BYTES = 256 * 1024 * 1024
MAX_NDIM = 32
SUPPORTED_BITS = frozenset({2, 3, 4, 5, 6, 7, 8, 16, 32})
SUPPORTED_DTYPES = frozenset(
    {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
     "uint64", "bool"}
)
_FLOAT_DTYPES = frozenset({"float16", "float32", "float64"})
# dtype -> name for the native-order dtypes: ``dtype.name`` is a Python property costing ~2.5 us a call.
_DT_NAME = {np.dtype(n): n for n in SUPPORTED_DTYPES}
_LITTLE = sys.byteorder == "little"

Scale = float | tuple[float, ...]


@dataclass(frozen=True, slots=True)
class EncodedTensor:
    """One encoded tensor: header fields plus packed little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    bits: int
    data: bytes | bytearray | memoryview
    scale: Scale = 0.0
    zero_point: Scale = 0.0
    axis: int | None = None
    clip: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, str) or self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"unsupported dtype {self.dtype!r}")
        shape = _check_shape(self.shape)
        object.__setattr__(self, "shape", shape)
        if type(self.bits) is not int or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"unsupported bit width {self.bits!r}")
        if self.bits < 32 and self.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{self.dtype} tensors are only supported at bits=32 (raw)")
        quantized = self.bits <= 8
        if self.axis is not None:
            if not quantized:
                raise ValueError("axis is only meaningful for 2..8-bit quantization")
            if type(self.axis) is not int or not 0 <= self.axis < len(shape):
                raise ValueError(f"axis {self.axis!r} out of range for shape {shape}")
        channels = None if self.axis is None else shape[self.axis]
        zp = _check_params("zero_point", self.zero_point, channels, quantized)
        object.__setattr__(self, "scale", _check_params("scale", self.scale, channels, quantized))
        object.__setattr__(self, "zero_point", zp)
        if isinstance(self.scale, tuple):
            if any(s < 0 for s in self.scale):
                raise ValueError("scale must be >= 0")
        elif self.scale < 0:
            raise ValueError("scale must be >= 0")
        if self.clip is not None:
            if not quantized or self.axis is not None:
                raise ValueError("clip is only meaningful for per-tensor 2..8-bit quantization")
            if not isinstance(self.clip, tuple | list) or len(self.clip) != 2:
                raise TypeError("clip must be a (lo, hi) pair")
            lo, hi = (_finite_float("clip", v) for v in self.clip)
            if lo > hi:
                raise ValueError(f"clip lo {lo} > hi {hi}")
            object.__setattr__(self, "clip", (lo, hi))
        data = self.data
        if isinstance(data, memoryview):
            if not data.c_contiguous:
                raise ValueError("data memoryview must be C-contiguous")
            if data.format != "B" or data.ndim != 1:
                data = data.cast("B") if data.ndim <= 1 else data.cast("B", (data.nbytes,))
                object.__setattr__(self, "data", data)
        elif not isinstance(data, bytes | bytearray):
            raise TypeError(f"data must be bytes or memoryview, not {type(data).__name__}")
        decoded = math.prod(shape) * np.dtype(self.dtype).itemsize
        if decoded > MAX_DECODED_BYTES:
            raise ValueError(f"{self.dtype}{list(shape)} would decode to {decoded} bytes, more than "
                             f"MAX_DECODED_BYTES={MAX_DECODED_BYTES}")
        expected = encoded_nbytes(self.dtype, shape, self.bits)
        if len(data) != expected:
            raise ValueError(
                f"data has {len(data)} bytes, {self.dtype}{list(shape)} at {self.bits} bits needs {expected}"
            )

    @classmethod
    def _trusted(cls, dtype: str, shape: tuple[int, ...], bits: int, data: memoryview, scale: float,
                 zero_point: float, clip: tuple[float, float] | None) -> EncodedTensor:
        """A per-tensor quantized value built by :func:`encode_tensor`, whose fields hold by construction.

        Skips ``__post_init__`` (about 10 us of re-checks on the encode hot path); everything else builds
        through the validating constructor.
        """
        t = object.__new__(cls)
        for k, v in (("dtype", dtype), ("shape", shape), ("bits", bits), ("data", data), ("scale", scale),
                     ("zero_point", zero_point), ("axis", None), ("clip", clip)):
            object.__setattr__(t, k, v)
        return t

    @property
    def nbytes(self) -> int:
        """Size of the packed payload in bytes."""
        return len(self.data)

    @property
    def decoded_nbytes(self) -> int:
        """Size of the array this tensor decodes to (from the header alone)."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def encode_tensor(
    arr: Any, bits: int = 32, *, axis: int | None = None, clip_percentile: float | None = None
) -> EncodedTensor:
    """Encode an array at ``bits`` (32 raw, 16 float16, 2..8 quantized); see the module docstring."""
    a = np.asarray(arr)
    name = _DT_NAME.get(a.dtype) or a.dtype.name
    if name not in SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {a.dtype}")
    if bits not in SUPPORTED_BITS or type(bits) is not int:
        raise ValueError(f"unsupported bit width {bits!r}")
    if bits < 32 and name not in _FLOAT_DTYPES:
        raise TypeError(f"{name} tensors can only be encoded raw (bits=32), not at {bits} bits")
    if bits > 8 and (axis is not None or clip_percentile is not None):
        raise ValueError("axis and clip_percentile apply to 2..8-bit quantization only")
    shape = _check_shape(a.shape)
    if not (a.flags.c_contiguous and (a.dtype.byteorder in "=|" if _LITTLE else a.dtype.byteorder in "<|")):
        le = a.dtype.newbyteorder("<") if a.dtype.itemsize > 1 else a.dtype
        a = np.ascontiguousarray(a, dtype=le)
    if bits == 32:
        return EncodedTensor(name, shape, 32, _bytes_view(a))
    if bits == 16:
        if name == "float16":
            return EncodedTensor(name, shape, 16, _bytes_view(a))
        try:
            with np.errstate(over="raise", invalid="ignore", under="ignore"):
                h = a.astype("<f2")
        except FloatingPointError:
            raise ValueError("value out of float16 range; use bits=32 or quantize") from None
        return EncodedTensor(name, shape, 16, _bytes_view(h))
    if axis is not None:
        if not -a.ndim <= axis < a.ndim:
            raise ValueError(f"axis {axis} out of range for {a.ndim}-d tensor")
        axis %= a.ndim
        if clip_percentile is not None:
            raise ValueError("clip_percentile is per-tensor only (not combined with axis)")
        codes, scale, zp = _quantize_channels(a, bits, axis)
        return EncodedTensor(name, shape, bits, _pack(codes, bits, a.size), scale, zp, axis)
    data, scale, zp, clip = _quantize_tensor(a, bits, clip_percentile)
    return EncodedTensor._trusted(name, shape, bits, data, scale, zp, clip)


def decode_tensor(t: EncodedTensor) -> np.ndarray:
    """Decode to an array of the original dtype and shape (read-only view for raw input)."""
    dt = np.dtype(t.dtype)
    n = math.prod(t.shape)
    if t.bits == 32:
        out = _frombuffer(t.data, dt.newbyteorder("<") if dt.itemsize > 1 else dt)
        if dt == np.bool_ and n and out.view(np.uint8).max() > 1:
            raise DecodeError("bool tensor holds bytes other than 0 and 1")
        return out.reshape(t.shape)
    if t.bits == 16:
        h = _frombuffer(t.data, np.dtype("<f2"))
        return (h if dt == np.float16 else h.astype(dt)).reshape(t.shape)
    if t.axis is not None:
        return _dequantize_channels(_unpack(t.data, t.bits, n), t, dt).reshape(t.shape)
    scale, zp = float(t.scale), float(t.zero_point)  # type: ignore[arg-type]
    return _dequantize_tensor(t.data, t.bits, n, scale, zp, dt).reshape(t.shape)


def max_abs_error(t: EncodedTensor) -> float:
    """Theoretical bound on |x - decode(x)| (for clipped tensors: for values inside the clip range)."""
    if t.bits == 32:
        return 0.0
    if t.bits == 16:
        if t.dtype == "float16":
            return 0.0
        h = np.abs(_frombuffer(t.data, np.dtype("<f2")).astype(np.float32))
        h = h[np.isfinite(h)]
        top = float(h.max()) if h.size else 0.0
        return top * 2.0**-11 * (1 + 2.0**-10) + 2.0**-25
    scales = t.scale if isinstance(t.scale, tuple) else (t.scale,)
    return max(scales, default=0.0) / 2.0


def warmup() -> bool:
    """Compile (or load from cache) the optional numba kernels now; False when only numpy is in use.

    Call it once when a node starts: the first quantized encode/decode would otherwise pay the JIT.
    """
    k = _kernels()
    if k is None:
        return False
    try:
        k.warmup()
    except Exception:  # numba present but broken: fall back for good
        _disable_kernels()
        return False
    return True


def encoded_nbytes(dtype: str, shape: tuple[int, ...], bits: int) -> int:
    """Payload byte count of a tensor of ``dtype`` and ``shape`` at ``bits``."""
    n = math.prod(shape)
    if bits == 32:
        return n * np.dtype(dtype).itemsize
    if bits == 16:
        return 2 * n
    return (n * bits + 7) // 8


def to_wire(t: EncodedTensor) -> dict[str, Any]:
    """A msgpack-ready dict; the payload stays a memoryview (no copy)."""
    d: dict[str, Any] = {"dtype": t.dtype, "shape": list(t.shape), "bits": t.bits, "data": t.data}
    if t.bits <= 8:
        if t.axis is None:
            d["scale"] = t.scale
            d["zp"] = t.zero_point
        else:
            d["axis"] = t.axis
            d["scale"] = np.asarray(t.scale, "<f8").tobytes()
            d["zp"] = np.asarray(t.zero_point, "<f8").tobytes()
        if t.clip is not None:
            d["clip"] = list(t.clip)
    return d


def from_wire(d: Any) -> EncodedTensor:
    """Inverse of :func:`to_wire`; raises DecodeError naming what is wrong."""
    if not isinstance(d, Mapping):
        raise DecodeError(f"tensor must be a map, got {type(d).__name__}")
    unknown = set(d) - _WIRE_KEYS
    if unknown:
        raise DecodeError(f"tensor has unknown keys {sorted(map(str, unknown))}")
    missing = {"dtype", "shape", "bits", "data"} - set(d)
    if missing:
        raise DecodeError(f"tensor lacks keys {sorted(missing)}")
    shape = d["shape"]
    if not isinstance(shape, list | tuple) or not all(type(s) is int for s in shape):
        raise DecodeError(f"tensor shape must be a list of ints, got {shape!r}")
    data = d["data"]
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"tensor data must be bytes, got {type(data).__name__}")
    axis = d.get("axis")
    scale, zp = d.get("scale", 0.0), d.get("zp", 0.0)
    try:
        if axis is not None:
            scale, zp = _f8_tuple("scale", scale), _f8_tuple("zp", zp)
        clip = d.get("clip")
        clip = tuple(clip) if isinstance(clip, list | tuple) else clip
        return EncodedTensor(d["dtype"], tuple(shape), d["bits"], data, scale, zp, axis, clip)
    except (ValueError, TypeError, OverflowError) as exc:
        raise DecodeError(f"invalid tensor: {exc}") from None


# ---------------------------------------------------------------------------------------------- private

_WIRE_KEYS = frozenset({"dtype", "shape", "bits", "data", "scale", "zp", "axis", "clip"})
# Elements per chunk in the hot loops (a multiple of 8): 128 Ki float32 = 512 KiB of scratch. Smaller chunks
# fit L2 better but measured slower here: numpy's per-call overhead outweighs the cache win.
_CHUNK = 1 << 17
# Spare bytes after a packed payload: the 3/5/6/7-bit packer stores whole uint64 words ``bits`` bytes apart.
_PAD = 16
# Below this ratio of |value| to step the float32 fast path keeps rounding error < 2**-10 step.
_FAST_RANGE = 2.0**12
_LOCAL = threading.local()
_LOG = logging.getLogger(__name__)
# The numba kernel module once imported, False when unavailable (or disabled), None before the first try.
_KERNELS: Any = None


def _kernels() -> Any:
    """The numba kernel module, imported on first use, or None (numpy path)."""
    global _KERNELS
    k = _KERNELS
    if k is None:
        k = False
        if os.environ.get("FLEETPIPE_CODEC_NUMBA", "1") != "0":
            try:
                from fleetpipe import _codec_numba as k
            except Exception:  # ImportError, or a numba/llvmlite that cannot load on this machine
                k = False
        _KERNELS = k
    return k or None


def _disable_kernels() -> None:
    global _KERNELS
    if _KERNELS:
        _LOG.warning("numba codec kernels failed; using the numpy path", exc_info=True)
    _KERNELS = False


# Float dtype name -> (integer view dtype, magnitude mask, exponent mask) for the kernel range scan: a value
# is NaN or inf exactly when its magnitude bits are >= the exponent mask.
_INT_VIEW = {
    "float16": (np.dtype(np.int16), 0x7FFF, 0x7C00, "=2e", "=2h"),
    "float32": (np.dtype(np.int32), 0x7FFFFFFF, 0x7F800000, "=2f", "=2i"),
    "float64": (np.dtype(np.int64), 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000, "=2d", "=2q"),
}


def _minmax(a: np.ndarray) -> tuple[float, float]:
    """Min and max of a non-empty 1-d float array (NaN if it holds a NaN)."""
    k = _kernels()
    if k is not None:
        name = _DT_NAME.get(a.dtype) or a.dtype.name
        it, sm, em, ffmt, ifmt = _INT_VIEW[name]
        try:
            klo, khi, mag = k.RANGE_KEYS[name](a.view(it))
        except Exception:
            _disable_kernels()
        else:
            if mag >= em:
                return math.nan, math.nan
            # Undo the order-preserving key (negative keys had their magnitude bits flipped).
            klo, khi = int(klo), int(khi)
            klo ^= sm if klo < 0 else 0
            khi ^= sm if khi < 0 else 0
            lo, hi = struct.unpack(ffmt, struct.pack(ifmt, klo, khi))
            return lo, hi
    return float(np.minimum.reduce(a)), float(np.maximum.reduce(a))


def _check_shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, tuple | list):
        raise TypeError(f"shape must be a tuple of ints, got {type(shape).__name__}")
    if len(shape) > MAX_NDIM:
        raise ValueError(f"shape has {len(shape)} dimensions, at most {MAX_NDIM} allowed")
    out = tuple(shape)
    n = 1
    for s in out:
        if type(s) is not int or s < 0:
            raise ValueError(f"shape entries must be non-negative ints, got {shape!r}")
        # Zero-size dims do not excuse the others: numpy cannot even describe (0, 2**64 - 1).
        n *= max(s, 1)
        if n > MAX_ELEMENTS:
            raise ValueError(f"shape {shape!r} exceeds {MAX_ELEMENTS} elements")
    return out


def _finite_float(what: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError(f"{what} must be a number, got {type(v).__name__}")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{what} must be finite, got {f}")
    return f


def _check_params(what: str, v: Any, channels: int | None, quantized: bool) -> Scale:
    if channels is None:
        f = _finite_float(what, v)
        if not quantized and f != 0.0:
            raise ValueError(f"{what} must be 0 for raw and float16 tensors")
        return f
    if not isinstance(v, tuple | list | np.ndarray):
        raise TypeError(f"per-channel {what} must be a tuple of floats")
    vals = tuple(_finite_float(what, x) for x in (v.tolist() if isinstance(v, np.ndarray) else v))
    if len(vals) != channels:
        raise ValueError(f"{what} has {len(vals)} entries for {channels} channels")
    return vals


def _f8_tuple(what: str, v: Any) -> tuple[float, ...]:
    if not isinstance(v, bytes | bytearray) or len(v) % 8:
        raise DecodeError(f"per-channel {what} must be float64 bytes")
    return tuple(np.frombuffer(v, "<f8").tolist())


def _bytes_view(a: np.ndarray) -> memoryview:
    return memoryview(a.reshape(-1)).cast("B")


def _frombuffer(data: bytes | bytearray | memoryview, dt: np.dtype[Any]) -> np.ndarray:
    arr = np.frombuffer(data, dt)
    return arr if arr.flags.aligned else arr.copy()


def _range(a: np.ndarray, clip_percentile: float | None) -> tuple[float, float, tuple[float, float] | None]:
    lo, hi = _minmax(a)
    lo += 0.0  # -0.0 -> +0.0: which signed zero a reduction returns is not specified
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("cannot quantize non-finite values (NaN/inf); use bits=16 or 32")
    if clip_percentile is None:
        return lo, hi, None
    if not 50.0 < clip_percentile <= 100.0:
        raise ValueError("clip_percentile must be in (50, 100]")
    plo, phi = np.percentile(a, [100.0 - clip_percentile, clip_percentile])
    lo, hi = float(np.float64(plo).astype(a.dtype)), float(np.float64(phi).astype(a.dtype))
    return lo, hi, (lo, hi)


def _quantize_tensor(
    a: np.ndarray, bits: int, clip_percentile: float | None
) -> tuple[memoryview, float, float, tuple[float, float] | None]:
    """Quantize and pack in one chunked pass: each chunk's codes go from L2 straight into the output."""
    flat = a.reshape(-1)
    n = flat.size
    nbytes = (n * bits + 7) // 8
    # _PAD spare bytes: the 3/5/6/7-bit packer stores whole uint64 words at a stride of ``bits`` bytes.
    out = np.empty(nbytes + _PAD, np.uint8)
    data = memoryview(out)[:nbytes]
    if n == 0:
        return data, 0.0, 0.0, None
    lo, hi, clip = _range(flat, clip_percentile)
    levels = (1 << bits) - 1
    scale = (hi - lo) / levels
    if not math.isfinite(scale):
        raise ValueError("value range too large to quantize")
    if scale < 1e-300:  # constant (or degenerate) tensor: every code is 0
        out[:nbytes] = 0
        return data, 0.0, lo, clip
    inv = 1.0 / scale
    fast = flat.dtype.char != "d" and max(abs(lo), abs(hi)) * inv < _FAST_RANGE and scale > 1e-30
    work = np.float32 if fast else np.float64
    winv, woff = work(inv), work(0.5 - lo * inv)
    k = _kernels()
    if k is not None and _quantize_kernel(k, flat, out, bits, nbytes, fast, winv, woff, lo, inv, levels, clip):
        return data, scale, lo, clip
    buf = _scratch("float32" if fast else "float64", work)
    codes = out if bits == 8 else _scratch("codes", np.uint8)
    for i in range(0, n, _CHUNK):
        x = flat[i : i + _CHUNK]
        m = x.size
        b = buf[:m]
        if fast:  # values >= 0 after the offset, so truncation after +0.5 rounds
            np.multiply(x, winv, out=b)
            np.add(b, woff, out=b)
        else:
            np.subtract(x, work(lo), out=b, casting="unsafe")
            np.multiply(b, winv, out=b)
            np.add(b, work(0.5), out=b)
        if clip is not None or not fast:
            np.clip(b, 0.0, levels + 0.25, out=b)
        if bits == 8:
            np.copyto(out[i : i + m], b, casting="unsafe")
        else:
            c = codes[: m + (-m) % 8]
            np.copyto(c[:m], b, casting="unsafe")
            c[m:] = 0
            _pack_chunk(c, bits, out, i * bits // 8, nbytes)
    return data, scale, lo, clip


def _quantize_kernel(
    k: Any, flat: np.ndarray, out: np.ndarray, bits: int, nbytes: int, fast: bool, winv: Any, woff: Any,
    lo: float, inv: float, levels: int, clip: tuple[float, float] | None,
) -> bool:
    """Fused quantize+pack into ``out`` with the numba kernels; False if they failed (numpy path then)."""
    x = flat if flat.dtype.char != "e" else flat.astype(np.float32)  # numba has no float16 arithmetic
    try:
        if fast:
            k.QUANTIZE_FAST[bits](x, out, nbytes, winv, woff, np.float32(levels + 0.25), clip is not None)
        else:
            k.QUANTIZE_EXACT[bits](x, out, nbytes, lo, inv, levels + 0.25, True)
    except Exception:
        _disable_kernels()
        return False
    return True


def _quantize_channels(
    a: np.ndarray, bits: int, axis: int
) -> tuple[np.ndarray, tuple[float, ...], tuple[float, ...]]:
    pre, ch = math.prod(a.shape[:axis]), a.shape[axis]
    n = a.size
    codes = np.zeros(n + (-n) % 8, np.uint8)
    if n == 0:
        return codes, (0.0,) * ch, (0.0,) * ch
    x = a.reshape(pre, ch, -1).astype(np.float64)
    levels = (1 << bits) - 1
    lo, hi = x.min(axis=(0, 2)), x.max(axis=(0, 2))
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise ValueError("cannot quantize non-finite values (NaN/inf); use bits=16 or 32")
    scale = (hi - lo) / levels
    if not np.isfinite(scale).all():
        raise ValueError("value range too large to quantize")
    scale[scale < 1e-300] = 0.0
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    x -= lo[None, :, None]
    x *= inv[None, :, None]
    x += 0.5
    np.clip(x, 0.0, levels + 0.25, out=x)
    np.copyto(codes[:n].reshape(x.shape), x, casting="unsafe")
    return codes, tuple(scale.tolist()), tuple(lo.tolist())


def _scratch(key: str, dtype: Any, div: int = 1) -> np.ndarray:
    """A per-thread buffer of ``_CHUNK // div`` items, reused so hot loops do not page-fault each call."""
    buf = getattr(_LOCAL, key, None)
    if buf is None or buf.size != _CHUNK // div:
        buf = np.empty(_CHUNK // div, dtype)
        setattr(_LOCAL, key, buf)
    return buf


def _dequantize_tensor(
    data: bytes | bytearray | memoryview, bits: int, n: int, scale: float, zp: float, dt: np.dtype[Any]
) -> np.ndarray:
    """Unpack and dequantize chunk by chunk, so the codes of a chunk never leave L2."""
    raw = np.frombuffer(data, np.uint8)
    levels_top = 255 * scale + abs(zp)
    fast = dt != np.float64 and levels_top < 1e37 and (scale == 0.0 or scale > 1e-30)
    work = np.dtype(np.float32) if fast else np.dtype(np.float64)
    out = np.empty(n, work)
    ws, wz = work.type(scale), work.type(zp)
    k = _kernels()
    if k is not None and n:
        try:
            (k.DEQUANTIZE32 if fast else k.DEQUANTIZE64)[bits](raw, out, ws, wz)
        except Exception:
            _disable_kernels()
        else:
            return out if work == dt else out.astype(dt)
    for i in range(0, n, _CHUNK):
        o = out[i : i + _CHUNK]
        np.copyto(o, _unpack_chunk(raw, bits, i, o.size))
        np.multiply(o, ws, out=o)
        np.add(o, wz, out=o)
    return out if work == dt else out.astype(dt)


def _dequantize_channels(codes: np.ndarray, t: EncodedTensor, dt: np.dtype[Any]) -> np.ndarray:
    assert t.axis is not None and isinstance(t.scale, tuple) and isinstance(t.zero_point, tuple)
    pre = math.prod(t.shape[: t.axis])
    ch = t.shape[t.axis]
    if codes.size == 0:
        return np.zeros(0, dt)
    c = codes.reshape(pre, ch, -1).astype(np.float64)
    c *= np.asarray(t.scale)[None, :, None]
    c += np.asarray(t.zero_point)[None, :, None]
    return c.astype(dt)


def _rounds(bits: int) -> tuple[tuple[np.uint64, np.uint64, np.uint64], ...]:
    """(keep mask, move mask, shift) per shift-or round folding 8 one-byte codes into 8*bits bits."""
    masks = (0x00FF00FF00FF00FF, 0x0000FFFF0000FFFF, 0x00000000FFFFFFFF)
    shifts = (8 - bits, 16 - 2 * bits, 32 - 4 * bits)
    full = (1 << 64) - 1
    return tuple((np.uint64(m), np.uint64(full ^ m), np.uint64(s)) for m, s in zip(masks, shifts, strict=True))


def _spreads(bits: int) -> tuple[tuple[np.uint64, np.uint64, np.uint64], ...]:
    """(mask, right shift, left shift) per round spreading 8*bits packed bits to 8 one-byte codes."""
    return (
        (np.uint64((1 << (4 * bits)) - 1), np.uint64(4 * bits), np.uint64(32)),
        (np.uint64(((1 << (2 * bits)) - 1) * 0x0000000100000001), np.uint64(2 * bits), np.uint64(16)),
        (np.uint64(((1 << bits) - 1) * 0x0001000100010001), np.uint64(bits), np.uint64(8)),
    )


_PACK_ROUNDS = {b: _rounds(b) for b in (3, 5, 6, 7)}
_UNPACK_ROUNDS = {b: _spreads(b) for b in (3, 5, 6, 7)}


def _pack_chunk(c: np.ndarray, bits: int, out: np.ndarray, off: int, nbytes: int) -> None:
    """Pack uint8 codes ``c`` (length a multiple of 8; clobbered) LSB-first into ``out[off:nbytes]``.

    ``out`` needs :data:`_PAD` spare bytes after ``nbytes`` for the 3/5/6/7-bit path, which stores each
    group of 8 codes as one uint64 word ``bits`` bytes after the previous one (in ascending order, so a
    word's zero top bytes are overwritten by the next group).
    """
    k = min(c.size * bits // 8, nbytes - off)
    if bits == 4:
        v = c.view("<u2")
        t = _scratch("u16", np.uint16, 2)[: v.size]
        np.right_shift(v, np.uint16(4), out=t)
        np.bitwise_or(v, t, out=v)
        np.copyto(out[off : off + k], v[:k], casting="unsafe")
    elif bits == 2:
        v = c.view("<u4")
        t = _scratch("u32", np.uint32, 4)[: v.size]
        np.right_shift(v, np.uint32(6), out=t)
        np.bitwise_or(v, t, out=v)
        np.right_shift(v, np.uint32(12), out=t)
        np.bitwise_or(v, t, out=v)
        np.copyto(out[off : off + k], v[:k], casting="unsafe")
    else:
        v = c.view("<u8")
        t = _scratch("u64", np.uint64, 8)[: v.size]
        for keep, move, shift in _PACK_ROUNDS[bits]:
            np.bitwise_and(v, move, out=t)
            np.right_shift(t, shift, out=t)
            np.bitwise_and(v, keep, out=v)
            np.bitwise_or(v, t, out=v)
        words = np.ndarray((v.size,), "<u8", buffer=out, offset=off, strides=(bits,))
        np.copyto(words, v)


def _pack(codes: np.ndarray, bits: int, n: int) -> memoryview:
    """Pack the first ``n`` uint8 codes (array padded to a multiple of 8) into an LSB-first bit stream."""
    nbytes = (n * bits + 7) // 8
    if bits == 8:
        return memoryview(codes).cast("B")[:nbytes]
    out = np.empty(nbytes + _PAD, np.uint8)
    for i in range(0, n, _CHUNK):
        _pack_chunk(codes[i : i + _CHUNK], bits, out, i * bits // 8, nbytes)
    return memoryview(out)[:nbytes]


def _unpack_chunk(raw: np.ndarray, bits: int, i: int, m: int) -> np.ndarray:
    """Codes ``i .. i+m`` of the LSB-first stream ``raw`` as uint8 (a per-thread scratch view)."""
    if bits == 8:
        return raw[i : i + m]
    off = i * bits // 8
    if bits == 4:
        k = (m + 1) // 2
        v = _scratch("u16", np.uint16, 2)[:k]
        t = _scratch("u16b", np.uint16, 2)[:k]
        np.copyto(v, raw[off : off + k])
        np.left_shift(v, np.uint16(4), out=t)
        np.bitwise_or(v, t, out=v)
        np.bitwise_and(v, np.uint16(0x0F0F), out=v)
        return v.view(np.uint8)[:m]
    if bits == 2:
        k = (m + 3) // 4
        v = _scratch("u32", np.uint32, 4)[:k]
        t = _scratch("u32b", np.uint32, 4)[:k]
        np.copyto(v, raw[off : off + k])
        np.left_shift(v, np.uint32(12), out=t)
        np.bitwise_or(v, t, out=v)
        np.bitwise_and(v, np.uint32(0x000F000F), out=v)
        np.left_shift(v, np.uint32(6), out=t)
        np.bitwise_or(v, t, out=v)
        np.bitwise_and(v, np.uint32(0x03030303), out=v)
        return v.view(np.uint8)[:m]
    groups = (m + 7) // 8
    src, soff = raw, off
    if off + (groups - 1) * bits + 8 > raw.size:  # the last words would read past the end: pad a copy
        src, soff = np.zeros(groups * bits + 8, np.uint8), 0
        src[: raw.size - off] = raw[off:]
    w = _scratch("u64", np.uint64, 8)[:groups]
    t = _scratch("u64b", np.uint64, 8)[:groups]
    np.copyto(w, np.ndarray((groups,), "<u8", buffer=src, offset=soff, strides=(bits,)))
    for mask, right, left in _UNPACK_ROUNDS[bits]:
        np.right_shift(w, right, out=t)
        np.bitwise_and(t, mask, out=t)
        np.left_shift(t, left, out=t)
        np.bitwise_and(w, mask, out=w)
        np.bitwise_or(w, t, out=w)
    return w.view(np.uint8)[:m]


def _unpack(data: bytes | bytearray | memoryview, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`_pack`: the first ``n`` codes as uint8."""
    raw = np.frombuffer(data, np.uint8)
    if bits == 8:
        return raw
    out = np.empty(n, np.uint8)
    for i in range(0, n, _CHUNK):
        m = min(_CHUNK, n - i)
        out[i : i + m] = _unpack_chunk(raw, bits, i, m)
    return out
