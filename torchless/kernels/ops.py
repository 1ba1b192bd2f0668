"""Norms, activations, RoPE and attention as Numba kernels.

All take 2-D (or 3-D) float32 arrays so one specialisation serves decode (T = 1) and prefill.
"""
import math

import numpy as np
from numba import njit, prange

from .bits import chunked_sum_f64, fast_exp, fast_tanh, fixed_dot

SQRT_2_OVER_PI = np.float32(math.sqrt(2.0 / math.pi))

NORM_RMS, NORM_RMS1P, NORM_LAYER = 0, 1, 2
ACT_SILU, ACT_GELU_TANH, ACT_GELU = 0, 1, 2


# One float32 chain per sum, in element order (a fixed, simple order; vectorising it changes
# greedy text at llama.cpp's near-ties, see tests/test_gemma3_270m.py).
@njit(cache=True)
def _norm_row(x, w, b, eps, kind, out):
    n = x.shape[0]
    if kind == NORM_LAYER:
        mu = np.float32(0.0)
        for i in range(n):
            mu += x[i]
        mu /= n
        var = np.float32(0.0)
        for i in range(n):
            d = x[i] - mu
            var += d * d
        inv = np.float32(1.0) / np.sqrt(var / n + np.float32(eps))
        for i in range(n):
            out[i] = (x[i] - mu) * inv * w[i] + b[i]
        return
    ss = np.float32(0.0)
    for i in range(n):
        ss += x[i] * x[i]
    inv = np.float32(1.0) / np.sqrt(ss / n + np.float32(eps))
    if kind == NORM_RMS1P:
        for i in range(n):
            out[i] = x[i] * inv * (np.float32(1.0) + w[i])
    else:
        for i in range(n):
            out[i] = w[i] * (x[i] * inv)


@njit(parallel=True, cache=True)
def norm_rows(x, w, b, eps, kind, out):
    """Normalise each row of ``x [N, n]`` (RMS, Gemma RMS (1+w), or LayerNorm with bias)."""
    for r in prange(x.shape[0]):
        _norm_row(x[r], w, b, eps, kind, out[r])


@njit(cache=True)
def norm_rows_serial(x, w, b, eps, kind, out):
    """:func:`norm_rows` without a parallel region (decode: a few rows, no fork/join)."""
    for r in range(x.shape[0]):
        _norm_row(x[r], w, b, eps, kind, out[r])


@njit(cache=True, fastmath={"contract"}, error_model="numpy")
def _gated_row(gate, up, kind, out):
    # one loop per kind, so that each vectorises (fast_exp / fast_tanh have no calls)
    n = gate.shape[0]
    if kind == ACT_SILU:
        for i in range(n):
            g = gate[i]
            out[i] = g / (np.float32(1.0) + fast_exp(-g)) * up[i]
    elif kind == ACT_GELU_TANH:
        for i in range(n):
            g = gate[i]
            t = fast_tanh(SQRT_2_OVER_PI * (g + np.float32(0.044715) * g * g * g))
            out[i] = np.float32(0.5) * g * (np.float32(1.0) + t) * up[i]
    else:
        for i in range(n):
            g = gate[i]
            a = np.float32(0.5) * g * (np.float32(1.0) + math.erf(g / np.float32(math.sqrt(2.0))))
            out[i] = a * up[i]


@njit(parallel=True, cache=True)
def gated_act(gate, up, kind, out):
    """``out = act(gate) * up`` elementwise over ``[T, I]``."""
    for t in prange(gate.shape[0]):
        _gated_row(gate[t], up[t], kind, out[t])


@njit(cache=True)
def gated_act_serial(gate, up, kind, out):
    for t in range(gate.shape[0]):
        _gated_row(gate[t], up[t], kind, out[t])


@njit(parallel=True, cache=True)
def gated_act_fused(gu, kind, out):
    """``out = act(gu[:, :I]) * gu[:, I:]`` for a fused gate/up product ``gu [T, 2I]``
    (row halves of a C-contiguous row stay contiguous, so the row loop vectorises)."""
    n = out.shape[1]
    for t in prange(gu.shape[0]):
        row = gu[t]
        _gated_row(row[:n], row[n:], kind, out[t])


@njit(cache=True)
def gated_act_fused_serial(gu, kind, out):
    n = out.shape[1]
    for t in range(gu.shape[0]):
        row = gu[t]
        _gated_row(row[:n], row[n:], kind, out[t])


@njit(cache=True)
def _rope_token(x, cos, sin, rot, t):
    nh = x.shape[1]
    half = rot // 2
    for h in range(nh):
        for i in range(half):
            a = x[t, h, i]
            b = x[t, h, i + half]
            c = cos[t, i]
            s = sin[t, i]
            x[t, h, i] = a * c - b * s
            x[t, h, i + half] = b * c + a * s


@njit(parallel=True, cache=True)
def rope_rows(x, cos, sin, rot):
    """Rotate the first ``rot`` dims of every head of ``x [T, nh, D]`` (split halves), in place.

    ``cos``/``sin`` are ``[T, rot/2]`` (already multiplied by the attention factor).
    """
    for t in prange(x.shape[0]):
        _rope_token(x, cos, sin, rot, t)


@njit(cache=True)
def rope_rows_serial(x, cos, sin, rot):
    for t in range(x.shape[0]):
        _rope_token(x, cos, sin, rot, t)


# No 'reassoc': a reassociated reduction is summed in whatever order LLVM's vectoriser picks,
# and that pick changed with the compilation context (a parallel kernel compiled fresh and the
# same kernel loaded from Numba's cache summed softmax rows differently), so results moved
# between a first and a second run. The sums below use bits.fixed_dot / chunked_sum_f64,
# which vectorise in a fixed order. No 'ninf' flag either: callers pass -inf masks.
_ATTN_MATH = {"contract", "nsz", "arcp"}


@njit(cache=True, fastmath=_ATTN_MATH | {"nnan", "reassoc"})
def _row_max(seg):
    # four independent chains (a max reduction does not vectorise here); max is exact, so
    # its order cannot change the result
    n = seg.shape[0]
    m0 = m1 = m2 = m3 = seg[0]
    n4 = n // 4 * 4
    for j in range(0, n4, 4):
        m0 = max(m0, seg[j])
        m1 = max(m1, seg[j + 1])
        m2 = max(m2, seg[j + 2])
        m3 = max(m3, seg[j + 3])
    for j in range(n4, n):
        m0 = max(m0, seg[j])
    return max(max(m0, m1), max(m2, m3))


@njit(cache=True, fastmath=_ATTN_MATH, error_model="numpy")
def _softmax_inplace(seg, softcap):
    """Soft-cap (when > 0) and softmax of a contiguous, non-empty score segment."""
    n = seg.shape[0]
    if softcap > 0:
        c = np.float32(softcap)
        for j in range(n):
            seg[j] = c * fast_tanh(seg[j] / c)
    m = _row_max(seg)
    for j in range(n):  # range(n) over a slice: LLVM sees non-negative unit-stride indices
        seg[j] = fast_exp(seg[j] - m)
    inv = np.float32(1.0 / chunked_sum_f64(seg))
    for j in range(n):
        seg[j] *= inv


@njit(cache=True, fastmath=_ATTN_MATH, error_model="numpy")
def _attend(q, k_cache, v_cache, start, scale, softcap, window, logn, out, t, h):
    D = q.shape[2]
    rep = q.shape[1] // k_cache.shape[0]
    g = h // rep
    i = start + t
    lo = 0
    if window > 0 and i - window + 1 > 0:
        lo = i - window + 1
    n = i + 1 - lo
    scores = np.empty(n, dtype=np.float32)
    qs = np.float32(scale) * logn[t]
    qv = q[t, h]
    for jj in range(n):
        scores[jj] = fixed_dot(qv, k_cache[g, lo + jj]) * qs
    _softmax_inplace(scores, softcap)
    acc = np.zeros(D, dtype=np.float32)
    for jj in range(n):
        p = scores[jj]
        vv = v_cache[g, lo + jj]
        for d in range(D):
            acc[d] += p * vv[d]
    for d in range(D):
        out[t, h, d] = acc[d]


@njit(parallel=True, cache=True, fastmath=_ATTN_MATH)
def attention(q, k_cache, v_cache, start, scale, softcap, window, logn, out):
    """Causal attention of ``q [T, nH, D]`` (positions ``start .. start+T-1``) over the cache.

    ``k_cache``/``v_cache`` are ``[nKV, capacity, D]`` holding positions ``0 .. start+T-1``.
    ``window`` > 0 restricts query ``i`` to keys ``j > i - window``; ``softcap`` > 0 applies
    ``cap * tanh(s / cap)`` to the scores; ``logn [T]`` scales each query (Qwen-1; ones
    otherwise). Softmax in float32. Writes ``out [T, nH, D]``.
    """
    T, nH = q.shape[0], q.shape[1]
    for job in prange(T * nH):
        _attend(q, k_cache, v_cache, start, scale, softcap, window, logn, out,
                job // nH, job % nH)


@njit(cache=True, fastmath=_ATTN_MATH)
def attention_serial(q, k_cache, v_cache, start, scale, softcap, window, logn, out):
    """:func:`attention` without a parallel region (decode over a short context)."""
    T, nH = q.shape[0], q.shape[1]
    for job in range(T * nH):
        _attend(q, k_cache, v_cache, start, scale, softcap, window, logn, out,
                job // nH, job % nH)


@njit(parallel=True, cache=True)
def masked_softmax_rows(s, start, window, softcap, k0):
    """In place over scores ``s [R, T, S]`` (R head rows, T queries at positions
    ``start..start+T-1``, S keys at positions ``k0..k0+S-1``): soft-cap, causal /
    sliding-window mask, softmax."""
    R, T, S = s.shape
    for job in prange(R * T):
        r = job // T
        t = job % T
        i = start + t
        lo = 0
        if window > 0 and i - window + 1 > 0:
            lo = i - window + 1
        lo = max(lo - k0, 0)
        hi = min(i + 1 - k0, S)
        row = s[r, t]
        _softmax_inplace(row[lo:hi], softcap)
        row[:lo] = 0.0
        row[hi:] = 0.0


# queries per block in batched attention: a block only multiplies the keys it can see
ATTENTION_BLOCK = 256


def attention_blas(q, k_cache, v_cache, start, scale, softcap, window, logn):
    """Prefill attention with the two products on BLAS (same contract as :func:`attention`).

    Queries go in blocks of :data:`ATTENTION_BLOCK`; each block multiplies only the keys
    between its window start and its last position (about half the work of the full
    square for a causal prompt)."""
    T, nH, D = q.shape
    nKV = k_cache.shape[0]
    rep = nH // nKV
    qs = q * (np.float32(scale) * logn)[:, None, None]
    # [nKV, rep, T, D]: the query heads sharing one KV head, together
    qg = np.ascontiguousarray(qs.reshape(T, nKV, rep, D).transpose(1, 2, 0, 3))
    out = np.empty((nKV, rep, T, D), np.float32)
    for t0 in range(0, T, ATTENTION_BLOCK):
        t1 = min(t0 + ATTENTION_BLOCK, T)
        k_lo = max(start + t0 - window + 1, 0) if window > 0 else 0
        k_hi = start + t1
        qb = np.ascontiguousarray(qg[:, :, t0:t1]).reshape(nKV, rep * (t1 - t0), D)
        scores = np.matmul(qb, k_cache[:, k_lo:k_hi].transpose(0, 2, 1))
        masked_softmax_rows(scores.reshape(nKV * rep, t1 - t0, k_hi - k_lo), start + t0,
                            window, np.float32(softcap), k_lo)
        out[:, :, t0:t1] = np.matmul(scores, v_cache[:, k_lo:k_hi]).reshape(
            nKV, rep, t1 - t0, D)
    return np.ascontiguousarray(out.transpose(2, 0, 1, 3)).reshape(T, nH, D)
