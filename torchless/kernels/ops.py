"""Norms, activations, RoPE and attention as Numba kernels.

All take 2-D (or 3-D) float32 arrays so one specialisation serves decode (T = 1) and prefill.
"""
import math

import numpy as np
from numba import njit, prange

SQRT_2_OVER_PI = np.float32(math.sqrt(2.0 / math.pi))

NORM_RMS, NORM_RMS1P, NORM_LAYER = 0, 1, 2
ACT_SILU, ACT_GELU_TANH, ACT_GELU = 0, 1, 2


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


@njit(cache=True)
def _gated_row(gate, up, kind, out):
    n = gate.shape[0]
    for i in range(n):
        g = gate[i]
        if kind == ACT_SILU:
            a = g / (np.float32(1.0) + np.exp(-g))
        elif kind == ACT_GELU_TANH:
            a = np.float32(0.5) * g * (np.float32(1.0) + np.tanh(
                SQRT_2_OVER_PI * (g + np.float32(0.044715) * g * g * g)))
        else:
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


# Reassociation lets LLVM vectorise the dot products and the weighted sum over V; no
# 'ninf'/'nnan' flags, since the masking logic relies on -inf.
_ATTN_MATH = {"reassoc", "contract", "nsz", "arcp"}


@njit(cache=True, fastmath=_ATTN_MATH)
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
    m = np.float32(-np.inf)
    for jj in range(n):
        kv = k_cache[g, lo + jj]
        s = np.float32(0.0)
        for d in range(D):
            s += qv[d] * kv[d]
        s *= qs
        if softcap > 0:
            s = np.float32(softcap) * np.tanh(s / np.float32(softcap))
        scores[jj] = s
        if s > m:
            m = s
    tot = np.float32(0.0)
    for jj in range(n):
        e = np.exp(scores[jj] - m)
        scores[jj] = e
        tot += e
    inv = np.float32(1.0) / tot
    acc = np.zeros(D, dtype=np.float32)
    for jj in range(n):
        p = scores[jj] * inv
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
def masked_softmax_rows(s, start, window, softcap):
    """In place over scores ``s [R, T, S]`` (R head rows, T queries at positions
    ``start..start+T-1``, S keys): soft-cap, causal / sliding-window mask, softmax."""
    R, T, S = s.shape
    for job in prange(R * T):
        r = job // T
        t = job % T
        i = start + t
        lo = 0
        if window > 0 and i - window + 1 > 0:
            lo = i - window + 1
        m = np.float32(-np.inf)
        for j in range(lo, i + 1):
            v = s[r, t, j]
            if softcap > 0:
                v = np.float32(softcap) * np.tanh(v / np.float32(softcap))
                s[r, t, j] = v
            if v > m:
                m = v
        tot = np.float32(0.0)
        for j in range(lo, i + 1):
            e = np.exp(s[r, t, j] - m)
            s[r, t, j] = e
            tot += e
        inv = np.float32(1.0) / tot
        for j in range(S):
            if j < lo or j > i:
                s[r, t, j] = 0.0
            else:
                s[r, t, j] *= inv


def attention_blas(q, k_cache, v_cache, start, scale, softcap, window, logn):
    """Prefill attention with the two products on BLAS (same contract as :func:`attention`)."""
    T, nH, D = q.shape
    nKV = k_cache.shape[0]
    rep = nH // nKV
    S = start + T
    qs = q * (np.float32(scale) * logn)[:, None, None]
    # [nKV, rep*T, D]: the query heads sharing one KV head, stacked
    qg = np.ascontiguousarray(qs.reshape(T, nKV, rep, D).transpose(1, 2, 0, 3)).reshape(
        nKV, rep * T, D)
    scores = np.matmul(qg, k_cache[:, :S].transpose(0, 2, 1))  # [nKV, rep*T, S]
    scores = scores.reshape(nKV * rep, T, S)
    masked_softmax_rows(scores, start, window, np.float32(softcap))
    out = np.matmul(scores.reshape(nKV, rep * T, S), v_cache[:, :S])  # [nKV, rep*T, D]
    return np.ascontiguousarray(out.reshape(nKV, rep, T, D).transpose(2, 0, 1, 3)).reshape(
        T, nH, D)
