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

_JIT = {"nogil": True, "cache": True, "boundscheck": False}


def _make_range_keys(ity, width):  # type: ignore[no-untyped-def]
    """(min key, max key, max magnitude) over the ``ity`` view of a float array of ``width`` bits.

    ``key = u ^ ((u >> (width-1)) & mag_mask)`` orders non-NaN floats like the floats themselves (-0 < +0);
    a magnitude >= the exponent mask means a NaN or an inf. Every intermediate is cast back to ``ity`` so
    LLVM keeps the lanes narrow and vectorises the loop.
    """
    sm = ity((1 << (width - 1)) - 1)
    sh = ity(width - 1)

    @numba.njit(**_JIT)
    def range_keys(u):  # type: ignore[no-untyped-def]
        lo = ity(u[0] ^ ((u[0] >> sh) & sm))
        hi = lo
        mag = ity(u[0] & sm)
        for i in range(1, u.size):
            v = u[i]
            k = ity(v ^ ((v >> sh) & sm))
            lo = min(lo, k)
            hi = max(hi, k)
            mag = max(mag, ity(v & sm))
        return lo, hi, mag

    return range_keys


RANGE_KEYS = {"float16": _make_range_keys(np.int16, 16), "float32": _make_range_keys(np.int32, 32),
              "float64": _make_range_keys(np.int64, 64)}


def _make_quantize_fast(bits):  # type: ignore[no-untyped-def]
    """float32 path, one bit width (a compile-time constant, so the packing loops unroll).

    ``y = x*winv + woff`` with two float32 roundings (a=winv, b=woff), clipped to [0, top] only when
    ``do_clip`` (percentile-clipped tensors), then ``code = trunc(y)``.
    """
    nb = bits

    @numba.njit(**_JIT)
    def quantize(x, out, nbytes, a, b, top, do_clip):  # type: ignore[no-untyped-def]
        n = x.size
        if nb == 8:
            for i in range(n):
                y = np.float32(x[i]) * a
                y = y + b
                if do_clip:
                    y = min(max(y, np.float32(0.0)), top)
                out[i] = np.uint8(np.int32(y))
            return
        if nb == 4 or nb == 2:  # whole bytes of 8 // nb codes: a flat loop that LLVM vectorises
            per = 8 // nb
            for o in range(n // per):
                byte = np.uint8(0)
                for j in range(per):
                    y = np.float32(x[o * per + j]) * a
                    y = y + b
                    if do_clip:
                        y = min(max(y, np.float32(0.0)), top)
                    byte |= np.uint8(np.uint8(np.int32(y)) << np.uint8(j * nb))
                out[o] = byte
            done = (n // per) * per
            if done < n:
                byte = np.uint8(0)
                for j in range(n - done):
                    y = np.float32(x[done + j]) * a
                    y = y + b
                    if do_clip:
                        y = min(max(y, np.float32(0.0)), top)
                    byte |= np.uint8(np.uint8(np.int32(y)) << np.uint8(j * nb))
                out[done // per] = byte
            return
        full = n // 8
        for g in range(full):
            acc = np.uint64(0)
            for j in range(8):
                y = np.float32(x[g * 8 + j]) * a
                y = y + b
                if do_clip:
                    y = min(max(y, np.float32(0.0)), top)
                acc |= np.uint64(np.uint8(np.int32(y))) << np.uint64(j * nb)
            for j in range(nb):
                out[g * nb + j] = np.uint8((acc >> np.uint64(8 * j)) & np.uint64(0xFF))
        if full * 8 < n:
            acc = np.uint64(0)
            for j in range(n - full * 8):
                y = np.float32(x[full * 8 + j]) * a
                y = y + b
                if do_clip:
                    y = min(max(y, np.float32(0.0)), top)
                acc |= np.uint64(np.uint8(np.int32(y))) << np.uint64(j * nb)
            for j in range(nb):
                if full * nb + j < nbytes:
                    out[full * nb + j] = np.uint8((acc >> np.uint64(8 * j)) & np.uint64(0xFF))

    return quantize


def _make_quantize_exact(bits):  # type: ignore[no-untyped-def]
    """float64 path: ``code = trunc(clip((x - lo) * inv + 0.5, 0, top))`` (a=lo, b=inv; do_clip unused)."""
    nb = bits

    @numba.njit(**_JIT)
    def quantize(x, out, nbytes, a, b, top, do_clip):  # type: ignore[no-untyped-def]
        n = x.size
        if nb == 8:
            for i in range(n):
                y = (np.float64(x[i]) - a) * b
                y = y + 0.5
                y = min(max(y, 0.0), top)
                out[i] = np.uint8(np.int32(y))
            return
        full = n // 8
        for g in range(full):
            acc = np.uint64(0)
            for j in range(8):
                y = (np.float64(x[g * 8 + j]) - a) * b
                y = y + 0.5
                y = min(max(y, 0.0), top)
                acc |= np.uint64(np.uint8(np.int32(y))) << np.uint64(j * nb)
            for j in range(nb):
                out[g * nb + j] = np.uint8((acc >> np.uint64(8 * j)) & np.uint64(0xFF))
        if full * 8 < n:
            acc = np.uint64(0)
            for j in range(n - full * 8):
                y = (np.float64(x[full * 8 + j]) - a) * b
                y = y + 0.5
                y = min(max(y, 0.0), top)
                acc |= np.uint64(np.uint8(np.int32(y))) << np.uint64(j * nb)
            for j in range(nb):
                if full * nb + j < nbytes:
                    out[full * nb + j] = np.uint8((acc >> np.uint64(8 * j)) & np.uint64(0xFF))

    return quantize


#: bits -> kernel(x, out, nbytes, winv, woff, top, do_clip) for the float32 path (x float32 or float64).
QUANTIZE_FAST = {b: _make_quantize_fast(b) for b in range(2, 9)}
#: bits -> kernel(x, out, nbytes, lo, inv, top, do_clip) for the float64 path (do_clip is ignored: always on).
QUANTIZE_EXACT = {b: _make_quantize_exact(b) for b in range(2, 9)}


def _make_dequantize(ftype, bits):  # type: ignore[no-untyped-def]
    """``out[i] = ftype(code_i) * scale + zp`` (two roundings in ``ftype``, as numpy does)."""
    nb = bits
    mask = np.uint64((1 << bits) - 1)

    @numba.njit(**_JIT)
    def dequantize(raw, out, scale, zp):  # type: ignore[no-untyped-def]
        n = out.size
        if nb == 8:
            for i in range(n):
                v = ftype(raw[i]) * scale
                out[i] = v + zp
            return
        nraw = raw.size
        full = n // 8
        for g in range(full):
            acc = np.uint64(0)
            for j in range(nb):
                acc |= np.uint64(raw[g * nb + j]) << np.uint64(8 * j)
            for j in range(8):
                v = ftype((acc >> np.uint64(j * nb)) & mask) * scale
                out[g * 8 + j] = v + zp
        if full * 8 < n:
            acc = np.uint64(0)
            for j in range(nb):
                if full * nb + j < nraw:
                    acc |= np.uint64(raw[full * nb + j]) << np.uint64(8 * j)
            for j in range(n - full * 8):
                v = ftype((acc >> np.uint64(j * nb)) & mask) * scale
                out[full * 8 + j] = v + zp

    return dequantize


#: bits -> kernel(raw uint8, out, scale, zp) with float32 resp. float64 arithmetic and output.
DEQUANTIZE32 = {b: _make_dequantize(np.float32, b) for b in range(2, 9)}
DEQUANTIZE64 = {b: _make_dequantize(np.float64, b) for b in range(2, 9)}


def warmup(bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)) -> None:
    """Compile (or load from the on-disk cache) the kernels for ``bits``: float32/float64/float16 input."""
    for name, ity in (("float16", np.int16), ("float32", np.int32), ("float64", np.int64)):
        RANGE_KEYS[name](np.arange(11, dtype=name).view(ity))
    out = np.zeros(32, np.uint8)
    raw = np.zeros(16, np.uint8)
    for b in bits:
        for ft in (np.float32, np.float64):
            x = np.linspace(-1, 1, 11).astype(ft)
            QUANTIZE_FAST[b](x, out, 11, np.float32(1.0), np.float32(0.5), np.float32(b + 0.25), False)
            QUANTIZE_EXACT[b](x, out, 11, -1.0, 1.0, b + 0.25, True)
        DEQUANTIZE32[b](raw, np.empty(11, np.float32), np.float32(1.0), np.float32(0.0))
        DEQUANTIZE64[b](raw, np.empty(11, np.float64), 1.0, 0.0)
