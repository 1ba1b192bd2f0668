"""Quantized weights times *quantized* activations, the way llama.cpp computes them.

llama.cpp never multiplies a block-quantized weight by float32 activations. It first
quantizes the activation vector (once per product) to the weight's "vec_dot type":

* ``q8_0`` blocks of 32 -- ``d`` (a half float) and 32 int8 -- for ``q8_0``, ``q4_0``,
  ``q5_0`` and ``iq4_nl`` weights (:func:`quantize_q8_0_act`, ggml's ``quantize_row_q8_0_ref``);
* ``q8_1`` blocks of 32 -- ``q8_0``'s plus ``s``, the half-rounded ``d * sum(qs)`` -- for
  ``q4_1`` and ``q5_1`` weights, whose min term ``m * sum(x)`` becomes ``m * s``
  (:func:`quantize_q8_1_act`);
* ``q8_K`` blocks of 256 -- ``d`` (float32), 256 int8 and 16 ``bsums`` (sums of 16
  consecutive quants) -- for ``q2_k``, ``q3_k``, ``q4_k``, ``q5_k``, ``q6_k``, ``iq4_xs``,
  ``tq1_0`` and ``tq2_0`` weights (:func:`quantize_q8_k_act`, ggml's ``quantize_row_q8_K_ref``),

then takes integer dot products block by block (int32 accumulation) and scales them.

==========  ===========================================================================
weight      per block ``b`` of a row (``wd``/``wdmin`` the weight's half floats as float32,
            ``xd`` the activation scale)
==========  ===========================================================================
q8_0, q4_0, the weight quants made signed (q4_0: ``q - 8``, q5_0: ``q - 16``); the block's
q5_0        32 products summed into 8 int32 lanes (lane ``i``: elements ``4i .. 4i+3``);
            ``acc = fma(float(lanes), wd * xd, acc)`` in 8 float32 lanes; at the end of the
            row the lanes are summed in a fixed tree -- the order of llama.cpp's x86 kernels
q4_k/q5_k   ``aux[l] = sum_s sc_s * dot_s`` over the elements ``e`` of the block with
            ``e % 8 == l`` (8 int32 lanes); ``sums[l] += (wd*xd) * float(aux[l])``;
            ``sumf -= (wdmin*xd) * float(sum_j bsums[j] * m_{j//2})``; at the end of the
            row ``sumf += sums[0]; ...; sumf += sums[7]`` -- ggml's generic C order
q6_k        as q4_k without the min term (``sc`` are the signed int8 sub-block scales)
q4_1, q5_1  as q4_0 with the unsigned quants, plus ``m * s`` per block summed in a scalar
            that is added after the lanes (llama.cpp's x86 order)
iq4_nl      as q4_0, the weights being the table values ``IQ4NL_VALUES[q]``
q2_k, q3_k, the integers of ggml's ``*_generic`` C code (kept in float32 lanes: exact below
iq4_xs,     2**24) and its float terms in its order: q2_k ``sumf += dall*isum - dmin*summs``;
tq1_0,      q3_k eight lanes ``e % 8`` as q6_k; iq4_xs ``sumf += (d*(ls-32)) * isum`` per
tq2_0       sub-block of 32; tq* ``sumf += isum * (wd*xd)`` per block
==========  ===========================================================================

The integers are those of every llama.cpp build; the float terms of a SIMD llama.cpp are
added in its own orders, so results agree with llama.cpp to float32 rounding, not bit for
bit. One more difference worth knowing: on x86 with AVX/AVX2, llama.cpp does not use the
*reference* q8_0 activation quantizer but ``quantize_row_q8_0`` from ``arch/x86/quants.c``,
which scales by ``127/amax`` (instead of ``1/d``) and rounds half to even (instead of half
away from zero); :func:`quantize_q8_0_act_x86` is that variant and
``matvec_q8act(..., q8_0_variant="x86")`` uses it. The q8_K quantizer is the reference one
on every architecture.

Implementation: the integer block products are small LLVM vector-IR intrinsics, because
Numba widens all integer arithmetic to 64 bits and would not vectorise it. On x86 with
AVX-VNNI / AVX512-VNNI they use ``vpdpbusd``, with plain AVX2 ``vpmaddubsw`` + ``vpmaddwd``
(ggml's sign trick for signed x signed bytes), elsewhere portable IR (:data:`ISA`; the
environment variable ``TORCHLESS_Q8ACT_ISA=generic|avx2|vnni`` lowers the choice -- use a fresh
``NUMBA_CACHE_DIR`` then, the on-disk cache does not know the tier). The integers are exact
and the float order fixed, so every tier gives the same bits. Details:

* 32-element kinds: one intrinsic runs a whole pair of rows (its own LLVM loop over the
  blocks, one 8-lane accumulator per row), sharing each activation load between the rows.
* q4_k / q5_k / q6_k: the activations permuted once per product (``K8_PERM`` /
  ``K6_PERM``) and each sub-block's weights the same way (one byte shuffle), so that the
  byte products' 4-element (``vpmaddubsw`` + ``vpmaddwd``) groups sum exactly the
  reference's eight lanes ``e % 8``, scaled by ``vpmaddwd``; scales and the min term in
  scalar code. The other k-quants: integer sums in float32 lanes.

Like the kernels of :mod:`torchless.kernels.quant`, these take read-only C-contiguous uint8
``data`` [rows, bytes_per_row] and int8 activation quants in [-127, 127] (what the
quantizers produce); go through :func:`matvec_q8act`, which checks shapes and normalises
the arguments so that every kernel has a single Numba specialisation.
"""

from __future__ import annotations

import math
import os
import platform

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..errors import TensorShapeError, UnsupportedError
from . import quant as _q
from .bits import PREFETCH_BYTES, _lane_tree, _prefetch_ir, prefetch
from .quant import _h2f

QK8_0 = 32
QK_K = 256

#: weight kind -> activation format ("q8_0", "q8_1" or "q8_k"); filled by :func:`_register`
ACT_FORMAT: dict = {}

__all__ = [
    "ACT_FORMAT",
    "matvec_q8act",
    "quantize_act",
    "quantize_q8_0_act",
    "quantize_q8_0_act_np",
    "quantize_q8_0_act_x86",
    "quantize_q8_0_act_x86_np",
    "quantize_q8_1_act",
    "quantize_q8_1_act_np",
    "quantize_q8_1_act_x86",
    "quantize_q8_k_act",
    "quantize_q8_k_act_np",
    "supports",
]  # + matvec_q8act_<kind> for every registered kind

_F32 = np.float32


def supports(kind: str) -> bool:
    """True when :func:`matvec_q8act` has a kernel for weights of this kind."""
    return kind in ACT_FORMAT


# ----------------------------------------------------------------------------------------
# Activation quantizers: NumPy (readable reference)
# ----------------------------------------------------------------------------------------


def _act_blocks(x, qk: int, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 1 or x.shape[0] == 0 or x.shape[0] % qk:
        raise TensorShapeError(
            f"{name} expects a 1-D vector whose length is a positive multiple of {qk}, "
            f"got shape {x.shape}"
        )
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, qk)


def _round_f16_np(d: np.ndarray) -> np.ndarray:
    """float32 -> nearest half (ties to even) -> float32, as GGML_FP32_TO_FP16 does."""
    with np.errstate(over="ignore"):
        return d.astype(np.float16).astype(np.float32)


def quantize_q8_0_act_np(x):
    """NumPy version of :func:`quantize_q8_0_act` (ggml ``quantize_row_q8_0_ref``)."""
    xb = _act_blocks(x, QK8_0, "quantize_q8_0_act")
    amax = np.abs(xb).max(axis=1)
    d = (amax / _F32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, _F32(1) / d, _F32(0)).astype(np.float32)
    v = (xb * inv[:, None]).astype(np.float32)
    a = np.abs(v).astype(np.float64)
    q = np.copysign(np.floor(a + 0.5), v)  # roundf: half away from zero (exact in float64)
    return _round_f16_np(d), q.astype(np.int8).reshape(-1)


def quantize_q8_0_act_x86_np(x):
    """NumPy version of :func:`quantize_q8_0_act_x86` (ggml's AVX ``quantize_row_q8_0``)."""
    xb = _act_blocks(x, QK8_0, "quantize_q8_0_act_x86")
    amax = np.abs(xb).max(axis=1)
    d = (amax / _F32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, _F32(127) / amax, _F32(0)).astype(np.float32)
    v = (xb * inv[:, None]).astype(np.float32)
    q = np.clip(np.rint(v), -128, 127)  # round half to even, saturating packs
    return _round_f16_np(d), q.astype(np.int8).reshape(-1)


def quantize_q8_1_act_np(x, variant: str = "ref"):
    """NumPy version of :func:`quantize_q8_1_act` / ``_x86``: the q8_0 quants and scale of
    that variant, and ``s`` = the half-rounded ``(amax / 127) * sum(q)`` of every block."""
    q8 = quantize_q8_0_act_np if variant == "ref" else quantize_q8_0_act_x86_np
    d, q = q8(x)
    xb = _act_blocks(x, QK8_0, "quantize_q8_1_act")
    dd = (np.abs(xb).max(axis=1) / _F32(127)).astype(np.float32)
    t = q.reshape(-1, QK8_0).astype(np.int32).sum(axis=1).astype(np.float32)
    return d, q, _round_f16_np((t * dd).astype(np.float32))


def quantize_q8_k_act_np(x):
    """NumPy version of :func:`quantize_q8_k_act` (ggml ``quantize_row_q8_K_ref``)."""
    xb = _act_blocks(x, QK_K, "quantize_q8_k_act")
    imax = np.abs(xb).argmax(axis=1)  # first element of largest magnitude
    mx = xb[np.arange(xb.shape[0]), imax]
    zero = mx == 0
    with np.errstate(divide="ignore"):
        iscale = np.where(zero, _F32(0), _F32(-127) / np.where(zero, _F32(1), mx)).astype(
            np.float32
        )
    v = (iscale[:, None] * xb).astype(np.float32)
    q = np.minimum(np.rint(v), 127).astype(np.int8)  # nearest_int: ties to even
    q[zero] = 0
    with np.errstate(divide="ignore"):
        d = np.where(zero, _F32(0), _F32(1) / np.where(zero, _F32(1), iscale)).astype(np.float32)
    bsums = q.reshape(-1, QK_K // 16, 16).astype(np.int32).sum(axis=2).astype(np.int16)
    return d, q.reshape(-1), bsums.reshape(-1)


# ----------------------------------------------------------------------------------------
# Activation quantizers: Numba
# ----------------------------------------------------------------------------------------

_F16_MAX_ROUNDS_TO_INF = 65520.0  # |v| >= this rounds to infinity in half precision


@njit(inline="always", cache=True)
def _round_f16(v):
    """float32 -> nearest IEEE half (ties to even) -> float32; portable and exact."""
    a = abs(np.float64(v))
    if not a < _F16_MAX_ROUNDS_TO_INF:  # overflow, inf or nan
        if math.isnan(a):
            return v
        return _F32(math.copysign(math.inf, v))
    if a < 6.103515625e-05:  # below 2**-14: half subnormals, spacing 2**-24
        step = 5.960464477539063e-08
    else:
        _, e = math.frexp(a)  # a in [2**(e-1), 2**e): spacing 2**(e-11)
        step = math.ldexp(1.0, e - 11)
    r = np.rint(a / step) * step  # exact: scaling by powers of two, rint ties to even
    return _F32(math.copysign(r, v))


@njit(cache=True)
def _q8_0_act_into(x, d, qs):
    """ggml ``quantize_row_q8_0_ref``: d = amax/127 (stored as a half), q = roundf(x/d)."""
    for b in range(x.shape[0] // 32):
        o = b * 32
        amax = _F32(0)
        for j in range(32):
            a = abs(x[o + j])
            if not amax > a:  # MAX(amax, fabsf(v))
                amax = a
        dd = amax / _F32(127)
        inv = _F32(1) / dd if dd != 0 else _F32(0)
        d[b] = _round_f16(dd)
        for j in range(32):
            v = x[o + j] * inv
            r = math.floor(abs(np.float64(v)) + 0.5)  # roundf, half away from zero
            qs[o + j] = np.int8(r if v >= 0 else -r)


@njit(inline="always", cache=True)
def _absmax(x, o, n):
    """max |x[o : o + n]| (n a multiple of 8) in eight independent chains: the same value
    as one chain (max is exact), without its latency."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = _F32(0)
    for j in range(o, o + n, 8):
        m0 = max(m0, abs(x[j]))
        m1 = max(m1, abs(x[j + 1]))
        m2 = max(m2, abs(x[j + 2]))
        m3 = max(m3, abs(x[j + 3]))
        m4 = max(m4, abs(x[j + 4]))
        m5 = max(m5, abs(x[j + 5]))
        m6 = max(m6, abs(x[j + 6]))
        m7 = max(m7, abs(x[j + 7]))
    return max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))


@njit(cache=True, error_model="numpy")
def _q8_0_act_x86_into(x, d, qs):
    """ggml's AVX/AVX2 ``quantize_row_q8_0``: x * (127/amax), rounded half to even."""
    for b in range(x.shape[0] // 32):
        o = b * 32
        amax = _absmax(x, o, 32)
        d[b] = _round_f16(amax / _F32(127))
        inv = _F32(127) / amax if amax != 0 else _F32(0)
        seg = x[o : o + 32]  # slices and range(32): loops LLVM vectorises
        qseg = qs[o : o + 32]
        for j in range(32):
            v = np.rint(seg[j] * inv)
            if abs(v) < _F32(2147483648.0):
                qseg[j] = np.int8(min(_F32(127.0), max(_F32(-128.0), v)))
            else:  # inf/NaN (127/amax overflowed, amax < 3.7e-37): cvtps2dq gives -128
                qseg[j] = np.int8(-128)


@njit(inline="always", cache=True)
def _q8_1_sums(x, qs, s):
    """The q8_1 ``s`` of every block: ``half((amax / 127) * sum(q))`` (ggml's
    ``y[i].s = GGML_FP32_TO_FP16(sum * d)`` with the unrounded ``d``)."""
    for b in range(x.shape[0] // 32):
        o = b * 32
        t = 0
        for j in range(32):
            t += qs[o + j]
        s[b] = _round_f16((_absmax(x, o, 32) / _F32(127)) * _F32(t))


@njit(cache=True)
def _q8_1_act_into(x, d, qs, s):
    """ggml ``quantize_row_q8_1_ref``: the q8_0 reference quants and ``d``, and ``s``."""
    _q8_0_act_into(x, d, qs)
    _q8_1_sums(x, qs, s)


@njit(cache=True, error_model="numpy")
def _q8_1_act_x86_into(x, d, qs, s):
    """ggml's AVX/AVX2 ``quantize_row_q8_1``: the x86 q8_0 quants and ``d``, and ``s``."""
    _q8_0_act_x86_into(x, d, qs)
    _q8_1_sums(x, qs, s)


@njit(cache=True, error_model="numpy")
def _q8_k_act_into(x, d, qs, bsums):
    """ggml ``quantize_row_q8_K_ref``: iscale = -127/max (max = the signed value of largest
    magnitude, the first such), q = min(127, nearest_int(iscale*x)), d = 1/iscale, bsums of 16."""
    for b in range(x.shape[0] // 256):
        o = b * 256
        amax = _absmax(x, o, 256)
        seg = x[o : o + 256]
        qseg = qs[o : o + 256]
        if not amax > 0:  # all zero (or NaN): ggml stores zeros
            d[b] = 0
            qseg[:] = 0
            bsums[b * 16 : b * 16 + 16] = 0
            continue
        j0 = 0
        while j0 < 255 and abs(seg[j0]) != amax:  # the first element of largest magnitude
            j0 += 1
        iscale = _F32(-127) / seg[j0]
        for j in range(256):
            qseg[j] = np.int8(min(_F32(127.0), np.rint(iscale * seg[j])))  # ties to even
        for j in range(16):
            t = 0
            for i in range(16):
                t += qseg[16 * j + i]
            bsums[b * 16 + j] = t
        d[b] = _F32(1) / iscale


def _act_vector(x, qk: int, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 1 or x.shape[0] == 0 or x.shape[0] % qk:
        raise TensorShapeError(
            f"{name} expects a 1-D vector whose length is a positive multiple of {qk}, "
            f"got shape {x.shape}"
        )
    return x


def quantize_q8_0_act(x):
    """float32 [n] -> (d float32 [n//32], qs int8 [n]), exactly ggml's ``quantize_row_q8_0_ref``.

    ``d`` is the block's ``amax / 127`` rounded to a half float (the value the dot products
    use); ``qs = roundf(x * (1/d_f32))`` with ``d_f32`` the unrounded scale.
    """
    x = _act_vector(x, QK8_0, "quantize_q8_0_act")
    d = np.empty(x.shape[0] // QK8_0, np.float32)
    qs = np.empty(x.shape[0], np.int8)
    _q8_0_act_into(x, d, qs)
    return d, qs


def quantize_q8_0_act_x86(x):
    """Like :func:`quantize_q8_0_act` but as ggml's AVX/AVX2 ``quantize_row_q8_0`` (what an
    x86 llama.cpp build actually runs): ``qs = rint(x * (127/amax))`` (ties to even)."""
    x = _act_vector(x, QK8_0, "quantize_q8_0_act_x86")
    d = np.empty(x.shape[0] // QK8_0, np.float32)
    qs = np.empty(x.shape[0], np.int8)
    _q8_0_act_x86_into(x, d, qs)
    return d, qs


def quantize_q8_1_act(x):
    """float32 [n] -> (d float32 [n//32], qs int8 [n], s float32 [n//32]), exactly ggml's
    ``quantize_row_q8_1_ref``: the q8_0 blocks plus ``s = half(d * sum(qs))`` per block,
    for weights with a min term (q4_1, q5_1)."""
    x = _act_vector(x, QK8_0, "quantize_q8_1_act")
    d = np.empty(x.shape[0] // QK8_0, np.float32)
    s = np.empty(x.shape[0] // QK8_0, np.float32)
    qs = np.empty(x.shape[0], np.int8)
    _q8_1_act_into(x, d, qs, s)
    return d, qs, s


def quantize_q8_1_act_x86(x):
    """Like :func:`quantize_q8_1_act` but as ggml's AVX/AVX2 ``quantize_row_q8_1``."""
    x = _act_vector(x, QK8_0, "quantize_q8_1_act_x86")
    d = np.empty(x.shape[0] // QK8_0, np.float32)
    s = np.empty(x.shape[0] // QK8_0, np.float32)
    qs = np.empty(x.shape[0], np.int8)
    _q8_1_act_x86_into(x, d, qs, s)
    return d, qs, s


def quantize_q8_k_act(x):
    """float32 [n] -> (d float32 [n//256], qs int8 [n], bsums int16 [n//16]), exactly ggml's
    ``quantize_row_q8_K_ref`` (an all-zero block gets d = 0, qs = 0 and bsums = 0)."""
    x = _act_vector(x, QK_K, "quantize_q8_k_act")
    n = x.shape[0]
    d = np.empty(n // QK_K, np.float32)
    qs = np.empty(n, np.int8)
    bsums = np.empty(n // 16, np.int16)
    _q8_k_act_into(x, d, qs, bsums)
    return d, qs, bsums


# ----------------------------------------------------------------------------------------
# Vector-IR building blocks
# ----------------------------------------------------------------------------------------
# The intrinsics below emit LLVM vector IR. The byte dot products go through ``_dot4``
# (vpdpbusd / vpmaddubsw on x86, plain widening multiplies elsewhere); the k-quants,
# whose reference keeps per-lane sums (element e -> lane e % 8), take the activations
# permuted once per product so that byte products sum exactly those lanes (``x8``).

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)

_ISA_ORDER = ("generic", "avx2", "vnni", "avx512")


def _detect_isa(env: str = "TORCHLESS_Q8ACT_ISA", wide: bool = False) -> str:
    """Which integer dot-product instructions the host has: "vnni" (AVX-VNNI or
    AVX512-VNNI+VL, x86), "avx2" (x86) or "generic" (portable LLVM IR, any host); with
    ``wide``, "avx512" when AVX512-VNNI comes with 512-bit AVX512F/BW registers.
    The environment variable ``env`` may lower the choice (e.g. to test the portable
    code)."""
    isa = "generic"
    if platform.machine().lower() in ("x86_64", "amd64"):
        try:
            from llvmlite import binding as llvm

            f = llvm.get_host_cpu_features()
        except (AttributeError, RuntimeError, OSError):  # pragma: no cover
            f = {}
        if f.get("avx2", False):
            isa = "avx2"
            if f.get("avxvnni", False) or (f.get("avx512vnni", False) and f.get("avx512vl", False)):
                isa = "vnni"
                if wide and all(f.get(k, False) for k in ("avx512f", "avx512bw", "avx512vnni")):
                    isa = "avx512"
    want = os.environ.get(env, "").strip().lower()
    if want in _ISA_ORDER and _ISA_ORDER.index(want) < _ISA_ORDER.index(isa):
        isa = want
    return isa


#: the instruction tier the kernels were compiled for (results do not depend on it):
#: ``TIER`` is one of :data:`_ISA_ORDER`; ``ISA`` the same with "avx512" read as "vnni" (the
#: 256-bit kernels), and ``WIDE`` whether the batched tiles use 512-bit registers
TIER = _detect_isa(wide=True)
ISA = "vnni" if TIER == "avx512" else TIER
WIDE = TIER == "avx512"


def _vec(ty, n):
    return ir.VectorType(ty, n)


def _splat_const(ty, n, v):
    return ir.Constant(_vec(ty, n), [ir.Constant(ty, v)] * n)


def _idx(values):
    values = list(values)
    return ir.Constant(_vec(_I32, len(values)), [ir.Constant(_I32, v) for v in values])


def _elem_ptr(context, builder, aty, aval, off, offty):
    """Pointer to element ``off`` of the 1-D array ``aval``."""
    arr = context.make_array(aty)(context, builder, value=aval)
    o = context.cast(builder, off, offty, types.intp)
    return builder.gep(arr.data, [o])


def _arg_ptr(context, builder, sig, args, i):
    """Pointer to element ``args[i + 1]`` of array argument ``args[i]``."""
    return _elem_ptr(context, builder, sig.args[i], args[i], args[i + 1], sig.args[i + 1])


def _data_ptr(context, builder, sig, args, i):
    return context.make_array(sig.args[i])(context, builder, value=args[i]).data


def _at(builder, ptr, k):
    return builder.gep(ptr, [ir.Constant(_I64, k)]) if k else ptr


def _load(builder, ptr, ty, n):
    """Unaligned load of ``n`` consecutive ``ty`` at ``ptr`` (any element pointer type)."""
    return builder.load(builder.bitcast(ptr, _vec(ty, n).as_pointer()), align=1)


def _store(builder, ptr, v):
    builder.store(v, builder.bitcast(ptr, v.type.as_pointer()), align=1)


def _shuf(builder, a, b, idx):
    return builder.shuffle_vector(a, b, _idx(idx))


def _slice(builder, v, start, n):
    return _shuf(builder, v, v, range(start, start + n))


def _widen(builder, v, ty, signed):
    t = _vec(ty, v.type.count)
    return builder.sext(v, t) if signed else builder.zext(v, t)


def _x86(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ret, [a.type for a in args]), name
    )
    return builder.call(fn, args)


def _pmadd(builder, a, b):
    """<2n x i16> a, b -> <n x i32> with lane i = a[2i]*b[2i] + a[2i+1]*b[2i+1] (vpmaddwd)."""
    n2 = a.type.count
    if ISA != "generic" and n2 == 16:
        return _x86(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), [a, b])
    ev, od = range(0, n2, 2), range(1, n2, 2)

    def half(sel):
        return builder.mul(
            _widen(builder, _shuf(builder, a, a, sel), _I32, True),
            _widen(builder, _shuf(builder, b, b, sel), _I32, True),
        )

    return builder.add(half(ev), half(od))


def _sign_trick(builder, a, b):
    """<32 x i8> signed a, b -> (|a| as unsigned bytes, b * sign(a)): the same products, with
    an unsigned first operand for vpdpbusd / vpmaddubsw (ggml's x86 trick; b not -128)."""
    b = _x86(builder, "llvm.x86.avx2.psign.b", a.type, [b, a])
    absfn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(a.type, [a.type, ir.IntType(1)]), "llvm.abs.v32i8"
    )
    return builder.call(absfn, [a, ir.Constant(ir.IntType(1), 0)]), b


def _dot4(builder, a, b, a_signed, acc=None):
    """<32 x i8> a, b -> <8 x i32>, lane i = sum_{k<4} a[4i+k] * b[4i+k].

    ``a`` is read as unsigned (nibbles, 5/6-bit quants) or signed, ``b`` as signed; ``b``
    must not hold -128 (quantized activations are within [-127, 127]). Adds ``acc`` (an
    <8 x i32>) when given. On x86 this is one
    ``vpdpbusd`` (AVX-VNNI / AVX512-VNNI) or ``vpmaddubsw`` + ``vpmaddwd`` (AVX2), with
    ggml's sign trick ``|a| * (b * sign(a))`` for a signed ``a``.
    """
    if ISA == "generic":
        p = builder.mul(_widen(builder, a, _I32, a_signed), _widen(builder, b, _I32, True))
        for k in range(4):
            t = _shuf(builder, p, p, range(k, 32, 4))
            acc = t if acc is None else builder.add(acc, t)
        return acc
    if a_signed:
        a, b = _sign_trick(builder, a, b)
    v8 = _vec(_I32, 8)
    if ISA == "vnni":
        return _x86(
            builder,
            "llvm.x86.avx512.vpdpbusd.256",
            v8,
            [
                _splat_const(_I32, 8, 0) if acc is None else acc,
                builder.bitcast(a, v8),
                builder.bitcast(b, v8),
            ],
        )
    t = _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [a, b])
    r = _x86(builder, "llvm.x86.avx2.pmadd.wd", v8, [t, _splat_const(_I16, 16, 1)])
    return r if acc is None else builder.add(acc, r)


def _reduce_add(builder, v):
    """Sum of the elements of an integer vector (llvm.vector.reduce.add)."""
    fnty = ir.FunctionType(v.type.element, [v.type])
    name = f"llvm.vector.reduce.add.v{v.type.count}i{v.type.element.width}"
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), [v])


def _is_array(t, dtype):
    return isinstance(t, types.Array) and t.ndim == 1 and t.dtype == dtype


def _is_int(*ts):
    return all(isinstance(t, types.Integer) for t in ts)


def _lo_hi(builder, q):
    """Low and high nibbles (0..15) of a byte vector."""
    n = q.type.count
    return builder.and_(q, _splat_const(_I8, n, 15)), builder.lshr(q, _splat_const(_I8, n, 4))


def _q5_high(builder, qh8, sel):
    """Bits of two q5_0 ``qh`` words (<8 x i8>: word A bytes 0..3, word B bytes 4..7) as
    values 0 / 16 for the 32 elements whose bits live in bytes ``sel`` (16 per word)."""
    rep = _shuf(builder, qh8, qh8, sel)
    mask = ir.Constant(_vec(_I8, 32), [ir.Constant(_I8, 1 << (j % 8)) for j in range(32)])
    bit = builder.icmp_unsigned("!=", builder.and_(rep, mask), _splat_const(_I8, 32, 0))
    return builder.shl(builder.zext(bit, _vec(_I8, 32)), _splat_const(_I8, 32, 4))




# --- the 256-element k-quant blocks: 8 int32 lanes (element e -> lane e % 8) -------------


def _k4_scales_mins(builder, p):
    """The 8 six-bit scales and mins (<8 x i16> each) of the q4_k / q5_k block at ``p``,
    unpacked from its 12 bytes at ``p + 4`` with ggml's ``utmp`` word arithmetic."""
    w0, w1, w2 = (
        builder.load(builder.bitcast(_at(builder, p, 4 + 4 * i), _I32.as_pointer()), align=1)
        for i in range(3)
    )

    def c(v):
        return ir.Constant(_I32, v)

    km1, km2, km3 = c(0x3F3F3F3F), c(0x0F0F0F0F), c(0x03030303)
    u3 = builder.or_(
        builder.and_(builder.lshr(w2, c(4)), km2),
        builder.shl(builder.and_(builder.lshr(w1, c(6)), km3), c(4)),
    )
    u2 = builder.and_(w1, km1)
    u1 = builder.or_(
        builder.and_(w2, km2), builder.shl(builder.and_(builder.lshr(w0, c(6)), km3), c(4))
    )
    u0 = builder.and_(w0, km1)
    v = ir.Constant(_vec(_I32, 4), None)
    for i, u in enumerate((u0, u1, u2, u3)):
        v = builder.insert_element(v, u, c(i))
    b = builder.bitcast(v, _vec(_I8, 16))
    return (
        _widen(builder, _slice(builder, b, 0, 8), _I16, False),
        _widen(builder, _slice(builder, b, 8, 8), _I16, False),
    )


# Within each 32 elements, position 4l + k holds element 8k + l (l < 8, k < 4): the 4-byte
# groups of vpdpbusd / vpmaddubsw + vpmaddwd then sum exactly the elements of the
# reference's lane l (e % 8), so the k4 kinds' lanes keep the reference's integers.
K8_PERM = [8 * (i % 4) + i // 4 for i in range(32)]


def _k4_body(builder, p, xps, bsps, with_high):
    """The q4_k / q5_k block at ``p`` against each activation row ``xps[j]`` (its bsums at
    ``bsps[j]``): ``[(<8 x i32> lanes, i64 min term)]`` per row, the weights unpacked once
    (see :func:`_k4_block`)."""
    sc, mn = _k4_scales_mins(builder, p)
    qoff = 48 if with_high else 16
    qh = None
    if with_high:
        qh = _load(builder, _at(builder, p, 16), _I8, 32)
    if WIDE:
        accs = _k4_products_wide(builder, p, xps, sc, qoff, qh)
    else:
        accs = _k4_products(builder, p, xps, sc, qoff, qh)
    mins = _shuf(builder, mn, mn, [j // 2 for j in range(16)])
    out = []
    for acc, bp in zip(accs, bsps):
        bs = _load(builder, bp, _I16, 16)
        out.append((acc, builder.sext(_reduce_add(builder, _pmadd(builder, bs, mins)), _I64)))
    return out


def _k4_high(builder, w, qh, s):
    """The fifth bit of sub-block ``s`` (q5_k) added to its nibbles ``w``."""
    hb = builder.lshr(qh, _splat_const(_I8, 32, s)) if s else qh
    return builder.or_(w, builder.shl(builder.and_(hb, _splat_const(_I8, 32, 1)),
                                      _splat_const(_I8, 32, 4)))


def _k4_products_wide(builder, p, xps, sc, qoff, qh):
    """:func:`_k4_products` in 512-bit registers: the two sub-blocks of each 32 quant bytes
    (low and high nibbles) side by side, one vpmaddubsw + vpmaddwd per 64 elements; lanes
    0-7 sum the even sub-blocks, 8-15 the odd ones, added at the end (the same integers)."""
    v32s, v16i = _vec(_I16, 32), _vec(_I32, 16)
    perm = list(K8_PERM) + [32 + k for k in K8_PERM]
    accs = [None] * len(xps)
    for i in range(4):
        q = _load(builder, _at(builder, p, qoff + 32 * i), _I8, 32)
        lo, hi = _lo_hi(builder, q)
        if qh is not None:
            lo, hi = _k4_high(builder, lo, qh, 2 * i), _k4_high(builder, hi, qh, 2 * i + 1)
        w = _shuf(builder, lo, hi, perm)
        scs = _shuf(builder, sc, sc, [2 * i] * 16 + [2 * i + 1] * 16)
        for j, px in enumerate(xps):
            x = _load(builder, _at(builder, px, 64 * i), _I8, 64)
            pairs = _x86(builder, "llvm.x86.avx512.pmaddubs.w.512", v32s, [w, x])
            t = _x86(builder, "llvm.x86.avx512.pmaddw.d.512", v16i, [pairs, scs])
            accs[j] = t if accs[j] is None else builder.add(accs[j], t)
    return [builder.add(_slice(builder, a, 0, 8), _slice(builder, a, 8, 8)) for a in accs]


def _k4_products(builder, p, xps, sc, qoff, qh):
    """Each activation row's eight int32 lanes for the q4_k / q5_k block at ``p``."""
    accs = [None] * len(xps)
    for i in range(4):
        q = _load(builder, _at(builder, p, qoff + 32 * i), _I8, 32)
        for half, w in enumerate(_lo_hi(builder, q)):
            s = 2 * i + half
            if qh is not None:
                w = _k4_high(builder, w, qh, s)
            w = _shuf(builder, w, w, K8_PERM)
            scs = builder.extract_element(sc, ir.Constant(_I32, s))
            sc8 = builder.sext(_splat(builder, scs, 8), _vec(_I32, 8))
            sc16 = _splat(builder, scs, 16)
            for j, px in enumerate(xps):
                x = _load(builder, _at(builder, px, 32 * s), _I8, 32)
                if ISA == "generic":
                    t = builder.mul(_dot4(builder, w, x, False), sc8)
                else:  # pair sums <= 2 * 31 * 127: vpmaddubsw cannot saturate
                    pairs = _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [w, x])
                    t = _pmadd(builder, pairs, sc16)
                accs[j] = t if accs[j] is None else builder.add(accs[j], t)
    return accs


def _k4_block(with_high):
    """Codegen of ``f(u, o, x8, xo, bsums, bo, aux) -> msum`` for the q4_k / q5_k block at
    byte ``o`` of ``u``: ``aux[l] = sum_s sc[s] * sum_k w[32s + 8k + l] * x[32s + 8k + l]``
    (the reference's eight lanes) and ``msum = sum_j bsums[bo + j] * m[j // 2]``. ``x8``
    holds the q8_K quants with each 32 permuted by ``K8_PERM`` (:func:`permute_k8`); each
    sub-block's weights get the same permutation, then one byte product per 4-element lane
    group (vpmaddubsw, then vpmaddwd by the sub-block scale, on x86)."""

    def codegen(context, builder, sig, args):
        p = _arg_ptr(context, builder, sig, args, 0)
        px = _arg_ptr(context, builder, sig, args, 2)
        bp = _arg_ptr(context, builder, sig, args, 4)
        ((acc, msum),) = _k4_body(builder, p, [px], [bp], with_high)
        _store(builder, _data_ptr(context, builder, sig, args, 6), acc)
        return msum

    return codegen


def _half(builder, ptr):
    """The float16 at ``ptr`` as a float."""
    h = builder.load(builder.bitcast(ptr, ir.IntType(16).as_pointer()), align=1)
    return builder.fpext(builder.bitcast(h, ir.HalfType()), ir.FloatType())


def _rows_ptrs(context, builder, aty, aval, b0, off, nb):
    """Pointers to element ``off`` of rows ``b0 .. b0 + nb - 1`` of the 2-D array ``aval``."""
    arr = context.make_array(aty)(context, builder, value=aval)
    st0 = cgutils.unpack_tuple(builder, arr.strides)[0]
    base = builder.bitcast(arr.data, ir.IntType(8).as_pointer())
    out = []
    for j in range(nb):
        row = builder.gep(base, [builder.mul(builder.add(b0, ir.Constant(b0.type, j)), st0)])
        out.append(builder.gep(builder.bitcast(row, arr.data.type), [off]))
    return out


def _k4_tile_intrinsic(with_high, nb):
    """``f(u, o, X8, b0, xo, BS, bo, aux, ms)``: the block of :func:`_k4_block` against the
    activation rows ``b0 .. b0 + nb - 1`` of ``X8 [B, n]`` / ``BS [B, n/16]``, the weights
    unpacked once: ``aux[8 j + l]`` and ``ms[j]`` per row j (the same integers)."""

    def impl(typingctx, u, o, X8, b0, xo, BS, bo, aux, ms):
        if not (_is_array(u, types.uint8) and isinstance(X8, types.Array) and X8.ndim == 2
                and X8.dtype == types.int8 and isinstance(BS, types.Array) and BS.ndim == 2
                and BS.dtype == types.int16 and _is_array(aux, types.int32)
                and _is_array(ms, types.int64) and _is_int(o, b0, xo, bo)):
            return None
        sig = types.void(u, o, X8, b0, xo, BS, bo, aux, ms)

        def codegen(context, builder, sig, args):
            p = _arg_ptr(context, builder, sig, args, 0)
            b0 = context.cast(builder, args[3], sig.args[3], types.intp)
            xo = context.cast(builder, args[4], sig.args[4], types.intp)
            bo = context.cast(builder, args[6], sig.args[6], types.intp)
            xps = _rows_ptrs(context, builder, sig.args[2], args[2], b0, xo, nb)
            bps = _rows_ptrs(context, builder, sig.args[5], args[5], b0, bo, nb)
            pa = _data_ptr(context, builder, sig, args, 7)
            pm = _data_ptr(context, builder, sig, args, 8)
            for j, (acc, msum) in enumerate(_k4_body(builder, p, xps, bps, with_high)):
                _store(builder, _at(builder, pa, 8 * j), acc)
                builder.store(msum, _at(builder, pm, j))
            return context.get_dummy_value()

        return sig, codegen

    impl.__name__ = impl.__qualname__ = f"_tile{nb}_{'q5_k' if with_high else 'q4_k'}"
    return intrinsic(impl)


def _splat(builder, v, n):
    u = builder.insert_element(ir.Constant(_vec(v.type, n), None), v, ir.Constant(_I32, 0))
    return _shuf(builder, u, u, [0] * n)


def _k4_sig(u, o, x, xo, bsums, bo, aux):
    if not (
        _is_array(u, types.uint8)
        and _is_array(x, types.int8)
        and _is_array(bsums, types.int16)
        and _is_array(aux, types.int32)
        and _is_int(o, xo, bo)
    ):
        return None
    return types.int64(u, o, x, xo, bsums, bo, aux)


@intrinsic
def _blk_q4_k(typingctx, u, o, x, xo, bsums, bo, aux):
    """One q4_k block: eight int32 lane sums into ``aux``, returns the min term's integer
    (see :func:`_k4_block`)."""
    sig = _k4_sig(u, o, x, xo, bsums, bo, aux)
    return None if sig is None else (sig, _k4_block(False))


@intrinsic
def _blk_q5_k(typingctx, u, o, x, xo, bsums, bo, aux):
    """One q5_k block (see :func:`_blk_q4_k`)."""
    sig = _k4_sig(u, o, x, xo, bsums, bo, aux)
    return None if sig is None else (sig, _k4_block(True))


# q6_k's lanes are per 16-element sub-block j: lane l = elements 16j + l and 16j + 8 + l.
# Within each 32 elements (sub-blocks 2i, 2i + 1), position 4l + 2a + k holds element
# 16a + 8k + l: a vpmaddubsw pair is then one lane of one sub-block, and vpmaddwd by the
# two sub-blocks' scales adds lane l of both, as the reference does.
K6_PERM = [16 * ((i % 4) // 2) + 8 * (i % 2) + i // 4 for i in range(32)]


def _q6_body(builder, p, xps):
    """The q6_k block at ``p`` against each activation row ``xps[j]``: its <8 x i32> lanes
    per row (see :func:`_aux_q6_k`), the weights unpacked once."""
    scales = _widen(builder, _load(builder, _at(builder, p, 192), _I8, 16), _I16, True)

    def c8(v):
        return _splat_const(_I8, 32, v)

    def bits(h, shift):  # ((h >> shift) & 3) << 4 on bytes
        v = builder.lshr(h, c8(shift)) if shift else h
        return builder.shl(builder.and_(v, c8(3)), c8(4))

    accs = [None] * len(xps)
    if WIDE:
        v32s, v16i = _vec(_I16, 32), _vec(_I32, 16)
        perm = list(K6_PERM) + [32 + k for k in K6_PERM]
        c32 = _splat_const(_I8, 64, 32)
    for h in range(2):
        ql0 = _load(builder, _at(builder, p, 64 * h), _I8, 32)
        ql1 = _load(builder, _at(builder, p, 64 * h + 32), _I8, 32)
        qh = _load(builder, _at(builder, p, 128 + 32 * h), _I8, 32)
        lo0, hi0 = _lo_hi(builder, ql0)
        lo1, hi1 = _lo_hi(builder, ql1)
        parts = [builder.or_(lo0, bits(qh, 0)), builder.or_(lo1, bits(qh, 2)),
                 builder.or_(hi0, bits(qh, 4)), builder.or_(hi1, bits(qh, 6))]
        if WIDE:
            # two parts (four sub-blocks) per 512-bit step. No vpsignb at this width: the
            # unsigned quants q (0..63) times x, minus 32 x per pair (w = q - 32), then the
            # sub-block scales; every integer is the 256-bit path's (pairs stay in int16)
            for m in range(2):
                q = _shuf(builder, parts[2 * m], parts[2 * m + 1], perm)
                j = 8 * h + 4 * m  # the sub-blocks j .. j + 3
                sc = _shuf(builder, scales, scales,
                           [j, j + 1] * 8 + [j + 2, j + 3] * 8)
                for r, px in enumerate(xps):
                    xv = _load(builder, _at(builder, px, 128 * h + 64 * m), _I8, 64)
                    qx = _x86(builder, "llvm.x86.avx512.pmaddubs.w.512", v32s, [q, xv])
                    bx = _x86(builder, "llvm.x86.avx512.pmaddubs.w.512", v32s, [c32, xv])
                    t = _x86(builder, "llvm.x86.avx512.pmaddw.d.512", v16i,
                             [builder.sub(qx, bx), sc])
                    accs[r] = t if accs[r] is None else builder.add(accs[r], t)
            continue
        for k, q in enumerate(parts):
            w = builder.sub(q, c8(32))
            w = _shuf(builder, w, w, K6_PERM)
            j = 8 * h + 2 * k  # the sub-blocks j and j + 1 of 16 elements
            sa = builder.extract_element(scales, ir.Constant(_I32, j))
            sb = builder.extract_element(scales, ir.Constant(_I32, j + 1))
            sv = builder.insert_element(ir.Constant(_vec(_I16, 2), None), sa,
                                        ir.Constant(_I32, 0))
            sv = builder.insert_element(sv, sb, ir.Constant(_I32, 1))
            if ISA == "generic":
                s32 = _widen(builder, _shuf(builder, sv, sv, [0, 0, 1, 1] * 8), _I32, True)
                ww = _widen(builder, w, _I32, True)
            else:
                sv16 = _shuf(builder, sv, sv, [0, 1] * 8)
            for r, px in enumerate(xps):
                xv = _load(builder, _at(builder, px, 128 * h + 32 * k), _I8, 32)
                if ISA == "generic":
                    prod = builder.mul(builder.mul(ww, _widen(builder, xv, _I32, True)), s32)
                    t = None
                    for m in range(4):
                        g = _shuf(builder, prod, prod, range(m, 32, 4))
                        t = g if t is None else builder.add(t, g)
                else:  # |w| <= 32: ggml's sign trick, pairs <= 2 * 32 * 127 (no saturation)
                    aw, sx = _sign_trick(builder, w, xv)
                    pairs = _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16),
                                 [aw, sx])
                    t = _pmadd(builder, pairs, sv16)
                accs[r] = t if accs[r] is None else builder.add(accs[r], t)
    if WIDE:
        return [builder.add(_slice(builder, a, 0, 8), _slice(builder, a, 8, 8)) for a in accs]
    return accs


@intrinsic
def _aux_q6_k(typingctx, u, o, x, xo, aux):
    """aux[l] = sum_j sc[j] * sum_{k<2} w[16j + 8k + l] * x[16j + 8k + l] for the q6_k block
    at u[o:o+210] (int8 sub-block scales sc[16] at byte 192, w = 6-bit quant - 32); ``x``
    holds the q8_K quants with each 32 permuted by ``K6_PERM`` (:func:`permute_k6`)."""
    if not (
        _is_array(u, types.uint8)
        and _is_array(x, types.int8)
        and _is_array(aux, types.int32)
        and _is_int(o, xo)
    ):
        return None
    sig = types.void(u, o, x, xo, aux)

    def codegen(context, builder, sig, args):
        p = _arg_ptr(context, builder, sig, args, 0)
        px = _arg_ptr(context, builder, sig, args, 2)
        (acc,) = _q6_body(builder, p, [px])
        _store(builder, _data_ptr(context, builder, sig, args, 4), acc)
        return context.get_dummy_value()

    return sig, codegen


def _q6_tile_intrinsic(nb):
    """``f(u, o, X6, b0, xo, aux)``: the q6_k block against activation rows ``b0 .. b0 + nb
    - 1`` of ``X6 [B, n]``, the weights unpacked once: ``aux[8 j + l]`` per row j."""

    def impl(typingctx, u, o, X6, b0, xo, aux):
        if not (_is_array(u, types.uint8) and isinstance(X6, types.Array) and X6.ndim == 2
                and X6.dtype == types.int8 and _is_array(aux, types.int32)
                and _is_int(o, b0, xo)):
            return None
        sig = types.void(u, o, X6, b0, xo, aux)

        def codegen(context, builder, sig, args):
            p = _arg_ptr(context, builder, sig, args, 0)
            b0 = context.cast(builder, args[3], sig.args[3], types.intp)
            xo = context.cast(builder, args[4], sig.args[4], types.intp)
            xps = _rows_ptrs(context, builder, sig.args[2], args[2], b0, xo, nb)
            pa = _data_ptr(context, builder, sig, args, 5)
            for j, acc in enumerate(_q6_body(builder, p, xps)):
                _store(builder, _at(builder, pa, 8 * j), acc)
            return context.get_dummy_value()

        return sig, codegen

    impl.__name__ = impl.__qualname__ = f"_tile{nb}_q6_k"
    return intrinsic(impl)


# ----------------------------------------------------------------------------------------
# Per-row dot products (ggml_vec_dot_*_generic float order)
# ----------------------------------------------------------------------------------------
# The 32-element kinds run two rows side by side: each row keeps its own sequential float
# sum (the reference order), and the two independent chains hide each other's latency.


@njit(inline="always", cache=True)
def _row_k4(u, xd, x8, bsums, aux, sums, bpb, with_high):
    for l in range(8):
        sums[l] = 0
    sumf = _F32(0)
    for b in range(u.shape[0] // bpb):
        o = b * bpb
        prefetch(u, o + PREFETCH_BYTES)
        if with_high:
            msum = _blk_q5_k(u, o, x8, b * 256, bsums, b * 16, aux)
        else:
            msum = _blk_q4_k(u, o, x8, b * 256, bsums, b * 16, aux)
        d = _h2f(u[o], u[o + 1]) * xd[b]
        for l in range(8):
            sums[l] += d * _F32(aux[l])
        dmin = _h2f(u[o + 2], u[o + 3]) * xd[b]
        sumf -= dmin * _F32(msum)
    for l in range(8):
        sumf += sums[l]
    return sumf


@njit(inline="always", cache=True)
def _row_q6_k(u, xd, x6, bsums, aux, sums):
    for l in range(8):
        sums[l] = 0
    for b in range(u.shape[0] // 210):
        o = b * 210
        prefetch(u, o + PREFETCH_BYTES)
        _aux_q6_k(u, o, x6, b * 256, aux)
        d = _h2f(u[o + 208], u[o + 209]) * xd[b]
        for l in range(8):
            sums[l] += d * _F32(aux[l])
    sumf = _F32(0)
    for l in range(8):
        sumf += sums[l]
    return sumf


@njit(inline="always", cache=True)
def _row2_k4(u0, u1, xd, x8, bsums, aux, sums, res, bpb, with_high):
    """:func:`_row_k4` for two rows against the same activations, their block loops
    interleaved (two independent chains per iteration; short rows -- an expert's 256-wide
    down projection is one block -- are otherwise bound by one row's latency). Each row's
    operations are :func:`_row_k4`'s, in its order: ``res[0], res[1]``, the same bits."""
    for l in range(16):
        sums[l] = 0
    sumf0 = _F32(0)
    sumf1 = _F32(0)
    a0 = aux[:8]
    a1 = aux[8:]
    for b in range(u0.shape[0] // bpb):
        o = b * bpb
        prefetch(u0, o + PREFETCH_BYTES)
        prefetch(u1, o + PREFETCH_BYTES)
        if with_high:
            m0 = _blk_q5_k(u0, o, x8, b * 256, bsums, b * 16, a0)
            m1 = _blk_q5_k(u1, o, x8, b * 256, bsums, b * 16, a1)
        else:
            m0 = _blk_q4_k(u0, o, x8, b * 256, bsums, b * 16, a0)
            m1 = _blk_q4_k(u1, o, x8, b * 256, bsums, b * 16, a1)
        d0 = _h2f(u0[o], u0[o + 1]) * xd[b]
        d1 = _h2f(u1[o], u1[o + 1]) * xd[b]
        for l in range(8):
            sums[l] += d0 * _F32(a0[l])
            sums[8 + l] += d1 * _F32(a1[l])
        dmin0 = _h2f(u0[o + 2], u0[o + 3]) * xd[b]
        dmin1 = _h2f(u1[o + 2], u1[o + 3]) * xd[b]
        sumf0 -= dmin0 * _F32(m0)
        sumf1 -= dmin1 * _F32(m1)
    for l in range(8):
        sumf0 += sums[l]
        sumf1 += sums[8 + l]
    res[0] = sumf0
    res[1] = sumf1


@njit(inline="always", cache=True)
def _row2_q6_k(u0, u1, xd, x6, bsums, aux, sums, res):
    """:func:`_row_q6_k` for two rows, interleaved as :func:`_row2_k4` (the same bits)."""
    for l in range(16):
        sums[l] = 0
    a0 = aux[:8]
    a1 = aux[8:]
    for b in range(u0.shape[0] // 210):
        o = b * 210
        prefetch(u0, o + PREFETCH_BYTES)
        prefetch(u1, o + PREFETCH_BYTES)
        _aux_q6_k(u0, o, x6, b * 256, a0)
        _aux_q6_k(u1, o, x6, b * 256, a1)
        d0 = _h2f(u0[o + 208], u0[o + 209]) * xd[b]
        d1 = _h2f(u1[o + 208], u1[o + 209]) * xd[b]
        for l in range(8):
            sums[l] += d0 * _F32(a0[l])
            sums[8 + l] += d1 * _F32(a1[l])
    sumf0 = _F32(0)
    sumf1 = _F32(0)
    for l in range(8):
        sumf0 += sums[l]
        sumf1 += sums[8 + l]
    res[0] = sumf0
    res[1] = sumf1


# ----------------------------------------------------------------------------------------
# Row loops with 8-lane float accumulation (the order of llama.cpp's AVX2 kernels)
# ----------------------------------------------------------------------------------------
# ggml's *generic* float order keeps one sequential float sum per row, a scalar
# multiply-add per block (the k-quant loops above still do); that chain, not memory,
# bounded the 32-element kinds. llama.cpp's x86
# kernels instead keep the block's 8 int32 lane sums as 8 floats and fuse them into an
# 8-lane float accumulator, ``acc = fma(float(lanes), d_w * d_x, acc)``, summed across
# lanes once per row. The loops below do that for two rows at a time, the whole row in one
# intrinsic; the weights are made signed first (q4_0: q - 8, q5_0: q - 16) so no activation
# sums are needed. Integers are exact and the float order is fixed, so every ISA tier gives
# the same bits; against the generic order they differ by float32 rounding.


def _signed_q8_0(builder, p):
    return _load(builder, _at(builder, p, 2), _I8, 32)


def _signed_q4_0(builder, p):
    lo, hi = _lo_hi(builder, _load(builder, _at(builder, p, 2), _I8, 16))
    return builder.sub(_shuf(builder, lo, hi, range(32)), _splat_const(_I8, 32, 8))


def _signed_q5_0(builder, p):
    lo, hi = _lo_hi(builder, _load(builder, _at(builder, p, 6), _I8, 16))
    qh = _load(builder, _at(builder, p, 2), _I8, 4)
    qh8 = _shuf(builder, qh, qh, range(8))
    w = builder.or_(
        _shuf(builder, lo, hi, range(32)), _q5_high(builder, qh8, [j // 8 for j in range(32)])
    )
    return builder.sub(w, _splat_const(_I8, 32, 16))




def _unsigned_q4_1(builder, p):
    lo, hi = _lo_hi(builder, _load(builder, _at(builder, p, 4), _I8, 16))
    return _shuf(builder, lo, hi, range(32))


def _unsigned_q5_1(builder, p):
    lo, hi = _lo_hi(builder, _load(builder, _at(builder, p, 8), _I8, 16))
    qh = _load(builder, _at(builder, p, 4), _I8, 4)
    qh8 = _shuf(builder, qh, qh, range(8))
    return builder.or_(
        _shuf(builder, lo, hi, range(32)), _q5_high(builder, qh8, [j // 8 for j in range(32)])
    )


def _lookup16(builder, idx, table):
    """<32 x i8> indices 0..15 -> table[idx] (int8 values): one vpshufb on x86, a chain of
    selects elsewhere."""
    if ISA != "generic":
        t = ir.Constant(_vec(_I8, 32), [ir.Constant(_I8, int(v) & 255) for v in table] * 2)
        return _x86(builder, "llvm.x86.avx2.pshuf.b", _vec(_I8, 32), [t, idx])
    out = _splat_const(_I8, 32, int(table[0]))
    for k in range(1, 16):
        hit = builder.icmp_unsigned("==", idx, _splat_const(_I8, 32, k))
        out = builder.select(hit, _splat_const(_I8, 32, int(table[k]) & 255), out)
    return out


def _signed_iq4_nl(builder, p):
    lo, hi = _lo_hi(builder, _load(builder, _at(builder, p, 2), _I8, 16))
    return _lookup16(builder, _shuf(builder, lo, hi, range(32)), _q.IQ4NL_VALUES)


def _make_rows2(weights, bpb, name, signed=True, with_min=False):
    """An intrinsic ``f(u0, u1, x, xd, xs, res)``: ``res[0], res[1]`` = the dot products of
    the rows ``u0``, ``u1`` (bytes of ``bpb``-byte blocks) with the activations ``(xd, x)``
    in natural order; ``weights(builder, p)`` gives the 32 quants of the block at ``p``
    (``signed`` int8, else unsigned). ``with_min``: a block ``d, m, ...`` whose weights are
    ``d * q + m`` with q8_1 activations (``xs`` = the blocks' ``d * sum(q)``), the min terms
    ``m * s`` summed in a scalar per row and added after the lanes, as llama.cpp does;
    otherwise ``xs`` is ignored."""

    def impl(typingctx, u0, u1, x, xd, xs, res):
        if not (
            isinstance(u0, types.Array) and u0.ndim == 1 and u0.dtype == types.uint8
            and isinstance(u1, types.Array) and u1.ndim == 1 and u1.dtype == types.uint8
            and _is_array(x, types.int8)
            and _is_array(xd, types.float32)
            and _is_array(xs, types.float32)
            and _is_array(res, types.float32)
        ):
            return None
        sig = types.void(u0, u1, x, xd, xs, res)

        def codegen(context, builder, sig, args):
            f32 = ir.FloatType()
            v8f = _vec(f32, 8)
            a0 = context.make_array(sig.args[0])(context, builder, value=args[0])
            p0 = a0.data
            p1 = _data_ptr(context, builder, sig, args, 1)
            px = _data_ptr(context, builder, sig, args, 2)
            pd = _data_ptr(context, builder, sig, args, 3)
            ps = _data_ptr(context, builder, sig, args, 4)
            nbytes = cgutils.unpack_tuple(builder, a0.shape)[0]
            nb = builder.udiv(nbytes, ir.Constant(nbytes.type, bpb))
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(v8f, [v8f, v8f, v8f]), "llvm.fma.v8f32")
            acc0 = cgutils.alloca_once_value(builder, ir.Constant(v8f, None))
            acc1 = cgutils.alloca_once_value(builder, ir.Constant(v8f, None))
            builder.store(ir.Constant(v8f, [ir.Constant(f32, 0.0)] * 8), acc0)
            builder.store(ir.Constant(v8f, [ir.Constant(f32, 0.0)] * 8), acc1)
            mins = [cgutils.alloca_once_value(builder, ir.Constant(f32, 0.0)) for _ in "01"]

            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                off = builder.mul(b, ir.Constant(b.type, bpb))
                xv = _load(builder, builder.gep(px, [builder.mul(b, ir.Constant(b.type, 32))]),
                           _I8, 32)
                xd_b = builder.load(builder.gep(pd, [b]))
                for p, acc, msum in ((p0, acc0, mins[0]), (p1, acc1, mins[1])):
                    pb = builder.gep(p, [off])
                    _prefetch_ir(builder, builder.gep(pb, [ir.Constant(_I64, PREFETCH_BYTES)]))
                    lanes = _dot4(builder, weights(builder, pb), xv, signed)
                    sc = builder.fmul(_half(builder, pb), xd_b)
                    scv = builder.insert_element(ir.Constant(v8f, None), sc, ir.Constant(_I32, 0))
                    scv = _shuf(builder, scv, scv, [0] * 8)
                    builder.store(builder.call(fma, [builder.sitofp(lanes, v8f), scv,
                                                     builder.load(acc)]), acc)
                    if with_min:
                        ms = builder.fmul(_half(builder, _at(builder, pb, 2)),
                                          builder.load(builder.gep(ps, [b])))
                        builder.store(builder.fadd(builder.load(msum), ms), msum)
            pr = _data_ptr(context, builder, sig, args, 5)
            # the 8 lanes in a fixed tree: (0+4, 1+5, 2+6, 3+7), then pairs
            for k, (acc, msum) in enumerate(((acc0, mins[0]), (acc1, mins[1]))):
                v = _lane_tree(builder, builder.load(acc))
                if with_min:
                    v = builder.fadd(v, builder.load(msum))
                builder.store(v, _at(builder, pr, k))
            return context.get_dummy_value()

        return sig, codegen

    impl.__name__ = impl.__qualname__ = name
    return intrinsic(impl)


# ----------------------------------------------------------------------------------------
# The skeleton: parallel kernels generated per weight kind (rows in chunks; scratch per chunk)
# ----------------------------------------------------------------------------------------
# As in :mod:`torchless.kernels.quant`, a template names its kind's row function (``_rows2``
# for the 32-element kinds, two rows per call; ``_row``, one row, for the 256-element ones)
# and :func:`_register` compiles it once per kind with that name bound.

_JIT = {"parallel": True, "cache": True, "fastmath": False}
_CHUNK = 8  # rows per parallel work item (even: the 32-element kinds do row pairs)
_NO_XS = np.zeros(0, np.float32)  # the q8_0 kinds' unused ``xs``


def _rows2_template(data, xd, xq, xs, out):
    """out[r] = row r of ``data`` . the 32-element activations (xd, xq[, xs])."""
    rows = data.shape[0]
    for ch in prange((rows + _CHUNK - 1) // _CHUNK):
        res = np.empty(2, np.float32)
        end = min(rows, ch * _CHUNK + _CHUNK)
        for r in range(ch * _CHUNK, end, 2):
            r1 = min(r + 1, end - 1)  # an odd last row is paired with itself
            _rows2(data[r], data[r1], xq, xd, xs, res)  # noqa: F821 (bound per kind)
            out[r] = res[0]
            out[r1] = res[1]


_K8_IDX = np.array(K8_PERM, np.int64)
_K6_IDX = np.array(K6_PERM, np.int64)


@njit(inline="always", cache=True)
def _permute32(xq, idx):
    flat = xq.reshape(-1)
    out = np.empty(flat.shape[0], np.int8)
    for c in range(0, flat.shape[0], 32):
        for i in range(32):
            out[c + i] = flat[c + idx[i]]
    return out.reshape(xq.shape)


@njit(cache=True)
def permute_k8(xq):
    """q8_K quants ``[..., n]`` (int8, n % 32 == 0) with each 32 permuted by ``K8_PERM``, as
    the q4_k / q5_k row functions read them."""
    return _permute32(xq, _K8_IDX)


@njit(cache=True)
def permute_k6(xq):
    """The same with ``K6_PERM``, as the q6_k row function reads them."""
    return _permute32(xq, _K6_IDX)


def _rows_k8_template(data, xd, xq, bsums, out):
    """out[r] = row r of ``data`` . the q8_K activations, quants permuted (q4_k, q5_k, q6_k)."""
    rows = data.shape[0]
    x8 = _permute(xq)  # noqa: F821 (bound: permute_k8)
    for ch in prange((rows + _CHUNK - 1) // _CHUNK):
        aux = np.empty(16, np.int32)
        sums = np.empty(16, np.float32)
        res = np.empty(2, np.float32)
        end = min(rows, ch * _CHUNK + _CHUNK)
        for r in range(ch * _CHUNK, end, 2):
            r1 = min(r + 1, end - 1)  # an odd last row is paired with itself
            _row2(data[r], data[r1], xd, x8, bsums, aux, sums, res)  # noqa: F821 (per kind)
            out[r] = res[0]
            out[r1] = res[1]


MATVEC_Q8ACT: dict = {}
# kind -> (its row function, how that function takes the activations: "rows2" for the
# 32-element kinds' two-row intrinsics, "k8" / "k6" for q8_K quants as int8 permuted by
# K8_PERM / K6_PERM, "kf" as float32)
ROW_FNS: dict = {}


def _register(kind: str, act: str, fn, template=None) -> None:
    """Weights of ``kind`` meet activations of format ``act`` ("q8_0", "q8_1" or "q8_k")
    through ``fn`` (a ``_rows2`` intrinsic, or a q8_K ``_row`` function for ``template``:
    :func:`_rows_k8_template`, permuted int8 quants, or :func:`_rows_kf_template`, float32);
    generates ``matvec_q8act_<kind>``."""
    ACT_FORMAT[kind] = act
    if act == "q8_k":
        shape = ("k6" if kind == "q6_k" else "k8") if template is _rows_k8_template else "kf"
        bound = {"_row": fn, "_permute": permute_k6 if shape == "k6" else permute_k8,
                 "_row2": ROW2_FNS.get(kind)}
        ROW_FNS[kind] = (fn, shape)
    else:
        template, bound = _rows2_template, {"_rows2": fn}
        ROW_FNS[kind] = (fn, "rows2")
    name = f"matvec_q8act_{kind}"
    MATVEC_Q8ACT[kind] = globals()[name] = _q._generate(template, name, **bound)
    __all__.append(name)


# the two-row products, by name: the batched and mixture kernels call them too
_rows2_q8_0 = _make_rows2(_signed_q8_0, 34, "_rows2_q8_0")
_rows2_q4_0 = _make_rows2(_signed_q4_0, 18, "_rows2_q4_0")
_rows2_q4_1 = _make_rows2(_unsigned_q4_1, 20, "_rows2_q4_1", False, True)
_rows2_q5_0 = _make_rows2(_signed_q5_0, 22, "_rows2_q5_0")
_rows2_q5_1 = _make_rows2(_unsigned_q5_1, 24, "_rows2_q5_1", False, True)
_rows2_iq4_nl = _make_rows2(_signed_iq4_nl, 18, "_rows2_iq4_nl")
_register("q8_0", "q8_0", _rows2_q8_0)
_register("q4_0", "q8_0", _rows2_q4_0)
_register("q4_1", "q8_1", _rows2_q4_1)
_register("q5_0", "q8_0", _rows2_q5_0)


@njit(inline="always", cache=True)
def _row_q4_k(u, xd, x8, bsums, aux, sums):
    return _row_k4(u, xd, x8, bsums, aux, sums, 144, False)


@njit(inline="always", cache=True)
def _row_q5_k(u, xd, x8, bsums, aux, sums):
    return _row_k4(u, xd, x8, bsums, aux, sums, 176, True)


#: the batched products' tiles (kernels/batch.py): kind -> {rows: intrinsic}
K_TILES = {
    "q4_k": {nb: _k4_tile_intrinsic(False, nb) for nb in (8, 4)},
    "q5_k": {nb: _k4_tile_intrinsic(True, nb) for nb in (8, 4)},
    "q6_k": {nb: _q6_tile_intrinsic(nb) for nb in (8, 4)},
}

@njit(inline="always", cache=True)
def _row2_q4_k(u0, u1, xd, x8, bsums, aux, sums, res):
    _row2_k4(u0, u1, xd, x8, bsums, aux, sums, res, 144, False)


@njit(inline="always", cache=True)
def _row2_q5_k(u0, u1, xd, x8, bsums, aux, sums, res):
    _row2_k4(u0, u1, xd, x8, bsums, aux, sums, res, 176, True)


#: the two-row versions of the permuted k-quants' row functions (the decode's matvec)
ROW2_FNS = {"q4_k": _row2_q4_k, "q5_k": _row2_q5_k, "q6_k": _row2_q6_k}

_register("q4_k", "q8_k", _row_q4_k, _rows_k8_template)
_register("q5_k", "q8_k", _row_q5_k, _rows_k8_template)
_register("q6_k", "q8_k", _row_q6_k, _rows_k8_template)


# --- the 256-element kinds without vector IR: integer sums in float32 -------------------
# Their block products are integers below 2**24 in magnitude, so float32 lanes add them
# exactly (in any order) -- loops LLVM vectorises -- and the result is the integer of
# ggml's generic C code; the float terms then follow that code's order.


def _rows_kf_template(data, xd, xq, bsums, out):
    """out[r] = row r of ``data`` . the q8_K activations (xd, xq, bsums)."""
    rows = data.shape[0]
    xf = xq.astype(np.float32)
    for ch in prange((rows + _CHUNK - 1) // _CHUNK):
        lanes = np.empty(32, np.float32)
        for r in range(ch * _CHUNK, min(rows, ch * _CHUNK + _CHUNK)):
            out[r] = _row(data[r], xd, xf, bsums, lanes)  # noqa: F821 (bound per kind)


@njit(inline="always", cache=True)
def _sum32(lanes):
    t = _F32(0)
    for l in range(32):
        t += lanes[l]
    return t


@njit(inline="always", cache=True)
def _rowf_q2_k(u, xd, xf, bsums, lanes):
    sumf = _F32(0)
    for b in range(u.shape[0] // 84):
        o = b * 84
        prefetch(u, o + PREFETCH_BYTES)
        summs = _F32(0)
        for j in range(16):
            summs += _F32(bsums[b * 16 + j]) * _q._ubits(u[o + j], 4, 15)
        lanes[:] = 0
        for h in range(2):
            for sh in range(4):
                j = 8 * h + 2 * sh
                s0 = _q._ubits(u[o + j], 0, 15)
                s1 = _q._ubits(u[o + j + 1], 0, 15)
                x0 = b * 256 + 128 * h + 32 * sh
                for l in range(32):
                    sc = s0 if l < 16 else s1
                    lanes[l] += (sc * _q._ubits(u[o + 16 + 32 * h + l], 2 * sh, 3)) * xf[x0 + l]
        dall = xd[b] * _h2f(u[o + 80], u[o + 81])
        dmin = xd[b] * _h2f(u[o + 82], u[o + 83])
        sumf += dall * _sum32(lanes) - dmin * summs
    return sumf


@njit(inline="always", cache=True)
def _rowf_q3_k(u, xd, xf, bsums, lanes):
    sums = np.zeros(8, np.float32)
    for b in range(u.shape[0] // 110):
        o = b * 110
        prefetch(u, o + PREFETCH_BYTES)
        lanes[:] = 0
        for h in range(2):
            for sh in range(4):
                j = 8 * h + 2 * sh
                s0 = _q._q3_scale(u, o, j)
                s1 = _q._q3_scale(u, o, j + 1)
                x0 = b * 256 + 128 * h + 32 * sh
                hbit = 4 * h + sh
                for l in range(32):
                    q = (_q._ubits(u[o + 32 + 32 * h + l], 2 * sh, 3)
                         - _F32(4) + _F32(4) * _q._ubits(u[o + l], hbit, 1))
                    lanes[l] += ((s0 if l < 16 else s1) * q) * xf[x0 + l]
        d = _h2f(u[o + 108], u[o + 109]) * xd[b]
        for l in range(8):  # ggml's aux32[l]: the elements e with e % 8 == l
            sums[l] += d * (lanes[l] + lanes[l + 8] + lanes[l + 16] + lanes[l + 24])
    sumf = _F32(0)
    for l in range(8):
        sumf += sums[l]
    return sumf


@njit(inline="always", cache=True)
def _rowf_iq4_xs(u, xd, xf, bsums, lanes):
    sumf = _F32(0)
    for b in range(u.shape[0] // 136):
        o = b * 136
        prefetch(u, o + PREFETCH_BYTES)
        d4d8 = _h2f(u[o], u[o + 1]) * xd[b]
        for j in range(8):
            qo = o + 8 + 16 * j
            x0 = b * 256 + 32 * j
            for l in range(16):
                v = u[qo + l]
                lanes[l] = _q._IQ4NL_F32[v & 15] * xf[x0 + l]
                lanes[l + 16] = _q._IQ4NL_F32[v >> 4] * xf[x0 + 16 + l]
            sumf += (d4d8 * _q._iq4_xs_scale(u, o, j)) * _sum32(lanes)
    return sumf


@njit(inline="always", cache=True)
def _rowf_tq2_0(u, xd, xf, bsums, lanes):
    sumf = _F32(0)
    for b in range(u.shape[0] // 66):
        o = b * 66
        prefetch(u, o + PREFETCH_BYTES)
        lanes[:] = 0
        for h in range(2):
            for sh in range(4):
                x0 = b * 256 + 128 * h + 32 * sh
                for l in range(32):
                    lanes[l] += (_q._ubits(u[o + 32 * h + l], 2 * sh, 3) - _F32(1)) * xf[x0 + l]
        sumf += _sum32(lanes) * (xd[b] * _h2f(u[o + 64], u[o + 65]))
    return sumf


@njit(inline="always", cache=True)
def _rowf_tq1_0(u, xd, xf, bsums, lanes):
    sumf = _F32(0)
    for b in range(u.shape[0] // 54):
        o = b * 54
        prefetch(u, o + PREFETCH_BYTES)
        lanes[:] = 0
        x0 = b * 256
        for n in range(5):
            for m in range(32):
                lanes[m] += _q._trit(u[o + m], n) * xf[x0 + 32 * n + m]
            for m in range(16):
                lanes[16 + m] += _q._trit(u[o + 32 + m], n) * xf[x0 + 160 + 16 * n + m]
        for n in range(4):
            for m in range(4):
                lanes[4 * n + m] += _q._trit(u[o + 48 + m], n) * xf[x0 + 240 + 4 * n + m]
        sumf += _sum32(lanes) * (_h2f(u[o + 52], u[o + 53]) * xd[b])
    return sumf


_register("q5_1", "q8_1", _rows2_q5_1)
_register("iq4_nl", "q8_0", _rows2_iq4_nl)
_register("q2_k", "q8_k", _rowf_q2_k, _rows_kf_template)
_register("q3_k", "q8_k", _rowf_q3_k, _rows_kf_template)
_register("iq4_xs", "q8_k", _rowf_iq4_xs, _rows_kf_template)
_register("tq1_0", "q8_k", _rowf_tq1_0, _rows_kf_template)
_register("tq2_0", "q8_k", _rowf_tq2_0, _rows_kf_template)

_QUANTIZERS = {
    ("q8_0", "ref"): quantize_q8_0_act,
    ("q8_0", "x86"): quantize_q8_0_act_x86,
    ("q8_1", "ref"): quantize_q8_1_act,
    ("q8_1", "x86"): quantize_q8_1_act_x86,
}


# ----------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------


def quantize_act(kind: str, x, q8_0_variant: str = "ref") -> tuple:
    """The activation ``x`` quantized to the format weights of ``kind`` multiply with:
    ``(d, qs)`` for q8_0 activations, ``(d, qs, s)`` for q8_1, ``(d, qs, bsums)`` for
    q8_K (:data:`ACT_FORMAT`)."""
    fmt = ACT_FORMAT.get(kind)
    if fmt is None:
        raise UnsupportedError(
            f"no q8-activation kernel for kind {kind!r}; known: {', '.join(ACT_FORMAT)}"
        )
    if fmt == "q8_k":
        return quantize_q8_k_act(x)
    try:
        quantizer = _QUANTIZERS[fmt, q8_0_variant]
    except KeyError:
        raise UnsupportedError(
            f"unknown q8_0 activation quantizer {q8_0_variant!r}; known: ref, x86"
        ) from None
    return quantizer(x)


def _readonly_act(act, kind):
    fmt = ACT_FORMAT[kind]
    want = {
        "q8_0": (np.float32, np.int8),
        "q8_1": (np.float32, np.int8, np.float32),
        "q8_k": (np.float32, np.int8, np.int16),
    }[fmt]
    if len(act) != len(want):
        raise TensorShapeError(f"{kind} expects {fmt} activations with {len(want)} arrays")
    return tuple(_q._readonly(a, dt) for a, dt in zip(act, want))


def matvec_q8act(
    kind: str,
    data: np.ndarray,
    x: np.ndarray,
    out: np.ndarray | None = None,
    act: tuple | None = None,
    q8_0_variant: str = "ref",
) -> np.ndarray:
    """``out[r] = sum_c W[r, c] * x[c]`` the llama.cpp way: ``x`` is quantized once (to q8_0
    or q8_K, see :data:`ACT_FORMAT`) and every block is an integer dot product.

    ``q8_0_variant`` picks the q8_0 (and q8_1) activation quantizer:
    ``"ref"`` (ggml's reference, the default) or ``"x86"`` (what llama.cpp runs on AVX2
    hosts). ``act`` may hold an already quantized ``x`` (from :func:`quantize_act`), e.g. to
    share one quantization between q/k/v; ``x`` is then ignored (may be None). Returns
    ``out`` (new if None). The kernels do not bounds-check; this function does.
    """
    if not supports(kind):
        raise UnsupportedError(
            f"no q8-activation kernel for kind {kind!r}; known: {', '.join(ACT_FORMAT)}"
        )
    data, cols = _q._qdata(kind, data)
    if act is None:
        x = np.asarray(x)
        if x.shape != (cols,):
            raise TensorShapeError(
                f"matvec_q8act {kind}: x must have shape ({cols},), got {x.shape}"
            )
        act = quantize_act(kind, x, q8_0_variant)
    act = _readonly_act(act, kind)
    fmt = ACT_FORMAT[kind]
    qk = QK_K if fmt == "q8_k" else QK8_0
    if (
        act[1].shape != (cols,)
        or act[0].shape != (cols // qk,)
        or (len(act) == 3 and act[2].shape != (cols // (16 if fmt == "q8_k" else qk),))
    ):
        raise TensorShapeError(
            f"matvec_q8act {kind}: activations quantized for {act[1].shape[0]} columns, "
            f"the weight has {cols}"
        )
    out = _q._out(out, (data.shape[0],), f"matvec_q8act {kind}")
    if fmt == "q8_0":
        act = (act[0], act[1], _NO_XS)
    MATVEC_Q8ACT[kind](data, *act, out)
    return out


# ----------------------------------------------------------------------------------------
# What the engine calls
# ----------------------------------------------------------------------------------------

# The q8_0 activation quantizer llama.cpp runs on x86 (AVX); see the module docstring.
ENGINE_Q8_0_VARIANT = "x86"


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantized_act_rows(x, fmt_k, out):
    """Each row of ``x [R, n]`` through the q8_0 (x86 quantizer; ``fmt_k`` False) or q8_K
    activation format and back to float32, rows in parallel."""
    R, n = x.shape
    qk = 256 if fmt_k else 32
    for r in prange(R):
        d = np.empty(n // qk, np.float32)
        q = np.empty(n, np.int8)
        if fmt_k:
            _q8_k_act_into(x[r], d, q, np.empty(n // 16, np.int16))
        else:
            _q8_0_act_x86_into(x[r], d, q)
        orow = out[r]
        for b in range(n // qk):
            qseg = q[b * qk : (b + 1) * qk]
            oseg = orow[b * qk : (b + 1) * qk]
            for j in range(qk):
                oseg[j] = _F32(qseg[j]) * d[b]


def dequantized_activations(kind: str, x: np.ndarray) -> np.ndarray:
    """``x`` (``[..., n]``) after the round trip through ``kind``'s activation format.

    ``W_deq @ dequantized_activations(kind, x)`` is, up to float32 rounding, what the
    integer kernels compute, so the NumPy reference and batched prefill use it to follow
    the decode kernels exactly.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    fmt_k = ACT_FORMAT[kind] == "q8_k"  # q8_0 and q8_1 share their quants and d
    n = x.shape[-1]
    qk = QK_K if fmt_k else QK8_0
    if x.size == 0 or n % qk:
        raise TensorShapeError(f"{kind} activations need rows of a multiple of {qk}, got {n}")
    if not fmt_k and ENGINE_Q8_0_VARIANT != "x86":
        d, q = quantize_q8_0_act_np(x.reshape(-1))
        return (q.reshape(-1, QK8_0).astype(np.float32) * d[:, None]).reshape(x.shape)
    rows = x.reshape(-1, n)
    out = np.empty_like(rows)
    _dequantized_act_rows(rows, fmt_k, out)
    return out.reshape(x.shape)
