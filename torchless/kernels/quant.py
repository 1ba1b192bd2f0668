"""Block-quantized GGUF weights: layouts, dequantization, quantization and matvec kernels.

One kernel skeleton serves every format. A format is one section of this file: its block
layout (elements and bytes per block), a NumPy dequantizer (``_deq_<kind>``, the readable
reference, equal to ``gguf.quants`` bit for bit), and two Numba inner functions of one row,
``_dot_<kind>(u, s, x, acc)`` (the row's dot product with float32 ``x``) and
``_row_<kind>(u, s, dst)`` (the row dequantized into ``dst``), ``u``/``s`` being the row's
bytes as uint8/int8. :func:`_register` then generates the parallel kernels from those:

* ``matvec_<kind>(data, x, out)`` (decode: ``out[r] = sum_c W[r, c] * x[c]``),
* ``matmul_<kind>(data, X, out)`` (small batches: ``out[t, r] = sum_c W[r, c] * X[t, c]``),
* ``dequant_rows_<kind>(data, r0, r1, out)`` (a float32 tile of rows, for BLAS on bigger
  batches).

Formats (ggml layouts, little-endian, ``d``/``dmin``/``m`` IEEE half floats):

========  ======  =====  ============================================================
kind      elems   bytes  block layout
========  ======  =====  ============================================================
q8_0        32     34    d, int8 qs[32];                      w = d * q
q4_0        32     18    d, qs[16]: element j in the low nibble of qs[j],
                         element j+16 in its high nibble;     w = d * (q - 8)
q4_1        32     20    d, m, qs[16] as q4_0;                w = d * q + m
q5_0        32     22    d, qh (uint32, bit j = 5th bit of element j), qs[16] as q4_0;
                                                              w = d * (q - 16)
q5_1        32     24    d, m, qh, qs[16] as q5_0;            w = d * q + m
iq4_nl      32     18    d, qs[16] as q4_0;                   w = d * IQ4NL_VALUES[q]
q2_k       256     84    scales[16] (4-bit scale | 4-bit min << 4), qs[64] (2-bit), d, dmin;
                         16 sub-blocks of 16;                 w = d*sc*q - dmin*m
q3_k       256    110    hmask[32], qs[64] (2-bit), scales[12] (16 six-bit), d;
                         q = low - 4 unless the hmask bit is set; w = d * (sc - 32) * q
q4_k       256    144    d, dmin, scales[12] (8 pairs of 6-bit scale/min), qs[128]:
                         the 32 bytes qs[32i:32i+32] hold sub-block 2i in the low nibbles
                         and sub-block 2i+1 in the high ones; w = d*sc*q - dmin*m
q5_k       256    176    d, dmin, scales[12], qh[32] (bit s of qh[l] = 5th bit of element
                         l of sub-block s), qs[128] as q4_k;  w = d*sc*q - dmin*m
q6_k       256    210    ql[128], qh[64], int8 scales[16], d; 16 sub-blocks of 16;
                                                              w = d * sc * (q - 32)
iq4_xs     256    136    d, scales_h, scales_l[4] (8 six-bit), qs[128] (8 x 16 nibbles);
                                                 w = d * (sc - 32) * IQ4NL_VALUES[q]
tq1_0      256     54    qs[48], qh[4] (5 / 4 base-3 digits a byte), d; w = d * (t - 1)
tq2_0      256     66    qs[64] (2-bit), d;                   w = d * (q - 1)
========  ======  =====  ============================================================

Adding a format: one section below (block layout in a comment, ``_deq_<kind>``,
``_dot_<kind>``, ``_row_<kind>``, a ``_register`` call), its entry in
:mod:`torchless.kernels.quant_q8` (the activation format llama.cpp pairs it with and the
integer row function), its GGUF type id in :mod:`torchless.gguf`, its kind code in
:mod:`torchless.kernels.decode`, and its name in ``weights.QUANT_KINDS``.

A quantized weight's ``data`` is uint8 ``[rows, bytes_per_row]``; every row holds
``cols // elems`` whole blocks.

Numerics of the kernels: each weight is dequantized exactly as the reference does
(``d * q`` resp. ``(d*sc) * q - dmin*m`` in float32, no FMA since fastmath is off), then
multiplied by ``x`` and accumulated in float32 into 32 lanes (lane ``c % 32``), which are
summed in a fixed order at the end of the row. ``matmul_<kind>`` runs the very same
per-row code as ``matvec_<kind>``, so a batched row equals the single-vector result bit
for bit.

To keep the number of Numba specialisations small, go through the dispatchers
(:func:`matvec`, :func:`matmul`, :func:`dequantize_rows_into`): they check shapes and
always pass read-only C-contiguous uint8 2-D ``data`` and read-only float32 inputs (the
same types a read-only memory map yields).
"""

from __future__ import annotations

import os
import platform
import types as pytypes

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ..errors import TensorShapeError, UnsupportedError
from .bits import PREFETCH_BYTES, prefetch

QK = 32
QK_K = 256

#: kind -> (elements per block, bytes per block); filled by :func:`_register`
BLOCK_INFO: dict = {}
_DEQ: dict = {}  # kind -> NumPy dequantizer of blocks [..., bytes_per_block]
MATVEC: dict = {}
MATMUL: dict = {}
DEQUANT_ROWS: dict = {}

__all__ = [
    "BLOCK_INFO",
    "block_info",
    "bytes_per_row",
    "dequantize",
    "dequantize_rows_into",
    "matmul",
    "matvec",
    "quantize_q4_0",
    "quantize_q8_0",
]  # + matvec_<kind>, matmul_<kind>, dequant_rows_<kind> for every registered kind


def block_info(kind: str) -> tuple:
    """``(elements_per_block, bytes_per_block)`` of a quantized kind."""
    try:
        return BLOCK_INFO[kind]
    except (KeyError, TypeError):
        raise UnsupportedError(
            f"unsupported quantized kind {kind!r}; known: {', '.join(BLOCK_INFO)}"
        ) from None

def bytes_per_row(kind: str, cols: int) -> int:
    """Bytes one row of ``cols`` elements takes; ``cols`` must be a whole number of blocks."""
    epb, bpb = block_info(kind)
    if cols <= 0 or cols % epb:
        raise UnsupportedError(
            f"{kind} needs a row length that is a positive multiple of {epb}, got {cols}"
        )
    return cols // epb * bpb


# ----------------------------------------------------------------------------------------
# Shared pieces: NumPy (reference) and Numba (kernels)
# ----------------------------------------------------------------------------------------


def _f16(blocks: np.ndarray, off: int) -> np.ndarray:
    """The half float at byte ``off`` of every block, as float32 (shape [..., 1])."""
    bits = blocks[..., off].astype(np.uint16) | (
        blocks[..., off + 1].astype(np.uint16) << np.uint16(8)
    )
    return bits.view(np.float16).astype(np.float32)[..., None]

def _k4_scales(sc12: np.ndarray):
    """Unpack q4_k/q5_k 12-byte scale fields [..., 12] into (scales, mins) [..., 8] uint8."""
    q = sc12
    lo_sc = q[..., 0:4] & 63
    lo_m = q[..., 4:8] & 63
    hi_sc = (q[..., 8:12] & 15) | ((q[..., 0:4] >> 6) << 4)
    hi_m = (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)
    return np.concatenate([lo_sc, hi_sc], axis=-1), np.concatenate([lo_m, hi_m], axis=-1)

_JIT = {"parallel": True, "cache": True, "fastmath": False}

_CHUNK = 8  # rows per parallel work item (per-item scratch is allocated once)

_F32 = np.float32

def _to_i32(builder, val, ty):
    i32 = ir.IntType(32)
    width = val.type.width
    if width == 32:
        return val
    if width > 32:
        return builder.trunc(val, i32)
    return builder.sext(val, i32) if ty.signed else builder.zext(val, i32)

@intrinsic
def _ubits(typingctx, v, shift, mask):
    """``float32((v >> shift) & mask)`` computed in 32-bit integers.

    Numba widens all integer arithmetic to 64 bits, which halves the SIMD width of the
    unpacking loops and forces int64 -> float conversions; doing the few bit operations
    in i32 lets LLVM vectorise them at the width of the float32 lanes. ``v`` is taken as
    its low 32 bits (zero-extended when narrower and unsigned).
    """
    if not all(isinstance(t, types.Integer) for t in (v, shift, mask)):
        return None
    sig = types.float32(v, shift, mask)

    def codegen(context, builder, signature, args):
        a, sh, mk = (_to_i32(builder, val, ty) for val, ty in zip(args, signature.args))
        return builder.sitofp(builder.and_(builder.lshr(a, sh), mk), ir.FloatType())

    return sig, codegen

@intrinsic
def _h2f_native(typingctx, lo, hi):
    """Little-endian IEEE half (two byte values) -> float32 via LLVM's ``fpext half``
    (one F16C / AVX512-FP16 / NEON instruction). Exact for every bit pattern."""
    if not (isinstance(lo, types.Integer) and isinstance(hi, types.Integer)):
        return None
    sig = types.float32(lo, hi)

    def codegen(context, builder, signature, args):
        i16 = ir.IntType(16)
        a, b = (
            builder.trunc(_to_i32(builder, val, ty), i16) for val, ty in zip(args, signature.args)
        )
        bits = builder.or_(
            builder.and_(a, ir.Constant(i16, 0xFF)), builder.shl(b, ir.Constant(i16, 8))
        )
        return builder.fpext(builder.bitcast(bits, ir.HalfType()), ir.FloatType())

    return sig, codegen

_F16_POW2 = np.array([2.0**-24] + [2.0 ** (e - 25) for e in range(1, 32)], dtype=np.float32)

@njit(inline="always", cache=True)
def _h2f_soft(lo, hi):
    """Portable half -> float32 (exact), for hosts whose LLVM cannot convert halves inline."""
    h = (np.int64(lo) & 255) | ((np.int64(hi) & 255) << 8)
    e = (h >> 10) & 31
    m = h & 1023
    if e == 0:
        v = _F32(m) * _F16_POW2[0]
    elif e == 31:
        v = _F32(np.inf) if m == 0 else _F32(np.nan)
    else:
        v = _F32(m + 1024) * _F16_POW2[e]
    if h & 0x8000:
        v = -v
    return v

def _host_converts_halves() -> bool:
    """True when LLVM lowers ``fpext half`` to an instruction on this host (no libcall)."""
    if os.environ.get("TORCHLESS_SOFT_F16"):
        return False
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    if machine in ("x86_64", "amd64"):
        try:
            from llvmlite import binding as llvm

            return bool(llvm.get_host_cpu_features().get("f16c", False))
        except (AttributeError, RuntimeError, OSError):  # pragma: no cover - unusual llvmlite
            return False
    return False

HALF_NATIVE = _host_converts_halves()

_h2f = _h2f_native if HALF_NATIVE else _h2f_soft

@njit(inline="always", cache=True)
def _lanes_sum(acc):
    """Sum of the 32 lanes in a fixed pairwise order (short dependency chain)."""
    for j in range(16):
        acc[j] += acc[j + 16]
    for j in range(8):
        acc[j] += acc[j + 8]
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))

@njit(inline="always", cache=True)
def _k4_scale_min(u, o, j):
    """Scale and min (6-bit each) of sub-block j from the 12 bytes at u[o:o+12]."""
    if j < 4:
        sc = np.int64(u[o + j]) & 63
        m = np.int64(u[o + j + 4]) & 63
    else:
        sc = (np.int64(u[o + j + 4]) & 15) | ((np.int64(u[o + j - 4]) >> 6) << 4)
        m = (np.int64(u[o + j + 4]) >> 4) | ((np.int64(u[o + j]) >> 6) << 4)
    return _F32(sc), _F32(m)

@njit(inline="always", cache=True)
def _qh32(u, o):
    """The little-endian uint32 at u[o:o+4] (the q5_0 high bits)."""
    return (
        np.uint32(u[o])
        | (np.uint32(u[o + 1]) << 8)
        | (np.uint32(u[o + 2]) << 16)
        | (np.uint32(u[o + 3]) << 24)
    )


# ----------------------------------------------------------------------------------------
# The skeleton: parallel kernels generated from a format's inner functions
# ----------------------------------------------------------------------------------------
# The templates name the format's inner functions ``_dot`` / ``_row``; :func:`_register`
# compiles each template once per format as a fresh function over the same code, with those
# names bound in its globals and named after the format (``matvec_q4_k``, ...), so that every
# kernel has its own Numba cache entry and inlines its format's code.


def _matvec_template(data, x, out):
    """out[r] = sum_c W[r, c] * x[c] for ``data`` [rows, bytes_per_row] of this kind."""
    rows = data.shape[0]
    sd = data.view(np.int8)
    for ch in prange((rows + _CHUNK - 1) // _CHUNK):
        acc = np.empty(32, np.float32)
        for r in range(ch * _CHUNK, min(rows, ch * _CHUNK + _CHUNK)):
            out[r] = _dot(data[r], sd[r], x, acc)  # noqa: F821 (bound per format)


def _matmul_template(data, X, out):
    """out[t, r] = sum_c W[r, c] * X[t, c]; X float32 [T, cols], out float32 [T, rows]."""
    rows = data.shape[0]
    sd = data.view(np.int8)
    for ch in prange((rows + _CHUNK - 1) // _CHUNK):
        acc = np.empty(32, np.float32)
        for r in range(ch * _CHUNK, min(rows, ch * _CHUNK + _CHUNK)):
            for t in range(X.shape[0]):
                out[t, r] = _dot(data[r], sd[r], X[t], acc)  # noqa: F821 (bound per format)


def _dequant_rows_template(data, r0, r1, out):
    """out[i, :] = dequantized row r0 + i, for i in range(r1 - r0)."""
    sd = data.view(np.int8)
    for i in prange(r1 - r0):
        _row(data[r0 + i], sd[r0 + i], out[i])  # noqa: F821 (bound per format)


def _generate(template, name: str, **bound):
    """``njit(template)`` as a new function ``name`` whose globals add ``bound``."""
    fn = pytypes.FunctionType(template.__code__, {**globals(), **bound}, name)
    fn.__qualname__ = name
    fn.__doc__ = template.__doc__
    return njit(**_JIT)(fn)


def _register(kind: str, elems: int, nbytes: int, deq, dot, row) -> None:
    """Add a format: its block size, NumPy dequantizer and row functions; generates
    ``matvec_<kind>``, ``matmul_<kind>`` and ``dequant_rows_<kind>`` (module attributes)."""
    BLOCK_INFO[kind] = (elems, nbytes)
    _DEQ[kind] = deq
    for table, template, prefix, inner in (
        (MATVEC, _matvec_template, "matvec", {"_dot": dot}),
        (MATMUL, _matmul_template, "matmul", {"_dot": dot}),
        (DEQUANT_ROWS, _dequant_rows_template, "dequant_rows", {"_row": row}),
    ):
        name = f"{prefix}_{kind}"
        table[kind] = globals()[name] = _generate(template, name, **inner)
        __all__.append(name)


# ----------------------------------------------------------------------------------------
# The formats (each: NumPy reference, the two Numba row functions, registration)
# ----------------------------------------------------------------------------------------

# --- q8_0: d, int8 qs[32]; w = d * q -------------------------------------------


def _deq_q8_0(b):
    d = _f16(b, 0)
    return d * b[..., 2:34].view(np.int8).astype(np.float32)

@njit(inline="always", cache=True)
def _dot_q8_0(u, s, x, acc):
    acc[:] = 0
    for b in range(u.shape[0] // 34):
        o = b * 34
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o], u[o + 1])
        xb = b * 32
        for j in range(32):
            acc[j] += (d * _F32(s[o + 2 + j])) * x[xb + j]
    return _lanes_sum(acc)

@njit(inline="always", cache=True)
def _row_q8_0(u, s, dst):
    for b in range(u.shape[0] // 34):
        o = b * 34
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o], u[o + 1])
        for j in range(32):
            dst[b * 32 + j] = d * _F32(s[o + 2 + j])


_register("q8_0", 32, 34, _deq_q8_0, _dot_q8_0, _row_q8_0)

# --- q4_0: d, 16 bytes of nibbles; w = d * (q - 8) -----------------------------


def _deq_q4_0(b):
    d = _f16(b, 0)
    qs = b[..., 2:18]
    q = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.int8) - np.int8(8)
    return d * q.astype(np.float32)

@njit(inline="always", cache=True)
def _dot_q4_0(u, s, x, acc):
    acc[:] = 0
    for b in range(u.shape[0] // 18):
        o = b * 18
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o], u[o + 1])
        xb = b * 32
        for j in range(16):
            v = u[o + 2 + j]
            acc[j] += (d * (_ubits(v, 0, 15) - _F32(8))) * x[xb + j]
            acc[j + 16] += (d * (_ubits(v, 4, 15) - _F32(8))) * x[xb + 16 + j]
    return _lanes_sum(acc)

@njit(inline="always", cache=True)
def _row_q4_0(u, s, dst):
    for b in range(u.shape[0] // 18):
        o = b * 18
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o], u[o + 1])
        for j in range(16):
            v = u[o + 2 + j]
            dst[b * 32 + j] = d * (_ubits(v, 0, 15) - _F32(8))
            dst[b * 32 + 16 + j] = d * (_ubits(v, 4, 15) - _F32(8))


_register("q4_0", 32, 18, _deq_q4_0, _dot_q4_0, _row_q4_0)

# --- q4_1: d, m, 16 bytes of nibbles; w = d * q + m ----------------------------------------


def _deq_q4_1(b):
    d, m = _f16(b, 0), _f16(b, 2)
    qs = b[..., 4:20]
    return d * np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.float32) + m


@njit(inline="always", cache=True)
def _dot_q4_1(u, s, x, acc):
    acc[:] = 0
    for b in range(u.shape[0] // 20):
        o = b * 20
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o], u[o + 1])
        m = _h2f(u[o + 2], u[o + 3])
        xb = b * 32
        for j in range(16):
            v = u[o + 4 + j]
            acc[j] += (d * _ubits(v, 0, 15) + m) * x[xb + j]
            acc[j + 16] += (d * _ubits(v, 4, 15) + m) * x[xb + 16 + j]
    return _lanes_sum(acc)


@njit(inline="always", cache=True)
def _row_q4_1(u, s, dst):
    for b in range(u.shape[0] // 20):
        o = b * 20
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o], u[o + 1])
        m = _h2f(u[o + 2], u[o + 3])
        for j in range(16):
            v = u[o + 4 + j]
            dst[b * 32 + j] = d * _ubits(v, 0, 15) + m
            dst[b * 32 + 16 + j] = d * _ubits(v, 4, 15) + m


_register("q4_1", 32, 20, _deq_q4_1, _dot_q4_1, _row_q4_1)

# --- q5_0: d, qh, 16 bytes of nibbles; w = d * (q - 16) ------------------------


def _deq_q5_0(b):
    d = _f16(b, 0)
    qh = np.ascontiguousarray(b[..., 2:6]).view("<u4")  # [..., 1]
    bits = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # [..., 32]
    qs = b[..., 6:22]
    low = np.concatenate([qs & 15, qs >> 4], axis=-1)
    q = (low | (bits << 4)).astype(np.int8) - np.int8(16)
    return d * q.astype(np.float32)

@njit(inline="always", cache=True)
def _dot_q5_0(u, s, x, acc):
    acc[:] = 0
    for b in range(u.shape[0] // 22):
        o = b * 22
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o], u[o + 1])
        qh = _qh32(u, o + 2)
        xb = b * 32
        for j in range(16):
            v = u[o + 6 + j]
            lo = _ubits(v, 0, 15) + _F32(16) * _ubits(qh, j, 1)
            hi = _ubits(v, 4, 15) + _F32(16) * _ubits(qh, j + 16, 1)
            acc[j] += (d * (lo - _F32(16))) * x[xb + j]
            acc[j + 16] += (d * (hi - _F32(16))) * x[xb + 16 + j]
    return _lanes_sum(acc)

@njit(inline="always", cache=True)
def _row_q5_0(u, s, dst):
    for b in range(u.shape[0] // 22):
        o = b * 22
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o], u[o + 1])
        qh = _qh32(u, o + 2)
        for j in range(16):
            v = u[o + 6 + j]
            lo = _ubits(v, 0, 15) + _F32(16) * _ubits(qh, j, 1)
            hi = _ubits(v, 4, 15) + _F32(16) * _ubits(qh, j + 16, 1)
            dst[b * 32 + j] = d * (lo - _F32(16))
            dst[b * 32 + 16 + j] = d * (hi - _F32(16))


_register("q5_0", 32, 22, _deq_q5_0, _dot_q5_0, _row_q5_0)

# --- q4_k and q5_k: d, dmin, 12 bytes of 6-bit scales/mins, (qh,) nibbles --------------


def _deq_k(b, with_high: bool):
    shape = b.shape[:-1]
    d = _f16(b, 0)
    dmin = _f16(b, 2)
    sc, m = _k4_scales(b[..., 4:16])
    dl = (d * sc.astype(np.float32))[..., None]  # [..., 8, 1]
    ml = (dmin * m.astype(np.float32))[..., None]
    qs = b[..., -128:].reshape(shape + (4, 1, 32))
    q = (qs >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)) & 15  # [..., 4, 2, 32]
    q = q.reshape(shape + (8, 32))
    if with_high:
        qh = b[..., 16:48].reshape(shape + (1, 32))
        hb = (qh >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1  # [..., 8, 32]
        q = q | (hb << 4)
    return (dl * q.astype(np.float32) - ml).reshape(shape + (256,))

def _deq_q4_k(b):
    return _deq_k(b, False)

@njit(inline="always", cache=True)
def _dot_q4_k(u, s, x, acc):
    acc[:] = 0
    for b in range(u.shape[0] // 144):
        o = b * 144
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o], u[o + 1])
        dmin = _h2f(u[o + 2], u[o + 3])
        for i in range(4):
            sc0, m0 = _k4_scale_min(u, o + 4, 2 * i)
            sc1, m1 = _k4_scale_min(u, o + 4, 2 * i + 1)
            dl0, ml0, dl1, ml1 = d * sc0, dmin * m0, d * sc1, dmin * m1
            qo = o + 16 + 32 * i
            x0 = b * 256 + 64 * i
            for l in range(32):
                v = u[qo + l]
                acc[l] += (dl0 * _ubits(v, 0, 15) - ml0) * x[x0 + l]
                acc[l] += (dl1 * _ubits(v, 4, 15) - ml1) * x[x0 + 32 + l]
    return _lanes_sum(acc)

@njit(inline="always", cache=True)
def _row_q4_k(u, s, dst):
    for b in range(u.shape[0] // 144):
        o = b * 144
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o], u[o + 1])
        dmin = _h2f(u[o + 2], u[o + 3])
        for i in range(4):
            sc0, m0 = _k4_scale_min(u, o + 4, 2 * i)
            sc1, m1 = _k4_scale_min(u, o + 4, 2 * i + 1)
            dl0, ml0, dl1, ml1 = d * sc0, dmin * m0, d * sc1, dmin * m1
            qo = o + 16 + 32 * i
            y0 = b * 256 + 64 * i
            for l in range(32):
                v = u[qo + l]
                dst[y0 + l] = dl0 * _ubits(v, 0, 15) - ml0
                dst[y0 + 32 + l] = dl1 * _ubits(v, 4, 15) - ml1


_register("q4_k", 256, 144, _deq_q4_k, _dot_q4_k, _row_q4_k)


def _deq_q5_k(b):
    return _deq_k(b, True)

@njit(inline="always", cache=True)
def _dot_q5_k(u, s, x, acc):
    acc[:] = 0
    for b in range(u.shape[0] // 176):
        o = b * 176
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o], u[o + 1])
        dmin = _h2f(u[o + 2], u[o + 3])
        for i in range(4):
            sc0, m0 = _k4_scale_min(u, o + 4, 2 * i)
            sc1, m1 = _k4_scale_min(u, o + 4, 2 * i + 1)
            dl0, ml0, dl1, ml1 = d * sc0, dmin * m0, d * sc1, dmin * m1
            qo = o + 48 + 32 * i
            x0 = b * 256 + 64 * i
            for l in range(32):
                v = u[qo + l]
                h = u[o + 16 + l]
                q0 = _ubits(v, 0, 15) + _F32(16) * _ubits(h, 2 * i, 1)
                q1 = _ubits(v, 4, 15) + _F32(16) * _ubits(h, 2 * i + 1, 1)
                acc[l] += (dl0 * q0 - ml0) * x[x0 + l]
                acc[l] += (dl1 * q1 - ml1) * x[x0 + 32 + l]
    return _lanes_sum(acc)

@njit(inline="always", cache=True)
def _row_q5_k(u, s, dst):
    for b in range(u.shape[0] // 176):
        o = b * 176
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o], u[o + 1])
        dmin = _h2f(u[o + 2], u[o + 3])
        for i in range(4):
            sc0, m0 = _k4_scale_min(u, o + 4, 2 * i)
            sc1, m1 = _k4_scale_min(u, o + 4, 2 * i + 1)
            dl0, ml0, dl1, ml1 = d * sc0, dmin * m0, d * sc1, dmin * m1
            qo = o + 48 + 32 * i
            y0 = b * 256 + 64 * i
            for l in range(32):
                v = u[qo + l]
                h = u[o + 16 + l]
                dst[y0 + l] = dl0 * (_ubits(v, 0, 15) + _F32(16) * _ubits(h, 2 * i, 1)) - ml0
                dst[y0 + 32 + l] = (
                    dl1 * (_ubits(v, 4, 15) + _F32(16) * _ubits(h, 2 * i + 1, 1)) - ml1
                )


_register("q5_k", 256, 176, _deq_q5_k, _dot_q5_k, _row_q5_k)

# --- q6_k: ql, qh, int8 scales[16], d; w = d * sc * (q - 32) -------------------


def _deq_q6_k(b):
    shape = b.shape[:-1]
    ql = b[..., 0:128].reshape(shape + (2, 1, 64))
    qh = b[..., 128:192].reshape(shape + (2, 1, 32))
    sc = b[..., 192:208].view(np.int8).astype(np.float32)  # [..., 16]
    d = _f16(b, 208)
    low = (ql >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)) & 15  # [..., 2, 2, 64]
    low = low.reshape(shape + (2, 4, 32))
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)) & 3  # [..., 2, 4, 32]
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    dl = (d * sc).reshape(shape + (16, 1))
    return (dl * q.reshape(shape + (16, 16)).astype(np.float32)).reshape(shape + (256,))

@njit(inline="always", cache=True)
def _dot_q6_k(u, s, x, acc):
    acc[:] = 0
    for b in range(u.shape[0] // 210):
        o = b * 210
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o + 208], u[o + 209])
        for h in range(2):
            qlo = o + 64 * h
            qho = o + 128 + 32 * h
            sco = o + 192 + 8 * h
            x0 = b * 256 + 128 * h
            for k in range(2):  # scales change every 16 elements
                dl0 = d * _F32(s[sco + k])
                dl1 = d * _F32(s[sco + k + 2])
                dl2 = d * _F32(s[sco + k + 4])
                dl3 = d * _F32(s[sco + k + 6])
                for l in range(16 * k, 16 * k + 16):
                    a = u[qlo + l]
                    c = u[qlo + 32 + l]
                    hb = u[qho + l]
                    q0 = _ubits(a, 0, 15) + _F32(16) * _ubits(hb, 0, 3) - _F32(32)
                    q1 = _ubits(c, 0, 15) + _F32(16) * _ubits(hb, 2, 3) - _F32(32)
                    q2 = _ubits(a, 4, 15) + _F32(16) * _ubits(hb, 4, 3) - _F32(32)
                    q3 = _ubits(c, 4, 15) + _F32(16) * _ubits(hb, 6, 3) - _F32(32)
                    acc[l] += (dl0 * q0) * x[x0 + l]
                    acc[l] += (dl1 * q1) * x[x0 + 32 + l]
                    acc[l] += (dl2 * q2) * x[x0 + 64 + l]
                    acc[l] += (dl3 * q3) * x[x0 + 96 + l]
    return _lanes_sum(acc)

@njit(inline="always", cache=True)
def _row_q6_k(u, s, dst):
    for b in range(u.shape[0] // 210):
        o = b * 210
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o + 208], u[o + 209])
        for h in range(2):
            qlo = o + 64 * h
            qho = o + 128 + 32 * h
            sco = o + 192 + 8 * h
            y0 = b * 256 + 128 * h
            for k in range(2):
                dl0 = d * _F32(s[sco + k])
                dl1 = d * _F32(s[sco + k + 2])
                dl2 = d * _F32(s[sco + k + 4])
                dl3 = d * _F32(s[sco + k + 6])
                for l in range(16 * k, 16 * k + 16):
                    a = u[qlo + l]
                    c = u[qlo + 32 + l]
                    hb = u[qho + l]
                    dst[y0 + l] = dl0 * (_ubits(a, 0, 15) + _F32(16) * _ubits(hb, 0, 3) - _F32(32))
                    dst[y0 + 32 + l] = dl1 * (
                        _ubits(c, 0, 15) + _F32(16) * _ubits(hb, 2, 3) - _F32(32)
                    )
                    dst[y0 + 64 + l] = dl2 * (
                        _ubits(a, 4, 15) + _F32(16) * _ubits(hb, 4, 3) - _F32(32)
                    )
                    dst[y0 + 96 + l] = dl3 * (
                        _ubits(c, 4, 15) + _F32(16) * _ubits(hb, 6, 3) - _F32(32)
                    )


_register("q6_k", 256, 210, _deq_q6_k, _dot_q6_k, _row_q6_k)


# --- q5_1: d, m, qh (uint32), 16 bytes of nibbles; w = d * q + m -------------------------


def _deq_q5_1(b):
    d, m = _f16(b, 0), _f16(b, 2)
    qh = np.ascontiguousarray(b[..., 4:8]).view("<u4")
    bits = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    qs = b[..., 8:24]
    q = np.concatenate([qs & 15, qs >> 4], axis=-1) | (bits << 4)
    return d * q.astype(np.float32) + m


@njit(inline="always", cache=True)
def _dot_q5_1(u, s, x, acc):
    acc[:] = 0
    for b in range(u.shape[0] // 24):
        o = b * 24
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o], u[o + 1])
        m = _h2f(u[o + 2], u[o + 3])
        qh = _qh32(u, o + 4)
        xb = b * 32
        for j in range(16):
            v = u[o + 8 + j]
            lo = _ubits(v, 0, 15) + _F32(16) * _ubits(qh, j, 1)
            hi = _ubits(v, 4, 15) + _F32(16) * _ubits(qh, j + 16, 1)
            acc[j] += (d * lo + m) * x[xb + j]
            acc[j + 16] += (d * hi + m) * x[xb + 16 + j]
    return _lanes_sum(acc)


@njit(inline="always", cache=True)
def _row_q5_1(u, s, dst):
    for b in range(u.shape[0] // 24):
        o = b * 24
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o], u[o + 1])
        m = _h2f(u[o + 2], u[o + 3])
        qh = _qh32(u, o + 4)
        for j in range(16):
            v = u[o + 8 + j]
            dst[b * 32 + j] = d * (_ubits(v, 0, 15) + _F32(16) * _ubits(qh, j, 1)) + m
            dst[b * 32 + 16 + j] = d * (_ubits(v, 4, 15) + _F32(16) * _ubits(qh, j + 16, 1)) + m


_register("q5_1", 32, 24, _deq_q5_1, _dot_q5_1, _row_q5_1)


# --- iq4_nl: d, 16 bytes of nibbles indexing a 16-value table; w = d * table[q] -----------

#: the non-linear 4-bit levels of iq4_nl / iq4_xs (ggml's kvalues_iq4nl)
IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                        dtype=np.int8)
_IQ4NL_F32 = IQ4NL_VALUES.astype(np.float32)


def _deq_iq4_nl(b):
    qs = b[..., 2:18]
    return _f16(b, 0) * _IQ4NL_F32[np.concatenate([qs & 15, qs >> 4], axis=-1)]


@njit(inline="always", cache=True)
def _dot_iq4_nl(u, s, x, acc):
    acc[:] = 0
    for b in range(u.shape[0] // 18):
        o = b * 18
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o], u[o + 1])
        xb = b * 32
        for j in range(16):
            v = u[o + 2 + j]
            acc[j] += (d * _IQ4NL_F32[v & 15]) * x[xb + j]
            acc[j + 16] += (d * _IQ4NL_F32[v >> 4]) * x[xb + 16 + j]
    return _lanes_sum(acc)


@njit(inline="always", cache=True)
def _row_iq4_nl(u, s, dst):
    for b in range(u.shape[0] // 18):
        o = b * 18
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o], u[o + 1])
        for j in range(16):
            v = u[o + 2 + j]
            dst[b * 32 + j] = d * _IQ4NL_F32[v & 15]
            dst[b * 32 + 16 + j] = d * _IQ4NL_F32[v >> 4]


_register("iq4_nl", 32, 18, _deq_iq4_nl, _dot_iq4_nl, _row_iq4_nl)


# --- q2_k: scales[16] (4-bit scale | 4-bit min), qs[64] (2-bit), d, dmin ------------------
# element e: sub-block e // 16; q = (qs[32 * (e // 128) + e % 32] >> 2 * (e % 128 // 32)) & 3;
# w = d * (sc & 15) * q - dmin * (sc >> 4)


def _deq_q2_k(b):
    shape = b.shape[:-1]
    sc = b[..., 0:16]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (sc & 15).astype(np.float32))[..., None]  # [..., 16, 1]
    ml = (dmin * (sc >> 4).astype(np.float32))[..., None]
    qs = b[..., 16:80].reshape(shape + (2, 1, 32))
    q = (qs >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)) & 3  # [..., 2, 4, 32]
    q = q.reshape(shape + (16, 16)).astype(np.float32)
    return (dl * q - ml).reshape(shape + (256,))


@njit(inline="always", cache=True)
def _dot_q2_k(u, s, x, acc):
    acc[:] = 0
    for b in range(u.shape[0] // 84):
        o = b * 84
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o + 80], u[o + 81])
        dmin = _h2f(u[o + 82], u[o + 83])
        for h in range(2):
            for sh in range(4):
                j = 8 * h + 2 * sh  # the sub-blocks j (l < 16) and j + 1
                dl0 = d * _ubits(u[o + j], 0, 15)
                ml0 = dmin * _ubits(u[o + j], 4, 15)
                dl1 = d * _ubits(u[o + j + 1], 0, 15)
                ml1 = dmin * _ubits(u[o + j + 1], 4, 15)
                x0 = b * 256 + 128 * h + 32 * sh
                for l in range(16):
                    acc[l] += (dl0 * _ubits(u[o + 16 + 32 * h + l], 2 * sh, 3) - ml0) * x[x0 + l]
                for l in range(16, 32):
                    acc[l] += (dl1 * _ubits(u[o + 16 + 32 * h + l], 2 * sh, 3) - ml1) * x[x0 + l]
    return _lanes_sum(acc)


@njit(inline="always", cache=True)
def _row_q2_k(u, s, dst):
    for b in range(u.shape[0] // 84):
        o = b * 84
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o + 80], u[o + 81])
        dmin = _h2f(u[o + 82], u[o + 83])
        for h in range(2):
            for sh in range(4):
                j = 8 * h + 2 * sh
                dl0 = d * _ubits(u[o + j], 0, 15)
                ml0 = dmin * _ubits(u[o + j], 4, 15)
                dl1 = d * _ubits(u[o + j + 1], 0, 15)
                ml1 = dmin * _ubits(u[o + j + 1], 4, 15)
                y0 = b * 256 + 128 * h + 32 * sh
                for l in range(16):
                    dst[y0 + l] = dl0 * _ubits(u[o + 16 + 32 * h + l], 2 * sh, 3) - ml0
                for l in range(16, 32):
                    dst[y0 + l] = dl1 * _ubits(u[o + 16 + 32 * h + l], 2 * sh, 3) - ml1


_register("q2_k", 256, 84, _deq_q2_k, _dot_q2_k, _row_q2_k)


# --- q3_k: hmask[32], qs[64] (2-bit), scales[12] (16 x 6 bits), d --------------------------
# element e: low bits as q2_k, q = low - 4 unless bit e // 32 of hmask[e % 32] is set;
# w = d * (sc - 32) * q


def _q3_scales(sc12):
    """The 16 six-bit q3_k scales minus 32 (int8 [..., 16]) from the 12 bytes."""
    lo = np.concatenate([sc12[..., 0:8] & 15, sc12[..., 0:8] >> 4], axis=-1)
    hi = (sc12[..., 8:12][..., None, :] >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3
    hi = hi.reshape(sc12.shape[:-1] + (16,))
    return (lo | (hi << 4)).astype(np.int8) - np.int8(32)


def _deq_q3_k(b):
    shape = b.shape[:-1]
    d = _f16(b, 108)
    dl = (d * _q3_scales(b[..., 96:108]).astype(np.float32))[..., None]  # [..., 16, 1]
    qs = b[..., 32:96].reshape(shape + (2, 1, 32))
    low = ((qs >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)) & 3).reshape(
        shape + (256,))
    hm = b[..., 0:32].reshape(shape + (1, 32))
    hb = ((hm >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1).reshape(shape + (256,))
    q = low.astype(np.int8) - ((hb ^ 1) << 2).astype(np.int8)
    return (dl * q.reshape(shape + (16, 16)).astype(np.float32)).reshape(shape + (256,))


@njit(inline="always", cache=True)
def _q3_scale(u, o, j):
    """Scale j (0..15) of the q3_k block at byte o, minus 32, as float32."""
    if j < 8:
        lo = np.int64(u[o + 96 + j]) & 15
    else:
        lo = np.int64(u[o + 88 + j]) >> 4
    hi = (np.int64(u[o + 104 + j % 4]) >> (2 * (j // 4))) & 3
    return _F32((lo | (hi << 4)) - 32)


@njit(inline="always", cache=True)
def _dot_q3_k(u, s, x, acc):
    acc[:] = 0
    for b in range(u.shape[0] // 110):
        o = b * 110
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o + 108], u[o + 109])
        for h in range(2):
            for sh in range(4):
                j = 8 * h + 2 * sh
                dl0 = d * _q3_scale(u, o, j)
                dl1 = d * _q3_scale(u, o, j + 1)
                x0 = b * 256 + 128 * h + 32 * sh
                hbit = 4 * h + sh
                for l in range(32):
                    q = (_ubits(u[o + 32 + 32 * h + l], 2 * sh, 3)
                         - _F32(4) + _F32(4) * _ubits(u[o + l], hbit, 1))
                    acc[l] += ((dl0 if l < 16 else dl1) * q) * x[x0 + l]
    return _lanes_sum(acc)


@njit(inline="always", cache=True)
def _row_q3_k(u, s, dst):
    for b in range(u.shape[0] // 110):
        o = b * 110
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o + 108], u[o + 109])
        for h in range(2):
            for sh in range(4):
                j = 8 * h + 2 * sh
                dl0 = d * _q3_scale(u, o, j)
                dl1 = d * _q3_scale(u, o, j + 1)
                y0 = b * 256 + 128 * h + 32 * sh
                hbit = 4 * h + sh
                for l in range(32):
                    q = (_ubits(u[o + 32 + 32 * h + l], 2 * sh, 3)
                         - _F32(4) + _F32(4) * _ubits(u[o + l], hbit, 1))
                    dst[y0 + l] = (dl0 if l < 16 else dl1) * q


_register("q3_k", 256, 110, _deq_q3_k, _dot_q3_k, _row_q3_k)


# --- iq4_xs: d, scales_h (uint16), scales_l[4], qs[128]; 8 sub-blocks of 32 -----------------
# sub-block j: ls = (4 bits of scales_l[j // 2]) | (2 bits j of scales_h) << 4; its 16 bytes
# qs[16j:16j+16] hold elements 32j + l (low nibbles) and 32j + 16 + l (high);
# w = d * (ls - 32) * table[q]


def _deq_iq4_xs(b):
    shape = b.shape[:-1]
    d = _f16(b, 0)
    sh = (b[..., 2].astype(np.uint16) | (b[..., 3].astype(np.uint16) << np.uint16(8)))[..., None]
    sl = b[..., 4:8]
    lo = np.stack([sl & 15, sl >> 4], axis=-1).reshape(shape + (8,))
    hi = ((sh >> (2 * np.arange(8, dtype=np.uint16))) & 3).astype(np.uint8)
    ls = (lo | (hi << 4)).astype(np.int8) - np.int8(32)
    dl = (d * ls.astype(np.float32))[..., None]  # [..., 8, 1]
    qs = b[..., 8:136].reshape(shape + (8, 16))
    q = np.concatenate([qs & 15, qs >> 4], axis=-1)  # [..., 8, 32]
    return (dl * _IQ4NL_F32[q]).reshape(shape + (256,))


@njit(inline="always", cache=True)
def _iq4_xs_scale(u, o, j):
    """Scale j (0..7) of the iq4_xs block at byte o, minus 32, as float32."""
    lo = (np.int64(u[o + 4 + j // 2]) >> (4 * (j % 2))) & 15
    h = np.int64(u[o + 2]) | (np.int64(u[o + 3]) << 8)
    return _F32((lo | (((h >> (2 * j)) & 3) << 4)) - 32)


@njit(inline="always", cache=True)
def _dot_iq4_xs(u, s, x, acc):
    acc[:] = 0
    for b in range(u.shape[0] // 136):
        o = b * 136
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o], u[o + 1])
        for j in range(8):
            dl = d * _iq4_xs_scale(u, o, j)
            qo = o + 8 + 16 * j
            x0 = b * 256 + 32 * j
            for l in range(16):
                v = u[qo + l]
                acc[l] += (dl * _IQ4NL_F32[v & 15]) * x[x0 + l]
                acc[l + 16] += (dl * _IQ4NL_F32[v >> 4]) * x[x0 + 16 + l]
    return _lanes_sum(acc)


@njit(inline="always", cache=True)
def _row_iq4_xs(u, s, dst):
    for b in range(u.shape[0] // 136):
        o = b * 136
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o], u[o + 1])
        for j in range(8):
            dl = d * _iq4_xs_scale(u, o, j)
            qo = o + 8 + 16 * j
            y0 = b * 256 + 32 * j
            for l in range(16):
                v = u[qo + l]
                dst[y0 + l] = dl * _IQ4NL_F32[v & 15]
                dst[y0 + 16 + l] = dl * _IQ4NL_F32[v >> 4]


_register("iq4_xs", 256, 136, _deq_iq4_xs, _dot_iq4_xs, _row_iq4_xs)


# --- tq2_0: qs[64] (2-bit), d; element e as q2_k's low bits; w = d * (q - 1) ---------------


def _deq_tq2_0(b):
    shape = b.shape[:-1]
    qs = b[..., 0:64].reshape(shape + (2, 1, 32))
    q = ((qs >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)) & 3).astype(np.int8)
    return _f16(b, 64) * (q - np.int8(1)).reshape(shape + (256,)).astype(np.float32)


@njit(inline="always", cache=True)
def _dot_tq2_0(u, s, x, acc):
    acc[:] = 0
    for b in range(u.shape[0] // 66):
        o = b * 66
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o + 64], u[o + 65])
        for h in range(2):
            for sh in range(4):
                x0 = b * 256 + 128 * h + 32 * sh
                for l in range(32):
                    q = _ubits(u[o + 32 * h + l], 2 * sh, 3) - _F32(1)
                    acc[l] += (d * q) * x[x0 + l]
    return _lanes_sum(acc)


@njit(inline="always", cache=True)
def _row_tq2_0(u, s, dst):
    for b in range(u.shape[0] // 66):
        o = b * 66
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o + 64], u[o + 65])
        for h in range(2):
            for sh in range(4):
                y0 = b * 256 + 128 * h + 32 * sh
                for l in range(32):
                    dst[y0 + l] = d * (_ubits(u[o + 32 * h + l], 2 * sh, 3) - _F32(1))


_register("tq2_0", 256, 66, _deq_tq2_0, _dot_tq2_0, _row_tq2_0)


# --- tq1_0: qs[48], qh[4] (5 resp. 4 base-3 digits per byte, fixed point), d ---------------
# digit n of byte v: ((v * 3**n mod 256) * 3) >> 8, in 0..2; w = d * (digit - 1). Elements
# 0..159: digit n of qs[m] (m < 32) is element 32n + m; 160..239: digit n of qs[32 + m]
# (m < 16) is element 160 + 16n + m; 240..255: digit n of qh[m] is element 240 + 4n + m.

_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def _deq_tq1_0(b):
    shape = b.shape[:-1]
    p = _POW3.reshape(5, 1)
    parts = [(b[..., None, 0:32] * p).reshape(shape + (160,)),
             (b[..., None, 32:48] * p).reshape(shape + (80,)),
             (b[..., None, 48:52] * p[:4]).reshape(shape + (16,))]
    v = np.concatenate(parts, axis=-1).astype(np.uint16)
    q = ((v * 3) >> 8).astype(np.int8) - np.int8(1)
    return _f16(b, 52) * q.astype(np.float32)


@njit(inline="always", cache=True)
def _trit(v, n):
    """Base-3 digit n of a tq1_0 byte, minus 1, as float32."""
    p = (np.int64(v) * _POW3[n]) & 255
    return _F32((p * 3) >> 8) - _F32(1)


@njit(inline="always", cache=True)
def _dot_tq1_0(u, s, x, acc):
    acc[:] = 0
    for b in range(u.shape[0] // 54):
        o = b * 54
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o + 52], u[o + 53])
        x0 = b * 256
        for n in range(5):
            for m in range(32):
                acc[m] += (d * _trit(u[o + m], n)) * x[x0 + 32 * n + m]
            for m in range(16):
                acc[16 + m] += (d * _trit(u[o + 32 + m], n)) * x[x0 + 160 + 16 * n + m]
        for n in range(4):
            for m in range(4):
                acc[4 * n + m] += (d * _trit(u[o + 48 + m], n)) * x[x0 + 240 + 4 * n + m]
    return _lanes_sum(acc)


@njit(inline="always", cache=True)
def _row_tq1_0(u, s, dst):
    for b in range(u.shape[0] // 54):
        o = b * 54
        prefetch(u, o + PREFETCH_BYTES)
        d = _h2f(u[o + 52], u[o + 53])
        y0 = b * 256
        for n in range(5):
            for m in range(32):
                dst[y0 + 32 * n + m] = d * _trit(u[o + m], n)
            for m in range(16):
                dst[y0 + 160 + 16 * n + m] = d * _trit(u[o + 32 + m], n)
        for n in range(4):
            for m in range(4):
                dst[y0 + 240 + 4 * n + m] = d * _trit(u[o + 48 + m], n)


_register("tq1_0", 256, 54, _deq_tq1_0, _dot_tq1_0, _row_tq1_0)


# ----------------------------------------------------------------------------------------
# NumPy dequantization of whole tensors
# ----------------------------------------------------------------------------------------


def _check_data(kind: str, data, cols: int) -> np.ndarray:
    block_info(kind)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise TensorShapeError(
            f"{kind} data must be a 2-D uint8 array [rows, bytes_per_row], got "
            f"{getattr(data, 'dtype', type(data).__name__)} "
            f"with shape {getattr(data, 'shape', None)}"
        )
    cols = int(cols)
    want = bytes_per_row(kind, cols)
    if data.shape[1] != want:
        raise TensorShapeError(
            f"{kind} rows of {cols} elements take {want} bytes, "
            f"but data has {data.shape[1]} bytes per row"
        )
    return data

def dequantize(kind: str, data: np.ndarray, cols: int) -> np.ndarray:
    """Dequantize ``data`` (uint8 [rows, bytes_per_row]) to float32 [rows, cols] (NumPy)."""
    data = _check_data(kind, data, cols)
    epb, bpb = BLOCK_INFO[kind]
    rows = data.shape[0]
    nb = int(cols) // epb
    out = np.empty((rows, nb * epb), dtype=np.float32)
    # Work in row groups to bound the temporaries (the reference builds several per block).
    step = max(1, (1 << 18) // max(1, nb * epb))
    for r in range(0, rows, step):
        blocks = np.ascontiguousarray(data[r : r + step]).reshape(-1, nb, bpb)
        out[r : r + step] = _DEQ[kind](blocks).reshape(-1, nb * epb)
    return out


# ----------------------------------------------------------------------------------------
# Quantizers (ggml reference quantization, NumPy)
# ----------------------------------------------------------------------------------------


def _blocks_of(w, name: str) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise TensorShapeError(f"{name} expects a 2-D [rows, cols] array, got shape {w.shape}")
    rows, cols = w.shape
    if cols == 0 or cols % QK:
        raise UnsupportedError(f"{name} needs cols to be a positive multiple of {QK}, got {cols}")
    return np.ascontiguousarray(w, dtype=np.float32).reshape(rows, cols // QK, QK)

def _f16_bytes(d: np.ndarray) -> np.ndarray:
    """float32 [..., 1] -> uint8 [..., 2] little-endian half floats (round to nearest even)."""
    return np.ascontiguousarray(d.astype(np.float16)).astype("<f2").view(np.uint8)

def quantize_q8_0(w: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] -> q8_0 uint8 [rows, cols // 32 * 34] (ggml's reference rounding)."""
    x = _blocks_of(w, "quantize_q8_0")
    rows = x.shape[0]
    d = np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    v = x * inv
    a = np.abs(v)
    fl = np.floor(a)
    q = np.sign(v) * (fl + np.floor(np.float32(2) * (a - fl)))  # roundf: half away from zero
    out = np.concatenate([_f16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=-1)
    return out.reshape(rows, -1)

def quantize_q4_0(w: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] -> q4_0 uint8 [rows, cols // 32 * 18] (ggml's reference rounding)."""
    x = _blocks_of(w, "quantize_q4_0")
    rows = x.shape[0]
    imax = np.abs(x).argmax(axis=-1)[..., None]  # first element of largest magnitude
    mx = np.take_along_axis(x, imax, axis=-1)
    d = mx / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np.trunc(x * inv + np.float32(8.5))
    q = np.clip(q, 0, 15).astype(np.uint8)
    packed = q[..., :16] | (q[..., 16:] << np.uint8(4))
    out = np.concatenate([_f16_bytes(d), packed], axis=-1)
    return out.reshape(rows, -1)


# ----------------------------------------------------------------------------------------
# Dispatchers (shape checks + argument normalisation -> one specialisation per kernel)
# ----------------------------------------------------------------------------------------


def _readonly(a: np.ndarray, dtype) -> np.ndarray:
    """A read-only, C-contiguous, plain-ndarray view of ``a`` as ``dtype`` (copy only if needed)."""
    if (
        type(a) is not np.ndarray
        or a.dtype != dtype
        or not a.flags.c_contiguous
        or not a.flags.aligned
    ):
        a = np.ascontiguousarray(a, dtype=dtype)
        if type(a) is not np.ndarray:
            a = a.view(np.ndarray)
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a

def _qdata(kind: str, data) -> tuple:
    epb, bpb = block_info(kind)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise TensorShapeError(
            f"{kind} data must be a 2-D uint8 array [rows, bytes_per_row], got "
            f"{getattr(data, 'dtype', type(data).__name__)} "
            f"with shape {getattr(data, 'shape', None)}"
        )
    if data.shape[1] == 0 or data.shape[1] % bpb:
        raise TensorShapeError(
            f"{kind} rows must be whole {bpb}-byte blocks, got {data.shape[1]} bytes per row"
        )
    return _readonly(data, np.uint8), data.shape[1] // bpb * epb

def _out(out, shape, what):
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if (
        not isinstance(out, np.ndarray)
        or out.dtype != np.float32
        or out.shape != shape
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        raise TensorShapeError(
            f"{what}: out must be a writable C-contiguous float32 array of shape {shape}, "
            f"got {getattr(out, 'dtype', None)} {getattr(out, 'shape', None)}"
        )
    return out

def matvec(kind: str, data: np.ndarray, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``out[r] = sum_c W[r, c] * x[c]`` on quantized ``data``; returns ``out`` (new if None)."""
    data, cols = _qdata(kind, data)
    x = _readonly(x, np.float32)
    if x.shape != (cols,):
        raise TensorShapeError(f"matvec {kind}: x must have shape ({cols},), got {x.shape}")
    out = _out(out, (data.shape[0],), f"matvec {kind}")
    MATVEC[kind](data, x, out)
    return out

def matmul(kind: str, data: np.ndarray, X: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``out[t, r] = sum_c W[r, c] * X[t, c]`` (X [T, cols] -> out [T, rows]) on the blocks."""
    data, cols = _qdata(kind, data)
    X = _readonly(X, np.float32)
    if X.ndim != 2 or X.shape[1] != cols:
        raise TensorShapeError(f"matmul {kind}: X must have shape (T, {cols}), got {X.shape}")
    out = _out(out, (X.shape[0], data.shape[0]), f"matmul {kind}")
    MATMUL[kind](data, X, out)
    return out

def dequantize_rows_into(
    kind: str, data: np.ndarray, r0: int, r1: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Rows ``r0:r1`` of the weight as float32 into ``out[:r1 - r0]`` (parallel Numba).

    ``out`` is a float32 ``[n, cols]`` tile with ``n >= r1 - r0`` (allocated when None);
    returns the filled part ``out[:r1 - r0]``.
    """
    data, cols = _qdata(kind, data)
    r0, r1 = int(r0), int(r1)
    if not 0 <= r0 <= r1 <= data.shape[0]:
        raise TensorShapeError(
            f"dequantize_rows_into {kind}: bad row range {r0}:{r1} of {data.shape[0]} rows"
        )
    what = f"dequantize_rows_into {kind}"
    if out is None:
        out = np.empty((r1 - r0, cols), dtype=np.float32)
    elif isinstance(out, np.ndarray) and out.ndim == 2 and out.shape[0] >= r1 - r0:
        out = _out(out[: r1 - r0], (r1 - r0, cols), what)
    else:
        _out(out, (r1 - r0, cols), what)  # raises with a clear message
    DEQUANT_ROWS[kind](data, r0, r1, out)
    return out
