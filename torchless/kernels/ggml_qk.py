"""Q4_K / Q6_K weight x activation products, bit-identical to llama.cpp's CPU backend
(the x86 AVX-512 build with GGML_USE_CPU_REPACK and GGML_USE_LLAMAFILE; notes below).

Entry point: :func:`matmul_k_family` ``(raw, kind, x) -> out`` with ``raw`` the GGUF blocks
(uint8 ``[rows, bytes_per_row]``, original layout), ``kind`` ``'q4_k'`` or ``'q6_k'``, ``x``
float32 ``[T, K]``; ``out`` float32 ``[T, rows]`` equals ggml's ``dst`` bit for bit for a
MUL_MAT with the same T. The result of a batch row depends on T (different kernels).

What ggml runs
--------------
Activations are quantized to Q8_K (a float ``d``, 256 int8 ``qs`` and 16 ``bsums`` = sums of
16 consecutive ``qs`` per block) by quantize_row_q8_K_ref (ggml-base, built without
-march=native, so no FMA): ``max`` = the signed value of the first element of largest
magnitude, ``iscale = -127/max``, ``q = round_half_even(iscale*x)`` (the product rounded to
float32 first), ``d = 1/iscale``. The 4-row interleaved variant quantize_mat_q8_K_4x8 (rows
fed to the gemm below) rounds the same way but takes ``iscale = -127/amax`` whenever some
element equals +amax: that flips the signs of ``d``, ``qs`` and ``bsums`` together and every
product below is unchanged (ints negate exactly, rounding is symmetric), so one quantizer
serves all rows.

Q4_K: every Q4_K matrix of this model is repacked to q4_K_8x8 at load (ne[1] % 8 == 0), and
MUL_MAT goes to ggml-cpu/repack.cpp. Batch rows in whole groups of 4 (``t < 4*(T//4)``) are
quantized with quantize_mat_q8_K_4x8 and go through ggml_gemm_q4_K_8x8_q8_K (AVX-512 for
pairs of 8-column groups, AVX2 for a leftover group: same arithmetic); the other ``T % 4``
rows (all of T = 1) are quantized with quantize_row_q8_K and go one by one through
ggml_gemv_q4_K_8x8_q8_K. Per output element, ``dot[j]`` the exact integer sum over 32-sub-
block j of q4*q8, ``bs[j]`` the sum of its 32 q8, ``sc``/``mn`` the 6-bit scales/mins::

    gemm, per superblock b and sub-block pair p = 0..3:
        acc  = fma(f32(sc[2p]*dot[2p] + sc[2p+1]*dot[2p+1]), f32(d[b]) * d_x[b], acc)
        accm = fma(f32(mn[2p]*bs[2p] + mn[2p+1]*bs[2p+1]), f32(dmin[b]) * d_x[b], accm)
    gemv, per superblock b:
        acc  = fma(f32(sum_j sc[j]*dot[j]), f32(d[b]) * d_x[b], acc)
        accm = fma(f32(sum_j mn[j]*bs[j]), f32(dmin[b]) * d_x[b], accm)
    result acc - accm                        (acc, accm start at 0; f32() rounds to nearest)

Q6_K: not repacked on x86 (only ARM has q6_K repacks) and llamafile's sgemm has no Q6_K
case, so MUL_MAT goes to ggml_compute_forward_mul_mat, which first tries the tiled K-quant
path (ggml-cpu/tiled), taken when src1 has >= 8 rows:

    T >= 8, tiled (AVX512-VNNI microkernel), per superblock b:
        S = sum_s sc[s] * sum_{16} (q6-32)*q8                     (exact int)
        buf = fma(f32(S) * f32(d[b]), d_x[b], buf)                 (buf starts at 0; gcc
                                                                    contracts mul + add)
    T < 8, ggml_vec_dot_q6_K_q8_K (AVX2 branch) per output element: 8 float lanes; lane m
        gets per superblock the int  sum_{s%2 == m//4} sc[s] * sum_{l=4(m%4)..+3} u[16s+l]*q8[16s+l]
                                       - 32*(sc[2m]*bsum[2m] + sc[2m+1]*bsum[2m+1])
        (u the unsigned code 0..63) and lane[m] = fma(d_x[b] * f32(d[b]), f32(int), lane[m]);
        result ((l4+l0)+(l6+l2)) + ((l5+l1)+(l7+l3))  (hsum_float_8)

How it is computed here
-----------------------
All integer parts (code x code products, their sums and the scale multiplications) are
done in exact integer SIMD arithmetic, written as LLVM IR through llvmlite intrinsics
(Numba's own loops do not vectorise here); every integer sum ggml forms fits int32, and its
conversion to float32 rounds to nearest even like vcvtdq2ps. The float operations are
exactly ggml's, in ggml's order (explicit fma, no contraction, no reassociation).
Weights are decoded from the GGUF bytes on every call, _RG output rows per parallel work
item. Batch rows that ggml runs through its gemv / vec_dot (T % 4 trailing rows resp. all
rows for T < 8, and T = 1) are computed row by row straight from the GGUF bytes and the int8
activation codes. Rows that ggml runs through its gemm / tiled kernels are computed 16 at a
time (vector lanes = batch rows) from int16 weights pre-multiplied by their sub-block scale
and the activation codes of 16 rows laid out [K/2, 16, 2] (vpmaddwd-shaped products).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .bits import f16_to_f32

QK_K = 256
_BLOCK_BYTES = {"q4_k": 144, "q6_k": 210}
_TILED_MIN_T = 8  # ggml_tiled_min_batch: Q6_K takes the tiled path from 8 batch rows on
_TV = 16  # batch rows per transposed chunk (vector lanes)
_RG = 16  # output rows per parallel work item
_EMPTY3 = np.zeros((0, 0, 0), np.float32)
_EMPTY3I = np.zeros((0, 0, 0), np.int16)


# ---------------------------------------------------------------------------------------
# Q8_K activation quantization (quantize_row_q8_K_ref)
# ---------------------------------------------------------------------------------------


@njit(cache=True)
def _quantize_q8k(x, qs, xd, bsums):
    T, K = x.shape
    nb = K // QK_K
    magic = np.float32(12582912.0)  # 1.5 * 2^23: nearest_int's rounding constant
    for t in range(T):
        for b in range(nb):
            o = b * QK_K
            amax = np.float32(0.0)
            mx = np.float32(0.0)
            for j in range(QK_K):
                v = x[t, o + j]
                ax = abs(v)
                if ax > amax:
                    amax = ax
                    mx = v
            if amax == np.float32(0.0):
                xd[t, b] = np.float32(0.0)
                for j in range(QK_K):
                    qs[t, o + j] = 0
                for j in range(16):
                    bsums[t, b * 16 + j] = 0
                continue
            iscale = np.float32(-127.0) / mx
            for j in range(QK_K):
                p = iscale * x[t, o + j]  # float32 product, rounded
                q = np.int32((p + magic) - magic)  # round half to even (|p| < 2^22)
                qs[t, o + j] = min(q, 127)
            for j in range(16):
                s = np.int32(0)
                for i in range(16):
                    s += np.int32(qs[t, o + 16 * j + i])
                bsums[t, b * 16 + j] = s
            xd[t, b] = np.float32(1.0) / iscale


# ---------------------------------------------------------------------------------------
# LLVM IR helpers
# ---------------------------------------------------------------------------------------

_F32T = ir.FloatType()
_I32T = ir.IntType(32)
_I64T = ir.IntType(64)


def _c(v):
    return ir.Constant(_I64T, v)


def _vty(n, ty=_F32T):
    return ir.VectorType(ty, n)


def _idxv(values):
    values = list(values)
    return ir.Constant(_vty(len(values), _I32T), [ir.Constant(_I32T, v) for v in values])


def _zeros(n, ty=_F32T):
    return ir.Constant(_vty(n, ty), [ir.Constant(ty, 0)] * n)


def _vload(builder, ptr, n):
    return builder.load(builder.bitcast(ptr, _vty(n).as_pointer()), align=4)


def _vstore(builder, ptr, v):
    builder.store(v, builder.bitcast(ptr, v.type.as_pointer()), align=4)


def _splat(builder, s, n):
    v = builder.insert_element(ir.Constant(_vty(n, s.type), ir.Undefined), s, ir.Constant(_I32T, 0))
    return builder.shuffle_vector(v, v, _idxv([0] * n))


def _pairsum(builder, v):
    """<2n> -> <n>: lane i = v[2i] + v[2i+1] (float)."""
    n = v.type.count
    ev = builder.shuffle_vector(v, v, _idxv(range(0, n, 2)))
    od = builder.shuffle_vector(v, v, _idxv(range(1, n, 2)))
    return builder.fadd(ev, od)


def _pairsum_i(builder, v):
    """<2n> -> <n>: lane i = v[2i] + v[2i+1] (integer)."""
    n = v.type.count
    return builder.add(builder.shuffle_vector(v, v, _idxv(range(0, n, 2))),
                       builder.shuffle_vector(v, v, _idxv(range(1, n, 2))))


def _call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _fma(builder, a, b, c):
    """a * b + c with one rounding (scalar or vector float32)."""
    n = f"v{a.type.count}f32" if isinstance(a.type, ir.VectorType) else "f32"
    return _call(builder, f"llvm.fma.{n}", a.type, [a, b, c])


def _isum(builder, v):
    """Sum of the lanes of an i32 vector (exact)."""
    return _call(builder, f"llvm.vector.reduce.add.v{v.type.count}i32", _I32T, [v])


def _ptrs(context, builder, sig, args):
    return [context.make_array(t)(context, builder, value=v).data for t, v in zip(sig.args, args)
            if isinstance(t, types.Array)]


def _len(context, builder, sig, args, i):
    a = context.make_array(sig.args[i])(context, builder, value=args[i])
    return cgutils.unpack_tuple(builder, a.shape)[0]


def _is_f32(t, ndim):
    return (isinstance(t, types.Array) and t.ndim == ndim and t.dtype == types.float32
            and t.layout == "C")


# ---------------------------------------------------------------------------------------
# Batch rows 16 at a time (ggml's gemm / tiled rows): int16 activation codes in chunks of
# 16 batch rows, laid out [K/2, 16, 2] (two consecutive elements of each row side by side),
# against int16 weights pre-multiplied by their sub-block scale; vpmaddwd-shaped products.
# ---------------------------------------------------------------------------------------

_I8T = ir.IntType(8)
_I16T = ir.IntType(16)


def _is_arr(t, ndim, dtype):
    return isinstance(t, types.Array) and t.ndim == ndim and t.dtype == dtype and t.layout == "C"


def _pmadd(builder, a, b):
    """<2n x i16> a, b -> <n x i32>: lane k = a[2k]*b[2k] + a[2k+1]*b[2k+1] (vpmaddwd)."""
    n2 = a.type.count
    v32 = _vty(n2, _I32T)
    p = builder.mul(builder.sext(a, v32), builder.sext(b, v32))
    return _pairsum_i(builder, p)


def _make_chunk_isums(run):
    """(ws [K] int16, xc [K/2, 32] int16, S [K/run, 16] int32):
    S[j, r] = sum over elements e of run j of ws[e] * x[r, e] (exact int32)."""

    @intrinsic
    def chunk_isums(typingctx, ws, xc, S):
        if not (_is_arr(ws, 1, types.int16) and _is_arr(xc, 2, types.int16)
                and _is_arr(S, 2, types.int32)):
            return None
        sig = types.void(ws, xc, S)

        def codegen(context, builder, signature, args):
            wp, xp, sp = _ptrs(context, builder, signature, args)
            K = _len(context, builder, signature, args, 0)
            wp32 = builder.bitcast(wp, _I32T.as_pointer())  # weight pairs
            v16i = _vty(_TV, _I32T)
            xvp = builder.bitcast(xp, _vty(2 * _TV, _I16T).as_pointer())  # one pair of 16 rows
            with cgutils.for_range(builder, builder.udiv(K, _c(run))) as loop:
                k0 = builder.mul(loop.index, _c(run // 2))
                wbase = builder.gep(wp32, [k0])
                xbase = builder.gep(xvp, [k0])
                acc = None
                for k in range(run // 2):  # unrolled
                    wpair = builder.load(builder.gep(wbase, [_c(k)]), align=2)
                    wv = builder.bitcast(_splat(builder, wpair, _TV), _vty(2 * _TV, _I16T))
                    p = _pmadd(builder, wv, builder.load(builder.gep(xbase, [_c(k)]), align=2))
                    acc = p if acc is None else builder.add(acc, p)
                sptr = builder.bitcast(builder.gep(sp, [builder.mul(loop.index, _c(_TV))]),
                                       v16i.as_pointer())
                builder.store(acc, sptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return chunk_isums


_chunk_isums64 = _make_chunk_isums(64)  # Q4_K: pairs of 32-sub-blocks
_chunk_isums256 = _make_chunk_isums(256)  # Q6_K: superblocks


@intrinsic
def _q4k_gemm16(typingctx, S, mn, dw, dm, xd, xb, res):
    """ggml_gemm_q4_K_8x8_q8_K for one weight row and 16 batch rows (lanes).
    S [K/64, 16] int32 sc-weighted dots of the sub-block pairs, mn [K/32] mins, dw/dm [nb]
    d/dmin, xd [nb, 16] activation d, xb [K/32, 16] activation code sums -> res [16]."""
    if not (_is_arr(S, 2, types.int32) and _is_f32(xd, 2) and _is_f32(xb, 2)
            and all(_is_f32(a, 1) for a in (mn, dw, dm, res))):
        return None
    sig = types.void(S, mn, dw, dm, xd, xb, res)

    def codegen(context, builder, signature, args):
        Sp, mnp, dwp, dmp, xdp, xbp, resp = _ptrs(context, builder, signature, args)
        nb = _len(context, builder, signature, args, 2)
        accp = cgutils.alloca_once_value(builder, _zeros(_TV))
        accmp = cgutils.alloca_once_value(builder, _zeros(_TV))

        def row(ptr, j):
            return _vload(builder, builder.gep(ptr, [builder.mul(j, _c(_TV))]), _TV)

        def bcast(ptr, j):
            return _splat(builder, builder.load(builder.gep(ptr, [j])), _TV)

        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            xdv = row(xdp, b)
            dd = builder.fmul(bcast(dwp, b), xdv)
            ddm = builder.fmul(bcast(dmp, b), xdv)
            acc, accm = builder.load(accp), builder.load(accmp)
            for q in range(4):  # pairs of sub-blocks
                jp = builder.add(builder.mul(b, _c(4)), _c(q))
                sptr = builder.bitcast(builder.gep(Sp, [builder.mul(jp, _c(_TV))]),
                                       _vty(_TV, _I32T).as_pointer())
                isum = builder.sitofp(builder.load(sptr, align=4), _vty(_TV))
                ja = builder.mul(jp, _c(2))
                jb = builder.add(ja, _c(1))
                msum = builder.fadd(builder.fmul(bcast(mnp, ja), row(xbp, ja)),
                                    builder.fmul(bcast(mnp, jb), row(xbp, jb)))  # exact: < 2^19
                acc = _fma(builder, isum, dd, acc)
                accm = _fma(builder, msum, ddm, accm)
            builder.store(acc, accp)
            builder.store(accm, accmp)
        _vstore(builder, resp, builder.fsub(builder.load(accp), builder.load(accmp)))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _q6k_tiled16(typingctx, S, dw, xd, res):
    """ggml's tiled Q6_K kernel for one weight row and 16 batch rows (lanes).
    S [nb, 16] int32 per superblock sum of sc * (u - 32) * q8, dw [nb], xd [nb, 16] -> res."""
    if not (_is_arr(S, 2, types.int32) and _is_f32(xd, 2) and _is_f32(dw, 1) and _is_f32(res, 1)):
        return None
    sig = types.void(S, dw, xd, res)

    def codegen(context, builder, signature, args):
        Sp, dwp, xdp, resp = _ptrs(context, builder, signature, args)
        nb = _len(context, builder, signature, args, 1)
        accp = cgutils.alloca_once_value(builder, _zeros(_TV))
        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            off = builder.mul(b, _c(_TV))
            sptr = builder.bitcast(builder.gep(Sp, [off]), _vty(_TV, _I32T).as_pointer())
            sv = builder.load(sptr, align=4)
            r = builder.fmul(builder.sitofp(sv, _vty(_TV)),
                             _splat(builder, builder.load(builder.gep(dwp, [b])), _TV))
            xdv = _vload(builder, builder.gep(xdp, [off]), _TV)
            acc = _fma(builder, r, xdv, builder.load(accp))
            builder.store(acc, accp)
        _vstore(builder, resp, builder.load(accp))
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------------------
# Row kernels straight from the GGUF bytes (one weight row, one batch row: ggml's gemv and
# vec_dot rows): integer SIMD on the 4/6-bit codes and the int8 activation codes.
# ---------------------------------------------------------------------------------------


def _bload(builder, ptr, off, n=32):
    """<n x i8> at byte ``off`` of ``ptr``."""
    vptr = builder.bitcast(builder.gep(ptr, [off]), _vty(n, _I8T).as_pointer())
    return builder.load(vptr, align=1)


def _bconst(v, n=32):
    return ir.Constant(_vty(n, _I8T), [ir.Constant(_I8T, v)] * n)


def _madd32(builder, w8, scale, x8):
    """<16 x i32>, lane k = sum over positions 2k, 2k+1 of scale * w8 * x8, for unsigned
    codes w8 and int8 codes x8 (<32 x i8>) and an int ``scale`` (<32 x i16>) with
    |scale * w8| < 2^15: exact. Written so that LLVM emits vpmullw + vpmaddwd on x86."""
    v16, v32 = _vty(32, _I16T), _vty(32, _I32T)
    a = builder.sext(builder.mul(builder.zext(w8, v16), scale), v32)
    p = builder.mul(a, builder.sext(x8, v32))
    ev = builder.shuffle_vector(p, p, _idxv(range(0, 32, 2)))
    od = builder.shuffle_vector(p, p, _idxv(range(1, 32, 2)))
    return builder.add(ev, od)


@intrinsic
def _q4k_gemv_raw(typingctx, wrow, x, sc, mn, dw, dm, xd, xb):
    """ggml_gemv_q4_K_8x8_q8_K for one weight row (GGUF bytes) and one batch row (int8
    codes x [K]); sc/mn [K/32], dw/dm [nb] decoded scales, xd [nb], xb [K/32] code sums."""
    if not (_is_arr(wrow, 1, types.uint8) and _is_arr(x, 1, types.int8)
            and all(_is_f32(a, 1) for a in (sc, mn, dw, dm, xd, xb))):
        return None
    sig = types.float32(wrow, x, sc, mn, dw, dm, xd, xb)

    def codegen(context, builder, signature, args):
        wp, xp, scp, mnp, dwp, dmp, xdp, xbp = _ptrs(context, builder, signature, args)
        nb = _len(context, builder, signature, args, 4)
        zero = ir.Constant(_F32T, 0.0)
        accp = cgutils.alloca_once_value(builder, zero)
        accmp = cgutils.alloca_once_value(builder, zero)
        vi = _vty(8, _I32T)
        m4 = _bconst(15)
        s4 = _bconst(4)
        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            wb = builder.mul(b, _c(144))
            xb0 = builder.mul(b, _c(QK_K))
            j0 = builder.mul(b, _c(8))
            sci = builder.fptosi(_vload(builder, builder.gep(scp, [j0]), 8), _vty(8, _I16T))
            acc = _zeros(16, _I32T)  # sum over the block of sc[j] * q4 * q8, by position pair
            for h in range(4):  # 32 bytes hold sub-blocks 2h (low nibbles) and 2h+1 (high)
                q = _bload(builder, wp, builder.add(wb, _c(16 + 32 * h)))
                xa = _bload(builder, xp, builder.add(xb0, _c(64 * h)))
                xh = _bload(builder, xp, builder.add(xb0, _c(64 * h + 32)))
                sa = builder.shuffle_vector(sci, sci, _idxv([2 * h] * 32))
                sb = builder.shuffle_vector(sci, sci, _idxv([2 * h + 1] * 32))
                acc = builder.add(acc, _madd32(builder, builder.and_(q, m4), sa, xa))
                acc = builder.add(acc, _madd32(builder, builder.lshr(q, s4), sb, xh))
            isum = _isum(builder, acc)  # exact: < 2^25
            mnv = builder.fptosi(_vload(builder, builder.gep(mnp, [j0]), 8), vi)
            xbv = builder.fptosi(_vload(builder, builder.gep(xbp, [j0]), 8), vi)
            msum = _isum(builder, builder.mul(mnv, xbv))
            xdb = builder.load(builder.gep(xdp, [b]))
            dd = builder.fmul(builder.load(builder.gep(dwp, [b])), xdb)
            ddm = builder.fmul(builder.load(builder.gep(dmp, [b])), xdb)
            acc = _fma(builder, builder.sitofp(isum, _F32T), dd, builder.load(accp))
            accm = _fma(builder, builder.sitofp(msum, _F32T), ddm, builder.load(accmp))
            builder.store(acc, accp)
            builder.store(accm, accmp)
        return builder.fsub(builder.load(accp), builder.load(accmp))

    return sig, codegen


@intrinsic
def _q6k_vecdot_raw(typingctx, wrow, x, sc, dw, xd, bs):
    """ggml_vec_dot_q6_K_q8_K (AVX2 branch) for one weight row (GGUF bytes) and one batch
    row (int8 codes x [K]); sc [K/16], dw [nb] decoded, xd [nb], bs [K/16] bsums."""
    if not (_is_arr(wrow, 1, types.uint8) and _is_arr(x, 1, types.int8)
            and all(_is_f32(a, 1) for a in (sc, dw, xd, bs))):
        return None
    sig = types.float32(wrow, x, sc, dw, xd, bs)

    def codegen(context, builder, signature, args):
        wp, xp, scp, dwp, xdp, bsp = _ptrs(context, builder, signature, args)
        nb = _len(context, builder, signature, args, 3)
        vi8 = _vty(8, _I32T)
        accp = cgutils.alloca_once_value(builder, _zeros(8))
        m4, m3 = _bconst(15), _bconst(3)
        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            wb = builder.mul(b, _c(210))
            xb0 = builder.mul(b, _c(QK_K))
            s0 = builder.mul(b, _c(16))
            scv = _vload(builder, builder.gep(scp, [s0]), 16)
            sc16 = builder.fptosi(scv, _vty(16, _I16T))
            acc = _zeros(16, _I32T)  # lane k: positions 2k, 2k+1 of every 32-run, sum of sc*u*q8
            for h in range(2):
                ql0 = _bload(builder, wp, builder.add(wb, _c(64 * h)))
                ql1 = _bload(builder, wp, builder.add(wb, _c(64 * h + 32)))
                qh = _bload(builder, wp, builder.add(wb, _c(128 + 32 * h)))
                def high2(shift):  # bits shift, shift+1 of qh, moved to bits 4, 5
                    v = builder.lshr(qh, _bconst(shift)) if shift else qh
                    return builder.shl(builder.and_(v, m3), _bconst(4))

                codes = [  # unsigned 6-bit codes of elements 128h + 32v + (0..31)
                    builder.or_(builder.and_(ql0, m4), high2(0)),
                    builder.or_(builder.and_(ql1, m4), high2(2)),
                    builder.or_(builder.lshr(ql0, _bconst(4)), high2(4)),
                    builder.or_(builder.lshr(ql1, _bconst(4)), high2(6)),
                ]
                for v in range(4):  # elements 128h + 32v .. +31: sub-blocks s, s+1
                    s = 8 * h + 2 * v
                    xv = _bload(builder, xp, builder.add(xb0, _c(128 * h + 32 * v)))
                    scs = builder.shuffle_vector(sc16, sc16, _idxv([s] * 16 + [s + 1] * 16))
                    acc = builder.add(acc, _madd32(builder, codes[v], scs, xv))  # |sc*u| < 2^13
            S = _pairsum_i(builder, acc)  # ggml's lane m holds positions 4m..4m+3
            corr = _pairsum(builder, builder.fmul(scv, _vload(builder, builder.gep(bsp, [s0]), 16)))
            c32 = _splat(builder, ir.Constant(_I32T, 32), 8)
            S = builder.sub(S, builder.mul(builder.fptosi(corr, vi8), c32))
            d = builder.fmul(builder.load(builder.gep(xdp, [b])),
                             builder.load(builder.gep(dwp, [b])))
            builder.store(_fma(builder, _splat(builder, d, 8), builder.sitofp(S, _vty(8)),
                               builder.load(accp)), accp)
        a = builder.load(accp)
        e = [builder.extract_element(a, ir.Constant(_I32T, i)) for i in range(8)]
        r = [builder.fadd(e[4 + i], e[i]) for i in range(4)]  # hsum_float_8
        return builder.fadd(builder.fadd(r[0], r[2]), builder.fadd(r[1], r[3]))

    return sig, codegen


# ---------------------------------------------------------------------------------------
# Kernels: decode a group of weight rows, then all batch rows against it
# ---------------------------------------------------------------------------------------

_U = np.uint64  # unsigned indices: no negative-index wraparound code in the loops


@njit(inline="always", cache=True)
def _f16_at(raw, r, o):
    return f16_to_f32(np.uint16(raw[r, o]) | (np.uint16(raw[r, o + _U(1)]) << np.uint16(8)))


@njit(cache=True, parallel=True)
def _q4k_kernel(raw, X8, XC, xd, xb, xdc, xbc, out):
    """X8 [T, K] int8 activation codes, xd [T, nb] their d, xb [T, K/32] their sums per 32.
    XC [nc, K/2, 32] int16 (see _chunked_codes), xdc [nc, nb, 16], xbc [nc, K/32, 16] (see
    _chunked): the first 4*(T//4) batch rows (ggml's gemm rows) in chunks of 16, empty for
    T < 4; the other batch rows take ggml's gemv."""
    R = raw.shape[0]
    T = X8.shape[0]
    nb = xd.shape[1]
    K = nb * QK_K
    nsub = K // 32
    n_gemm = (T // 4) * 4 if XC.shape[0] > 0 else 0
    for g in prange((R + _RG - 1) // _RG):
        r0 = g * _RG
        nr = min(_RG, R - r0)
        SC = np.empty((nr, nsub), np.float32)
        MN = np.empty((nr, nsub), np.float32)
        DW = np.empty((nr, nb), np.float32)
        DM = np.empty((nr, nb), np.float32)
        for i in range(_U(nr)):
            ru = _U(r0) + i
            for b in range(_U(nb)):
                o = b * _U(144)
                DW[i, b] = _f16_at(raw, ru, o)
                DM[i, b] = _f16_at(raw, ru, o + _U(2))
                for j in range(_U(8)):  # get_scale_min_k4
                    lo = raw[ru, o + _U(4) + j]  # scales[j]
                    if j < 4:
                        s = lo & np.uint8(63)
                        m = raw[ru, o + _U(8) + j] & np.uint8(63)
                    else:
                        hi = raw[ru, o + _U(8) + j]  # scales[j + 4]
                        s = (hi & np.uint8(15)) | ((raw[ru, o + j] >> np.uint8(6)) << np.uint8(4))
                        m = (hi >> np.uint8(4)) | ((lo >> np.uint8(6)) << np.uint8(4))
                    SC[i, b * _U(8) + j] = s
                    MN[i, b * _U(8) + j] = m
        if n_gemm > 0:
            WS = np.empty((nr, K), np.int16)  # code * sub-block scale (< 2^10)
            for i in range(_U(nr)):
                ru = _U(r0) + i
                for b in range(_U(nb)):
                    o = b * _U(144) + _U(16)
                    ow = b * _U(QK_K)
                    for h in range(_U(4)):
                        sa = np.int16(SC[i, b * _U(8) + _U(2) * h])
                        sb = np.int16(SC[i, b * _U(8) + _U(2) * h + _U(1)])
                        for l in range(_U(32)):
                            byte = raw[ru, o + _U(32) * h + l]
                            WS[i, ow + _U(64) * h + l] = np.int16(byte & np.uint8(15)) * sa
                            WS[i, ow + _U(64) * h + _U(32) + l] = np.int16(byte >> np.uint8(4)) * sb
            S = np.empty((K // 64, _TV), np.int32)
            res = np.empty(_TV, np.float32)
            for c in range(XC.shape[0]):
                for i in range(nr):
                    _chunk_isums64(WS[i], XC[c], S)
                    _q4k_gemm16(S, MN[i], DW[i], DM[i], xdc[c], xbc[c], res)
                    for lane in range(min(_TV, n_gemm - c * _TV)):
                        out[c * _TV + lane, r0 + i] = res[lane]
        for t in range(n_gemm, T):
            for i in range(nr):
                out[t, r0 + i] = _q4k_gemv_raw(raw[r0 + i], X8[t], SC[i], MN[i], DW[i], DM[i],
                                               xd[t], xb[t])


@njit(cache=True, parallel=True)
def _q6k_kernel(raw, X8, XC, xd, xs, xdc, out):
    """As :func:`_q4k_kernel`, with xs [T, K/16] the Q8_K bsums; when XC / xdc are given
    (T >= 8) every batch row takes the tiled kernel from them, else ggml_vec_dot_q6_K_q8_K."""
    R = raw.shape[0]
    T = X8.shape[0]
    nb = xd.shape[1]
    K = nb * QK_K
    nsub = K // 16
    for g in prange((R + _RG - 1) // _RG):
        r0 = g * _RG
        nr = min(_RG, R - r0)
        SC = np.empty((nr, nsub), np.float32)
        DW = np.empty((nr, nb), np.float32)
        for i in range(_U(nr)):
            ru = _U(r0) + i
            for b in range(_U(nb)):
                o = b * _U(210)
                DW[i, b] = _f16_at(raw, ru, o + _U(208))
                for s in range(_U(16)):
                    SC[i, b * _U(16) + s] = np.int8(raw[ru, o + _U(192) + s])
        if XC.shape[0] > 0:
            WS = np.empty((nr, K), np.int16)  # (code - 32) * sub-block scale (|.| <= 2^12)
            for i in range(_U(nr)):
                ru = _U(r0) + i
                for b in range(_U(nb)):
                    o = b * _U(210)
                    for h in range(_U(2)):
                        for hs in range(_U(2)):  # the two 16-sub-blocks of each run of 32
                            e0 = b * _U(QK_K) + _U(128) * h + _U(16) * hs
                            s0 = b * _U(16) + _U(8) * h + hs
                            c0 = np.int16(SC[i, s0])
                            c1 = np.int16(SC[i, s0 + _U(2)])
                            c2 = np.int16(SC[i, s0 + _U(4)])
                            c3 = np.int16(SC[i, s0 + _U(6)])
                            oq = o + _U(64) * h + _U(16) * hs
                            oh = o + _U(128) + _U(32) * h + _U(16) * hs
                            for l in range(_U(16)):
                                ql0 = raw[ru, oq + l]
                                ql1 = raw[ru, oq + _U(32) + l]
                                qh = raw[ru, oh + l]
                                u0 = (ql0 & np.uint8(15)) | ((qh & np.uint8(3)) << np.uint8(4))
                                u1 = ((ql1 & np.uint8(15))
                                      | (((qh >> np.uint8(2)) & np.uint8(3)) << np.uint8(4)))
                                u2 = ((ql0 >> np.uint8(4))
                                      | (((qh >> np.uint8(4)) & np.uint8(3)) << np.uint8(4)))
                                u3 = (ql1 >> np.uint8(4)) | ((qh >> np.uint8(6)) << np.uint8(4))
                                WS[i, e0 + l] = (np.int16(u0) - np.int16(32)) * c0
                                WS[i, e0 + _U(32) + l] = (np.int16(u1) - np.int16(32)) * c1
                                WS[i, e0 + _U(64) + l] = (np.int16(u2) - np.int16(32)) * c2
                                WS[i, e0 + _U(96) + l] = (np.int16(u3) - np.int16(32)) * c3
            S = np.empty((nb, _TV), np.int32)
            res = np.empty(_TV, np.float32)
            for c in range(XC.shape[0]):
                for i in range(nr):
                    _chunk_isums256(WS[i], XC[c], S)
                    _q6k_tiled16(S, DW[i], xdc[c], res)
                    for lane in range(min(_TV, T - c * _TV)):
                        out[c * _TV + lane, r0 + i] = res[lane]
        else:
            for t in range(T):
                for i in range(nr):
                    out[t, r0 + i] = _q6k_vecdot_raw(raw[r0 + i], X8[t], SC[i], DW[i], xd[t], xs[t])


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


def _readonly(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v


def _chunked(a: np.ndarray) -> np.ndarray:
    """[n, m] -> float32 [ceil(n/16), m, 16], zero-padded: chunks of 16 rows, transposed."""
    n, m = a.shape
    nc = -(-n // _TV)
    out = np.zeros((nc * _TV, m), np.float32)
    out[:n] = a
    return np.ascontiguousarray(out.reshape(nc, _TV, m).transpose(0, 2, 1))


def _chunked_codes(qs: np.ndarray) -> np.ndarray:
    """int8 codes [n, K] -> int16 [ceil(n/16), K/2, 32]: chunks of 16 rows, element pairs
    (2k, 2k+1) of the 16 rows side by side (row r at 2r, 2r+1), zero-padded."""
    n, K = qs.shape
    nc = -(-n // _TV)
    out = np.zeros((nc * _TV, K), np.int16)
    out[:n] = qs
    out = out.reshape(nc, _TV, K // 2, 2).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(out).reshape(nc, K // 2, 2 * _TV)


def quantize_q8k(x: np.ndarray):
    """Q8_K blocks of the rows of ``x`` (float32 [T, K]): ``(qs int8 [T, K], d float32
    [T, K/256], bsums int32 [T, K/16])``, as ggml's quantize_row_q8_K."""
    x = _readonly(np.ascontiguousarray(x, dtype=np.float32))
    T, K = x.shape
    qs = np.empty((T, K), np.int8)
    xd = np.empty((T, K // QK_K), np.float32)
    bsums = np.empty((T, K // 16), np.int32)
    _quantize_q8k(x, qs, xd, bsums)
    return qs, xd, bsums


def matmul_k_family(raw: np.ndarray, kind: str, x: np.ndarray) -> np.ndarray:
    """``out[t, r] = W[r] . x[t]`` (float32 [T, rows]) as llama.cpp computes it for a
    MUL_MAT of ``T = len(x)`` batch rows; ``raw`` holds the weight rows as GGUF blocks.
    A 1-D ``x`` is one batch row (T = 1) and gives a 1-D result."""
    kind = kind.lower()
    if kind not in _BLOCK_BYTES:
        raise ValueError(f"unsupported kind {kind!r} (q4_k or q6_k)")
    x = np.asarray(x)
    one = x.ndim == 1
    if one:
        x = x[None, :]
    T, K = x.shape
    if K % QK_K or K == 0:
        raise ValueError(f"K = {K} is not a positive multiple of {QK_K}")
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] != (K // QK_K) * _BLOCK_BYTES[kind]:
        raise ValueError(f"raw {raw.dtype} {raw.shape} does not hold {kind} rows of {K} elements")
    raw = _readonly(np.ascontiguousarray(raw))
    out = np.empty((T, raw.shape[0]), np.float32)
    if T == 0:
        return out
    qs, xd, bsums = quantize_q8k(x)
    if kind == "q4_k":
        xs = bsums.reshape(T, -1, 2).sum(axis=2).astype(np.float32)  # code sums per 32
        n_gemm = (T // 4) * 4  # ggml's gemm takes the rows in whole groups of 4
        if n_gemm:
            XC, xdc, xsc = _chunked_codes(qs[:n_gemm]), _chunked(xd[:n_gemm]), _chunked(xs[:n_gemm])
        else:
            XC, xdc, xsc = _EMPTY3I, _EMPTY3, _EMPTY3
        _q4k_kernel(raw, qs, XC, xd, xs, xdc, xsc, out)
    else:
        xs = bsums.astype(np.float32)  # code sums per 16
        if T >= _TILED_MIN_T:  # ggml's tiled path
            XC, xdc = _chunked_codes(qs), _chunked(xd)
        else:
            XC, xdc = _EMPTY3I, _EMPTY3
        _q6k_kernel(raw, qs, XC, xd, xs, xdc, out)
    return out[0] if one else out
