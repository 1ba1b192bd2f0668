"""Weight x activation products, computed from the weight's stored format.

``matvec(w, x, out)`` is the decode product (one token): every weight is read once, rows in
parallel, float32 accumulation. ``matmul(w, X)`` is the prefill product (T tokens): the weight
is widened to float32 one tile of rows at a time and multiplied with BLAS, so a bf16, f16 or
quantized model never exists as a float32 copy.
"""
import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..weights import Weight
from . import quant, quant_q8
from . import quant_q8 as q8
from .bits import _lane_tree, bf16_to_f32, f16_to_f32

# With act_quant, quantized weights meet 8-bit quantized activations, as in llama.cpp:
# integer dot products, about twice as fast, at the cost of activation rounding noise.
# Models choose it by default when they hold block-quantized weights (DecoderModel); with
# float32 activations every path equals the NumPy reference to float32 rounding.
# TORCHLESS_ACT_QUANT=0 or 1 overrides the default.


def act_quant_default(quantized: bool) -> bool:
    """The ``act_quant`` a model gets when none is asked for: on for block-quantized
    weights (llama.cpp's behaviour), unless ``TORCHLESS_ACT_QUANT`` says otherwise."""
    env = os.environ.get("TORCHLESS_ACT_QUANT", "").strip()
    if env in ("0", "1"):
        return env == "1"
    return quantized


# Four rows per step, each x load feeding four rows, in one LLVM loop per row group:
# 16-lane float32 FMAs, the weights widened in registers (bf16: shift into the high half;
# f16: vcvtph2ps), and a software prefetch 4 KiB ahead in every row. Numba's own loop
# vectorised the same arithmetic but, without the prefetch, bf16 reached 11-14 GB/s on
# DRAM-sized matrices against ~24-27 GB/s with it (BENCHMARKS.md, "Decode kernels").

FLOAT_PREFETCH_BYTES = 4096
_LANES = 16


def _make_rows4(kind):
    """An intrinsic ``f(w, r, x, res)``: ``res[k] = sum_c w[r + k, c] * x[c]`` for k < 4 over
    the first ``cols // 16 * 16`` columns (the caller adds the rest)."""
    dtype = types.float32 if kind == "f32" else types.uint16

    def impl(typingctx, w, r, x, res):
        if not (isinstance(w, types.Array) and w.ndim == 2 and w.dtype == dtype
                and isinstance(r, types.Integer) and isinstance(x, types.Array)
                and x.dtype == types.float32 and isinstance(res, types.Array)
                and res.dtype == types.float32):
            return None
        sig = types.void(w, r, x, res)

        def codegen(context, builder, sig, args):
            f32 = ir.FloatType()
            vf = ir.VectorType(f32, _LANES)
            i8p = ir.IntType(8).as_pointer()
            wa = context.make_array(sig.args[0])(context, builder, value=args[0])
            cols = cgutils.unpack_tuple(builder, wa.shape)[1]
            stride = cgutils.unpack_tuple(builder, wa.strides)[0]
            r = context.cast(builder, args[1], sig.args[1], types.intp)
            base = builder.bitcast(wa.data, i8p)
            rows = [builder.bitcast(builder.gep(base, [builder.mul(
                builder.add(r, ir.Constant(r.type, k)), stride)]), wa.data.type)
                for k in range(4)]
            px = context.make_array(sig.args[2])(context, builder, value=args[2]).data
            zero = ir.Constant(vf, [ir.Constant(f32, 0.0)] * _LANES)
            accs = [cgutils.alloca_once_value(builder, zero) for _ in range(4)]
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vf, [vf, vf, vf]), f"llvm.fma.v{_LANES}f32")
            n = builder.udiv(cols, ir.Constant(cols.type, _LANES))
            with cgutils.for_range(builder, n) as loop:
                c = builder.mul(loop.index, ir.Constant(cols.type, _LANES))
                xv = q8._load(builder, builder.gep(px, [c]), f32, _LANES)
                for k in range(4):
                    p = builder.gep(rows[k], [c])
                    q8._prefetch_ir(builder, builder.gep(builder.bitcast(p, i8p), [
                        ir.Constant(ir.IntType(64), FLOAT_PREFETCH_BYTES)]))
                    if kind == "f32":
                        wv = q8._load(builder, p, f32, _LANES)
                    else:
                        u = q8._load(builder, p, ir.IntType(16), _LANES)
                        if kind == "bf16":
                            wide = builder.zext(u, ir.VectorType(ir.IntType(32), _LANES))
                            wv = builder.bitcast(builder.shl(wide, ir.Constant(
                                wide.type, [ir.Constant(ir.IntType(32), 16)] * _LANES)), vf)
                        else:
                            wv = builder.fpext(builder.bitcast(
                                u, ir.VectorType(ir.HalfType(), _LANES)), vf)
                    builder.store(builder.call(fma, [wv, xv, builder.load(accs[k])]), accs[k])
            pr = context.make_array(sig.args[3])(context, builder, value=args[3]).data
            for k in range(4):
                builder.store(_lane_tree(builder, builder.load(accs[k])),
                              builder.gep(pr, [ir.Constant(ir.IntType(32), k)]))
            return context.get_dummy_value()

        return sig, codegen

    impl.__name__ = impl.__qualname__ = f"_rows4_{kind}"
    return intrinsic(impl)


_rows4_f32 = _make_rows4("f32")
_rows4_bf16 = _make_rows4("bf16")
_rows4_f16 = _make_rows4("f16")


@njit(inline="always", cache=True)
def _widen(v, kind):
    if kind == 0:
        return np.float32(v)
    if kind == 1:
        return bf16_to_f32(v)
    return f16_to_f32(v)


@njit(inline="always", cache=True)
def _matvec_float(w, x, out, kind):
    rows, cols = w.shape
    c0 = cols - cols % _LANES
    for b in prange(rows // 4):
        r = 4 * b
        res = np.empty(4, np.float32)
        if kind == 0:
            _rows4_f32(w, r, x, res)
        elif kind == 1:
            _rows4_bf16(w, r, x, res)
        else:
            _rows4_f16(w, r, x, res)
        for k in range(4):
            acc = res[k]
            for c in range(c0, cols):
                acc += _widen(w[r + k, c], kind) * x[c]
            out[r + k] = acc
    for r in range(rows - rows % 4, rows):
        acc = np.float32(0.0)
        for c in range(cols):
            acc += _widen(w[r, c], kind) * x[c]
        out[r] = acc


@njit(parallel=True, cache=True)
def matvec_f32(w, x, out):
    _matvec_float(w, x, out, 0)


@njit(parallel=True, cache=True)
def matvec_bf16(w, x, out):
    _matvec_float(w, x, out, 1)


@njit(parallel=True, cache=True)
def matvec_f16(w, x, out):
    _matvec_float(w, x, out, 2)


@njit(parallel=True, cache=True)
def widen_rows_bf16(w, r0, r1, out):
    cols = w.shape[1]
    for r in prange(r0, r1):
        for c in range(cols):
            out[r - r0, c] = bf16_to_f32(w[r, c])


@njit(parallel=True, cache=True)
def widen_rows_f16(w, r0, r1, out):
    cols = w.shape[1]
    for r in prange(r0, r1):
        for c in range(cols):
            out[r - r0, c] = f16_to_f32(w[r, c])


def _as2d(w: Weight):
    """The weight's data as the 2-D array the kernels take (uint16 bits for f16)."""
    return w.kernel_view()


_FLOAT_MATVEC = {"f32": matvec_f32, "bf16": matvec_bf16, "f16": matvec_f16}


def matvec(w: Weight, x: np.ndarray, out: np.ndarray | None = None,
           act_quant: bool = False) -> np.ndarray:
    """``out = W @ x`` for a 2-D weight ``[out, in]`` and a float32 vector ``[in]``."""
    if out is None:
        out = np.empty(w.rows, dtype=np.float32)
    kernel = _FLOAT_MATVEC.get(w.kind)
    if kernel is not None:
        kernel(w.kernel_view(), x, out)
    elif act_quant and quant_q8.supports(w.kind):
        # llama.cpp's way: quantize x to 8 bits, integer dot products per block
        quant_q8.matvec_q8act(w.kind, w.kernel_view(), x, out,
                              q8_0_variant=quant_q8.ENGINE_Q8_0_VARIANT)
    else:
        quant.matvec(w.kind, w.kernel_view(), x, out)
    return out


TILE_ROWS = 2048


def widen_rows(w: Weight, r0: int, r1: int, out: np.ndarray) -> np.ndarray:
    """Rows ``r0:r1`` of ``w`` as float32 into ``out[:r1-r0]``."""
    d = _as2d(w)
    if w.kind == "bf16":
        widen_rows_bf16(d, r0, r1, out)
    elif w.kind == "f16":
        widen_rows_f16(d, r0, r1, out)
    elif w.kind == "f32":
        out[: r1 - r0] = d[r0:r1]
    else:
        quant.dequantize_rows_into(w.kind, d, r0, r1, out)
    return out[: r1 - r0]


def matmul(w: Weight, x: np.ndarray, out: np.ndarray | None = None,
           act_quant: bool = False) -> np.ndarray:
    """``out = X @ W.T`` for activations ``X [T, in]``; returns ``[T, out]`` float32."""
    T = x.shape[0]
    if out is None:
        out = np.empty((T, w.rows), dtype=np.float32)
    if T == 1:
        matvec(w, x[0], out[0], act_quant)
        return out
    if w.kind == "f32":
        np.matmul(x, _as2d(w).T, out=out)
        return out
    if act_quant and quant_q8.supports(w.kind):
        x = quant_q8.dequantized_activations(w.kind, x)
    tile = np.empty((min(TILE_ROWS, w.rows), w.cols), dtype=np.float32)
    for r0 in range(0, w.rows, TILE_ROWS):
        r1 = min(r0 + TILE_ROWS, w.rows)
        t = widen_rows(w, r0, r1, tile)
        np.matmul(x, t.T, out=out[:, r0:r1])
    return out
