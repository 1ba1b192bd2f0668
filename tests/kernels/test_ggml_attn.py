"""Property tests for ``torchless.kernels.ggml_attn.attention_ggml`` (llama.cpp's non-flash
attention with an f16 K/V cache).

The kernel is compared, bit for bit, with :func:`ref_attention`, a NumPy statement of what
ggml's graph computes (KQ = MUL_MAT, SOFT_MAX with a {0, -inf} mask, KQV = MUL_MAT), written
from ggml's code and not from the kernel:

* the query and the softmax weights are rounded to float16 (``vcvtps2ph``, nearest even)
  before each MUL_MAT;
* a MUL_MAT element is a dot product over the f16 values: with one query row (T == 1)
  ``ggml_vec_dot_f16`` (4 accumulators of 16 lanes, element i to accumulator (i // 16) % 4,
  then ``(acc0 + acc2) + (acc1 + acc3)``), with more rows tinyBLAS (one 16-lane accumulator);
  then ``_mm512_reduce_add_ps`` (upper half + lower half until one lane is left). A product
  of two float16 values is exact in float32 (11 + 11 significant bits, exponents far inside
  float32's range), so each fma is ``acc + a*b`` with one rounding, which float32 NumPy does;
  :func:`ref_dot` asserts that exactness;
* softmax: ``w = kq*1 + mask``, running max, ``y = ggml_v_expf(w - max)``, per 16-chunk the
  ``_mm512_reduce_add_ps`` sum in float32 added to a float64 total, ``p = y * (float)(1/total)``.
  ``ggml_v_expf`` (AVX-512) is transcribed in :func:`ref_v_expf` with an exact float32 fma
  emulation, and checked against the kernel's ``v_expf`` and against exp itself;
* GQA: query head h reads KV head ``h // (nH // nKV)``; cache cells from ``P + T`` on are
  empty (zero) and masked; a query at position ``P + t`` sees cells ``j <= P + t`` with
  ``P + t - j < window`` (window 0: no window).
"""
import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from numba import njit

from torchless.kernels.ggml_attn import attention_ggml, v_expf

from exact_f32 import assert_same_bits, f16, fma_f32  # (tests/kernels/exact_f32.py)

F32, F64 = np.float32, np.float64
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------
# the reference
# ---------------------------------------------------------------------------------------


def _hex(s):
    return F32(float.fromhex(s))


def ref_v_expf(x):
    """ggml_v_expf, AVX-512 version (ggml-cpu/vec.h), element-wise on float32."""
    x = np.asarray(x, F32)
    shift = _hex("0x1.8p23")
    with np.errstate(invalid="ignore", over="ignore"):
        z = fma_f32(x, _hex("0x1.715476p+0"), shift)
        n = z - shift
        b = fma_f32(-n, _hex("0x1.7f7d1cp-20"), fma_f32(-n, _hex("0x1.62e4p-1"), x))  # fnmadd
        out_of_range = np.abs(n) > 192
        u = b * b
        j = fma_f32(fma_f32(fma_f32(_hex("0x1.0e4020p-7"), b, _hex("0x1.573e2ep-5")), u,
                            fma_f32(_hex("0x1.555e66p-3"), b, _hex("0x1.fffdb6p-2"))),
                    u, fma_f32(_hex("0x1.ffffecp-1"), b, F32(1)))
        # _mm512_scalef_ps(j, n) = j * 2^n with one rounding (n integral here)
        e = np.where(np.isfinite(n) & ~out_of_range, n, 0).astype(np.int64)
        res = np.ldexp(j.astype(F64), e).astype(F32)
        alt = np.where(n <= 0, F32(0), F32(np.inf))
        return np.where(out_of_range, alt, res).astype(F32)


def reduce_add_16(v):
    """_mm512_reduce_add_ps over the last axis (16): upper half + lower half, 16 -> 1."""
    while v.shape[-1] > 1:
        h = v.shape[-1] // 2
        v = v[..., h:] + v[..., :h]
    return v[..., 0]


def ref_dot(a, b, single):
    """ggml's f16 MUL_MAT element over the last axis of float32 arrays holding f16 values:
    ggml_vec_dot_f16 (``single``) or tinyBLAS."""
    prod = a * b
    assert np.array_equal(prod.astype(F64), a.astype(F64) * b.astype(F64))  # exact products
    n = prod.shape[-1]
    if single:  # 4 accumulators x 16 lanes; step 64: acc[k] += elements 64s+16k .. 64s+16k+15
        steps = prod.reshape(prod.shape[:-1] + (n // 64, 4, 16))
        acc = np.zeros(prod.shape[:-1] + (4, 16), F32)
        for s in range(n // 64):
            acc = acc + steps[..., s, :, :]
        lanes = (acc[..., 0, :] + acc[..., 2, :]) + (acc[..., 1, :] + acc[..., 3, :])
    else:  # one 16-lane accumulator
        lanes = np.zeros(prod.shape[:-1] + (16,), F32)
        for s in range(n // 16):
            lanes = lanes + prod[..., 16 * s:16 * s + 16]
    return reduce_add_16(lanes)


def kv_cells(P, T):
    """Cells llama.cpp's graph spans: min(512, max(256, roundup(P + T, 256)))."""
    return min(512, max(256, -(-(P + T) // 256) * 256))


def ref_attention(q, k_cache, v_cache, P, window, n_kv):
    """(kqv_out [T, nH*D], kq [nH, T, n_kv], kq_soft_max [nH, T, n_kv])."""
    T, nH, D = q.shape
    nKV = k_cache.shape[0]
    K = np.zeros((nKV, n_kv, D), F32)
    V = np.zeros((nKV, n_kv, D), F32)
    K[:, :P + T] = k_cache[:, :P + T]
    V[:, :P + T] = v_cache[:, :P + T]
    single = T == 1
    p1 = P + np.arange(T)[:, None]  # query positions
    j = np.arange(n_kv)[None, :]  # cells
    masked = (j > p1) | ((window > 0) & (p1 - j >= window))
    mask = np.where(masked, F32(-np.inf), F32(0))
    out = np.empty((T, nH * D), F32)
    kq_all = np.empty((nH, T, n_kv), F32)
    sm_all = np.empty((nH, T, n_kv), F32)
    qh = f16(q)
    for h in range(nH):
        g = h // (nH // nKV)
        kq = ref_dot(K[g][None, :, :], qh[:, h, None, :], single)  # [T, n_kv]
        w = kq * F32(1) + mask
        mx = w.max(axis=1, keepdims=True)
        y = ref_v_expf(w - mx)
        chunk = reduce_add_16(y.reshape(T, n_kv // 16, 16))  # float32 chunk sums
        total = np.zeros(T, F64)
        for c in range(n_kv // 16):  # ggml_float sum, chunk after chunk
            total = total + chunk[:, c].astype(F64)
        p = y * (1.0 / total).astype(F32)[:, None]
        kqv = ref_dot(V[g].T[None, :, :], f16(p)[:, None, :], single)  # [T, D]
        out[:, h * D:(h + 1) * D] = kqv
        kq_all[h], sm_all[h] = kq, p
    return out, kq_all, sm_all


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------

HEADS = [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4)]  # (nH, nKV)


def f16_midpoints(rng, shape, scale):
    """float32 values exactly halfway between two adjacent float16 values near +-scale."""
    a = f16(rng.uniform(0.5, 2.0, shape) * scale)
    nxt = np.nextafter(a.astype(np.float16), np.float16(np.inf)).astype(F32)
    mid = ((a.astype(F64) + nxt) / 2).astype(F32)
    return np.where(rng.random(shape) < 0.5, -mid, mid)


@st.composite
def attn_cases(draw, min_T=1, spare=0):
    nH, nKV = draw(st.sampled_from(HEADS))
    D = draw(st.sampled_from([64, 128]))
    T = draw(st.integers(min_T, 9))
    P = draw(st.one_of(st.integers(0, 30), st.integers(240, 260)))  # n_kv 256 or 512
    window = draw(st.one_of(st.just(0), st.integers(1, 8), st.integers(1, P + T)))
    S = P + T + spare + draw(st.integers(0, 3))
    qs = draw(st.sampled_from([0.01, 0.1, 0.5, 2.0]))  # 2.0: peaked softmax, exp underflow
    ks = draw(st.sampled_from([0.5, 1.0, 4.0]))
    vs = draw(st.sampled_from([0.01, 1.0, 100.0]))
    special = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = (rng.standard_normal((T, nH, D)) * qs).astype(F32)
    kc = f16(rng.standard_normal((nKV, S, D)) * ks)
    vc = f16(rng.standard_normal((nKV, S, D)) * vs)
    if special:
        sel = rng.random(q.shape) < 0.2  # float16 rounding ties in the query
        q[sel] = f16_midpoints(rng, q.shape, qs)[sel]
        for c in (kc, vc):
            r = rng.random(c.shape)
            c[r < 0.05] = F32(0.0)
            c[(r >= 0.05) & (r < 0.1)] = F32(-0.0)
            sub = (r >= 0.1) & (r < 0.15)  # float16 subnormals
            c[sub] = (rng.integers(-1023, 1024, c.shape) * 2.0**-24).astype(F32)[sub]
        vc[rng.random(vc.shape) < 0.01] = F32(60000.0)
    # cells past P + T are not this sequence's: anything there must be ignored
    kc[:, P + T:] = f16(rng.standard_normal((nKV, S - P - T, D)) * 1000)
    vc[:, P + T:] = f16(rng.standard_normal((nKV, S - P - T, D)) * 1000)
    return q, kc, vc, P, window


# ---------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------


@njit(cache=False)  # not cached: a cached copy would keep an old v_expf inlined
def _kernel_v_expf(x, out):
    for i in range(x.shape[0]):
        out[i] = v_expf(x[i])


EXP_EDGES = [0.0, -0.0, -1e-30, 1e-30, -np.inf, np.inf, 88.72283, 88.72284, 89.0, 100.0,
             133.0, 134.0, -87.33654, -87.34, -100.0, -103.97, -103.98, -104.0, -110.0,
             -133.0, -134.0, -200.0, -0.34657359, 0.34657359, -4.552887, 38.42307]


@settings(max_examples=100, **SETTINGS)
@given(st.lists(st.floats(-140, 140, width=32), min_size=1, max_size=64),
       st.integers(0, 2**32 - 1))
@example(EXP_EDGES, 0)
def test_v_expf(xs, seed):
    """The kernel's v_expf equals the transcription of ggml_v_expf bit for bit, and is within
    2.5 ulp of exp: over every float32 with 2^-12 <= |x| and x in [-103.9, 88.73] the largest
    error is 2.238 ulp (at x = -4.5553937; ggml's comment quotes 1.45 + 0.5 ulp for ARM's
    original, which adds the 1 outside the polynomial); 0 below about -104, inf above 88.72."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([np.array(xs, F32), rng.uniform(-105, 89, 2000).astype(F32)])
    got = np.empty_like(x)
    _kernel_v_expf(x, got)
    assert_same_bits(got, ref_v_expf(x), "v_expf")
    with np.errstate(over="ignore"):
        e = np.exp(x.astype(F64))
    fin = (e <= float(np.finfo(F32).max)) & (x > -103.9)
    m, ex = np.frexp(e[fin])
    ulp = np.ldexp(1.0, np.maximum(ex - 1, -126) - 23)
    err = np.abs(got[fin].astype(F64) - e[fin]) / ulp
    assert err.max(initial=0) <= 2.5, (x[fin][np.argmax(err)], err.max())
    assert np.all(got[x >= F32(88.73)] == np.inf)
    assert np.all(got[x <= F32(-104.5)] == 0)


@settings(max_examples=200, **SETTINGS)
@given(attn_cases())
@example((np.full((1, 1, 64), 0.5, F32), np.ones((1, 1, 64), F32), np.ones((1, 1, 64), F32),
          0, 0))
def test_attention_matches_ggml_reference(case):
    """attention_ggml == ref_attention bit for bit (output, and with return_parts the softmax
    at every cell and kq at the sequence's cells), serial == parallel."""
    q, kc, vc, P, window = case
    T = q.shape[0]
    n_kv = kv_cells(P, T)
    want, want_kq, want_sm = ref_attention(q, kc, vc, P, window, n_kv)
    got = attention_ggml(q, kc, vc, P, window)
    assert_same_bits(got, want, f"out T={T} P={P} window={window} {q.shape} {kc.shape}")
    got2, kq, sm = attention_ggml(q, kc, vc, P, window, return_parts=True)
    assert_same_bits(got2, got, "out with return_parts")
    assert_same_bits(sm, want_sm, "kq_soft_max")
    assert_same_bits(kq[:, :, :P + T], want_kq[:, :, :P + T], "kq")
    if T > 1:
        assert_same_bits(attention_ggml(q, kc, vc, P, window, parallel=False), got, "serial")


@settings(max_examples=50, **SETTINGS)
@given(attn_cases(min_T=2, spare=1))
def test_attention_batch_rows_do_not_depend_on_T(case):
    """For T >= 2 (tinyBLAS for both MUL_MATs) a query row's result depends only on its
    position and the cache: row t of a batch at P equals the first row of a 2-row batch at
    P + t, and a larger n_kv (more masked cells) changes nothing. (A single-row call, T == 1,
    is a decode step: ggml_vec_dot_f16 sums in another order, so it is NOT asserted equal to
    the batch row; test_attention_matches_ggml_reference covers T == 1 on its own.)"""
    q, kc, vc, P, window = case
    T = q.shape[0]
    full = attention_ggml(q, kc, vc, P, window)
    for t in range(T):
        pair = np.ascontiguousarray(np.stack([q[t], q[(t + 1) % T]]))
        assert_same_bits(attention_ggml(pair, kc, vc, P + t, window)[0], full[t], f"row {t}")
    assert_same_bits(attention_ggml(q, kc, vc, P, window, n_kv=512), full, "n_kv=512")


def test_decode_order_differs_from_batch_order():
    """Why the test above leaves T == 1 out: on the same query row, cache and position the
    decode kernel (vec_dot_f16, 4 accumulators) and the batch kernel (tinyBLAS, 1) round
    differently. Both the reference and the kernel show it, each matching its own order."""
    rng = np.random.default_rng(7)
    P, nH, D = 100, 2, 128
    q = rng.standard_normal((2, nH, D)).astype(F32)
    kc = f16(rng.standard_normal((1, P + 2, D)))
    vc = f16(rng.standard_normal((1, P + 2, D)))
    decode = attention_ggml(q[:1], kc, vc, P)[0]
    batch = attention_ggml(q, kc, vc, P)[0]
    assert_same_bits(decode, ref_attention(q[:1], kc, vc, P, 0, 256)[0][0], "decode")
    assert_same_bits(batch, ref_attention(q, kc, vc, P, 0, 256)[0][0], "batch")
    assert (decode.view(np.uint32) != batch.view(np.uint32)).any()
    np.testing.assert_allclose(decode, batch, rtol=1e-5, atol=1e-6)
