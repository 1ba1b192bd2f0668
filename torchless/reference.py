"""The plain-NumPy operations of the decoder: the readable specification.

``forward`` runs the shared decoder with these; ``fast_forward`` and ``prefill`` run the same
decoder with the Numba kernels, and the tests hold the two to each other and to transformers.
All arrays are float32; weights are widened to float32 where they are used.
"""
from __future__ import annotations

import math

import numpy as np

from .weights import Weight


def linear(x: np.ndarray, w: Weight, b: Weight | None = None,
           act_quant: bool = False) -> np.ndarray:
    """``x @ W.T + b`` for ``x [T, in]``.

    With ``act_quant`` a block-quantized weight meets 8-bit activations (as llama.cpp
    computes): ``x`` goes through the activation format's round trip first.
    """
    from .kernels import quant_q8

    if act_quant and quant_q8.supports(w.kind):
        x = quant_q8.dequantized_activations(w.kind, x)
    y = x @ w.to_f32().T
    if b is not None:
        y = y + b.to_f32()
    return y.astype(np.float32)


def norm(x: np.ndarray, kind: str, w: np.ndarray, b: np.ndarray | None, eps: float) -> np.ndarray:
    """Normalise over the last axis: ``rms`` (Llama), ``rms1p`` (Gemma, 1 + w), ``layernorm``."""
    if kind == "layernorm":
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return ((x - mu) / np.sqrt(var + np.float32(eps)) * w + b).astype(np.float32)
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(eps))
    if kind == "rms1p":
        return (y * (np.float32(1) + w)).astype(np.float32)
    return (w * y).astype(np.float32)


def activation(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "silu":
        return x / (np.float32(1) + np.exp(-x))
    if kind == "gelu_tanh":
        c = np.float32(math.sqrt(2.0 / math.pi))
        return np.float32(0.5) * x * (1 + np.tanh(c * (x + np.float32(0.044715) * x ** 3)))
    if kind == "gelu":
        from math import erf

        return (0.5 * x * (1 + np.vectorize(erf)(x / math.sqrt(2.0)))).astype(np.float32)
    raise ValueError(kind)


def rope_angles(positions: np.ndarray, inv_freq: np.ndarray, factor: float):
    """cos and sin ``[T, R/2]`` for integer positions, in float32 as transformers computes them."""
    ang = positions.astype(np.float32)[:, None] * inv_freq[None, :]
    return (np.cos(ang) * np.float32(factor)).astype(np.float32), (
        np.sin(ang) * np.float32(factor)
    ).astype(np.float32)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rot: int) -> np.ndarray:
    """Split-halves rotation of the first ``rot`` dims of ``x [T, heads, D]``."""
    half = rot // 2
    x1, x2 = x[..., :half], x[..., half:rot]
    c, s = cos[:, None, :], sin[:, None, :]
    out = x.copy()
    out[..., :half] = x1 * c - x2 * s
    out[..., half:rot] = x2 * c + x1 * s
    return out


def attention(q, k, v, start, scale, softcap, window, logn):
    """Causal (optionally sliding-window, soft-capped) attention.

    ``q [T, nH, D]`` at positions ``start..start+T-1``; ``k, v [nKV, S, D]`` for positions
    ``0..S-1``. Query head ``h`` reads KV head ``h // (nH // nKV)``.
    """
    T, nH, D = q.shape
    nKV, S, _ = k.shape
    rep = nH // nKV
    kk = np.repeat(k, rep, axis=0)  # [nH, S, D]
    vv = np.repeat(v, rep, axis=0)
    s = np.einsum("thd,hsd->hts", q, kk) * np.float32(scale) * logn[None, :, None]
    if softcap:
        s = np.float32(softcap) * np.tanh(s / np.float32(softcap))
    i = (start + np.arange(T))[:, None]
    j = np.arange(S)[None, :]
    visible = j <= i
    if window:
        visible &= (i - j) < window
    s = np.where(visible[None], s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,hsd->thd", p.astype(np.float32), vv).astype(np.float32)


def route(logits: np.ndarray, top_k: int, router: str, renorm: bool):
    """The experts each token uses and their weights, from router logits ``[T, E]``.

    ``softmax_topk``: softmax over all experts, the ``top_k`` largest probabilities (ties:
    the lower expert index first), divided by their sum when ``renorm``. ``topk_softmax``:
    the ``top_k`` largest logits, softmax over those. Returns ``(experts [T, k] int64,
    weights [T, k] float32)``, experts in decreasing order of weight.
    """
    logits = logits.astype(np.float32)
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :top_k]
    if router == "topk_softmax":
        top = np.take_along_axis(logits, order, -1)
        e = np.exp(top - top.max(-1, keepdims=True))
        return order, (e / e.sum(-1, keepdims=True)).astype(np.float32)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    top = np.take_along_axis(p, order, -1)
    if renorm:
        top = top / top.sum(-1, keepdims=True)
    return order, top.astype(np.float32)


def moe(x: np.ndarray, router_w: Weight, gate, up, down, top_k: int, router: str,
        renorm: bool, act: str, act_quant: bool = False) -> np.ndarray:
    """A mixture of gated MLPs for ``x [T, H]``: each token through its ``top_k`` experts,
    ``sum_j w_j * down_e(act(gate_e x) * up_e x)``. ``gate``/``up``/``down`` index like lists
    of per-expert :class:`Weight` (``torchless.weights.Experts``)."""
    experts, weights = route(linear(x, router_w), top_k, router, renorm)
    out = np.zeros_like(x, dtype=np.float32)
    for t in range(x.shape[0]):
        xt = x[t:t + 1]
        for e, w in zip(experts[t], weights[t]):
            a = activation(linear(xt, gate[e], None, act_quant), act) * linear(
                xt, up[e], None, act_quant)
            out[t] += w * linear(a.astype(np.float32), down[e], None, act_quant)[0]
    return out
