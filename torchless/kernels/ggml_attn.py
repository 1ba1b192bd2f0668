"""Attention as llama.cpp's CPU backend computes it with flash attention OFF and an f16 K/V
cache (the build described in /work/peer/emu/COMMON.md: gcc -O3 -march=native, AVX-512 with
AVX512-FP16, GGML_USE_LLAMAFILE, 2 threads), bit for bit.

What ggml runs, per layer, from the roped+scaled query q [T, nH, D] to kqv_out [T, nH*D]:

* SET_ROWS f32 -> f16 into cache_k / cache_v (V stored transposed): ``ggml_cpu_fp32_to_fp16``,
  i.e. ``vcvtps2ph`` with round-to-nearest-even (overflow to inf, subnormals kept) —
  :func:`round_f16`. The caller stores these f16 values as float32.
* kq = MUL_MAT(K view [D, n_kv] f16, q permuted [D, T, nH] f32). src1 is converted to f16
  first (``ggml_cpu_fp32_to_fp16``, RNE). Then
    - T == 1: llamafile_sgemm refuses n < 2, so ``ggml_vec_dot_f16`` runs. With AVX512-FP16
      it accumulates in float32: 4 accumulators of 16 lanes; element i goes to accumulator
      (i // 16) % 4, lane i % 16, as fma(x, y, acc); per 64-element step in order. Then
      acc0 += acc2, acc1 += acc3, acc0 += acc1 (lane-wise), then _mm512_reduce_add_ps
      (upper 8 lanes + lower 8, then 4+4, 2+2, 1+1).
    - T >= 2: tinyBLAS<16, __m512, __m512, f16, f16, float> (llamafile sgemm): one 16-lane
      float32 accumulator per output, fma over 16-element chunks in order, then
      _mm512_reduce_add_ps (same tree). Tiling/threading does not change any element's order.
* kq_soft_max = SOFT_MAX(kq, mask f32 {0, -inf}, scale 1, max_bias 0): w = kq*1 + mask;
  max = scalar running max; per 16-element chunk y = ggml_v_expf(w - max) (AVX-512 version,
  FMA polynomial + vscalefps), chunk sum = _mm512_reduce_add_ps(y) in float32 added to a
  float64 total; s = (float)(1.0 / total); p = y * s.
* kqv = MUL_MAT(V^T view [n_kv, D] f16, kq_soft_max [n_kv, T, nH] f32): src1 converted to f16
  (RNE), then the same two kernels over the n_kv positions (vec_dot_f16 for T == 1,
  tinyBLAS for T >= 2). GQA: head h reads KV head h // (nH // nKV).
* kqv_out = CONT(permute(kqv)): out[t, h*D + d] = kqv[h, t, d] (a copy).

n_kv (KV cells the graph spans) = min(kv_size, max(256, roundup(P + T, 256))); the cells past
P + T are masked. Mask for query position p1 = P + t and key cell/position p0: -inf if
p0 > p1 (causal), or (SWA layers) if p1 - p0 >= n_swa (512 for Gemma 3; SWA layers are
il % 6 < 5, i.e. all but 5, 11, 17); else 0. This assumes cell index == position (true
while P + T <= the cache size, which llama.cpp's n_ctx = 512 guarantees; with a larger n_ctx
the SWA cache becomes a ring of 1024 cells and cell order != position order past that).

Implementation notes: per (head, query row), one function (:func:`_row`) does kq, softmax and
kqv. Masked cells are exactly 0 after the softmax (expf of -inf -> 0), and a zero weight
leaves an fma accumulator unchanged, so kqv only visits the cells < P + T with nonzero f16
weight; it walks V's rows in position order, each position feeding accumulator row
((j // 16) % nacc) * 16 + j % 16 (vectorised over D), then reduces the rows in ggml's order.
Decode (T == 1) runs serially; T > 1 runs the rows in a prange.
Verified bit-exact against llama.cpp dumps: /work/peer/emu/C/verify.py.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .bits import fma32

_LANES = 16


# ---------------------------------------------------------------------------------------------
# float16 rounding (vcvtps2ph, round to nearest even), value returned as float32


@intrinsic
def _f32_bits(typingctx, x):
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def _bits_f32(typingctx, b):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(inline="always", cache=True)
def f16r(x):
    """float32 -> nearest float16 (ties to even) -> float32; as F16C/AVX-512 vcvtps2ph."""
    b = _f32_bits(np.float32(x))
    sign = b & np.uint32(0x80000000)
    a = b & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x7F800000):          # inf / nan
        return np.float32(x)
    if a >= np.uint32(0x477FF000):          # >= 65520: overflows to inf
        return _bits_f32(sign | np.uint32(0x7F800000))
    if a >= np.uint32(0x38800000):          # f16 normal range: keep 10 mantissa bits
        lsb = (a >> np.uint32(13)) & np.uint32(1)
        a = (a + np.uint32(0xFFF) + lsb) & np.uint32(0xFFFFE000)
        return _bits_f32(sign | a)
    # f16 subnormal range: multiples of 2^-24
    e = np.int64(a >> np.uint32(23))
    if e < 101:
        return _bits_f32(sign)
    m = np.int64(a & np.uint32(0x7FFFFF)) | np.int64(0x800000)
    sh = 126 - e                             # 14 .. 25
    r = m >> sh
    rem = m & ((np.int64(1) << sh) - 1)
    half = np.int64(1) << (sh - 1)
    if rem > half or (rem == half and (r & 1) == 1):
        r += 1
    v = np.float32(r) * np.float32(5.960464477539063e-08)   # exact: r <= 1024, 2^-24
    return _bits_f32(sign | _f32_bits(v))


def round_f16(x):
    """Round float32 values to float16 exactly as ggml's SET_ROWS f32 -> f16 (vcvtps2ph, RNE);
    returns float32 holding the float16 values."""
    a = np.ascontiguousarray(x, dtype=np.float32)
    return a.astype(np.float16).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# dot products in the two orders ggml uses (inputs: contiguous float32 holding f16 values)


def _lane_tree(builder, v):
    """_mm512_reduce_add_ps: upper half + lower half lane-wise until one lane is left."""
    while v.type.count > 1:
        h = v.type.count // 2
        i32 = ir.IntType(32)
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, h), list(range(h))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, h),
                                                      list(range(h, 2 * h))))
        v = builder.fadd(hi, lo)
    return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))


def _dot_codegen(nacc):
    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        vf = ir.VectorType(f32, _LANES)
        arys = [context.make_array(t)(context, builder, value=v)
                for t, v in zip(signature.args[:2], args[:2])]
        n = args[2]
        zero = ir.Constant(vf, [ir.Constant(f32, 0.0)] * _LANES)
        accs = [cgutils.alloca_once_value(builder, zero) for _ in range(nacc)]
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vf, [vf, vf, vf]), f"llvm.fma.v{_LANES}f32")
        step = _LANES * nacc
        nb = builder.udiv(n, ir.Constant(n.type, step))
        with cgutils.for_range(builder, nb) as loop:
            base = builder.mul(loop.index, ir.Constant(n.type, step))
            for j in range(nacc):
                c = builder.add(base, ir.Constant(n.type, j * _LANES))
                va, vb = [builder.load(builder.bitcast(builder.gep(x.data, [c]),
                                                       vf.as_pointer()), align=4)
                          for x in arys]
                builder.store(builder.call(fma, [va, vb, builder.load(accs[j])]), accs[j])
        if nacc == 4:
            a0 = builder.fadd(builder.load(accs[0]), builder.load(accs[2]))
            a1 = builder.fadd(builder.load(accs[1]), builder.load(accs[3]))
            tot = builder.fadd(a0, a1)
        else:
            tot = builder.load(accs[0])
        return _lane_tree(builder, tot)
    return codegen


def _dot_typer(a, b, n):
    if not all(isinstance(t, types.Array) and t.ndim == 1 and t.dtype == types.float32
               and t.layout == "C" for t in (a, b)):
        return None
    if not isinstance(n, types.Integer):
        return None
    return types.float32(a, b, types.intp)


@intrinsic
def _dot_vec_f16(typingctx, a, b, n):
    """ggml_vec_dot_f16 (AVX512-FP16 build) over n elements, n % 64 == 0."""
    sig = _dot_typer(a, b, n)
    return (sig, _dot_codegen(4)) if sig is not None else None


@intrinsic
def _dot_tinyblas(typingctx, a, b, n):
    """tinyBLAS<16, __m512> f16 x f16 element over n elements, n % 16 == 0."""
    sig = _dot_typer(a, b, n)
    return (sig, _dot_codegen(1)) if sig is not None else None


@njit(inline="always", cache=True)
def _dot(a, b, n, single):
    if single:
        return _dot_vec_f16(a, b, n)
    return _dot_tinyblas(a, b, n)


# ---------------------------------------------------------------------------------------------
# ggml_v_expf (AVX-512F/DQ version)


@intrinsic
def _bits_f64(typingctx, b):
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return sig, codegen


@njit(inline="always", cache=True)
def _scalef(j, n):
    # vscalefps for integral |n| <= 192: j * 2^n with one rounding (the float64 product is
    # exact; its conversion to float32 rounds to nearest even, subnormals included)
    two_n = _bits_f64((np.int64(n) + np.int64(1023)) << np.int64(52))
    return np.float32(np.float64(j) * two_n)


_E_LOG2E = np.float32(float.fromhex('0x1.715476p+0'))
_E_SHIFT = np.float32(float.fromhex('0x1.8p23'))
_E_LN2HI = np.float32(float.fromhex('0x1.62e4p-1'))
_E_LN2LO = np.float32(float.fromhex('0x1.7f7d1cp-20'))
_E_C5 = np.float32(float.fromhex('0x1.0e4020p-7'))
_E_C4 = np.float32(float.fromhex('0x1.573e2ep-5'))
_E_C3 = np.float32(float.fromhex('0x1.555e66p-3'))
_E_C2 = np.float32(float.fromhex('0x1.fffdb6p-2'))
_E_C1 = np.float32(float.fromhex('0x1.ffffecp-1'))


@njit(inline="always", cache=True)
def v_expf(x):
    """ggml_v_expf, AVX-512 version, one lane."""
    z = fma32(x, _E_LOG2E, _E_SHIFT)
    n = z - _E_SHIFT
    if not (abs(n) <= np.float32(192.0)):            # |n| > 192 (or nan): 0 or inf
        if n <= np.float32(0.0):
            return np.float32(0.0)
        if n > np.float32(0.0):
            return np.float32(np.inf)
        return n                                     # nan: compare false, res is nan
    b = fma32(-n, _E_LN2HI, x)
    b = fma32(-n, _E_LN2LO, b)
    u = b * b
    p1 = fma32(_E_C5, b, _E_C4)
    p2 = fma32(_E_C3, b, _E_C2)
    p3 = fma32(_E_C1, b, np.float32(1.0))
    j = fma32(fma32(p1, u, p2), u, p3)
    return _scalef(j, n)


# ---------------------------------------------------------------------------------------------
# the attention


def kv_cells(P, T, kv_size=512):
    """n_kv of llama.cpp's graph: min(kv_size, max(256, roundup(P + T, 256)))."""
    need = ((P + T + 255) // 256) * 256
    return min(kv_size, max(256, need))


@njit(inline="always", cache=True)
def _masked(j, p1, npos, window):
    return j > p1 or j >= npos or (window > 0 and p1 - j >= window)


@njit(cache=True)
def _row(q, k_cache, v_cache, P, window, n_kv, full_kq, h, t, kq, sm, out, qh, ph, acc):
    """One (head, query row): kq, softmax, kqv. qh [D], ph [n_kv], acc [64, D] scratch."""
    T, nH, D = q.shape
    nKV, S, _ = k_cache.shape
    g = h // (nH // nKV)
    single = T == 1
    npos = P + T
    p1 = P + t
    # query to f16
    for d in range(D):
        qh[d] = f16r(q[t, h, d])
    # kq = K . q (every cell < n_kv with full_kq, else the unmasked ones)
    kqr = kq[h, t]
    for j in range(n_kv):
        if _masked(j, p1, npos, window):
            if not full_kq:
                kqr[j] = -np.inf
                continue
            if j >= S:
                kqr[j] = np.float32(0.0)
                continue
        kqr[j] = _dot(k_cache[g, j], qh, D, single)
    # softmax: w = kq*1 + mask; max; y = expf(w - max) per 16-chunk, chunk sums in float32,
    # total in float64; p = y * (float)(1/total). Chunks past npos are all zero.
    smr = sm[h, t]
    mx = np.float32(-np.inf)
    for j in range(npos):
        if not _masked(j, p1, npos, window):
            w = kqr[j] * np.float32(1.0) + np.float32(0.0)
            mx = mx if mx > w else w         # MAX(max, x)
    nch = (npos + 15) // 16
    total = 0.0
    s8 = acc[0, :8]                              # scratch (acc is reset below)
    for c in range(nch):
        for l in range(16):
            j = c * 16 + l
            y = np.float32(0.0)
            if not _masked(j, p1, npos, window):
                y = v_expf((kqr[j] * np.float32(1.0) + np.float32(0.0)) - mx)
            smr[j] = y
        b = c * 16
        for l in range(8):
            s8[l] = smr[b + l + 8] + smr[b + l]
        s4a = s8[4] + s8[0]
        s4b = s8[5] + s8[1]
        s4c = s8[6] + s8[2]
        s4d = s8[7] + s8[3]
        total += np.float64((s4c + s4a) + (s4d + s4b))
    sc = np.float32(1.0 / total)
    for j in range(nch * 16):
        y = smr[j] * sc
        smr[j] = y
        ph[j] = f16r(y)
    for j in range(nch * 16, n_kv):
        smr[j] = np.float32(0.0)
    # kqv[d] = sum_j ph[j] V[j, d]: position j feeds accumulator row ((j//16) % nacc)*16 + j%16
    # (vec_dot_f16: 4 accumulators of 16 lanes; tinyBLAS: 1), fma in position order; zero
    # weights (masked cells, cells >= npos) leave the accumulators unchanged and are skipped.
    nacc = 4 if single else 1
    for a in range(nacc * 16):
        for d in range(D):
            acc[a, d] = np.float32(0.0)
    for j in range(npos):
        wj = ph[j]
        if wj == np.float32(0.0):
            continue
        ar = acc[((j >> 4) % nacc) * 16 + (j & 15)]
        vr = v_cache[g, j]
        for d in range(D):
            ar[d] = fma32(wj, vr[d], ar[d])
    if single:                                   # acc0 += acc2, acc1 += acc3, acc0 += acc1
        for l in range(16):
            for d in range(D):
                acc[l, d] = (acc[l, d] + acc[32 + l, d]) + (acc[16 + l, d] + acc[48 + l, d])
    for half in (8, 4, 2, 1):                    # _mm512_reduce_add_ps over the 16 lanes
        for l in range(half):
            for d in range(D):
                acc[l, d] = acc[l + half, d] + acc[l, d]
    for d in range(D):
        out[t, h * D + d] = acc[0, d]


@njit(cache=True)
def _attn_serial(q, k_cache, v_cache, P, window, n_kv, full_kq, kq, sm, out):
    T, nH, D = q.shape
    qh = np.empty(D, np.float32)
    ph = np.empty(n_kv, np.float32)
    acc = np.empty((64, D), np.float32)
    for r in range(nH * T):
        _row(q, k_cache, v_cache, P, window, n_kv, full_kq, r // T, r % T, kq, sm, out,
             qh, ph, acc)


@njit(cache=True, parallel=True)
def _attn_parallel(q, k_cache, v_cache, P, window, n_kv, full_kq, kq, sm, out):
    T, nH, D = q.shape
    for r in prange(nH * T):
        qh = np.empty(D, np.float32)
        ph = np.empty(n_kv, np.float32)
        acc = np.empty((64, D), np.float32)
        _row(q, k_cache, v_cache, P, window, n_kv, full_kq, r // T, r % T, kq, sm, out,
             qh, ph, acc)


def attention_ggml(q, k_cache, v_cache, P, window=0, n_kv=None, return_parts=False,
                   parallel=True):
    """llama.cpp's non-flash attention, bit for bit (see the module docstring).

    q: float32 [T, nH, D], roped and scaled (the SCALE node after Qcur ROPE).
    k_cache, v_cache: float32 [nKV, S, D] holding float16 values (see :func:`round_f16`);
      rows P .. P+T-1 already hold this call's K and V; rows >= P+T are ignored (treated as 0).
    P: tokens cached before this call. window: sliding window (0 = none; Gemma 3: 512 on
      layers il % 6 < 5).
    n_kv: KV cells the graph spans; default :func:`kv_cells` (P, T).
    Returns float32 [T, nH*D] (= kqv_out); with return_parts also (kq, kq_soft_max) as
    [nH, T, n_kv] arrays (kq computed at every cell, as the dumps hold it).
    """
    T, nH, D = q.shape
    if n_kv is None:
        n_kv = kv_cells(P, T)
    assert D % 64 == 0 and n_kv % 64 == 0 and P + T <= n_kv
    assert P + T <= k_cache.shape[1]
    q = np.ascontiguousarray(q, dtype=np.float32)
    k_cache = np.ascontiguousarray(k_cache, dtype=np.float32)
    v_cache = np.ascontiguousarray(v_cache, dtype=np.float32)
    kq = np.empty((nH, T, n_kv), np.float32)
    sm = np.empty((nH, T, n_kv), np.float32)
    out = np.empty((T, nH * D), np.float32)
    fn = _attn_serial if (T == 1 or not parallel) else _attn_parallel
    fn(q, k_cache, v_cache, np.int64(P), np.int64(window), np.int64(n_kv),
       bool(return_parts), kq, sm, out)
    if return_parts:
        return out, kq, sm
    return out
