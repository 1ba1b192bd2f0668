"""Decode (one token) with one Numba call per layer.

The per-op path in :mod:`torchless.engine` calls a kernel per operation from Python: ~50 calls
per token on a 12-layer model, each with argument checks, temporaries and dispatch. Here one
compiled function runs a whole decoder layer (norms, projections, q/k norms, RoPE, the KV
write, attention, MLP and residuals) and calls the same kernels directly, so a token costs
one Python call per layer plus the output head.

Every weight reaches the kernels as read-only ``uint8 [rows, bytes_per_row]`` with a kind
code, so one specialisation serves every mix of stored formats (GGUF files mix them per
tensor); inside, the bytes are viewed back as float32/uint16 or read as blocks. Absent
tensors are empty arrays. The math follows ``DecoderModel._layer`` operation by operation.
"""
import numpy as np
from numba import njit

from . import matmul as km
from . import ops as ko
from . import quant as kq
from . import quant_q8 as q8

(NONE, F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K, Q4_1, Q5_1, IQ4_NL, Q2_K, Q3_K,
 IQ4_XS, TQ1_0, TQ2_0) = range(-1, 17)
KIND_CODES = {"f32": F32, "f16": F16, "bf16": BF16, "q8_0": Q8_0, "q4_0": Q4_0,
              "q5_0": Q5_0, "q4_k": Q4_K, "q5_k": Q5_K, "q6_k": Q6_K, "q4_1": Q4_1,
              "q5_1": Q5_1, "iq4_nl": IQ4_NL, "q2_k": Q2_K, "q3_k": Q3_K, "iq4_xs": IQ4_XS,
              "tq1_0": TQ1_0, "tq2_0": TQ2_0}

# weight / bias slots
W_Q, W_K, W_V, W_O, W_GATE, W_UP, W_DOWN = range(7)
SLOT_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
FUSED_SLOTS = {"attn_qkv": W_Q, "ffn_gate_up": W_GATE}
# norm slots
N_ATTN, N_POST_ATTN, N_FFN, N_POST_FFW, N_Q, N_K = range(6)
NORM_SLOTS = ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm",
              "attn_q_norm", "attn_k_norm")

# integer config: icfg[...]
(C_NORM, C_QK_NORM, C_RESIDUAL, C_MLP, C_ACT, C_NH, C_NKV, C_D, C_WINDOW, C_ROT, C_ACT_QUANT,
 C_QKV_FUSED, C_GU_FUSED, C_INTER, C_PAR_ATTN, C_QK_FULL) = range(16)
N_ICFG = 16
RES_SEQUENTIAL, RES_PARALLEL, RES_SANDWICH = 0, 1, 2
MLP_GATED, MLP_DENSE = 0, 1
# float config: fcfg[...]
F_EPS, F_SCALE, F_SOFTCAP = range(3)

# heads * head_dim * context above which attention forks (icfg[C_PAR_ATTN])
PARALLEL_ATTENTION_WORK = 1 << 18


@njit(cache=True)
def linear(kind, w, b, x, out, act_quant):
    """``out = W x (+ b)`` for a weight of any stored kind (see the module docstring)."""
    if kind == F32:
        km.matvec_f32(w.view(np.float32), x, out)
    elif kind == F16:
        km.matvec_f16(w.view(np.uint16), x, out)
    elif kind == BF16:
        km.matvec_bf16(w.view(np.uint16), x, out)
    elif act_quant:
        n = x.shape[0]
        if kind == Q8_0 or kind == Q4_0 or kind == Q5_0 or kind == IQ4_NL:  # q8_0 activations
            xd = np.empty(n // 32, np.float32)
            xq = np.empty(n, np.int8)
            q8._q8_0_act_x86_into(x, xd, xq)
            no_xs = np.empty(0, np.float32)
            if kind == Q8_0:
                q8.matvec_q8act_q8_0(w, xd, xq, no_xs, out)
            elif kind == Q4_0:
                q8.matvec_q8act_q4_0(w, xd, xq, no_xs, out)
            elif kind == Q5_0:
                q8.matvec_q8act_q5_0(w, xd, xq, no_xs, out)
            else:
                q8.matvec_q8act_iq4_nl(w, xd, xq, no_xs, out)
        elif kind == Q4_1 or kind == Q5_1:  # q8_1 activations
            xd = np.empty(n // 32, np.float32)
            xs = np.empty(n // 32, np.float32)
            xq = np.empty(n, np.int8)
            q8._q8_1_act_x86_into(x, xd, xq, xs)
            if kind == Q4_1:
                q8.matvec_q8act_q4_1(w, xd, xq, xs, out)
            else:
                q8.matvec_q8act_q5_1(w, xd, xq, xs, out)
        else:  # q8_K activations
            xd = np.empty(n // 256, np.float32)
            xq = np.empty(n, np.int8)
            bsums = np.empty(n // 16, np.int16)
            q8._q8_k_act_into(x, xd, xq, bsums)
            if kind == Q4_K:
                q8.matvec_q8act_q4_k(w, xd, xq, bsums, out)
            elif kind == Q5_K:
                q8.matvec_q8act_q5_k(w, xd, xq, bsums, out)
            elif kind == Q6_K:
                q8.matvec_q8act_q6_k(w, xd, xq, bsums, out)
            elif kind == Q2_K:
                q8.matvec_q8act_q2_k(w, xd, xq, bsums, out)
            elif kind == Q3_K:
                q8.matvec_q8act_q3_k(w, xd, xq, bsums, out)
            elif kind == IQ4_XS:
                q8.matvec_q8act_iq4_xs(w, xd, xq, bsums, out)
            elif kind == TQ1_0:
                q8.matvec_q8act_tq1_0(w, xd, xq, bsums, out)
            else:
                q8.matvec_q8act_tq2_0(w, xd, xq, bsums, out)
    elif kind == Q8_0:
        kq.matvec_q8_0(w, x, out)
    elif kind == Q4_0:
        kq.matvec_q4_0(w, x, out)
    elif kind == Q4_1:
        kq.matvec_q4_1(w, x, out)
    elif kind == Q5_0:
        kq.matvec_q5_0(w, x, out)
    elif kind == Q5_1:
        kq.matvec_q5_1(w, x, out)
    elif kind == IQ4_NL:
        kq.matvec_iq4_nl(w, x, out)
    elif kind == Q2_K:
        kq.matvec_q2_k(w, x, out)
    elif kind == Q3_K:
        kq.matvec_q3_k(w, x, out)
    elif kind == Q4_K:
        kq.matvec_q4_k(w, x, out)
    elif kind == Q5_K:
        kq.matvec_q5_k(w, x, out)
    elif kind == Q6_K:
        kq.matvec_q6_k(w, x, out)
    elif kind == IQ4_XS:
        kq.matvec_iq4_xs(w, x, out)
    elif kind == TQ1_0:
        kq.matvec_tq1_0(w, x, out)
    else:
        kq.matvec_tq2_0(w, x, out)
    if b.shape[0] > 0:
        for i in range(out.shape[0]):
            out[i] += b[i]


@njit(cache=True)
def _mlp(h, ws, kinds, bs, icfg, out):
    I = icfg[C_INTER]
    aq = icfg[C_ACT_QUANT] != 0
    act = np.empty(I, np.float32)
    if icfg[C_MLP] == MLP_DENSE:
        u = np.empty(I, np.float32)
        linear(kinds[W_UP], ws[W_UP], bs[W_UP], h, u, aq)
        ko._gated_row(u, np.ones(I, np.float32), icfg[C_ACT], act)
    else:
        if icfg[C_GU_FUSED] != 0:
            gu = np.empty(2 * I, np.float32)
            linear(kinds[W_GATE], ws[W_GATE], bs[W_GATE], h, gu, aq)
            g = np.empty(I, np.float32)
            u = np.empty(I, np.float32)
            g[:] = gu[:I]
            u[:] = gu[I:]
            ko._gated_row(g, u, icfg[C_ACT], act)
        else:
            g = np.empty(I, np.float32)
            u = np.empty(I, np.float32)
            linear(kinds[W_GATE], ws[W_GATE], bs[W_GATE], h, g, aq)
            linear(kinds[W_UP], ws[W_UP], bs[W_UP], h, u, aq)
            ko._gated_row(g, u, icfg[C_ACT], act)
    linear(kinds[W_DOWN], ws[W_DOWN], bs[W_DOWN], act, out, aq)


@njit(cache=True)
def attention_block(x, h, ws, kinds, bs, ns, nbs, icfg, fcfg, kc, vc, pos, cos, sin, logn, o):
    """The attention half of a layer: ``h`` = attention norm of ``x``, ``o`` = the attention
    output projection (the residual is the caller's)."""
    norm = icfg[C_NORM]
    eps = fcfg[F_EPS]
    nH, nKV, D = icfg[C_NH], icfg[C_NKV], icfg[C_D]
    qd, kvd = nH * D, nKV * D
    aq = icfg[C_ACT_QUANT] != 0

    ko._norm_row(x, ns[N_ATTN], nbs[N_ATTN], eps, norm, h)
    q1 = np.empty(qd, np.float32)
    k1 = np.empty(kvd, np.float32)
    v = np.empty(kvd, np.float32)
    if icfg[C_QKV_FUSED] != 0:
        qkv = np.empty(qd + 2 * kvd, np.float32)
        linear(kinds[W_Q], ws[W_Q], bs[W_Q], h, qkv, aq)
        q1[:] = qkv[:qd]
        k1[:] = qkv[qd:qd + kvd]
        v[:] = qkv[qd + kvd:]
    else:
        linear(kinds[W_Q], ws[W_Q], bs[W_Q], h, q1, aq)
        linear(kinds[W_K], ws[W_K], bs[W_K], h, k1, aq)
        linear(kinds[W_V], ws[W_V], bs[W_V], h, v, aq)
    q = q1.reshape(1, nH, D)
    k = k1.reshape(1, nKV, D)
    qk = icfg[C_QK_NORM]
    if qk >= 0 and icfg[C_QK_FULL] != 0:  # over the whole projection (OLMoE)
        ko._norm_row(q1, ns[N_Q], nbs[N_Q], eps, qk, q1)
        ko._norm_row(k1, ns[N_K], nbs[N_K], eps, qk, k1)
    elif qk >= 0:
        for hh in range(nH):
            ko._norm_row(q[0, hh], ns[N_Q], nbs[N_Q], eps, qk, q[0, hh])
        for hh in range(nKV):
            ko._norm_row(k[0, hh], ns[N_K], nbs[N_K], eps, qk, k[0, hh])
    rot = icfg[C_ROT]
    if rot > 0:
        ko._rope_token(q, cos, sin, rot, 0)
        ko._rope_token(k, cos, sin, rot, 0)
    for g in range(nKV):
        for d in range(D):
            kc[g, pos, d] = k[0, g, d]
            vc[g, pos, d] = v[g * D + d]

    a = np.empty((1, nH, D), np.float32)
    window = icfg[C_WINDOW]
    if qd * (pos + 1) > icfg[C_PAR_ATTN]:
        ko.attention(q, kc, vc, pos, fcfg[F_SCALE], fcfg[F_SOFTCAP], window, logn, a)
    else:
        ko.attention_serial(q, kc, vc, pos, fcfg[F_SCALE], fcfg[F_SOFTCAP], window, logn, a)
    linear(kinds[W_O], ws[W_O], bs[W_O], a.reshape(qd), o, aq)


@njit(cache=True)
def decode_layer(x, ws, kinds, bs, ns, nbs, icfg, fcfg, kc, vc, pos, cos, sin, logn):
    """Run decoder layer on the residual ``x [H]`` (updated in place) for position ``pos``.

    ``ws``/``bs``: weights and biases by slot (``W_*``); ``ns``/``nbs``: norm weights and
    biases by slot (``N_*``); ``kc``/``vc`` this layer's cache ``[nKV, capacity, D]``;
    ``cos``/``sin`` ``[1, rot/2]`` for ``pos``; ``logn [1]`` the query scale (Qwen-1).
    """
    H = x.shape[0]
    norm = icfg[C_NORM]
    eps = fcfg[F_EPS]
    h = np.empty(H, np.float32)
    o = np.empty(H, np.float32)
    attention_block(x, h, ws, kinds, bs, ns, nbs, icfg, fcfg, kc, vc, pos, cos, sin, logn, o)

    m = np.empty(H, np.float32)
    res = icfg[C_RESIDUAL]
    if res == RES_PARALLEL:
        _mlp(h, ws, kinds, bs, icfg, m)
        for i in range(H):
            x[i] = x[i] + o[i] + m[i]
    elif res == RES_SANDWICH:
        ko._norm_row(o, ns[N_POST_ATTN], nbs[N_POST_ATTN], eps, norm, o)
        for i in range(H):
            x[i] += o[i]
        ko._norm_row(x, ns[N_FFN], nbs[N_FFN], eps, norm, h)
        _mlp(h, ws, kinds, bs, icfg, m)
        ko._norm_row(m, ns[N_POST_FFW], nbs[N_POST_FFW], eps, norm, m)
        for i in range(H):
            x[i] += m[i]
    else:
        for i in range(H):
            x[i] += o[i]
        ko._norm_row(x, ns[N_FFN], nbs[N_FFN], eps, norm, h)
        _mlp(h, ws, kinds, bs, icfg, m)
        for i in range(H):
            x[i] += m[i]


@njit(cache=True)
def decode_head(x, nw, nb, norm, eps, kind, w, b, softcap, act_quant, out):
    """Final norm, output projection and soft-cap for one token: ``out [V]``."""
    h = np.empty(x.shape[0], np.float32)
    ko._norm_row(x, nw, nb, eps, norm, h)
    linear(kind, w, b, h, out, act_quant)
    if softcap > 0:
        c = np.float32(softcap)
        for i in range(out.shape[0]):
            out[i] = c * np.tanh(out[i] / c)


# ---- packing (Python side, once per model) ---------------------------------------------------

_EMPTY_U8 = np.zeros((0, 0), np.uint8)
_EMPTY_U8.flags.writeable = False
_EMPTY_F32 = np.zeros(0, np.float32)
_EMPTY_F32.flags.writeable = False


def _ro(a: np.ndarray) -> np.ndarray:
    a = a.view()
    a.flags.writeable = False
    return a


def weight_bytes(w) -> tuple:
    """``(kind code, read-only uint8 [rows, bytes_per_row])`` for a :class:`Weight`."""
    if w is None:
        return NONE, _EMPTY_U8
    v = w.kernel_view()
    item = v.dtype.itemsize
    if not v.flags.c_contiguous or v.ctypes.data % item:
        v = np.ascontiguousarray(v).copy()
    return KIND_CODES[w.kind], _ro(v.view(np.uint8).reshape(v.shape[0], -1))


def f32_vector(a, n: int | None = None) -> np.ndarray:
    """A read-only float32 vector (zeros of length ``n`` when ``a`` is None and ``n`` given)."""
    if a is None:
        return _EMPTY_F32 if n is None else _ro(np.zeros(n, np.float32))
    return _ro(np.ascontiguousarray(a, dtype=np.float32))
