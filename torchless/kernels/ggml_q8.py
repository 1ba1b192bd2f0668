"""Q5_0 / Q8_0 weights times float32 activations, bit for bit as llama.cpp's x86 CPU backend.

What llama.cpp runs (this build: gcc -O3 -march=native with AVX-512/VNNI/F16C/FMA,
GGML_USE_LLAMAFILE, no repacking for these two types on x86):

* ``T > 1`` activation rows: llamafile's ``tinyBLAS_Q0_AVX<block_q5_0|block_q8_0, block_q8_0>``
  (``ggml-cpu/llamafile/sgemm.cpp``) after the activations have been quantized to q8_0;
  the tile shape (``gemm4xN``, ``gemmMx4``, ``gemm<RM, RN>``) only decides which thread
  computes which output element -- every element is computed the same way.
* ``T == 1``: llamafile declines (``n < 2``), so ggml's ``vec_dot`` runs:
  ``ggml_vec_dot_q5_0_q8_0`` / ``ggml_vec_dot_q8_0_q8_0`` (``arch/x86/quants.c``, AVX2 branch).

Both compute, for weight row ``r`` and activation row ``t`` (``K = 32 * nb`` columns):

1. The activation row is quantized by ``quantize_row_q8_0`` (x86 AVX branch), block by block:
   ``amax = max |x|``; ``d = amax / 127.0f`` (a float32 division), stored as a half
   (round to nearest even, ``_cvtss_sh(d, 0)``); ``id = 127.0f / amax`` (0 if amax == 0);
   ``q = round_half_even(x * id)`` (float32 product, ``_mm256_round_ps``), saturated to int8.
   The scale used later is the *half* ``d``.
2. Per block ``b``: the weight quants made signed (q8_0 as stored, q5_0 ``nibble | bit4 << 4``
   minus 16) and the block's integer products summed in 8 int32 lanes, lane ``i`` holding
   elements ``4i .. 4i+3`` (``vpdpbusd`` with the sign trick; exact).
3. ``s = f32(d_w) * f32(d_x)`` (one float32 product of the two halves) and, lane by lane,
   ``acc[i] = fma(s, float(lane[i]), acc[i])`` starting from ``acc = 0``, blocks in order.
4. The row result is ``((acc0 + acc4) + (acc2 + acc6)) + ((acc1 + acc5) + (acc3 + acc7))``
   (``hsum_float_8`` / tinyBLAS ``hsum``: high 128-bit half added to the low half, then
   ``movehl`` and ``movehdup``).

This module does exactly that: :func:`quantize_act_q8_0` (step 1, Numba), and one LLVM
intrinsic per (kind, tile) for steps 2-4, which keeps a tile of ``RM`` weight rows by ``RN``
activation rows in registers (the integer work on ``vpdpbusd`` when the host has AVX-VNNI /
AVX512-VNNI, else ``vpmaddubsw`` + ``vpmaddwd``, else portable IR; integers are exact, so every
tier gives the same bits). On AVX512-VNNI hosts, batches of ``T >= 8`` rows instead decode
each chunk of weight rows once per call (unsigned quants + float32 scales), pack the
activations by row pairs, and run 4 weight rows x 8 activation rows per tile in zmm registers
(two activation rows' 8 lanes per register); the lane integers and every float operation per
output element are unchanged (see ``_make_tile512``). Entry point: :func:`matmul_q8_family`.
"""

from __future__ import annotations

import os
import platform

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .bits import PREFETCH_BYTES, _lane_tree, _prefetch_ir
from .quant_q8 import _detect_isa, _q8_0_act_x86_into

__all__ = [
    "BLOCK_BYTES",
    "ISA",
    "matmul_q8_family",
    "matmul_q8_family_act",
    "quantize_act_q8_0",
]

QK = 32
#: bytes of one 32-element block
BLOCK_BYTES = {"q8_0": 34, "q5_0": 22}
_KIND_ID = {"q8_0": 0, "q5_0": 1}
_F32 = np.float32

# ----------------------------------------------------------------------------------------
# Step 1: ggml's x86 quantize_row_q8_0
# ----------------------------------------------------------------------------------------


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_rows(x, xq, xd):
    """Each row of ``x [T, K]`` to q8_0: ``xq`` int8 [T, K], ``xd`` (the half scale as
    float32) [T, K // 32]; ggml's AVX ``quantize_row_q8_0``."""
    for t in prange(x.shape[0]):
        _q8_0_act_x86_into(x[t], xd[t], xq[t])


def quantize_act_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``x [T, K]`` (K a multiple of 32) -> ``(xq int8 [T, K], xd float32 [T, K//32])``
    exactly as llama.cpp's x86 ``quantize_row_q8_0`` (``xd`` holds the half scale)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2 or x.shape[1] == 0 or x.shape[1] % QK:
        raise ValueError(f"activations must be [T, K] with K a multiple of 32, got {x.shape}")
    if type(x) is not np.ndarray:
        x = x.view(np.ndarray)
    if not x.flags.aligned:
        x = x.copy()
    if x.flags.writeable:  # one Numba type (read-only) for every caller
        x = x.view()
        x.flags.writeable = False
    T, K = x.shape
    xq = np.empty((T, K), np.int8)
    xd = np.empty((T, K // QK), np.float32)
    if T:
        _quantize_rows(x, xq, xd)
    return xq, xd


# ----------------------------------------------------------------------------------------
# Steps 2-4: tiles of RM weight rows x RN activation rows, as LLVM IR
# ----------------------------------------------------------------------------------------

#: integer instruction tier the tiles use (the results do not depend on it). Changing it via
#: TORCHLESS_GGML_Q8_ISA needs a fresh NUMBA_CACHE_DIR (the cache does not key on it).
ISA = _detect_isa("TORCHLESS_GGML_Q8_ISA")

_I1, _I8, _I16, _I32, _I64 = (ir.IntType(n) for n in (1, 8, 16, 32, 64))
_F = ir.FloatType()


def _v(ty, n):
    return ir.VectorType(ty, n)


def _splat(ty, n, val):
    return ir.Constant(_v(ty, n), [ir.Constant(ty, val)] * n)


def _const_vec(ty, vals):
    return ir.Constant(_v(ty, len(vals)), [ir.Constant(ty, x) for x in vals])


def _shuf(b, x, y, idx):
    return b.shuffle_vector(x, y, _const_vec(_I32, list(idx)))


def _call(b, name, ret, args):
    fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(ret, [a.type for a in args]),
                                        name)
    return b.call(fn, args)


def _load_vec(b, p, ty, n):
    """Unaligned load of n ``ty`` at i8* ``p``."""
    return b.load(b.bitcast(p, _v(ty, n).as_pointer()), align=1)


def _gep(b, p, off):
    return b.gep(p, [off if isinstance(off, ir.Value) else ir.Constant(_I64, off)])


def _bcast8(b, f):
    """float -> <8 x float> with f in every lane."""
    v = b.insert_element(ir.Constant(_v(_F, 8), None), f, ir.Constant(_I32, 0))
    return _shuf(b, v, ir.Constant(_v(_F, 8), None), [0] * 8)


def _weights_q8_0(b, p):
    """Signed quants <32 x i8> of the q8_0 block at i8* p."""
    return _load_vec(b, _gep(b, p, 2), _I8, 32)


def _weights_q5_0(b, p):
    """Signed quants <32 x i8> of the q5_0 block at i8* p: (nibble | bit << 4) - 16, element j
    < 16 from the low nibble of qs[j], j >= 16 from the high nibble of qs[j - 16], bit j of
    the little-endian qh word."""
    qs = _load_vec(b, _gep(b, p, 6), _I8, 16)
    lo = b.and_(qs, _splat(_I8, 16, 15))
    hi = b.lshr(qs, _splat(_I8, 16, 4))
    w = _shuf(b, lo, hi, range(32))
    qh = _load_vec(b, _gep(b, p, 2), _I8, 4)
    rep = _shuf(b, qh, qh, [j // 8 for j in range(32)])
    bit = b.icmp_unsigned("!=", b.and_(rep, _const_vec(_I8, [1 << (j % 8) for j in range(32)])),
                          _splat(_I8, 32, 0))
    w = b.or_(w, b.select(bit, _splat(_I8, 32, 16), _splat(_I8, 32, 0)))
    return b.sub(w, _splat(_I8, 32, 16))


_WEIGHTS = {"q8_0": _weights_q8_0, "q5_0": _weights_q5_0}


def _prep_w(b, w):
    """What the dot product needs of a weight vector, computed once per block: (w, |w|)."""
    if ISA == "generic":
        return w, b.sext(w, _v(_I32, 32))
    aw = _call(b, "llvm.abs.v32i8", w.type, [w, ir.Constant(_I1, 0)])
    return w, aw


def _dot(b, wp, x):
    """<8 x i32>: lane i = sum_{k<4} w[4i+k] * x[4i+k] (exact; x never -128)."""
    w, aw = wp
    if ISA == "generic":
        p = b.mul(aw, b.sext(x, _v(_I32, 32)))
        acc = None
        for k in range(4):
            t = _shuf(b, p, p, range(k, 32, 4))
            acc = t if acc is None else b.add(acc, t)
        return acc
    sx = _call(b, "llvm.x86.avx2.psign.b", x.type, [x, w])  # x * sign(w)
    v8 = _v(_I32, 8)
    if ISA == "vnni":
        return _call(b, "llvm.x86.avx512.vpdpbusd.256", v8,
                     [_splat(_I32, 8, 0), b.bitcast(aw, v8), b.bitcast(sx, v8)])
    t = _call(b, "llvm.x86.avx2.pmadd.ub.sw", _v(_I16, 16), [aw, sx])
    return _call(b, "llvm.x86.avx2.pmadd.wd", v8, [t, _splat(_I16, 16, 1)])


def _make_tile(kind: str, RM: int, RN: int):
    """Intrinsic ``tile(data, r0, xq, xd, t0, out)``: ``out[t, r]`` for the weight rows
    ``r0 .. r0+RM-1`` and activation rows ``t0 .. t0+RN-1`` (indices past the end are
    clamped to the last row, so a partial tile recomputes and rewrites valid elements)."""
    bpb = BLOCK_BYTES[kind]
    weights = _WEIGHTS[kind]

    def impl(typingctx, data, r0, xq, xd, t0, out):
        ok = (
            isinstance(data, types.Array) and data.ndim == 2 and data.dtype == types.uint8
            and isinstance(xq, types.Array) and xq.ndim == 2 and xq.dtype == types.int8
            and isinstance(xd, types.Array) and xd.ndim == 2 and xd.dtype == types.float32
            and isinstance(out, types.Array) and out.ndim == 2 and out.dtype == types.float32
            and isinstance(r0, types.Integer) and isinstance(t0, types.Integer)
        )
        if not ok:
            return None
        sig = types.void(data, r0, xq, xd, t0, out)

        def codegen(context, builder, sig, args):
            b = builder
            i8p = _I8.as_pointer()
            arrs = [context.make_array(sig.args[i])(context, b, value=args[i])
                    for i in (0, 2, 3, 5)]
            da, qa, ma, oa = arrs
            rows, _ = cgutils.unpack_tuple(b, da.shape)
            T, K = cgutils.unpack_tuple(b, qa.shape)
            ds0 = cgutils.unpack_tuple(b, da.strides)[0]
            qs0 = cgutils.unpack_tuple(b, qa.strides)[0]
            ms0 = cgutils.unpack_tuple(b, ma.strides)[0]
            os0 = cgutils.unpack_tuple(b, oa.strides)[0]
            r0v = context.cast(b, args[1], sig.args[1], types.intp)
            t0v = context.cast(b, args[4], sig.args[4], types.intp)
            one = ir.Constant(r0v.type, 1)

            def clamp(base, k, n):
                i = b.add(base, ir.Constant(base.type, k))
                last = b.sub(n, one)
                return b.select(b.icmp_signed("<", i, n), i, last)

            ridx = [clamp(r0v, i, rows) for i in range(RM)]
            tidx = [clamp(t0v, j, T) for j in range(RN)]
            dbase = b.bitcast(da.data, i8p)
            qbase = b.bitcast(qa.data, i8p)
            mbase = b.bitcast(ma.data, i8p)
            obase = b.bitcast(oa.data, i8p)
            prow = [b.gep(dbase, [b.mul(r, ds0)]) for r in ridx]
            xrow = [b.gep(qbase, [b.mul(t, qs0)]) for t in tidx]
            drow = [b.bitcast(b.gep(mbase, [b.mul(t, ms0)]), _F.as_pointer()) for t in tidx]
            v8f = _v(_F, 8)
            zero8 = ir.Constant(v8f, [ir.Constant(_F, 0.0)] * 8)
            accs = [[cgutils.alloca_once_value(b, zero8) for _ in range(RN)] for _ in range(RM)]
            for row in accs:
                for a in row:
                    b.store(zero8, a)
            nb = b.udiv(K, ir.Constant(K.type, QK))
            with cgutils.for_range(b, nb) as loop:
                blk = loop.index
                woff = b.mul(blk, ir.Constant(blk.type, bpb))
                xoff = b.mul(blk, ir.Constant(blk.type, QK))
                xs = [_load_vec(b, b.gep(p, [xoff]), _I8, 32) for p in xrow]
                xds = [_bcast8(b, b.load(b.gep(p, [blk]))) for p in drow]
                for i in range(RM):
                    pb = b.gep(prow[i], [woff])
                    _prefetch_ir(b, b.gep(pb, [ir.Constant(_I64, PREFETCH_BYTES)]))
                    wp = _prep_w(b, weights(b, pb))
                    h = b.load(b.bitcast(pb, _I16.as_pointer()), align=1)
                    dw = _bcast8(b, b.fpext(b.bitcast(h, ir.HalfType()), _F))
                    for j in range(RN):
                        lanes = b.sitofp(_dot(b, wp, xs[j]), v8f)
                        sv = b.fmul(dw, xds[j])  # d_w * d_x in every lane
                        acc = accs[i][j]
                        b.store(_call(b, "llvm.fma.v8f32", v8f, [sv, lanes, b.load(acc)]), acc)
            for i in range(RM):
                for j in range(RN):
                    res = _lane_tree(b, b.load(accs[i][j]))
                    off = b.add(b.mul(tidx[j], os0), b.mul(ridx[i], ir.Constant(os0.type, 4)))
                    b.store(res, b.bitcast(b.gep(obase, [off]), _F.as_pointer()))
            return context.get_dummy_value()

        return sig, codegen

    impl.__name__ = impl.__qualname__ = f"_tile_{kind}_{RM}x{RN}"
    return intrinsic(impl)


# Tile shapes: decode (one activation row) streams RM1 weight rows at once; batches use
# RM x RN tiles, the remaining activation rows (T % RN) one at a time.
RM1 = 4
RM, RN = 4, 4
_CHUNK = 64  # weight rows per parallel work item (a multiple of RM and RM1)

_tile_q8_0_1 = _make_tile("q8_0", RM1, 1)
_tile_q5_0_1 = _make_tile("q5_0", RM1, 1)
_tile_q8_0_n = _make_tile("q8_0", RM, RN)
_tile_q5_0_n = _make_tile("q5_0", RM, RN)


@njit(inline="always", cache=True)
def _rows_tiles(kind, data, xq, xd, out, lo, hi, t_start, nfull, T):
    """Weight rows lo..hi against activation rows t_start..T: 4x4 tiles up to nfull, then
    one activation row at a time."""
    for t0 in range(t_start, nfull, RN):
        for r0 in range(lo, hi, RM):
            if kind == 0:
                _tile_q8_0_n(data, r0, xq, xd, t0, out)
            else:
                _tile_q5_0_n(data, r0, xq, xd, t0, out)
    for t0 in range(nfull, T):
        for r0 in range(lo, hi, RM1):
            if kind == 0:
                _tile_q8_0_1(data, r0, xq, xd, t0, out)
            else:
                _tile_q5_0_1(data, r0, xq, xd, t0, out)


@njit(parallel=True, cache=True)
def _matmul_kernel(data, kind, xq, xd, out):
    rows = data.shape[0]
    T = xq.shape[0]
    nfull = T // RN * RN
    for ch in prange((rows + _CHUNK - 1) // _CHUNK):
        lo = ch * _CHUNK
        hi = min(rows, lo + _CHUNK)
        _rows_tiles(kind, data, xq, xd, out, lo, hi, 0, nfull, T)


# ----------------------------------------------------------------------------------------
# Batches on AVX512-VNNI hosts: weights pre-decoded once per row chunk, 512-bit tiles
# ----------------------------------------------------------------------------------------
#
# The lane integers are computed as ``dot(u, x) - o * sum4(x)`` with ``u = w + o`` unsigned
# (``o`` = 16 for q5_0: the 5-bit quant itself; 128 for q8_0) -- exact, so the same lane values
# as above -- which lets ``vpdpbusd`` take the weights as its unsigned operand with no sign
# trick. One zmm holds the 8 lanes of two activation rows for one weight row; the float steps
# (``s = d_w * d_x``, ``fma(s, float(lane), acc)``, the 8-lane tree) are per element as before.

_OFFSET = {"q8_0": 128, "q5_0": 16}


def _detect_512() -> bool:
    if ISA != "vnni" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        from llvmlite import binding as llvm

        f = llvm.get_host_cpu_features()
    except Exception:  # pragma: no cover
        return False
    if os.environ.get("TORCHLESS_GGML_Q8_NO512", "").strip() not in ("", "0"):
        return False
    return bool(f.get("avx512vnni", False) and f.get("avx512bw", False)
                and f.get("avx512f", False))


#: whether batches use the 512-bit path (results do not depend on it)
USE512 = _detect_512()


def _make_decode(kind: str, RM: int):
    """Intrinsic ``decode(data, r, wg, g, i)``: row ``r`` of the GGUF blocks into slot ``i`` of
    row group ``wg[g]``, laid out by block: per block the ``RM`` rows' unsigned quants
    (``w + offset``, 32 bytes each), then their ``RM`` float32 scales."""
    bpb = BLOCK_BYTES[kind]
    gb = RM * (QK + 4)  # bytes of one block of a row group

    def impl(typingctx, data, r, wg, g, i):
        ok = (
            isinstance(data, types.Array) and data.ndim == 2 and data.dtype == types.uint8
            and isinstance(wg, types.Array) and wg.ndim == 2 and wg.dtype == types.uint8
            and isinstance(r, types.Integer) and isinstance(g, types.Integer)
            and isinstance(i, types.Integer)
        )
        if not ok:
            return None
        sig = types.void(data, r, wg, g, i)

        def codegen(context, builder, sig, args):
            b = builder
            i8p = _I8.as_pointer()
            da = context.make_array(sig.args[0])(context, b, value=args[0])
            ga = context.make_array(sig.args[2])(context, b, value=args[2])
            _, nbytes = cgutils.unpack_tuple(b, da.shape)
            ds0 = cgutils.unpack_tuple(b, da.strides)[0]
            gs0 = cgutils.unpack_tuple(b, ga.strides)[0]
            rv = context.cast(b, args[1], sig.args[1], types.intp)
            gv = context.cast(b, args[3], sig.args[3], types.intp)
            iv = context.cast(b, args[4], sig.args[4], types.intp)
            src = b.gep(b.bitcast(da.data, i8p), [b.mul(rv, ds0)])
            dst = b.gep(b.bitcast(ga.data, i8p), [b.mul(gv, gs0)])
            qdst = b.gep(dst, [b.mul(iv, ir.Constant(iv.type, QK))])
            sdst = b.gep(dst, [b.add(b.mul(iv, ir.Constant(iv.type, 4)),
                                     ir.Constant(iv.type, RM * QK))])
            nb = b.udiv(nbytes, ir.Constant(nbytes.type, bpb))
            with cgutils.for_range(b, nb) as loop:
                blk = loop.index
                pb = b.gep(src, [b.mul(blk, ir.Constant(blk.type, bpb))])
                goff = b.mul(blk, ir.Constant(blk.type, gb))
                u = b.add(_WEIGHTS[kind](b, pb), _splat(_I8, 32, _OFFSET[kind] & 0xFF))
                b.store(u, b.bitcast(b.gep(qdst, [goff]), _v(_I8, 32).as_pointer()), align=1)
                h = b.load(b.bitcast(pb, _I16.as_pointer()), align=1)
                b.store(b.fpext(b.bitcast(h, ir.HalfType()), _F),
                        b.bitcast(b.gep(sdst, [goff]), _F.as_pointer()), align=1)
            return context.get_dummy_value()

        return sig, codegen

    impl.__name__ = impl.__qualname__ = f"_decode_{kind}_{RM}"
    return intrinsic(impl)


def _make_pack(off: int, NP: int):
    """Intrinsic ``pack(xq, xd, q, ap)``: activation rows ``2q, 2q+1`` into slot ``q % NP`` of
    pair group ``ap[q // NP]``, laid out by block: per block and slot 192 bytes, the two rows'
    quants (64 bytes), the lanes' ``-off * sum4(x)`` (16 int32) and the two scales (8 each)."""

    def impl(typingctx, xq, xd, q, ap):
        ok = (
            isinstance(xq, types.Array) and xq.ndim == 2 and xq.dtype == types.int8
            and isinstance(xd, types.Array) and xd.ndim == 2 and xd.dtype == types.float32
            and isinstance(ap, types.Array) and ap.ndim == 2 and ap.dtype == types.uint8
            and isinstance(q, types.Integer)
        )
        if not ok:
            return None
        sig = types.void(xq, xd, q, ap)

        def codegen(context, builder, sig, args):
            b = builder
            i8p = _I8.as_pointer()
            qa = context.make_array(sig.args[0])(context, b, value=args[0])
            ma = context.make_array(sig.args[1])(context, b, value=args[1])
            aa = context.make_array(sig.args[3])(context, b, value=args[3])
            _, K = cgutils.unpack_tuple(b, qa.shape)
            qs0 = cgutils.unpack_tuple(b, qa.strides)[0]
            ms0 = cgutils.unpack_tuple(b, ma.strides)[0]
            as0 = cgutils.unpack_tuple(b, aa.strides)[0]
            qv = context.cast(b, args[2], sig.args[2], types.intp)
            c = lambda k: ir.Constant(qv.type, k)  # noqa: E731
            t0 = b.mul(qv, c(2))
            t1 = b.add(t0, c(1))
            x0p = b.gep(b.bitcast(qa.data, i8p), [b.mul(t0, qs0)])
            x1p = b.gep(b.bitcast(qa.data, i8p), [b.mul(t1, qs0)])
            d0p = b.bitcast(b.gep(b.bitcast(ma.data, i8p), [b.mul(t0, ms0)]), _F.as_pointer())
            d1p = b.bitcast(b.gep(b.bitcast(ma.data, i8p), [b.mul(t1, ms0)]), _F.as_pointer())
            g = b.sdiv(qv, c(NP))
            slot = b.sub(qv, b.mul(g, c(NP)))
            dst = b.gep(b.bitcast(aa.data, i8p), [b.add(b.mul(g, as0), b.mul(slot, c(192)))])
            v16i = _v(_I32, 16)
            v16f = _v(_F, 16)
            izero = _splat(_I32, 16, 0)
            offv = b.bitcast(_splat(_I8, 64, off & 0xFF), v16i)
            nb = b.udiv(K, ir.Constant(K.type, QK))
            with cgutils.for_range(b, nb) as loop:
                blk = loop.index
                xoff = b.mul(blk, ir.Constant(blk.type, QK))
                base = b.gep(dst, [b.mul(blk, ir.Constant(blk.type, NP * 192))])
                x0 = _load_vec(b, b.gep(x0p, [xoff]), _I8, 32)
                x1 = _load_vec(b, b.gep(x1p, [xoff]), _I8, 32)
                xv = _shuf(b, x0, x1, range(64))
                b.store(xv, b.bitcast(base, xv.type.as_pointer()), align=1)
                osum = _call(b, "llvm.x86.avx512.vpdpbusd.512", v16i,
                             [izero, offv, b.bitcast(xv, v16i)])
                b.store(b.sub(izero, osum), b.bitcast(_gep(b, base, 64), v16i.as_pointer()),
                        align=1)
                d0 = b.load(b.gep(d0p, [blk]))
                d1 = b.load(b.gep(d1p, [blk]))
                dv = b.insert_element(ir.Constant(v16f, None), d0, ir.Constant(_I32, 0))
                dv = b.insert_element(dv, d1, ir.Constant(_I32, 8))
                dv = _shuf(b, dv, ir.Constant(v16f, None), [0] * 8 + [8] * 8)
                b.store(dv, b.bitcast(_gep(b, base, 128), v16f.as_pointer()), align=1)
            return context.get_dummy_value()

        return sig, codegen

    impl.__name__ = impl.__qualname__ = f"_pack512_{off}_{NP}"
    return intrinsic(impl)


def _make_tile512(RM: int, NP: int):
    """Intrinsic ``tile(wg, g, ap, h, out, r0, rows)``: ``out[t, r]`` for the ``RM`` rows of the
    decoded row group ``wg[g]`` (rows ``r0 ..``, those past ``rows`` are copies of the last
    and not stored) and the ``2 * NP`` activation rows of pair group ``ap[h]``."""

    def impl(typingctx, wg, g, ap, h, out, r0, rows):
        ok = (
            isinstance(wg, types.Array) and wg.ndim == 2 and wg.dtype == types.uint8
            and isinstance(ap, types.Array) and ap.ndim == 2 and ap.dtype == types.uint8
            and isinstance(out, types.Array) and out.ndim == 2 and out.dtype == types.float32
            and isinstance(g, types.Integer) and isinstance(h, types.Integer)
            and isinstance(r0, types.Integer) and isinstance(rows, types.Integer)
        )
        if not ok:
            return None
        sig = types.void(wg, g, ap, h, out, r0, rows)

        def codegen(context, builder, sig, args):
            b = builder
            i8p = _I8.as_pointer()
            ga = context.make_array(sig.args[0])(context, b, value=args[0])
            aa = context.make_array(sig.args[2])(context, b, value=args[2])
            oa = context.make_array(sig.args[4])(context, b, value=args[4])
            _, gbytes = cgutils.unpack_tuple(b, ga.shape)
            gs0 = cgutils.unpack_tuple(b, ga.strides)[0]
            as0 = cgutils.unpack_tuple(b, aa.strides)[0]
            os0 = cgutils.unpack_tuple(b, oa.strides)[0]
            gv, hv, r0v, rowsv = [context.cast(b, args[k], sig.args[k], types.intp)
                                  for k in (1, 3, 5, 6)]
            wbase = b.gep(b.bitcast(ga.data, i8p), [b.mul(gv, gs0)])
            abase = b.gep(b.bitcast(aa.data, i8p), [b.mul(hv, as0)])
            obase = b.bitcast(oa.data, i8p)
            v16f = _v(_F, 16)
            v16i = _v(_I32, 16)
            zero16 = ir.Constant(v16f, [ir.Constant(_F, 0.0)] * 16)
            accs = [[cgutils.alloca_once_value(b, zero16) for _ in range(NP)] for _ in range(RM)]
            for row in accs:
                for a in row:
                    b.store(zero16, a)
            gb = RM * (QK + 4)
            nb = b.udiv(gbytes, ir.Constant(gbytes.type, gb))
            with cgutils.for_range(b, nb) as loop:
                blk = loop.index
                wp = b.gep(wbase, [b.mul(blk, ir.Constant(blk.type, gb))])
                xp = b.gep(abase, [b.mul(blk, ir.Constant(blk.type, NP * 192))])
                xs = [b.bitcast(_load_vec(b, _gep(b, xp, 192 * p), _I8, 64), v16i)
                      for p in range(NP)]
                dxs = [b.load(b.bitcast(_gep(b, xp, 192 * p + 128), v16f.as_pointer()), align=1)
                       for p in range(NP)]
                for i in range(RM):
                    w = _load_vec(b, _gep(b, wp, QK * i), _I8, 32)
                    wv = b.bitcast(_shuf(b, w, w, list(range(32)) * 2), v16i)
                    dw = b.load(b.bitcast(_gep(b, wp, RM * QK + 4 * i), _F.as_pointer()), align=1)
                    dwv = b.insert_element(ir.Constant(v16f, None), dw, ir.Constant(_I32, 0))
                    dwv = _shuf(b, dwv, ir.Constant(v16f, None), [0] * 16)
                    for p in range(NP):
                        c = b.load(b.bitcast(_gep(b, xp, 192 * p + 64), v16i.as_pointer()),
                                   align=1)
                        lanes = _call(b, "llvm.x86.avx512.vpdpbusd.512", v16i, [c, wv, xs[p]])
                        sv = b.fmul(dwv, dxs[p])  # d_w * d_x, per activation row
                        acc = accs[i][p]
                        b.store(_call(b, "llvm.fma.v16f32", v16f,
                                      [sv, b.sitofp(lanes, v16f), b.load(acc)]), acc)
            t0 = b.mul(hv, ir.Constant(hv.type, 2 * NP))
            for i in range(RM):
                r = b.add(r0v, ir.Constant(r0v.type, i))
                with b.if_then(b.icmp_signed("<", r, rowsv)):
                    for p in range(NP):
                        a = b.load(accs[i][p])
                        for hh in range(2):
                            res = _lane_tree(b, _shuf(b, a, a, range(8 * hh, 8 * hh + 8)))
                            t = b.add(t0, ir.Constant(t0.type, 2 * p + hh))
                            o = b.add(b.mul(t, os0), b.mul(r, ir.Constant(os0.type, 4)))
                            b.store(res, b.bitcast(b.gep(obase, [o]), _F.as_pointer()))
            return context.get_dummy_value()

        return sig, codegen

    impl.__name__ = impl.__qualname__ = f"_tile512_{RM}x{NP}"
    return intrinsic(impl)


RM2, RN2 = 4, 8  # 4 weight rows x 4 activation-row pairs: 16 zmm accumulators
_NP2 = RN2 // 2
_CHUNK2 = 64  # weight rows decoded per parallel work item (a multiple of RM2)

_decode_q8_0 = _make_decode("q8_0", RM2)
_decode_q5_0 = _make_decode("q5_0", RM2)
_pack512_q8_0 = _make_pack(_OFFSET["q8_0"], _NP2)
_pack512_q5_0 = _make_pack(_OFFSET["q5_0"], _NP2)
_tile512 = _make_tile512(RM2, _NP2)


@njit(parallel=True, cache=True)
def _matmul_kernel512(data, kind, xq, xd, out):
    rows = data.shape[0]
    T, K = xq.shape
    nb = K // QK
    nfull2 = T // RN2 * RN2
    nfull = nfull2 + (T - nfull2) // RN * RN
    ngrp = nfull2 // RN2
    ap = np.empty((ngrp, nb * _NP2 * 192), np.uint8)
    for q in range(ngrp * _NP2):  # cheap: serial, so that the call has one parallel region
        if kind == 0:
            _pack512_q8_0(xq, xd, q, ap)
        else:
            _pack512_q5_0(xq, xd, q, ap)
    for ch in prange((rows + _CHUNK2 - 1) // _CHUNK2):
        lo = ch * _CHUNK2
        hi = min(rows, lo + _CHUNK2)
        ng = (hi - lo + RM2 - 1) // RM2
        wg = np.empty((ng, nb * RM2 * (QK + 4)), np.uint8)
        for g in range(ng):
            for i in range(RM2):
                r = min(lo + g * RM2 + i, hi - 1)
                if kind == 0:
                    _decode_q8_0(data, r, wg, g, i)
                else:
                    _decode_q5_0(data, r, wg, g, i)
        for h in range(ngrp):
            for g in range(ng):
                _tile512(wg, g, ap, h, out, lo + g * RM2, hi)
        _rows_tiles(kind, data, xq, xd, out, lo, hi, nfull2, nfull, T)


# ----------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------


def _weights(raw, kind):
    if kind not in BLOCK_BYTES:
        raise ValueError(f"kind must be one of {sorted(BLOCK_BYTES)}, got {kind!r}")
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] % BLOCK_BYTES[kind]:
        raise ValueError(f"{kind} weights must be uint8 [rows, k*{BLOCK_BYTES[kind]}], "
                         f"got {raw.dtype} {raw.shape}")
    if type(raw) is not np.ndarray or not raw.flags.c_contiguous:
        raw = np.ascontiguousarray(raw).view(np.ndarray)
    if raw.flags.writeable:  # one Numba type (read-only) for every caller
        raw = raw.view()
        raw.flags.writeable = False
    return raw


def matmul_q8_family_act(raw: np.ndarray, kind: str, xq: np.ndarray, xd: np.ndarray,
                         out: np.ndarray | None = None) -> np.ndarray:
    """As :func:`matmul_q8_family` with the activations already quantized
    (``(xq, xd) = quantize_act_q8_0(x)``; e.g. one quantization shared by Q, K and V)."""
    raw = _weights(raw, kind)
    rows = raw.shape[0]
    K = raw.shape[1] // BLOCK_BYTES[kind] * QK
    if xq.dtype != np.int8 or xq.ndim != 2 or xq.shape[1] != K or not xq.flags.c_contiguous:
        raise ValueError(f"xq must be C-contiguous int8 [T, {K}], got {xq.dtype} {xq.shape}")
    T = xq.shape[0]
    if xd.dtype != np.float32 or xd.shape != (T, K // QK) or not xd.flags.c_contiguous:
        raise ValueError(f"xd must be C-contiguous float32 [{T}, {K // QK}]")
    if out is None:
        out = np.empty((T, rows), np.float32)
    elif (out.dtype != np.float32 or out.shape != (T, rows) or not out.flags.c_contiguous
          or not out.flags.writeable):
        raise ValueError(f"out must be a writeable C-contiguous float32 [{T}, {rows}]")
    if T and rows:
        if not xq.flags.writeable or not xd.flags.writeable:  # keep one specialisation
            xq, xd = xq.copy(), xd.copy()
        if USE512 and T >= RN2:
            _matmul_kernel512(raw, _KIND_ID[kind], xq, xd, out)
        else:
            _matmul_kernel(raw, _KIND_ID[kind], xq, xd, out)
    return out


def matmul_q8_family(raw: np.ndarray, kind: str, x: np.ndarray,
                     out: np.ndarray | None = None) -> np.ndarray:
    """``dst[t, r] = W[r] . x[t]`` for a Q5_0 / Q8_0 weight ``raw`` (uint8 [rows, bytes_per_row],
    GGUF blocks) and float32 ``x [T, K]``, bit-identical to llama.cpp's MUL_MAT on this x86
    build for every ``T`` (see the module docstring for the order of operations). A 1-D ``x``
    is one row and gives a 1-D result."""
    x = np.asarray(x)
    one = x.ndim == 1
    xq, xd = quantize_act_q8_0(x)
    res = matmul_q8_family_act(raw, kind, xq, xd, out)
    return res[0] if one else res
