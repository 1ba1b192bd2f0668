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
Decode (T == 1) runs serially. T > 1 (:func:`_attn_parallel`, tinyBLAS order) takes groups of
query rows and up to 4 heads of one KV head at a time, with the same operations per element
in the same order: kq as register tiles (4 heads x 4 keys, key blocks shared by the rows),
the softmax on 16-lane vectors (ggml_v_expf with selects for its branches, f16 rounding by
fptrunc to half, which is vcvtps2ph), kqv from V transposed once per call so that each
output's 16-lane tinyBLAS accumulator is one vector fma per 16-chunk of positions; only
the chunks holding unmasked cells are visited (a chunk of zero weights changes nothing).
Verified bit-exact against llama.cpp dumps: /work/peer/emu/C/verify.py.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .bits import _lane_tree, fma32
from .bits import round_f16 as f16r

_LANES = 16


# ---------------------------------------------------------------------------------------------
# float16 rounding (vcvtps2ph, round to nearest even), value returned as float32: f16r in
# kernels (kernels/bits.py), round_f16 for arrays


def round_f16(x):
    """Round float32 values to float16 exactly as ggml's SET_ROWS f32 -> f16 (vcvtps2ph, RNE);
    returns float32 holding the float16 values."""
    a = np.ascontiguousarray(x, dtype=np.float32)
    return a.astype(np.float16).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# dot products in the two orders ggml uses (inputs: contiguous float32 holding f16 values)


# _lane_tree (kernels/bits.py) is _mm512_reduce_add_ps: the upper half added to the lower
# half lane by lane until one lane is left


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


def _lane_trees(builder, vecs):
    """_lane_tree of every vector in vecs, as a butterfly over all of them (each result sees
    the same additions: upper half + lower half until one lane is left). Returns the list of
    scalars, in the order of vecs."""
    i32 = ir.IntType(32)
    n = vecs[0].type.count
    items = [(v, [k]) for k, v in enumerate(vecs)]      # (vector, labels of its groups)
    size = n
    while size > 1:
        if len(items) % 2:
            items.append((items[-1][0], [None] * len(items[-1][1])))
        h = size // 2
        nxt = []
        for (a, la), (b, lb) in zip(items[0::2], items[1::2]):
            hi, lo = [], []
            for src, off, labels in ((0, 0, la), (n, 0, lb)):
                for g in range(len(labels)):
                    hi += [src + g * size + h + l for l in range(h)]
                    lo += [src + g * size + l for l in range(h)]
            vh = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, n), hi))
            vl = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, n), lo))
            nxt.append((builder.fadd(vh, vl), la + lb))
        items = nxt
        size = h
    out = [None] * len(vecs)
    for v, labels in items:
        for lane, lab in enumerate(labels):
            if lab is not None and out[lab] is None:
                out[lab] = builder.extract_element(v, ir.Constant(i32, lane))
    return out


# ---------------------------------------------------------------------------------------------
# T > 1 (tinyBLAS order), several heads at a time. Every output element sees exactly the
# operations of :func:`_row` in the same order; only the loop nesting differs:
# * kq: _NQ query heads (sharing a KV head) x 4 key rows per step, one 16-lane accumulator per
#   (head, key), fma over D in 16-element chunks in order, then the lane tree;
# * kqv: V transposed once per call (vt [nKV, D, npos rounded up to 16], zero padded), so the
#   tinyBLAS accumulator of output d (lane = position % 16) is a 16-lane fma over the 16-chunks
#   of positions in order: fma(p[chunk], vt[d, chunk], acc). Chunks whose weights are all zero
#   (causally masked, outside the window) leave the accumulators unchanged and are skipped;
#   zero weights inside a visited chunk add exactly +-0 to an accumulator that is never -0
#   (this needs finite V: with an inf/nan in V's rows < P + T, every row goes through _row,
#   which skips zero weights one by one).

_NQ = 4       # query heads per tile (padded with zero rows)
_ND = 4       # outputs (d) per kqv register block


def _ptr2(context, builder, aty, ary, i, j):
    return cgutils.get_item_pointer(context, builder, aty, ary, [i, j])


def _kq_tile_codegen(nk):
    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        vf = ir.VectorType(f32, _LANES)
        kty, qty, _, _, rty = signature.args
        k2, q2, r2 = [context.make_array(t)(context, builder, value=v)
                      for t, v in zip((kty, qty, rty), (args[0], args[1], args[4]))]
        j, n = args[2], args[3]
        it = n.type
        zero = ir.Constant(vf, [ir.Constant(f32, 0.0)] * _LANES)
        accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(nk)]
                for _ in range(_NQ)]
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vf, [vf, vf, vf]), f"llvm.fma.v{_LANES}f32")
        nb = builder.udiv(n, ir.Constant(it, _LANES))
        with cgutils.for_range(builder, nb) as loop:
            c = builder.mul(loop.index, ir.Constant(it, _LANES))
            kv = [builder.load(builder.bitcast(
                _ptr2(context, builder, kty, k2, builder.add(j, ir.Constant(it, b)), c),
                vf.as_pointer()), align=4) for b in range(nk)]
            for i in range(_NQ):
                qv = builder.load(builder.bitcast(
                    _ptr2(context, builder, qty, q2, ir.Constant(it, i), c),
                    vf.as_pointer()), align=4)
                for b in range(nk):
                    builder.store(builder.call(fma, [kv[b], qv, builder.load(accs[i][b])]),
                                  accs[i][b])
        sums = _lane_trees(builder, [builder.load(accs[i][b])
                                     for i in range(_NQ) for b in range(nk)])
        for i in range(_NQ):
            for b in range(nk):
                builder.store(sums[i * nk + b],
                              _ptr2(context, builder, rty, r2, ir.Constant(it, i),
                                    builder.add(j, ir.Constant(it, b))))
        return context.get_dummy_value()
    return codegen


def _tile_typer(a, b, j, n, r):
    for t in (a, b, r):
        if not (isinstance(t, types.Array) and t.ndim == 2 and t.dtype == types.float32
                and t.layout == "C"):
            return None
    return types.void(a, b, types.intp, types.intp, r)


@intrinsic
def _kq_tile4(typingctx, k2, q2, j, n, r2):
    """r2[i, j + b] = tinyBLAS dot(k2[j + b, :n], q2[i, :n]) for i < _NQ, b < 4."""
    sig = _tile_typer(k2, q2, j, n, r2)
    return (sig, _kq_tile_codegen(4)) if sig is not None else None


@intrinsic
def _kq_tile1(typingctx, k2, q2, j, n, r2):
    """r2[i, j] = tinyBLAS dot(k2[j, :n], q2[i, :n]) for i < _NQ."""
    sig = _tile_typer(k2, q2, j, n, r2)
    return (sig, _kq_tile_codegen(1)) if sig is not None else None


def _kqv_codegen(context, builder, signature, args):
    f32 = ir.FloatType()
    vf = ir.VectorType(f32, _LANES)
    vty, pty, _, _, _, _, rty = signature.args
    v2, p2, r2 = [context.make_array(t)(context, builder, value=v)
                  for t, v in zip((vty, pty, rty), (args[0], args[1], args[6]))]
    c0, c1, dlo, dhi = args[2], args[3], args[4], args[5]
    it = c0.type
    zero = ir.Constant(vf, [ir.Constant(f32, 0.0)] * _LANES)
    fma = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vf, [vf, vf, vf]), f"llvm.fma.v{_LANES}f32")
    accs = [[cgutils.alloca_once(builder, vf) for _ in range(_ND)] for _ in range(_NQ)]
    nb = builder.udiv(builder.sub(dhi, dlo), ir.Constant(it, _ND))
    with cgutils.for_range(builder, nb) as dl:
        d0 = builder.add(dlo, builder.mul(dl.index, ir.Constant(it, _ND)))
        for i in range(_NQ):
            for e in range(_ND):
                builder.store(zero, accs[i][e])
        with cgutils.for_range(builder, builder.sub(c1, c0)) as cl:
            c = builder.mul(builder.add(c0, cl.index), ir.Constant(it, _LANES))
            pv = [builder.load(builder.bitcast(
                _ptr2(context, builder, pty, p2, ir.Constant(it, i), c),
                vf.as_pointer()), align=4) for i in range(_NQ)]
            for e in range(_ND):
                vv = builder.load(builder.bitcast(
                    _ptr2(context, builder, vty, v2, builder.add(d0, ir.Constant(it, e)), c),
                    vf.as_pointer()), align=4)
                for i in range(_NQ):
                    builder.store(builder.call(fma, [pv[i], vv, builder.load(accs[i][e])]),
                                  accs[i][e])
        sums = _lane_trees(builder, [builder.load(accs[i][e])
                                     for i in range(_NQ) for e in range(_ND)])
        for i in range(_NQ):
            for e in range(_ND):
                builder.store(sums[i * _ND + e],
                              _ptr2(context, builder, rty, r2, ir.Constant(it, i),
                                    builder.add(d0, ir.Constant(it, e))))
    return context.get_dummy_value()


@intrinsic
def _kqv_tile(typingctx, vt2, p2, c0, c1, dlo, dhi, r2):
    """r2[i, d] = tinyBLAS sum over 16-chunks c0 <= c < c1 of p2[i, chunk] * vt2[d, chunk],
    for i < _NQ, dlo <= d < dhi ((dhi - dlo) % _ND == 0)."""
    for t in (vt2, p2, r2):
        if not (isinstance(t, types.Array) and t.ndim == 2 and t.dtype == types.float32
                and t.layout == "C"):
            return None
    return (types.void(vt2, p2, types.intp, types.intp, types.intp, types.intp, r2),
            _kqv_codegen)


def _vconst(vf, x):
    return ir.Constant(vf, [ir.Constant(vf.element, float(x))] * vf.count)


def _v_f16r(builder, x):
    """f16r on a vector: fptrunc to half (vcvtps2ph, nearest even) and back; nan kept as is."""
    vh = ir.VectorType(ir.HalfType(), x.type.count)
    r = builder.fpext(builder.fptrunc(x, vh), x.type)
    return builder.select(builder.fcmp_unordered("uno", x, x), x, r)


def _v_expf(builder, x, fma):
    """v_expf, lane-wise on a float32 vector (same operations, branches as selects)."""
    vf = x.type
    n16 = vf.count

    def c(v):
        return _vconst(vf, v)
    z = builder.call(fma, [x, c(_E_LOG2E), c(_E_SHIFT)])
    n = builder.fsub(z, c(_E_SHIFT))
    fabs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf]),
                                          f"llvm.fabs.v{n16}f32")
    big = builder.fcmp_unordered(">", builder.call(fabs, [n]), c(192.0))   # not |n| <= 192
    nn = builder.fsub(c(-0.0), n)
    b = builder.call(fma, [nn, c(_E_LN2HI), x])
    b = builder.call(fma, [nn, c(_E_LN2LO), b])
    u = builder.fmul(b, b)
    p1 = builder.call(fma, [c(_E_C5), b, c(_E_C4)])
    p2 = builder.call(fma, [c(_E_C3), b, c(_E_C2)])
    p3 = builder.call(fma, [c(_E_C1), b, c(1.0)])
    j = builder.call(fma, [builder.call(fma, [p1, u, p2]), u, p3])
    i64v = ir.VectorType(ir.IntType(64), n16)
    nsafe = builder.select(big, c(0.0), n)
    ni = builder.fptosi(nsafe, i64v)
    e = builder.shl(builder.add(ni, ir.Constant(i64v, [ir.Constant(ir.IntType(64), 1023)] * n16)),
                    ir.Constant(i64v, [ir.Constant(ir.IntType(64), 52)] * n16))
    dv = ir.VectorType(ir.DoubleType(), n16)
    res = builder.fptrunc(builder.fmul(builder.fpext(j, dv), builder.bitcast(e, dv)), vf)
    # |n| > 192 or nan: n <= 0 -> 0, n > 0 -> inf, nan -> n
    ovf = builder.select(builder.fcmp_ordered("<=", n, c(0.0)), c(0.0),
                         builder.select(builder.fcmp_ordered(">", n, c(0.0)), c(np.inf), n))
    return builder.select(big, ovf, res)


def _sm_codegen(context, builder, signature, args):
    f32 = ir.FloatType()
    vf = ir.VectorType(f32, _LANES)
    kty, pty = signature.args[:2]
    k2, p2 = [context.make_array(t)(context, builder, value=v)
              for t, v in zip((kty, pty), args[:2])]
    i, c0, c1, jlo, jhi, mx = args[2:]
    it = c0.type
    fma = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vf, [vf, vf, vf]), f"llvm.fma.v{_LANES}f32")
    ivt = ir.VectorType(it, _LANES)
    lanes = ir.Constant(ivt, [ir.Constant(it, l) for l in range(_LANES)])
    zero_m = ir.Constant(ir.VectorType(ir.IntType(32), _LANES),
                         [ir.Constant(ir.IntType(32), 0)] * _LANES)

    def splat(v, vt):
        return builder.shuffle_vector(builder.insert_element(ir.Constant(vt, None), v,
                                                             ir.Constant(ir.IntType(32), 0)),
                                      ir.Constant(vt, None), zero_m)
    vlo = splat(jlo, ivt)
    vhi = splat(jhi, ivt)
    vmx = splat(mx, vf)
    total = cgutils.alloca_once_value(builder, ir.Constant(ir.DoubleType(), 0.0))
    with cgutils.for_range(builder, builder.sub(c1, c0)) as cl:
        b = builder.mul(builder.add(c0, cl.index), ir.Constant(it, _LANES))
        jv = builder.add(splat(b, ivt), lanes)
        m = builder.and_(builder.icmp_signed(">=", jv, vlo), builder.icmp_signed("<", jv, vhi))
        w = builder.load(builder.bitcast(_ptr2(context, builder, kty, k2, i, b),
                                         vf.as_pointer()), align=4)
        w = builder.fadd(builder.fmul(w, _vconst(vf, 1.0)), _vconst(vf, 0.0))
        y = _v_expf(builder, builder.fsub(w, vmx), fma)
        y = builder.select(m, y, _vconst(vf, 0.0))
        builder.store(y, builder.bitcast(_ptr2(context, builder, pty, p2, i, b),
                                         vf.as_pointer()), align=4)
        s = _lane_tree(builder, y)
        builder.store(builder.fadd(builder.load(total), builder.fpext(s, ir.DoubleType())),
                      total)
    return builder.load(total)


def _max_codegen(context, builder, signature, args):
    f32 = ir.FloatType()
    vf = ir.VectorType(f32, _LANES)
    kty = signature.args[0]
    k2 = context.make_array(kty)(context, builder, value=args[0])
    i, c0, c1, jlo, jhi = args[1:]
    it = c0.type
    ivt = ir.VectorType(it, _LANES)
    i32 = ir.IntType(32)
    lanes = ir.Constant(ivt, [ir.Constant(it, l) for l in range(_LANES)])
    zero_m = ir.Constant(ir.VectorType(i32, _LANES), [ir.Constant(i32, 0)] * _LANES)

    def splat(v, vt):
        return builder.shuffle_vector(builder.insert_element(ir.Constant(vt, None), v,
                                                             ir.Constant(i32, 0)),
                                      ir.Constant(vt, None), zero_m)
    vlo = splat(jlo, ivt)
    vhi = splat(jhi, ivt)
    ninf = _vconst(vf, -np.inf)
    bt = ir.VectorType(ir.IntType(1), _LANES)
    acc = cgutils.alloca_once_value(builder, ninf)
    nan = cgutils.alloca_once_value(
        builder, ir.Constant(bt, [ir.Constant(ir.IntType(1), 0)] * _LANES))
    with cgutils.for_range(builder, builder.sub(c1, c0)) as cl:
        b = builder.mul(builder.add(c0, cl.index), ir.Constant(it, _LANES))
        jv = builder.add(splat(b, ivt), lanes)
        m = builder.and_(builder.icmp_signed(">=", jv, vlo), builder.icmp_signed("<", jv, vhi))
        w = builder.load(builder.bitcast(_ptr2(context, builder, kty, k2, i, b),
                                         vf.as_pointer()), align=4)
        w = builder.fadd(builder.fmul(w, _vconst(vf, 1.0)), _vconst(vf, 0.0))
        w = builder.select(m, w, ninf)
        a = builder.load(acc)
        builder.store(builder.select(builder.fcmp_ordered(">", a, w), a, w), acc)
        builder.store(builder.or_(builder.load(nan), builder.fcmp_unordered("uno", w, w)), nan)
    # lanes are combined as a tree; without nan the max of floats with no -0 (w = x*1 + 0)
    # does not depend on the order
    v = builder.load(acc)
    n = _LANES
    while n > 1:
        h = n // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, h), list(range(h))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, h),
                                                      list(range(h, 2 * h))))
        v = builder.select(builder.fcmp_ordered(">", lo, hi), lo, hi)
        n = h
    mx = builder.extract_element(v, ir.Constant(i32, 0))
    nb = builder.bitcast(builder.load(nan), ir.IntType(_LANES))
    anynan = builder.icmp_unsigned("!=", nb, ir.Constant(ir.IntType(_LANES), 0))
    return builder.select(anynan, ir.Constant(f32, float("nan")), mx)


@intrinsic
def _max_chunks(typingctx, k2, i, c0, c1, jlo, jhi):
    """max of k2[i, j]*1 + 0 over jlo <= j < jhi (inside the 16-chunks c0 <= c < c1); nan if
    any of them is nan (the caller then runs the order-dependent scalar loop)."""
    if not (isinstance(k2, types.Array) and k2.ndim == 2 and k2.dtype == types.float32
            and k2.layout == "C"):
        return None
    sig = types.float32(k2, types.intp, types.intp, types.intp, types.intp, types.intp)
    return sig, _max_codegen


@intrinsic
def _sm_chunks(typingctx, k2, p2, i, c0, c1, jlo, jhi, mx):
    """For 16-chunks c0 <= c < c1 of row i: p2[i, j] = v_expf((k2[i, j]*1 + 0) - mx) for
    jlo <= j < jhi, else 0; returns the float64 sum of the chunks' _mm512_reduce_add_ps."""
    for t in (k2, p2):
        if not (isinstance(t, types.Array) and t.ndim == 2 and t.dtype == types.float32
                and t.layout == "C"):
            return None
    sig = types.float64(k2, p2, types.intp, types.intp, types.intp, types.intp, types.intp,
                        types.float32)
    return sig, _sm_codegen


def _scale_codegen(context, builder, signature, args):
    f32 = ir.FloatType()
    vf = ir.VectorType(f32, _LANES)
    pty = signature.args[0]
    p2 = context.make_array(pty)(context, builder, value=args[0])
    i, c0, c1, sc = args[1:]
    it = c0.type
    zero_m = ir.Constant(ir.VectorType(ir.IntType(32), _LANES),
                         [ir.Constant(ir.IntType(32), 0)] * _LANES)
    vsc = builder.shuffle_vector(builder.insert_element(ir.Constant(vf, None), sc,
                                                        ir.Constant(ir.IntType(32), 0)),
                                 ir.Constant(vf, None), zero_m)
    with cgutils.for_range(builder, builder.sub(c1, c0)) as cl:
        b = builder.mul(builder.add(c0, cl.index), ir.Constant(it, _LANES))
        ptr = builder.bitcast(_ptr2(context, builder, pty, p2, i, b), vf.as_pointer())
        y = builder.fmul(builder.load(ptr, align=4), vsc)
        builder.store(_v_f16r(builder, y), ptr, align=4)
    return context.get_dummy_value()


@intrinsic
def _scale_f16_chunks(typingctx, p2, i, c0, c1, sc):
    """p2[i, j] = f16r(p2[i, j] * sc) over the 16-chunks c0 <= c < c1."""
    if not (isinstance(p2, types.Array) and p2.ndim == 2 and p2.dtype == types.float32
            and p2.layout == "C"):
        return None
    return types.void(p2, types.intp, types.intp, types.intp, types.float32), _scale_codegen


def _f16copy_codegen(context, builder, signature, args):
    f32 = ir.FloatType()
    vf = ir.VectorType(f32, _LANES)
    sty, dty = signature.args[:2]
    s1, d1 = [context.make_array(t)(context, builder, value=v)
              for t, v in zip((sty, dty), args[:2])]
    n = args[2]
    it = n.type
    with cgutils.for_range(builder, builder.udiv(n, ir.Constant(it, _LANES))) as cl:
        b = builder.mul(cl.index, ir.Constant(it, _LANES))
        x = builder.load(builder.bitcast(builder.gep(s1.data, [b]), vf.as_pointer()), align=4)
        builder.store(_v_f16r(builder, x),
                      builder.bitcast(builder.gep(d1.data, [b]), vf.as_pointer()), align=4)
    return context.get_dummy_value()


@intrinsic
def _f16_copy(typingctx, src, dst, n):
    """dst[:n] = f16r(src[:n]), n % 16 == 0 (contiguous 1-d float32)."""
    sig = _dot_typer(src, dst, n)
    return (types.void(src, dst, types.intp), _f16copy_codegen) if sig is not None else None


@njit(cache=True)
def _rows_group(q, k_cache, v_cache, vt, P, window, n_kv, full_kq, t0, R, g, h0, nq, kq, sm,
                out, qh, kqs, ph, res, rng):
    """Query rows t0 .. t0+R-1, heads h0 .. h0+nq-1 (all reading KV head g): kq, softmax,
    kqv. The rows share key blocks (kq) and d blocks of vt (kqv) while these are in cache.
    A (row, head) whose softmax scale is not finite (nan/inf inputs) is redone by :func:`_row`,
    whose nan propagation through masked cells differs."""
    T, nH, D = q.shape
    S = k_cache.shape[1]
    kg = k_cache[g]
    vg = vt[g]
    jmin = n_kv
    jmax = 0
    for r in range(R):
        p1 = P + t0 + r
        jlo = 0
        if window > 0 and p1 - window + 1 > 0:
            jlo = p1 - window + 1
        rng[r, 0] = jlo
        rng[r, 1] = p1 + 1                       # unmasked cells: jlo <= j < p1 + 1
        jmin = min(jmin, jlo)
        jmax = max(jmax, p1 + 1)
        for i in range(_NQ):
            if i < nq:
                _f16_copy(q[t0 + r, h0 + i], qh[r, i], D)
            else:
                for d in range(D):
                    qh[r, i, d] = np.float32(0.0)
    # kq, in blocks of _JB keys shared by the R rows
    for jb in range(jmin, jmax, _JB):
        for r in range(R):
            j = max(jb, rng[r, 0])
            je = min(jb + _JB, rng[r, 1])
            while j + 4 <= je:
                _kq_tile4(kg, qh[r], j, D, kqs[r])
                j += 4
            while j < je:
                _kq_tile1(kg, qh[r], j, D, kqs[r])
                j += 1
    for r in range(R):
        t = t0 + r
        jlo = rng[r, 0]
        jhi = rng[r, 1]
        if full_kq:                              # the masked cells, as _row computes them
            for i in range(nq):
                kqr = kq[h0 + i, t]
                for jj in range(n_kv):
                    if jj >= jlo and jj < jhi:
                        kqr[jj] = kqs[r, i, jj]
                    elif jj >= S:
                        kqr[jj] = np.float32(0.0)
                    else:
                        kqr[jj] = _dot_tinyblas(kg[jj], qh[r, i], D)
        # chunks holding unmasked cells: c0 <= c < c1 (the others give y = 0: chunk sum 0,
        # which leaves the float64 total unchanged, and zero weights)
        c0 = jlo // 16
        c1 = (jhi + 15) // 16
        rng[r, 2] = c0
        rng[r, 3] = c1
        phr = ph[r]
        kqsr = kqs[r]
        for i in range(_NQ):
            if i >= nq:
                for jj in range(c0 * 16, c1 * 16):
                    phr[i, jj] = np.float32(0.0)
                continue
            mx = _max_chunks(kqsr, i, c0, c1, jlo, jhi)
            if mx != mx:                         # a nan: MAX(max, x) in order, as _row
                mx = np.float32(-np.inf)
                for jj in range(jlo, jhi):
                    w = kqsr[i, jj] * np.float32(1.0) + np.float32(0.0)
                    mx = mx if mx > w else w
            total = _sm_chunks(kqsr, phr, i, c0, c1, jlo, jhi, mx)
            sc = np.float32(1.0 / total)
            rng[r, 4 + i] = 0 if abs(sc) < np.float32(np.inf) else 1
            if full_kq:
                smr = sm[h0 + i, t]
                for jj in range(n_kv):
                    smr[jj] = np.float32(0.0)
                for jj in range(c0 * 16, c1 * 16):
                    smr[jj] = phr[i, jj] * sc
            _scale_f16_chunks(phr, i, c0, c1, sc)
    # kqv, in blocks of _ND outputs shared by the R rows
    for d0 in range(0, D, _ND):
        for r in range(R):
            _kqv_tile(vg, ph[r], rng[r, 2], rng[r, 3], d0, d0 + _ND, res[r])
    for r in range(R):
        for i in range(nq):
            for d in range(D):
                out[t0 + r, (h0 + i) * D + d] = res[r, i, d]
    for r in range(R):
        for i in range(nq):
            if rng[r, 4 + i]:
                _row(q, k_cache, v_cache, P, window, n_kv, full_kq, h0 + i, t0 + r, kq, sm,
                     out, np.empty(D, np.float32), np.empty(n_kv, np.float32),
                     np.empty((64, D), np.float32))


_NCHUNK = 16  # prange work items (row group m goes to item m % _NCHUNK: balances causal cost)
_R = 4        # query rows per group
_JB = 16      # keys per kq block


@njit(cache=True, parallel=True)
def _attn_parallel(q, k_cache, v_cache, P, window, n_kv, full_kq, kq, sm, out):
    T, nH, D = q.shape
    nKV = k_cache.shape[0]
    hpg = nH // nKV
    npos = P + T
    np16 = ((npos + 15) // 16) * 16
    vt = np.empty((nKV, D, np16), np.float32)
    nonfin = np.zeros(nKV * D, np.int64)
    for gd in prange(nKV * D):
        g = gd // D
        d = gd % D
        nf = 0
        for j in range(npos):
            x = v_cache[g, j, d]
            vt[g, d, j] = x
            nf += not (abs(x) < np.float32(np.inf))
        nonfin[gd] = nf
        for j in range(npos, np16):
            vt[g, d, j] = np.float32(0.0)
    if nonfin.sum() > 0:
        for r in prange(nH * T):
            _row(q, k_cache, v_cache, P, window, n_kv, full_kq, r // T, r % T, kq, sm, out,
                 np.empty(D, np.float32), np.empty(n_kv, np.float32),
                 np.empty((64, D), np.float32))
        return
    ngrp = (hpg + _NQ - 1) // _NQ
    nrg = (T + _R - 1) // _R
    for ch in prange(_NCHUNK):
        qh = np.empty((_R, _NQ, D), np.float32)
        kqs = np.empty((_R, _NQ, np16), np.float32)
        ph = np.empty((_R, _NQ, np16), np.float32)
        res = np.empty((_R, _NQ, D), np.float32)
        rng = np.empty((_R, 4 + _NQ), np.int64)
        for m in range(ch, nrg, _NCHUNK):
            t0 = m * _R
            R = min(_R, T - t0)
            for g in range(nKV):
                for hg in range(ngrp):
                    h0 = g * hpg + hg * _NQ
                    nq = min(_NQ, hpg - hg * _NQ)
                    _rows_group(q, k_cache, v_cache, vt, P, window, n_kv, full_kq, t0, R, g,
                                h0, nq, kq, sm, out, qh, kqs, ph, res, rng)


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
