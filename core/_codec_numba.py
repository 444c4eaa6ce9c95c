"""Optional numba kernels for :mod:`fleetpipe.codec` (install the ``fast`` extra: ``pip install fleetpipe[fast]``).

Importing this module imports numba; :mod:`fleetpipe.codec` does that lazily and falls back to its numpy
path when numba is missing or a kernel fails to compile. Every kernel reproduces the numpy path's
arithmetic operation by operation (same working precision, same order, no FMA contraction: numba's
default ``fastmath=False`` forbids it), so the output is byte-identical:

* range: min and max via the order-preserving integer key of the IEEE bits (integer min/max vectorise
  without fast-math, and NaN/inf are found from the same bits in the same pass);
* quantize: ``code = trunc(x * inv + (0.5 - lo * inv))`` in float32 (the fast path) or
  ``trunc(clip((x - lo) * inv + 0.5, 0, levels + 0.25))`` in float64, exactly as the numpy loop does,
  with the codes packed LSB-first straight into the output buffer;
* dequantize: ``x' = float(code) * scale + zero_point`` in the same working precision as numpy.

The kernels are serial (``parallel=False``): the node's other processes share the cores.
"""

from __future__ import annotations

import numba
import numpy as np

_JIT = {"nopython": True, "nogil": True, "cache": True, "boundscheck": False}


@numba.njit(**_JIT)
def range_keys(u, sign_mask):  # type: ignore[no-untyped-def]
    """(min key, max key, max |bits|) over the integer view ``u`` of a float array.

    ``key = u ^ ((u >> (w-1)) & sign_mask)`` orders non-NaN floats like the floats themselves (-0 < +0);
    ``|bits| >= exponent mask`` means the array holds a NaN or an inf.
    """
    n = u.size
    lo = u[0] ^ ((u[0] >> (u.itemsize * 8 - 1)) & sign_mask)
    hi = lo
    mag = u[0] & sign_mask
    shift = u.itemsize * 8 - 1
    for i in range(1, n):
        v = u[i]
        k = v ^ ((v >> shift) & sign_mask)
        lo = min(lo, k)
        hi = max(hi, k)
        mag = max(mag, v & sign_mask)
    return lo, hi, mag


@numba.njit(**_JIT)
def _store(out, base, acc, nb, limit):  # type: ignore[no-untyped-def]
    """Write the low ``nb`` bytes of ``acc`` to ``out[base:]``, never past ``limit``."""
    for j in range(nb):
        if base + j < limit:
            out[base + j] = np.uint8((acc >> np.uint64(8 * j)) & np.uint64(0xFF))


@numba.njit(**_JIT)
def quantize_fast(x, out, bits, nbytes, winv, woff, clip_top, do_clip):  # type: ignore[no-untyped-def]
    """float32 path: ``b = x*winv + woff`` (two float32 roundings), optional clip, truncate, pack."""
    n = x.size
    zero = np.float32(0.0)
    if bits == 8:
        for i in range(n):
            b = np.float32(x[i]) * winv
            b = b + woff
            if do_clip:
                b = min(max(b, zero), clip_top)
            out[i] = np.uint8(np.int32(b))
        return
    full = n // 8
    for g in range(full):
        acc = np.uint64(0)
        for j in range(8):
            b = np.float32(x[g * 8 + j]) * winv
            b = b + woff
            if do_clip:
                b = min(max(b, zero), clip_top)
            acc |= np.uint64(np.uint8(np.int32(b))) << np.uint64(j * bits)
        base = g * bits
        for j in range(bits):
            out[base + j] = np.uint8((acc >> np.uint64(8 * j)) & np.uint64(0xFF))
    if full * 8 < n:
        acc = np.uint64(0)
        for j in range(n - full * 8):
            b = np.float32(x[full * 8 + j]) * winv
            b = b + woff
            if do_clip:
                b = min(max(b, zero), clip_top)
            acc |= np.uint64(np.uint8(np.int32(b))) << np.uint64(j * bits)
        _store(out, full * bits, acc, bits, nbytes)


@numba.njit(**_JIT)
def quantize_exact(x, out, bits, nbytes, lo, inv, clip_top):  # type: ignore[no-untyped-def]
    """float64 path: ``b = clip((x - lo) * inv + 0.5, 0, clip_top)``, truncate, pack."""
    n = x.size
    if bits == 8:
        for i in range(n):
            b = (np.float64(x[i]) - lo) * inv
            b = b + 0.5
            b = min(max(b, 0.0), clip_top)
            out[i] = np.uint8(np.int32(b))
        return
    full = n // 8
    for g in range(full):
        acc = np.uint64(0)
        for j in range(8):
            b = (np.float64(x[g * 8 + j]) - lo) * inv
            b = b + 0.5
            b = min(max(b, 0.0), clip_top)
            acc |= np.uint64(np.uint8(np.int32(b))) << np.uint64(j * bits)
        base = g * bits
        for j in range(bits):
            out[base + j] = np.uint8((acc >> np.uint64(8 * j)) & np.uint64(0xFF))
    if full * 8 < n:
        acc = np.uint64(0)
        for j in range(n - full * 8):
            b = (np.float64(x[full * 8 + j]) - lo) * inv
            b = b + 0.5
            b = min(max(b, 0.0), clip_top)
            acc |= np.uint64(np.uint8(np.int32(b))) << np.uint64(j * bits)
        _store(out, full * bits, acc, bits, nbytes)


def _make_dequantize(ftype):  # type: ignore[no-untyped-def]
    """``out[i] = ftype(code_i) * scale + zp`` (two roundings in ``ftype``, as numpy does)."""

    @numba.njit(**_JIT)
    def dequantize(raw, bits, out, scale, zp):  # type: ignore[no-untyped-def]
        n = out.size
        if bits == 8:
            for i in range(n):
                v = ftype(raw[i]) * scale
                out[i] = v + zp
            return
        mask = np.uint64((1 << bits) - 1)
        nraw = raw.size
        full = n // 8
        for g in range(full):
            base = g * bits
            acc = np.uint64(0)
            for j in range(bits):
                acc |= np.uint64(raw[base + j]) << np.uint64(8 * j)
            for j in range(8):
                v = ftype((acc >> np.uint64(j * bits)) & mask) * scale
                out[g * 8 + j] = v + zp
        if full * 8 < n:
            base = full * bits
            acc = np.uint64(0)
            for j in range(bits):
                if base + j < nraw:
                    acc |= np.uint64(raw[base + j]) << np.uint64(8 * j)
            for j in range(n - full * 8):
                v = ftype((acc >> np.uint64(j * bits)) & mask) * scale
                out[full * 8 + j] = v + zp

    return dequantize


dequantize32 = _make_dequantize(np.float32)
dequantize64 = _make_dequantize(np.float64)


def warmup() -> None:
    """Compile (or load from the on-disk cache) every kernel signature the codec uses."""
    for ft, it, sm in ((np.float32, np.int32, 0x7FFFFFFF), (np.float64, np.int64, 0x7FFFFFFFFFFFFFFF),
                       (np.float16, np.int16, 0x7FFF)):
        x = np.arange(11, dtype=ft)
        range_keys(x.view(it), it(sm))
    for ft in (np.float32, np.float64):
        x = np.linspace(-1, 1, 11).astype(ft)
        out = np.zeros(32, np.uint8)
        for bits in (8, 3):
            quantize_fast(x, out, bits, 11, np.float32(1.0), np.float32(0.5), np.float32(255.25), False)
            quantize_exact(x, out, bits, 11, -1.0, 1.0, 255.25)
    raw = np.zeros(16, np.uint8)
    for bits in (8, 3):
        dequantize32(raw, bits, np.empty(11, np.float32), np.float32(1.0), np.float32(0.0))
        dequantize64(raw, bits, np.empty(11, np.float64), 1.0, 0.0)
