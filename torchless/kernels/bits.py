"""Scalar bit-casts Numba lacks (bfloat16 / float16 bit patterns to float32), and a
software prefetch."""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def _u32_as_f32(typingctx, v):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _u16_as_half_to_f32(typingctx, v):
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@njit(inline="always", cache=True)
def bf16_to_f32(b):
    """bfloat16 bits -> float32 (exact)."""
    return _u32_as_f32(np.uint32(b) << np.uint32(16))


@njit(inline="always", cache=True)
def f16_to_f32(b):
    """IEEE half bits -> float32 (exact)."""
    return _u16_as_half_to_f32(np.uint16(b))


# Software prefetch distance: with two hyperthreads sharing a core, the hardware
# prefetchers alone left a DRAM-sized q8_0 product at ~12-14 GB/s; prefetching 2 KiB ahead
# of each row measured ~23 GB/s (262144 x 640, the Gemma 3 output matrix). On Zen 5
# (2026-12-06) the same product took 5.2-6.1 ms at 2 KiB, 3.9 at 4 KiB, 3.4-3.6 at 8 KiB
# (46-49 GB/s, the bandwidth probe's 47-52) and 4.6 at 16 KiB; Gemma's decode 9.2 -> 7.2 ms,
# SmolLM2's 5.2 -> 4.3 ms with 8 KiB.
PREFETCH_BYTES = 8192


def _prefetch_ir(builder, ptr):
    """llvm.prefetch (read, high locality) of the cache line holding ``ptr``."""
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
        "llvm.prefetch.p0i8")
    builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3),
                      ir.Constant(i32, 1)])


@intrinsic
def prefetch(typingctx, a, i):
    """Prefetch the cache line of byte offset ``i`` past the start of array ``a``'s data
    (a hint: an address past the end is harmless)."""
    if not isinstance(a, types.Array) or not isinstance(i, types.Integer):
        return None
    sig = types.void(a, i)

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, value=args[0]).data
        i8p = ir.IntType(8).as_pointer()
        off = context.cast(builder, args[1], sig.args[1], types.intp)
        _prefetch_ir(builder, builder.gep(builder.bitcast(data, i8p), [off]))
        return context.get_dummy_value()

    return sig, codegen


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 split so that n * _LN2_HI is exact for |n| < 2^8
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_HI = np.float32(88.72283172607422)  # largest x with a finite float32 exp(x)
_EXP_LO = np.float32(-87.33654022216797)  # smallest x with a normal float32 exp(x)


@njit(inline="always", cache=True, fastmath={"contract"})
def fast_exp(x):
    """``exp(x)`` for float32 ``x`` within ~2 ulp, written without calls or branches so that
    LLVM vectorises loops around it (Numba's ``np.exp`` is a scalar libm call here).

    ``x = n ln2 + r`` with ``|r| <= ln2 / 2``; ``e^r`` by a degree-6 minimax polynomial
    (Cephes' single-precision coefficients); ``2^n`` built in the exponent bits, as two
    factors so that n = 128 does not overflow. Results below float32's normal range are
    flushed to 0; NaN propagates. Within 1 ulp (tests/kernels/test_fast_math.py).
    """
    xc = x if x <= _EXP_HI else _EXP_HI
    xc = xc if xc >= _EXP_LO else _EXP_LO
    n = np.floor(xc * _LOG2E + np.float32(0.5))
    r = xc - n * _LN2_HI - n * _LN2_LO
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = p * r * r + r + np.float32(1.0)
    ni = np.int32(n)
    half = ni >> np.int32(1)  # 2^n in two factors: n reaches 128 just below the overflow
    y = y * _u32_as_f32(np.uint32(half + np.int32(127)) << np.uint32(23))
    y = y * _u32_as_f32(np.uint32(ni - half + np.int32(127)) << np.uint32(23))
    y = y if x <= _EXP_HI else np.float32(np.inf)
    y = y if x >= _EXP_LO else np.float32(0.0)
    return y if x == x else x


@njit(inline="always", cache=True, fastmath={"contract"})
def fast_tanh(x):
    """``tanh(x)`` through :func:`fast_exp`: ``sign(x) (1 - 2 / (e^{2|x|} + 1))``; absolute error
    ~1e-7 (relative error grows for |x| < 1e-3, where the result is close to ``x``)."""
    a = x if x >= 0 else -x
    t = np.float32(1.0) - np.float32(2.0) / (fast_exp(np.float32(2.0) * a) + np.float32(1.0))
    t = t if a > np.float32(4e-4) else a
    return t if x >= 0 else -t


# Reductions in a fixed order. A float reduction that LLVM may reassociate is summed in
# whatever order its vectoriser picks, and that pick can change with the compilation context
# (a kernel compiled fresh and the same kernel loaded from Numba's cache once summed
# differently). These build the vector loop themselves: 16 lanes (element j into lane
# j % 16) added as a fixed tree (halves added lane by lane), the tail in element order.
_VLANES = 16


def _lane_tree(builder, v):
    """Sum of a float vector's lanes as a fixed tree: the upper half added to the lower half,
    lane by lane, until one lane is left."""
    while v.type.count > 1:
        h = v.type.count // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), h),
                                                      list(range(h))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), h),
                                                      list(range(h, 2 * h))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))


@intrinsic
def _vdot_body(typingctx, a, b):
    """Dot product of two contiguous float32 vectors over their whole 16-element chunks."""
    if not all(isinstance(t, types.Array) and t.ndim == 1 and t.dtype == types.float32
               and t.layout == "C" for t in (a, b)):
        return None
    sig = types.float32(a, b)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        vf = ir.VectorType(f32, _VLANES)
        arys = [context.make_array(t)(context, builder, value=v)
                for t, v in zip(signature.args, args)]
        n = cgutils.unpack_tuple(builder, arys[0].shape)[0]
        acc = cgutils.alloca_once_value(builder, ir.Constant(vf, [ir.Constant(f32, 0.0)]
                                                             * _VLANES))
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vf, [vf, vf, vf]), f"llvm.fma.v{_VLANES}f32")
        nb = builder.udiv(n, ir.Constant(n.type, _VLANES))
        with cgutils.for_range(builder, nb) as loop:
            c = builder.mul(loop.index, ir.Constant(n.type, _VLANES))
            va, vb = [builder.load(builder.bitcast(builder.gep(x.data, [c]), vf.as_pointer()),
                                   align=4) for x in arys]
            builder.store(builder.call(fma, [va, vb, builder.load(acc)]), acc)
        return _lane_tree(builder, builder.load(acc))

    return sig, codegen


@njit(inline="always", cache=True)
def fixed_dot(a, b):
    """``sum(a * b)`` over two contiguous float32 vectors of equal length, in a fixed order."""
    n = a.shape[0]
    s = _vdot_body(a, b)
    for j in range(n - n % _VLANES, n):
        s += a[j] * b[j]
    return s


@intrinsic
def _vsum_chunks_f64_body(typingctx, a):
    """float64 sum of the 16-element chunks' float32 lane-tree sums (whole chunks only)."""
    if not (isinstance(a, types.Array) and a.ndim == 1 and a.dtype == types.float32
            and a.layout == "C"):
        return None
    sig = types.float64(a)

    def codegen(context, builder, signature, args):
        f32, f64 = ir.FloatType(), ir.DoubleType()
        vf = ir.VectorType(f32, _VLANES)
        ary = context.make_array(signature.args[0])(context, builder, value=args[0])
        n = cgutils.unpack_tuple(builder, ary.shape)[0]
        acc = cgutils.alloca_once_value(builder, ir.Constant(f64, 0.0))
        nb = builder.udiv(n, ir.Constant(n.type, _VLANES))
        with cgutils.for_range(builder, nb) as loop:
            c = builder.mul(loop.index, ir.Constant(n.type, _VLANES))
            v = builder.load(builder.bitcast(builder.gep(ary.data, [c]), vf.as_pointer()),
                             align=4)
            part = builder.fpext(_lane_tree(builder, v), f64)
            builder.store(builder.fadd(builder.load(acc), part), acc)
        return builder.load(acc)

    return sig, codegen


@njit(inline="always", cache=True)
def chunked_sum_f64(a):
    """``sum(a)`` as ggml's softmax sums: each 16-element chunk in float32, chunks and the
    remaining elements accumulated in float64."""
    n = a.shape[0]
    s = _vsum_chunks_f64_body(a)
    for j in range(n - n % _VLANES, n):
        s += np.float64(a[j])
    return s


@intrinsic
def _fma_f32(typingctx, a, b, c):
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(f32, [f32, f32, f32]), "llvm.fma.f32")
        return builder.call(fn, args)

    return sig, codegen


@njit(inline="always", cache=True)
def fma32(a, b, c):
    """``a * b + c`` in float32 with one rounding (a fused multiply-add)."""
    return _fma_f32(np.float32(a), np.float32(b), np.float32(c))


@intrinsic
def _f32_to_f16_bits(typingctx, v):
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


@njit(inline="always", cache=True)
def f32_to_f16_bits(x):
    """float32 -> IEEE half bits, rounded to nearest even (F16C's ``vcvtps2ph``; overflow
    to inf)."""
    return _f32_to_f16_bits(np.float32(x))


@njit(inline="always", cache=True)
def round_f16(x):
    """float32 -> nearest float16 (ties to even) -> float32."""
    return f16_to_f32(f32_to_f16_bits(x))
