"""Batched decode: B sequences, one token each, in one pass through a layer.

``linear_rows(w, X)`` multiplies a weight by ``X [B, in]`` reading each weight row from
memory once for all B rows (the row stays in cache while every activation row meets it).
Every ``(weight row, activation row)`` dot product is computed by the same per-row code as
the decode product (:func:`kernels.matmul.matvec` and the 8-bit activation kernels), in the
same order, whatever B is and wherever the row sits in the batch: a sequence gets the same
bits in a batch as alone.

``attention_slots`` writes each row's key/value into its own KV cache (each sequence has its
own cache, capacity and position) and attends, all rows and heads in one compiled call; the
caches reach the kernel as addresses so one specialisation serves any B.
"""
import weakref

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..weights import Weight
from . import matmul as km
from . import ops as ko
from . import quant as kq
from . import quant_q8 as q8
from .bits import _lane_tree

# ---- float weights ---------------------------------------------------------------------------
# Tiles of 4 weight rows x NB activation rows: each weight vector load feeds NB rows. Every
# (weight row, activation row) pair keeps its own 16-lane accumulator, updated with the same
# fma sequence as kernels.matmul._rows4 and summed with the same lane tree, so the tile size
# and a row's place in it cannot change its bits.

NB = 4


def _make_rows4xnb(kind):
    """An intrinsic ``f(w, r, X, b0, res)``: ``res[4 * j + k] = sum_c w[r + k, c] *
    X[b0 + j, c]`` for k, j < 4 over the first ``cols // 16 * 16`` columns."""
    dtype = types.float32 if kind == "f32" else types.uint16

    def impl(typingctx, w, r, X, b0, res):
        if not (isinstance(w, types.Array) and w.ndim == 2 and w.dtype == dtype
                and isinstance(X, types.Array) and X.ndim == 2 and X.dtype == types.float32
                and isinstance(r, types.Integer) and isinstance(b0, types.Integer)
                and isinstance(res, types.Array) and res.dtype == types.float32):
            return None
        sig = types.void(w, r, X, b0, res)

        def codegen(context, builder, sig, args):
            f32 = ir.FloatType()
            L = km._LANES
            vf = ir.VectorType(f32, L)
            i8p = ir.IntType(8).as_pointer()
            wa = context.make_array(sig.args[0])(context, builder, value=args[0])
            cols = cgutils.unpack_tuple(builder, wa.shape)[1]
            stride = cgutils.unpack_tuple(builder, wa.strides)[0]
            r = context.cast(builder, args[1], sig.args[1], types.intp)
            base = builder.bitcast(wa.data, i8p)
            rows = [builder.bitcast(builder.gep(base, [builder.mul(
                builder.add(r, ir.Constant(r.type, k)), stride)]), wa.data.type)
                for k in range(4)]
            xa = context.make_array(sig.args[2])(context, builder, value=args[2])
            xstride = cgutils.unpack_tuple(builder, xa.strides)[0]
            b0 = context.cast(builder, args[3], sig.args[3], types.intp)
            xbase = builder.bitcast(xa.data, i8p)
            xrows = [builder.bitcast(builder.gep(xbase, [builder.mul(
                builder.add(b0, ir.Constant(b0.type, j)), xstride)]), xa.data.type)
                for j in range(NB)]
            zero = ir.Constant(vf, [ir.Constant(f32, 0.0)] * L)
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(4)]
                    for _ in range(NB)]
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vf, [vf, vf, vf]), f"llvm.fma.v{L}f32")
            n = builder.udiv(cols, ir.Constant(cols.type, L))
            with cgutils.for_range(builder, n) as loop:
                c = builder.mul(loop.index, ir.Constant(cols.type, L))
                wvs = []
                for k in range(4):
                    p = builder.gep(rows[k], [c])
                    q8._prefetch_ir(builder, builder.gep(builder.bitcast(p, i8p), [
                        ir.Constant(ir.IntType(64), km.FLOAT_PREFETCH_BYTES)]))
                    if kind == "f32":
                        wv = q8._load(builder, p, f32, L)
                    else:
                        u = q8._load(builder, p, ir.IntType(16), L)
                        if kind == "bf16":
                            wide = builder.zext(u, ir.VectorType(ir.IntType(32), L))
                            wv = builder.bitcast(builder.shl(wide, ir.Constant(
                                wide.type, [ir.Constant(ir.IntType(32), 16)] * L)), vf)
                        else:
                            wv = builder.fpext(builder.bitcast(
                                u, ir.VectorType(ir.HalfType(), L)), vf)
                    wvs.append(wv)
                for j in range(NB):
                    xv = q8._load(builder, builder.gep(xrows[j], [c]), f32, L)
                    for k in range(4):
                        builder.store(builder.call(fma, [wvs[k], xv,
                                                         builder.load(accs[j][k])]),
                                      accs[j][k])
            pr = context.make_array(sig.args[4])(context, builder, value=args[4]).data
            for j in range(NB):
                for k in range(4):
                    builder.store(_lane_tree(builder, builder.load(accs[j][k])),
                                  builder.gep(pr, [ir.Constant(ir.IntType(32), 4 * j + k)]))
            return context.get_dummy_value()

        return sig, codegen

    impl.__name__ = impl.__qualname__ = f"_rows4x{NB}_{kind}"
    return intrinsic(impl)


_rows4xnb_f32 = _make_rows4xnb("f32")
_rows4xnb_bf16 = _make_rows4xnb("bf16")
_rows4xnb_f16 = _make_rows4xnb("f16")


@njit(inline="always", cache=True)
def _matmul_rows_float(w, X, out, kind):
    rows, cols = w.shape
    B = X.shape[0]
    c0 = cols - cols % km._LANES
    for g in prange(rows // 4):
        r = 4 * g
        res = np.empty(4, np.float32)
        tile = np.empty(4 * NB, np.float32)
        for b0 in range(0, B - B % NB, NB):
            if kind == 0:
                _rows4xnb_f32(w, r, X, b0, tile)
            elif kind == 1:
                _rows4xnb_bf16(w, r, X, b0, tile)
            else:
                _rows4xnb_f16(w, r, X, b0, tile)
            for j in range(NB):
                x = X[b0 + j]
                for k in range(4):
                    acc = tile[4 * j + k]
                    for c in range(c0, cols):
                        acc += km._widen(w[r + k, c], kind) * x[c]
                    out[b0 + j, r + k] = acc
        for b in range(B - B % NB, B):
            x = X[b]
            if kind == 0:
                km._rows4_f32(w, r, x, res)
            elif kind == 1:
                km._rows4_bf16(w, r, x, res)
            else:
                km._rows4_f16(w, r, x, res)
            for k in range(4):
                acc = res[k]
                for c in range(c0, cols):
                    acc += km._widen(w[r + k, c], kind) * x[c]
                out[b, r + k] = acc
    for r in range(rows - rows % 4, rows):
        for b in range(B):
            acc = np.float32(0.0)
            for c in range(cols):
                acc += km._widen(w[r, c], kind) * X[b, c]
            out[b, r] = acc


@njit(parallel=True, cache=True)
def matmul_rows_f32(w, X, out):
    """``out[b] = W @ X[b]``, each row exactly as :func:`kernels.matmul.matvec_f32`."""
    _matmul_rows_float(w, X, out, 0)


@njit(parallel=True, cache=True)
def matmul_rows_bf16(w, X, out):
    _matmul_rows_float(w, X, out, 1)


@njit(parallel=True, cache=True)
def matmul_rows_f16(w, X, out):
    _matmul_rows_float(w, X, out, 2)


_FLOAT = {"f32": matmul_rows_f32, "bf16": matmul_rows_bf16, "f16": matmul_rows_f16}

# ---- block-quantized weights, 8-bit activations ----------------------------------------------


@njit(cache=True)
def quantize_rows_q8_0(X, xd, xq):
    """Each row of ``X [B, n]`` to q8_0 activations (the x86 quantizer the decode uses)."""
    for b in range(X.shape[0]):
        q8._q8_0_act_x86_into(X[b], xd[b], xq[b])


@njit(cache=True)
def quantize_rows_q8_k(X, xd, xq, bsums):
    """Each row of ``X [B, n]`` to q8_K activations."""
    for b in range(X.shape[0]):
        q8._q8_k_act_into(X[b], xd[b], xq[b], bsums[b])


def _is2d(a, dtype):
    return isinstance(a, types.Array) and a.ndim == 2 and a.dtype == dtype


def _tile_sig(u0, u1, XQ, XD, XST, b0, res):
    """The signature of a 32-element tile intrinsic, or None for other argument types."""
    if not (isinstance(u0, types.Array) and u0.ndim == 1 and u0.dtype == types.uint8
            and isinstance(u1, types.Array) and u1.ndim == 1 and u1.dtype == types.uint8
            and _is2d(XQ, types.int8) and _is2d(XD, types.float32)
            and _is2d(XST, types.float32) and isinstance(b0, types.Integer)
            and isinstance(res, types.Array) and res.dtype == types.float32):
        return None
    return types.void(u0, u1, XQ, XD, XST, b0, res)


def _tile_ptrs(context, builder, sig, args, bpb, nb):
    """A tile intrinsic's pointers: the two weight rows, their block count, the ``nb``
    activation rows of XQ and XD from row ``b0``, and (pointer to ``XST[0, b0]``, XST's row
    stride in bytes)."""
    i8p = ir.IntType(8).as_pointer()
    a0 = context.make_array(sig.args[0])(context, builder, value=args[0])
    p1 = q8._data_ptr(context, builder, sig, args, 1)
    nbytes = cgutils.unpack_tuple(builder, a0.shape)[0]
    nblk = builder.udiv(nbytes, ir.Constant(nbytes.type, bpb))
    b0v = context.cast(builder, args[5], sig.args[5], types.intp)
    zero = ir.Constant(b0v.type, 0)
    xrows = q8._rows_ptrs(context, builder, sig.args[2], args[2], b0v, zero, nb)
    drows = q8._rows_ptrs(context, builder, sig.args[3], args[3], b0v, zero, nb)
    arr = context.make_array(sig.args[4])(context, builder, value=args[4])
    tcol = (builder.gep(builder.bitcast(arr.data, i8p), [builder.mul(
        b0v, ir.Constant(b0v.type, 4))]), cgutils.unpack_tuple(builder, arr.strides)[0])
    return a0.data, p1, nblk, xrows, drows, tcol


def _halves(builder, a, b, n):
    """<2n x float> (a x n, b x n)."""
    f32 = ir.FloatType()
    v = builder.insert_element(ir.Constant(q8._vec(f32, 2), None), a, ir.Constant(q8._I32, 0))
    v = builder.insert_element(v, b, ir.Constant(q8._I32, 1))
    return q8._shuf(builder, v, v, [0] * n + [1] * n)


def _tile_block(builder, ptrs, off, weights, with_min):
    """The block at byte ``off`` of each weight row: (quants, scales d, mins m or none)."""
    ws, dws, mws = [], [], []
    for p in ptrs:
        pb = builder.gep(p, [off])
        q8._prefetch_ir(builder, builder.gep(pb, [ir.Constant(q8._I64, q8.PREFETCH_BYTES)]))
        ws.append(weights(builder, pb))
        dws.append(q8._half(builder, pb))
        if with_min:
            mws.append(q8._half(builder, q8._at(builder, pb, 2)))
    return ws, dws, mws


def _tile_intrinsic(name, codegen):
    """An intrinsic ``f(u0, u1, XQ, XD, XST, b0, res)`` generated by ``codegen``."""

    def impl(typingctx, u0, u1, XQ, XD, XST, b0, res):
        sig = _tile_sig(u0, u1, XQ, XD, XST, b0, res)
        return None if sig is None else (sig, codegen)

    impl.__name__ = impl.__qualname__ = name
    return intrinsic(impl)


def _make_rows2xnb(weights, bpb, name, signed=True, with_min=False):
    """An intrinsic ``f(u0, u1, XQ, XD, XST, b0, res)``: ``res[2 * j + k]`` = the dot product
    of weight row ``u_k`` (bytes of ``bpb``-byte blocks) with activation row ``b0 + j``
    (``XQ [B, n]`` int8, ``XD [B, n/32]``; when ``with_min`` the q8_1 sums transposed,
    ``XST [n/32, B]``), j < NB: the weight blocks are loaded and unpacked once for NB
    activation rows; each pair's arithmetic is that of ``quant_q8._make_rows2`` with the same
    ``weights``, ``signed`` and ``with_min`` (the same float operations per lane).

    The pair's block scale ``d_w * d_x`` is multiplied as a vector of 8 equal lanes (a
    broadcast of ``d_w`` per weight block, ``d_x`` broadcast from memory), not broadcast
    from a scalar product per pair: on x86 a register broadcast is a shuffle, and shuffles
    have one port where the multiply has two. The 2 x NB min terms are one vector multiply."""
    I8, I32 = q8._I8, q8._I32
    assert NB == 4  # one <8 x float> holds the 2 x NB scales: lane 4k + j

    def codegen(context, builder, sig, args):
        f32 = ir.FloatType()
        v8f = q8._vec(f32, 8)
        p0, p1, nb, xrows, drows, tcol = _tile_ptrs(context, builder, sig, args, bpb, NB)

        # Signed weights with VNNI: vpdpbusd multiplies unsigned by signed bytes. The
        # one-row kernels use ggml's sign trick (|w| . x sign(w), a sign op per pair);
        # here the activations are offset instead, x + 128 (one xor per activation row,
        # shared by both weight rows), and the products start from -128 * sum(w) per lane
        # group (one vpdpbusd per weight block, shared by the NB rows): the same integers.
        # (_dot4 is that one vpdpbusd here: unsigned x + 128 times signed w, plus acc.)
        offset = signed and q8.ISA == "vnni"
        c128 = q8._splat_const(I8, 32, -128)  # the byte 0x80

        def four(col, b):  # <8 x float> (v[b0 .. b0+3], v[b0 .. b0+3]) of block b
            base, st0 = col
            v = q8._load(builder, builder.gep(base, [builder.mul(b, st0)]), f32, 4)
            return q8._shuf(builder, v, v, [0, 1, 2, 3] * 2)

        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(v8f, [v8f, v8f, v8f]), "llvm.fma.v8f32")
        zero = ir.Constant(v8f, [ir.Constant(f32, 0.0)] * 8)
        accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(2)]
                for _ in range(NB)]
        mins = cgutils.alloca_once_value(builder, zero)  # lane 4k + j

        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            off = builder.mul(b, ir.Constant(b.type, bpb))
            ws, dws, mws = _tile_block(builder, (p0, p1), off, weights, with_min)
            dwv = [q8._splat(builder, d, 8) for d in dws]
            if with_min:  # lane 4k + j: m_w(k) * s_x(j), as the one-row kernel per pair
                builder.store(builder.fadd(builder.load(mins), builder.fmul(
                    _halves(builder, mws[0], mws[1], 4), four(tcol, b))), mins)
            xo = builder.mul(b, ir.Constant(b.type, 32))
            if offset:  # -128 * (sum of each 4 weights): the bias of x + 128 below
                corr = [builder.sub(q8._splat_const(I32, 8, 0),
                                    q8._dot4(builder, c128, w, False)) for w in ws]
            for j in range(NB):
                xv = q8._load(builder, builder.gep(xrows[j], [xo]), I8, 32)
                xdv = q8._splat(builder, builder.load(builder.gep(drows[j], [b])), 8)
                if offset:
                    xu = builder.xor(xv, c128)  # x + 128 as unsigned bytes
                for k in range(2):
                    if offset:  # -128 sum(w) + (x + 128) . w = x . w, exactly
                        lanes = q8._dot4(builder, xu, ws[k], False, corr[k])
                    else:
                        lanes = q8._dot4(builder, ws[k], xv, signed)
                    scv = builder.fmul(dwv[k], xdv)  # d_w(k) * d_x(j) in every lane
                    acc = accs[j][k]
                    builder.store(builder.call(fma, [builder.sitofp(lanes, v8f), scv,
                                                     builder.load(acc)]), acc)
        pr = q8._data_ptr(context, builder, sig, args, 6)
        mv = builder.load(mins)
        for j in range(NB):
            for k in range(2):
                v = _lane_tree(builder, builder.load(accs[j][k]))
                if with_min:
                    v = builder.fadd(v, builder.extract_element(
                        mv, ir.Constant(I32, 4 * k + j)))
                builder.store(v, q8._at(builder, pr, 2 * j + k))
        return context.get_dummy_value()

    return _tile_intrinsic(name, codegen)


def _make_wide_tile(weights, bpb, name, signed=True, with_min=False, nb=8):
    """The tile of :func:`_make_rows2xnb` for ``nb`` activation rows in 512-bit registers
    (AVX512-VNNI, :data:`quant_q8.WIDE`): the two weight rows' blocks side by side in one
    64-byte vector, each activation block broadcast to both halves, so that one
    ``vpdpbusd`` and one convert, multiply and fma serve both pairs (lanes 0-7 row 0, lanes
    8-15 row 1). Every lane sees the same operations in the same order as in the one-row
    kernel, so the bits are the same; the 16 lanes only run two pairs at once. For the
    signed kinds ``XQ`` holds the activations offset by 128 (``x ^ 0x80``, made once per
    product), the unsigned operand of ``vpdpbusd``."""
    I8, I32 = q8._I8, q8._I32
    assert 2 * nb <= 16  # the min terms: one <2nb x float>, lane nb * k + j

    def codegen(context, builder, sig, args):
        f32 = ir.FloatType()
        v16f = q8._vec(f32, 16)
        v16i = q8._vec(I32, 16)
        vm = q8._vec(f32, 2 * nb)
        p0, p1, nblk, xrows, drows, (tbase, tstride) = _tile_ptrs(context, builder, sig,
                                                                   args, bpb, nb)
        c128 = q8._splat_const(I8, 64, -128)  # the byte 0x80
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(v16f, [v16f, v16f, v16f]), "llvm.fma.v16f32")
        dpbusd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(v16i, [v16i, v16i, v16i]),
            "llvm.x86.avx512.vpdpbusd.512")
        zero = ir.Constant(v16f, [ir.Constant(f32, 0.0)] * 16)
        izero = q8._splat_const(I32, 16, 0)
        accs = [cgutils.alloca_once_value(builder, zero) for _ in range(nb)]
        mins = cgutils.alloca_once_value(builder, ir.Constant(vm, [ir.Constant(f32, 0.0)]
                                                              * (2 * nb)))

        with cgutils.for_range(builder, nblk) as loop:
            b = loop.index
            off = builder.mul(b, ir.Constant(b.type, bpb))
            ws, dws, mws = _tile_block(builder, (p0, p1), off, weights, with_min)
            w = builder.bitcast(q8._shuf(builder, ws[0], ws[1], range(64)), v16i)
            dwv = _halves(builder, dws[0], dws[1], 8)
            if with_min:  # lane nb * k + j: m_w(k) * s_x(j)
                t = q8._load(builder, builder.gep(tbase, [builder.mul(b, tstride)]),
                             f32, nb)
                builder.store(builder.fadd(builder.load(mins), builder.fmul(
                    _halves(builder, mws[0], mws[1], nb), q8._shuf(builder, t, t,
                                                         list(range(nb)) * 2))), mins)
            if signed:  # -128 * (sum of each 4 weights): the bias of x + 128 below
                corr = builder.sub(izero, builder.call(dpbusd, [
                    izero, builder.bitcast(c128, v16i), w]))
            xo = builder.mul(b, ir.Constant(b.type, 32))
            for j in range(nb):
                xv = q8._load(builder, builder.gep(xrows[j], [xo]), I8, 32)
                xv = q8._shuf(builder, xv, xv, list(range(32)) * 2)
                xdv = q8._splat(builder, builder.load(builder.gep(drows[j], [b])), 16)
                if signed:  # -128 sum(w) + (x + 128) . w = x . w, exactly (XQ holds x + 128)
                    lanes = builder.call(dpbusd, [corr, builder.bitcast(xv, v16i), w])
                else:
                    lanes = builder.call(dpbusd, [izero, w, builder.bitcast(xv, v16i)])
                acc = accs[j]
                builder.store(builder.call(fma, [builder.sitofp(lanes, v16f),
                                                 builder.fmul(dwv, xdv),
                                                 builder.load(acc)]), acc)
        pr = q8._data_ptr(context, builder, sig, args, 6)
        mv = builder.load(mins)
        for j in range(nb):
            a = builder.load(accs[j])
            for k in range(2):
                v = _lane_tree(builder, q8._shuf(builder, a, a, range(8 * k, 8 * k + 8)))
                if with_min:
                    v = builder.fadd(v, builder.extract_element(
                        mv, ir.Constant(I32, nb * k + j)))
                builder.store(v, q8._at(builder, pr, 2 * j + k))
        return context.get_dummy_value()

    return _tile_intrinsic(name, codegen)


# the tiled 32-element kinds: (their block's quants, bytes per block, signed, with a min term)
_TILE_SPECS = {
    "q8_0": (q8._signed_q8_0, 34, True, False),
    "q4_0": (q8._signed_q4_0, 18, True, False),
    "q5_0": (q8._signed_q5_0, 22, True, False),
    "iq4_nl": (q8._signed_iq4_nl, 18, True, False),
    "q4_1": (q8._unsigned_q4_1, 20, False, True),
    "q5_1": (q8._unsigned_q5_1, 24, False, True),
}
_TILES = {kind: _make_rows2xnb(fn, bpb, f"_rows2xnb_{kind}", signed, with_min)
          for kind, (fn, bpb, signed, with_min) in _TILE_SPECS.items()}
_WIDE_TILES = {kind: {nb: _make_wide_tile(fn, bpb, f"_wide{nb}_{kind}", signed, with_min, nb)
                      for nb in (8, 4)}
               for kind, (fn, bpb, signed, with_min) in _TILE_SPECS.items()}

# Each kind's kernel is generated from one template by the shape of its decode row function
# (quant_q8.ROW_FNS): the same function, on the same row pairs, as the decode matvec, so a row
# gets the decode's bits; the weight rows of a chunk stay in cache while every activation row
# meets them. The 32-element kinds (q8_0, q4_0, q5_0, q4_1, q5_1, iq4_nl) and q4_k / q5_k /
# q6_k also unpack each weight block once for a tile of activation rows (4 in 256-bit
# registers, 8 then 4 in 512-bit ones for the 32-element kinds; 8 then 4 for the k-quants,
# whose per-row float terms stay scalar code in the decode's order); the float-lane
# k-quants (q2_k, q3_k, iq4_xs, tq1_0, tq2_0) run the row function once per activation row.


def _tiled_template(data, xd, xq, xs, out):
    """``out[b, r]`` = row r of ``data`` . activation row b (xd[b], xq[b]), NB rows a tile."""
    rows = data.shape[0]
    B = xq.shape[0]
    xst = np.ascontiguousarray(xs.T)  # [blocks, B]: a tile's NB sums of a block in one load
    for ch in prange((rows + _C - 1) // _C):  # noqa: F821 (bound per kind)
        res = np.empty(2, np.float32)
        tile = np.empty(2 * _NB, np.float32)  # noqa: F821
        end = min(rows, ch * _C + _C)  # noqa: F821
        for r in range(ch * _C, end, 2):  # noqa: F821
            r1 = min(r + 1, end - 1)  # an odd last row is paired with itself
            for b0 in range(0, B - B % _NB, _NB):  # noqa: F821
                _tile(data[r], data[r1], xq, xd, xst, b0, tile)  # noqa: F821
                for j in range(_NB):  # noqa: F821
                    out[b0 + j, r] = tile[2 * j]
                    out[b0 + j, r1] = tile[2 * j + 1]
            for b in range(B - B % _NB, B):  # noqa: F821
                _rows2(data[r], data[r1], xq[b], xd[b], xs[b], res)  # noqa: F821
                out[b, r] = res[0]
                out[b, r1] = res[1]


def _wide_template(data, xd, xq, xs, out):
    """The same with the 512-bit tiles: 8 activation rows a tile, then 4, then one by one."""
    rows = data.shape[0]
    B = xq.shape[0]
    xst = np.ascontiguousarray(xs.T)
    xt = xq
    if _signed:  # noqa: F821 (bound per kind): the tiles take x + 128 (x ^ 0x80)
        xt = np.empty_like(xq)
        for b in range(B - B % 4):
            for i in range(xq.shape[1]):
                xt[b, i] = xq[b, i] ^ np.int8(-128)
    b8 = B - B % 8
    b4 = B - B % 4
    for ch in prange((rows + _C - 1) // _C):  # noqa: F821 (bound per kind)
        res = np.empty(2, np.float32)
        tile = np.empty(16, np.float32)
        end = min(rows, ch * _C + _C)  # noqa: F821
        for r in range(ch * _C, end, 2):  # noqa: F821
            r1 = min(r + 1, end - 1)  # an odd last row is paired with itself
            for b0 in range(0, b8, 8):
                _tile8(data[r], data[r1], xt, xd, xst, b0, tile)  # noqa: F821
                for j in range(8):
                    out[b0 + j, r] = tile[2 * j]
                    out[b0 + j, r1] = tile[2 * j + 1]
            if b4 > b8:
                _tile4(data[r], data[r1], xt, xd, xst, b8, tile)  # noqa: F821
                for j in range(4):
                    out[b8 + j, r] = tile[2 * j]
                    out[b8 + j, r1] = tile[2 * j + 1]
            for b in range(b4, B):
                _rows2(data[r], data[r1], xq[b], xd[b], xs[b], res)  # noqa: F821
                out[b, r] = res[0]
                out[b, r1] = res[1]


def _rows2_batch_template(data, xd, xq, xs, out):
    """The same with the two-row product for every activation row (q8_0/q8_1 kinds)."""
    rows = data.shape[0]
    B = xq.shape[0]
    for ch in prange((rows + _C - 1) // _C):  # noqa: F821
        res = np.empty(2, np.float32)
        end = min(rows, ch * _C + _C)  # noqa: F821
        for r in range(ch * _C, end, 2):  # noqa: F821
            r1 = min(r + 1, end - 1)
            for b in range(B):
                _rows2(data[r], data[r1], xq[b], xd[b], xs[b], res)  # noqa: F821
                out[b, r] = res[0]
                out[b, r1] = res[1]


def _k_tiled_template(data, xd, x8, bsums, out):
    """``out[b, r]`` for q4_k / q5_k / q6_k, the weight blocks unpacked once for tiles of 8
    (then 4) activation rows; each row's float terms are those of ``quant_q8._row_k4`` /
    ``_row_q6_k`` in their order (the same bits), the rest row by row."""
    rows = data.shape[0]
    B = x8.shape[0]
    b8 = B - B % 8
    b4 = B - B % 4
    nblk = data.shape[1] // _BPB  # noqa: F821 (bound per kind)
    for ch in prange((rows + _C - 1) // _C):  # noqa: F821
        aux = np.empty(64, np.int32)
        ms = np.zeros(8, np.int64)
        sums = np.empty(64, np.float32)
        sumf = np.empty(8, np.float32)
        aux1 = np.empty(8, np.int32)
        sums1 = np.empty(8, np.float32)
        for r in range(ch * _C, min(rows, ch * _C + _C)):  # noqa: F821
            u = data[r]
            b0 = 0
            while b0 < b4:
                nb = 8 if b0 < b8 else 4
                sums[:] = 0
                sumf[:] = 0
                for b in range(nblk):
                    o = b * _BPB  # noqa: F821
                    prefetch(u, o + PREFETCH_BYTES)  # noqa: F821 (kernels.quant's)
                    if _Q6:  # noqa: F821 (bound per kind): scale at the end, no min terms
                        if nb == 8:
                            _tile8(u, o, x8, b0, b * 256, aux)  # noqa: F821
                        else:
                            _tile4(u, o, x8, b0, b * 256, aux)  # noqa: F821
                        dw = _h2f(u[o + 208], u[o + 209])  # noqa: F821
                        dm = np.float32(0)
                    else:
                        if nb == 8:
                            _tile8(u, o, x8, b0, b * 256, bsums, b * 16, aux, ms)  # noqa: F821
                        else:
                            _tile4(u, o, x8, b0, b * 256, bsums, b * 16, aux, ms)  # noqa: F821
                        dw = _h2f(u[o], u[o + 1])  # noqa: F821
                        dm = _h2f(u[o + 2], u[o + 3])  # noqa: F821
                    for j in range(nb):
                        d = dw * xd[b0 + j, b]
                        for l in range(8):
                            sums[8 * j + l] += d * np.float32(aux[8 * j + l])
                        if not _Q6:  # noqa: F821
                            dmin = dm * xd[b0 + j, b]
                            sumf[j] -= dmin * np.float32(ms[j])
                for j in range(nb):
                    t = sumf[j]
                    for l in range(8):
                        t += sums[8 * j + l]
                    out[b0 + j, r] = t
                b0 += nb
            for b in range(b4, B):
                out[b, r] = _row(u, xd[b], x8[b], bsums[b], aux1, sums1)  # noqa: F821


def _kf_batch_template(data, xd, xf, bsums, out):
    """The same for the k-quants whose row function takes them as float32."""
    rows = data.shape[0]
    B = xf.shape[0]
    for ch in prange((rows + _C - 1) // _C):  # noqa: F821
        lanes = np.empty(32, np.float32)
        for r in range(ch * _C, min(rows, ch * _C + _C)):  # noqa: F821
            for b in range(B):
                out[b, r] = _row(data[r], xd[b], xf[b], bsums[b], lanes)  # noqa: F821


_Q8ACT: dict = {}  # kind -> (generated kernel, activation variant)
for _kind, (_fn, _shape) in q8.ROW_FNS.items():
    _name = f"matmul_rows_q8act_{_kind}"
    if _shape == "rows2":
        _variant = q8.ACT_FORMAT[_kind]  # "q8_0" or "q8_1"
        if q8.WIDE and _kind in _WIDE_TILES:
            _k = kq._generate(_wide_template, _name, _C=q8._CHUNK, _rows2=_fn,
                              _tile8=_WIDE_TILES[_kind][8], _tile4=_WIDE_TILES[_kind][4],
                              _signed=_TILE_SPECS[_kind][2])
        elif _kind in _TILES:
            _k = kq._generate(_tiled_template, _name, _C=q8._CHUNK, _NB=NB, _rows2=_fn,
                              _tile=_TILES[_kind])
        else:
            _k = kq._generate(_rows2_batch_template, _name, _C=q8._CHUNK, _rows2=_fn)
    elif _kind in q8.K_TILES:
        _variant = {"k8": "q8_k8", "k6": "q8_k6"}[_shape]
        _t = q8.K_TILES[_kind]
        _k = kq._generate(_k_tiled_template, _name, _C=q8._CHUNK, _row=_fn, _tile8=_t[8],
                          _tile4=_t[4], _BPB=kq.BLOCK_INFO[_kind][1], _Q6=_shape == "k6")
    else:  # the float-lane k-quants
        _variant = "q8_kf"
        _k = kq._generate(_kf_batch_template, _name, _C=q8._CHUNK, _row=_fn)
    _Q8ACT[_kind] = (_k, _variant)
    globals()[_name] = _k


@njit(cache=True)
def quantize_rows_q8_1(X, xd, xq, xs):
    """Each row of ``X [B, n]`` to q8_1 activations (the x86 quantizer the decode uses)."""
    for b in range(X.shape[0]):
        q8._q8_1_act_x86_into(X[b], xd[b], xq[b], xs[b])


def quantize_rows(kind: str, X: np.ndarray) -> tuple:
    """The rows of ``X [B, n]`` in the 8-bit activation format of weights of ``kind``, as
    that kind's batched kernel takes them: ``(xd, xq, xs)`` for the 32-element kinds (``xs``
    empty unless q8_1); ``(xd, quants, bsums)`` for the k-quants, the quants permuted (int8)
    or as float32, as the kind's row function reads them."""
    B, n = X.shape
    variant = _Q8ACT[kind][1]
    if variant in ("q8_0", "q8_1"):
        xd = np.empty((B, n // 32), np.float32)
        xq = np.empty((B, n), np.int8)
        if variant == "q8_0":
            quantize_rows_q8_0(X, xd, xq)
            return xd, xq, np.empty((B, 0), np.float32)
        xs = np.empty((B, n // 32), np.float32)
        quantize_rows_q8_1(X, xd, xq, xs)
        return xd, xq, xs
    xd = np.empty((B, n // 256), np.float32)
    xq = np.empty((B, n), np.int8)
    bsums = np.empty((B, n // 16), np.int16)
    quantize_rows_q8_k(X, xd, xq, bsums)
    if variant in ("q8_k8", "q8_k6"):
        return xd, (q8.permute_k8 if variant == "q8_k8" else q8.permute_k6)(xq), bsums
    return xd, xq.astype(np.float32), bsums


class ActCache:
    """Remembers the quantized activations of the last input per format, so q, k and v
    (three weights, one input) quantize it once."""

    def __init__(self):
        self._key = (None, None)
        self._val = None

    def get(self, kind: str, X: np.ndarray) -> tuple:
        fmt = _Q8ACT[kind][1]
        ref, f = self._key
        if ref is None or ref() is not X or f != fmt:
            self._val = quantize_rows(kind, X)
            self._key = (weakref.ref(X), fmt)
        return self._val


# Up to how many rows the batched 8-bit products beat widening the weight to float32 for BLAS
# (prefill of a short prompt, kernels chosen by DecoderModel's ops), measured on SmolLM2 Q4_1
# and Gemma 3 270M Q4_K_M prefill (bench/short_prefill.py, BENCHMARKS.md). With 256-bit tiles
# (Intel Xeon, 2026-12-04) the tiled 32-element kinds won up to ~96 rows and q4_k/q5_k/q6_k
# up to ~52; with the 512-bit tiles and the k-quant tiles (Zen 5, 2026-12-06) the batched
# products won at every length measured, up to 512 (Gemma 558 against 585 ms, SmolLM2 567
# against 631), by 20-60 % up to 128 rows and 5-18 % beyond: the limit is 128 there, so that
# long prompts (and perplexity windows) keep the float32 path. The float-lane k-quants
# (q2_k, q3_k, iq4_xs, tq*) keep the limit measured for the k-quants before those changes.
SHORT_ROWS_TILED = 128 if q8.WIDE else 64
SHORT_ROWS_K8 = 128 if q8.WIDE else 48
SHORT_ROWS_OTHER = 24


def short_rows(kind: str) -> int:
    """The longest chunk for which prefill uses the batched 8-bit products on ``kind``
    weights (0: never, no such kernel)."""
    if kind not in _Q8ACT:
        return 0
    if kind in _TILES:
        return SHORT_ROWS_TILED
    return SHORT_ROWS_K8 if _Q8ACT[kind][1] in ("q8_k8", "q8_k6") else SHORT_ROWS_OTHER


def linear_rows(w: Weight, X: np.ndarray, act_quant: bool = False,
                cache: ActCache | None = None) -> np.ndarray:
    """``X @ W.T`` for ``X [B, in]`` (float32, C-contiguous): row b bit for bit what
    :func:`kernels.matmul.matvec` gives for ``X[b]``, any B."""
    B = X.shape[0]
    out = np.empty((B, w.rows), np.float32)
    data = w.kernel_view()
    kernel = _FLOAT.get(w.kind)
    if kernel is not None:
        kernel(data, X, out)
    elif act_quant and w.kind in _Q8ACT:
        act = cache.get(w.kind, X) if cache is not None else quantize_rows(w.kind, X)
        _Q8ACT[w.kind][0](kq._readonly(data, np.uint8), *act, out)
    else:
        kq.MATMUL[w.kind](kq._readonly(data, np.uint8), X, out)
    return out


# ---- attention over one KV cache per row -----------------------------------------------------


@intrinsic
def _f32_ptr(typingctx, addr):
    """An int64 address as a float32 pointer (for :func:`numba.carray`)."""
    if not isinstance(addr, types.Integer):
        return None
    sig = types.CPointer(types.float32)(addr)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return sig, codegen


@njit(inline="always", cache=True)
def _write_kv(k, v, kaddr, vaddr, caps, pos):
    B, nKV, D = k.shape
    for b in range(B):
        kc = carray(_f32_ptr(kaddr[b]), (nKV, caps[b], D))
        vc = carray(_f32_ptr(vaddr[b]), (nKV, caps[b], D))
        p = pos[b]
        for g in range(nKV):
            for d in range(D):
                kc[g, p, d] = k[b, g, d]
                vc[g, p, d] = v[b, g, d]


@njit(parallel=True, cache=True, fastmath=ko._ATTN_MATH)
def attention_slots(q, k, v, kaddr, vaddr, caps, pos, scale, softcap, window, logn, out,
                    parallel):
    """Row b: store ``k[b], v[b]`` at position ``pos[b]`` of its caches (float32
    ``[nKV, caps[b], D]`` at addresses ``kaddr[b]``, ``vaddr[b]``), then causal attention of
    ``q[b] [nH, D]`` over positions ``0..pos[b]`` (the same per-head code as
    :func:`ops.attention`). ``logn [B]`` scales each query; writes ``out [B, nH, D]``."""
    B, nH, D = q.shape
    nKV = k.shape[1]
    _write_kv(k, v, kaddr, vaddr, caps, pos)
    if parallel:
        for job in prange(B * nH):
            b = job // nH
            h = job % nH
            kc = carray(_f32_ptr(kaddr[b]), (nKV, caps[b], D))
            vc = carray(_f32_ptr(vaddr[b]), (nKV, caps[b], D))
            ko._attend(q[b:b + 1], kc, vc, pos[b], scale, softcap, window, logn[b:b + 1],
                       out[b:b + 1], 0, h)
    else:
        for job in range(B * nH):
            b = job // nH
            h = job % nH
            kc = carray(_f32_ptr(kaddr[b]), (nKV, caps[b], D))
            vc = carray(_f32_ptr(vaddr[b]), (nKV, caps[b], D))
            ko._attend(q[b:b + 1], kc, vc, pos[b], scale, softcap, window, logn[b:b + 1],
                       out[b:b + 1], 0, h)


@njit(cache=True)
def softcap_rows(logits, cap):
    """``cap * tanh(x / cap)`` in place over ``logits [B, V]``, element by element as
    :func:`kernels.decode.decode_head` does (so a batch of one matches the fused decode)."""
    c = np.float32(cap)
    for b in range(logits.shape[0]):
        row = logits[b]
        for i in range(row.shape[0]):
            row[i] = c * np.tanh(row[i] / c)
