"""Mixture-of-experts MLPs that compute only the experts the router picks.

Decode (one token): the router's ``E`` logits, the top-k selection (``route_row``), then for
each of the ``k`` chosen experts its gate, up and down rows only (``decode_moe``, called by
the fused decode in :mod:`torchless.kernels.decode`); the other experts' weights are never
read. Prefill (``T`` tokens): the tokens are grouped by expert, and each expert that any token
chose multiplies the matrix of its tokens' rows (``prefill_moe``): its weights are read once
per batch, however many tokens use it, and the weighted results are added back to their rows.

Expert weights are per-expert 2-D arrays (views into a 3-D GGUF tensor, or a checkpoint's
per-expert tensors), handed to the compiled code as a ``numba.typed.List`` of read-only
``uint8 [rows, bytes_per_row]`` with one kind code per projection (as
:func:`torchless.kernels.decode.weight_bytes` makes them), so every stored format -- f32, f16,
bf16 and the GGUF block kinds, with 8-bit activations for the latter when ``act_quant`` --
goes through the same product kernels as a dense layer.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.typed import List

from . import decode as kd
from . import matmul as km
from . import ops as ko
from . import quant_q8 as q8

ROUTER_SOFTMAX_TOPK, ROUTER_TOPK_SOFTMAX = 0, 1
ROUTER_CODES = {"softmax_topk": ROUTER_SOFTMAX_TOPK, "topk_softmax": ROUTER_TOPK_SOFTMAX}


@njit(cache=True)
def route_row(logits, k, router, renorm, sel, wts):
    """The ``k`` experts of one token (``sel``, by decreasing weight; ties: lower index) and
    their weights ``wts``, from its router ``logits [E]`` (see ``reference.route``)."""
    E = logits.shape[0]
    taken = np.zeros(E, np.bool_)
    for j in range(k):
        best = -1
        for e in range(E):
            if not taken[e] and (best < 0 or logits[e] > logits[best]):
                best = e
        taken[best] = True
        sel[j] = best
    if router == ROUTER_TOPK_SOFTMAX:
        m = logits[sel[0]]
        s = np.float32(0.0)
        for j in range(k):
            wts[j] = np.exp(logits[sel[j]] - m)
            s += wts[j]
        for j in range(k):
            wts[j] /= s
        return
    m = logits[sel[0]]
    s = np.float32(0.0)
    for e in range(E):
        s += np.exp(logits[e] - m)
    tot = np.float32(0.0)
    for j in range(k):
        wts[j] = np.exp(logits[sel[j]] - m) / s
        tot += wts[j]
    if renorm:
        for j in range(k):
            wts[j] /= tot


@njit(cache=True)
def route_rows(logits, k, router, renorm, sel, wts):
    for t in range(logits.shape[0]):
        route_row(logits[t], k, router, renorm, sel[t], wts[t])


# ---- decode: the chosen experts' rows, all k experts in one parallel loop per projection ---

_CHUNK = 16  # rows per parallel work item


@njit(inline="always", cache=True)
def _rows_f32(w, r0, r1, x, out):
    """``out[r] = w[r] . x`` for rows ``r0:r1`` of a float32 weight."""
    res = np.empty(4, np.float32)
    cols = x.shape[0]
    c0 = cols - cols % 16
    r = r0
    while r + 4 <= r1:
        km._rows4_f32(w, r, x, res)
        for q in range(4):
            acc = res[q]
            for c in range(c0, cols):
                acc += w[r + q, c] * x[c]
            out[r + q] = acc
        r += 4
    while r < r1:
        acc = np.float32(0.0)
        for c in range(cols):
            acc += w[r, c] * x[c]
        out[r] = acc
        r += 1


@njit(inline="always", cache=True)
def _rows_u16(kind, w, r0, r1, x, out):
    """The same for bf16 / f16 weights (uint16 bits)."""
    res = np.empty(4, np.float32)
    cols = x.shape[0]
    c0 = cols - cols % 16
    wk = 1 if kind == kd.BF16 else 2
    r = r0
    while r + 4 <= r1:
        if wk == 1:
            km._rows4_bf16(w, r, x, res)
        else:
            km._rows4_f16(w, r, x, res)
        for q in range(4):
            acc = res[q]
            for c in range(c0, cols):
                acc += km._widen(w[r + q, c], wk) * x[c]
            out[r + q] = acc
        r += 4
    while r < r1:
        acc = np.float32(0.0)
        for c in range(cols):
            acc += km._widen(w[r, c], wk) * x[c]
        out[r] = acc
        r += 1


ACT_Q8_0, ACT_Q8_1, ACT_Q8_K = 0, 1, 2  # the 8-bit activation format a block kind pairs with


@njit(inline="always", cache=True)
def _act_format(kind):
    if kind == kd.Q4_1 or kind == kd.Q5_1:
        return ACT_Q8_1
    if kind == kd.Q8_0 or kind == kd.Q4_0 or kind == kd.Q5_0 or kind == kd.IQ4_NL:
        return ACT_Q8_0
    return ACT_Q8_K


@njit(inline="always", cache=True)
def _quant_rows(kind, w, r0, r1, xd, xq, xs, xf, bsums, out):
    """``out[r]`` for rows ``r0:r1`` of a block-quantized weight against 8-bit activations:
    the decode product's row functions (:mod:`quant_q8`), so a row has the decode's bits.
    ``(xd, xq[, xs])`` are q8_0/q8_1 activations for the 32-element kinds; for the k-quants
    q8_K ``(xd, bsums)`` with the quants as float32 ``xf`` or, for q4_k, q5_k and q6_k, as
    ``xq`` permuted by ``quant_q8.K8_PERM`` / ``K6_PERM``."""
    if _act_format(kind) != ACT_Q8_K:
        res = np.empty(2, np.float32)
        for r in range(r0, r1, 2):
            ra = r
            rb = min(r + 1, r1 - 1)
            if kind == kd.Q8_0:
                q8._rows2_q8_0(w[ra], w[rb], xq, xd, xs, res)
            elif kind == kd.Q4_0:
                q8._rows2_q4_0(w[ra], w[rb], xq, xd, xs, res)
            elif kind == kd.Q5_0:
                q8._rows2_q5_0(w[ra], w[rb], xq, xd, xs, res)
            elif kind == kd.IQ4_NL:
                q8._rows2_iq4_nl(w[ra], w[rb], xq, xd, xs, res)
            elif kind == kd.Q4_1:
                q8._rows2_q4_1(w[ra], w[rb], xq, xd, xs, res)
            else:
                q8._rows2_q5_1(w[ra], w[rb], xq, xd, xs, res)
            out[ra] = res[0]
            out[rb] = res[1]
    elif kind == kd.Q4_K or kind == kd.Q5_K or kind == kd.Q6_K:  # two rows at a time
        aux = np.empty(16, np.int32)
        sums = np.empty(16, np.float32)
        res = np.empty(2, np.float32)
        for r in range(r0, r1, 2):
            ra = r
            rb = min(r + 1, r1 - 1)
            if kind == kd.Q4_K:
                q8._row2_k4(w[ra], w[rb], xd, xq, bsums, aux, sums, res, 144, False)
            elif kind == kd.Q5_K:
                q8._row2_k4(w[ra], w[rb], xd, xq, bsums, aux, sums, res, 176, True)
            else:
                q8._row2_q6_k(w[ra], w[rb], xd, xq, bsums, aux, sums, res)
            out[ra] = res[0]
            out[rb] = res[1]
    else:
        aux = np.empty(8, np.int32)
        sums = np.empty(8, np.float32)
        lanes = np.empty(32, np.float32)
        for r in range(r0, r1):
            if kind == kd.Q4_K:
                out[r] = q8._row_k4(w[r], xd, xq, bsums, aux, sums, 144, False)
            elif kind == kd.Q5_K:
                out[r] = q8._row_k4(w[r], xd, xq, bsums, aux, sums, 176, True)
            elif kind == kd.Q6_K:
                out[r] = q8._row_q6_k(w[r], xd, xq, bsums, aux, sums)
            elif kind == kd.Q2_K:
                out[r] = q8._rowf_q2_k(w[r], xd, xf, bsums, lanes)
            elif kind == kd.Q3_K:
                out[r] = q8._rowf_q3_k(w[r], xd, xf, bsums, lanes)
            elif kind == kd.IQ4_XS:
                out[r] = q8._rowf_iq4_xs(w[r], xd, xf, bsums, lanes)
            elif kind == kd.TQ1_0:
                out[r] = q8._rowf_tq1_0(w[r], xd, xf, bsums, lanes)
            else:
                out[r] = q8._rowf_tq2_0(w[r], xd, xf, bsums, lanes)


@njit(cache=True)
def _quantize_inputs(kind, X):
    """8-bit activations of each row of ``X [n, cols]`` for weight ``kind``:
    ``(XD, XQ, XS, XF, BS)`` as :func:`_quant_rows` takes them (unused ones empty)."""
    nx, cols = X.shape
    fmt = _act_format(kind)
    qk = 256 if fmt == ACT_Q8_K else 32
    XD = np.empty((nx, cols // qk), np.float32)
    XQ = np.empty((nx, cols), np.int8)
    XS = np.empty((nx, cols // 32 if fmt == ACT_Q8_1 else 0), np.float32)
    BS = np.empty((nx, cols // 16 if fmt == ACT_Q8_K else 1), np.int16)
    for j in range(nx):
        if fmt == ACT_Q8_0:
            q8._q8_0_act_x86_into(X[j], XD[j], XQ[j])
        elif fmt == ACT_Q8_1:
            q8._q8_1_act_x86_into(X[j], XD[j], XQ[j], XS[j])
        else:
            q8._q8_k_act_into(X[j], XD[j], XQ[j], BS[j])
    if kind == kd.Q4_K or kind == kd.Q5_K or kind == kd.Q6_K:  # rows read them permuted
        XP = q8.permute_k6(XQ) if kind == kd.Q6_K else q8.permute_k8(XQ)
        return XD, XP, XS, np.empty((nx, 0), np.float32), BS
    if fmt == ACT_Q8_K:
        return XD, XQ, XS, XQ.astype(np.float32), BS
    return XD, XQ, XS, np.empty((nx, 0), np.float32), BS


@njit(cache=True)
def _no_inputs(nx):
    return (np.empty((nx, 0), np.float32), np.empty((nx, 0), np.int8),
            np.empty((nx, 0), np.float32), np.empty((nx, 0), np.float32),
            np.empty((nx, 0), np.int16))


@njit(parallel=True, cache=True)
def experts_matvec(kind, mats, sel, X, out, aq, nb):
    """``out[j] = mats[sel[j]] @ X[j or 0]`` for every chosen expert ``j``, all their rows in
    one parallel loop. ``X`` has one row (shared input) or one per chosen expert."""
    k = sel.shape[0]
    rows = out.shape[1]
    nch = (rows + _CHUNK - 1) // _CHUNK
    quant = kind != kd.F32 and kind != kd.F16 and kind != kd.BF16
    nx = X.shape[0]
    if quant and aq:
        XD, XQ, XS, XF, BS = _quantize_inputs(kind, X)
    else:
        XD, XQ, XS, XF, BS = _no_inputs(nx)
    for item in prange(k * nch):
        j = item // nch
        r0 = (item % nch) * _CHUNK
        r1 = min(rows, r0 + _CHUNK)
        xi = j if nx > 1 else 0
        w = mats[sel[j]]
        if kind == kd.F32:
            _rows_f32(w.view(np.float32), r0, r1, X[xi], out[j])
        elif not quant:
            _rows_u16(kind, w.view(np.uint16), r0, r1, X[xi], out[j])
        elif aq:
            _quant_rows(kind, w, r0, r1, XD[xi], XQ[xi], XS[xi], XF[xi], BS[xi],
                        out[j])
        else:
            kd.linear(kind, w[r0:r1], nb, X[xi], out[j, r0:r1], False)


@njit(parallel=True, cache=True)
def experts_gate_up(kind, gates, ups, sel, h, g, u):
    """:func:`experts_matvec` of the gate and the up projections of the chosen experts in
    one parallel loop (one fork, ``h`` quantized once), for gate and up weights of the same
    block kind with 8-bit activations: ``g[j] = gates[sel[j]] @ h``, ``u[j] = ups[sel[j]] @ h``."""
    k = sel.shape[0]
    rows = g.shape[1]
    nch = (rows + _CHUNK - 1) // _CHUNK
    XD, XQ, XS, XF, BS = _quantize_inputs(kind, h.reshape(1, h.shape[0]))
    for item in prange(2 * k * nch):
        which = item // (k * nch)
        rest = item % (k * nch)
        j = rest // nch
        r0 = (rest % nch) * _CHUNK
        r1 = min(rows, r0 + _CHUNK)
        if which == 0:
            _quant_rows(kind, gates[sel[j]], r0, r1, XD[0], XQ[0], XS[0], XF[0], BS[0], g[j])
        else:
            _quant_rows(kind, ups[sel[j]], r0, r1, XD[0], XQ[0], XS[0], XF[0], BS[0], u[j])


@njit(cache=True)
def decode_moe(h, rkind, rw, kinds, gates, ups, downs, k, router, renorm, act, aq, nb, out):
    """The mixture for one token: ``out [H] = sum_j w_j down_j(act(gate_j h) * up_j h)`` over
    the ``k`` experts the router ``rw`` picks; only their weights are read."""
    E = len(gates)
    logits = np.empty(E, np.float32)
    kd.linear(rkind, rw, nb, h, logits, aq)
    sel = np.empty(k, np.int64)
    wts = np.empty(k, np.float32)
    route_row(logits, k, router, renorm, sel, wts)
    inter = gates[0].shape[0]
    X = h.reshape(1, h.shape[0])
    g = np.empty((k, inter), np.float32)
    u = np.empty((k, inter), np.float32)
    quant = kinds[0] != kd.F32 and kinds[0] != kd.F16 and kinds[0] != kd.BF16
    if aq and quant and kinds[1] == kinds[0]:
        experts_gate_up(kinds[0], gates, ups, sel, h, g, u)
    else:
        experts_matvec(kinds[0], gates, sel, X, g, aq, nb)
        experts_matvec(kinds[1], ups, sel, X, u, aq, nb)
    a = np.empty((k, inter), np.float32)
    for j in range(k):
        ko._gated_row(g[j], u[j], act, a[j])
    H = out.shape[0]
    d = np.empty((k, H), np.float32)
    experts_matvec(kinds[2], downs, sel, a, d, aq, nb)
    for i in range(H):
        out[i] = 0.0
    for j in range(k):
        wj = wts[j]
        for i in range(H):
            out[i] += wj * d[j, i]


@njit(cache=True)
def shared_expert(h, skinds, sg, su, sd, sgi, act, aq, nb, out):
    """``out += sigmoid(sgi . h) * sd(act(sg h) * su h)``: Qwen2-MoE's shared expert, which
    every token uses beside its routed experts (``skinds``: the kinds of gate, up, down and
    the one-row gate ``sgi``)."""
    Is = sg.shape[0]
    g = np.empty(Is, np.float32)
    u = np.empty(Is, np.float32)
    kd.linear(skinds[0], sg, nb, h, g, aq)
    kd.linear(skinds[1], su, nb, h, u, aq)
    a = np.empty(Is, np.float32)
    ko._gated_row(g, u, act, a)
    H = out.shape[0]
    y = np.empty(H, np.float32)
    kd.linear(skinds[2], sd, nb, a, y, aq)
    s = np.empty(1, np.float32)
    kd.linear(skinds[3], sgi, nb, h, s, aq)
    sig = np.float32(1) / (np.float32(1) + np.exp(-s[0]))
    for i in range(H):
        out[i] += y[i] * sig


@njit(cache=True)
def decode_layer_moe(x, ws, kinds, bs, ns, nbs, icfg, fcfg, kc, vc, pos, cos, sin, logn,
                     rkind, rw, ekinds, gates, ups, downs, k, router, renorm, act, aq, nb,
                     skinds, sg, su, sd, sgi):
    """:func:`torchless.kernels.decode.decode_layer` for a mixture layer (sequential
    residual): attention, then the chosen experts (``decode_moe``) and, where ``skinds`` are
    not NONE, the shared expert (``shared_expert``)."""
    H = x.shape[0]
    h = np.empty(H, np.float32)
    o = np.empty(H, np.float32)
    kd.attention_block(x, h, ws, kinds, bs, ns, nbs, icfg, fcfg, kc, vc, pos, cos, sin, logn, o)
    for i in range(H):
        x[i] += o[i]
    ko._norm_row(x, ns[kd.N_FFN], nbs[kd.N_FFN], fcfg[kd.F_EPS], icfg[kd.C_NORM], h)
    m = np.empty(H, np.float32)
    decode_moe(h, rkind, rw, ekinds, gates, ups, downs, k, router, renorm, act, aq, nb, m)
    if skinds[0] != kd.NONE:
        shared_expert(h, skinds, sg, su, sd, sgi, act, aq, nb, m)
    for i in range(H):
        x[i] += m[i]


# ---- packing (Python side, once per model) ---------------------------------------------------

def expert_list(ex):
    """``(kind code, typed List of read-only uint8 [rows, bytes_per_row])`` of an Experts."""
    lst = List()
    kind = kd.NONE
    for w in ex.experts:
        kind, b = kd.weight_bytes(w)
        lst.append(b)
    return kind, lst


def pack_layer(layer, cfg, act_code: int, act_quant: bool) -> tuple:
    """The extra arguments ``decode_moe`` takes for a mixture layer."""
    m = cfg.moe
    rkind, rw = kd.weight_bytes(layer.w["ffn_gate_inp"])
    packed = _packed_experts(layer, [layer.w[n] for n in ("ffn_gate_exps", "ffn_up_exps",
                                                           "ffn_down_exps")])
    kinds = np.array([p[0] for p in packed], np.int64)
    lists = [p[1] for p in packed]
    return (rkind, rw, kinds, lists[0], lists[1], lists[2], m.top_k, ROUTER_CODES[m.router],
            bool(m.renorm), act_code, bool(act_quant), kd.f32_vector(None))


SHARED_TENSORS = ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp", "ffn_gate_inp_shexp")


def pack_shared(layer) -> tuple:
    """The shared-expert arguments of ``decode_layer_moe``: kinds (NONE where the layer has
    no shared expert) and the four weights' bytes."""
    packed = [kd.weight_bytes(layer.w.get(n)) for n in SHARED_TENSORS]
    return (np.array([p[0] for p in packed], np.int64), *[p[1] for p in packed])


# ---- prefill: tokens grouped by expert ------------------------------------------------------

@njit(parallel=True, cache=True)
def grouped_matmul(kind, mats, items, starts, order, xrow, X, out):
    """``out[s] = mats[e] @ X[xrow[s]]`` for every slot ``s`` (a token's choice) routed to
    expert ``e``: slots ``order[starts[e]:starts[e + 1]]``. The work items are
    ``(expert, 16-row chunk)`` pairs (``items [n, 2]``): each chunk of an expert's weight is
    read from memory once and multiplied with every token routed to it, so each expert's
    weights are read once per batch. Float kinds and block kinds with 8-bit activations."""
    rows = out.shape[1]
    nx = X.shape[0]
    quant = kind != kd.F32 and kind != kd.F16 and kind != kd.BF16
    if quant:
        XD, XQ, XS, XF, BS = _quantize_inputs(kind, X)
    else:
        XD, XQ, XS, XF, BS = _no_inputs(nx)
    for it in prange(items.shape[0]):
        e = items[it, 0]
        r0 = items[it, 1]
        r1 = min(rows, r0 + _CHUNK)
        w = mats[e]
        for q in range(starts[e], starts[e + 1]):
            sl = order[q]
            xi = xrow[sl]
            if kind == kd.F32:
                _rows_f32(w.view(np.float32), r0, r1, X[xi], out[sl])
            elif not quant:
                _rows_u16(kind, w.view(np.uint16), r0, r1, X[xi], out[sl])
            else:
                _quant_rows(kind, w, r0, r1, XD[xi], XQ[xi], XS[xi], XF[xi], BS[xi],
                            out[sl])


def _groups(sel: np.ndarray, E: int, rows_by_kind: dict):
    flat = sel.reshape(-1)
    order = np.argsort(flat, kind="stable").astype(np.int64)
    starts = np.searchsorted(flat[order], np.arange(E + 1)).astype(np.int64)
    used = np.nonzero(np.diff(starts))[0]
    items = {}
    for rows in set(rows_by_kind.values()):
        nch = (rows + _CHUNK - 1) // _CHUNK
        it = np.empty((len(used) * nch, 2), np.int64)
        it[:, 0] = np.repeat(used, nch)
        it[:, 1] = np.tile(np.arange(nch) * _CHUNK, len(used))
        items[rows] = it
    return order, starts, items


def prefill_moe(h: np.ndarray, layer, cfg, act_code: int, act_quant: bool,
                router_logits: np.ndarray) -> np.ndarray:
    """The mixture for ``h [T, H]`` given the router logits ``[T, E]``: the tokens' choices
    grouped by expert, one pass over each chosen expert's weights for all its tokens
    (``grouped_matmul``), the weighted results summed per token."""
    m = cfg.moe
    T, H = h.shape
    k = m.top_k
    sel = np.empty((T, k), np.int64)
    wts = np.empty((T, k), np.float32)
    route_rows(np.ascontiguousarray(router_logits, dtype=np.float32), k,
               ROUTER_CODES[m.router], bool(m.renorm), sel, wts)
    ex = [layer.w[n] for n in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")]
    if not act_quant and any(e.is_quantized for e in ex):
        return _prefill_moe_blas(h, ex, sel, wts, m, act_code)
    I = ex[0].rows
    order, starts, items = _groups(sel, m.num_experts, {"i": I, "h": H})
    packed = _packed_experts(layer, ex)
    n = T * k
    tok = np.repeat(np.arange(T, dtype=np.int64), k)
    g = np.empty((n, I), np.float32)
    u = np.empty((n, I), np.float32)
    grouped_matmul(packed[0][0], packed[0][1], items[I], starts, order, tok, h, g)
    grouped_matmul(packed[1][0], packed[1][1], items[I], starts, order, tok, h, u)
    a = np.empty_like(g)
    kernel = ko.gated_act if g.size > 65536 else ko.gated_act_serial
    kernel(g, u, act_code, a)
    d = np.empty((n, H), np.float32)
    grouped_matmul(packed[2][0], packed[2][1], items[H], starts, order,
                   np.arange(n, dtype=np.int64), a, d)
    return np.einsum("tk,tkh->th", wts, d.reshape(T, k, H)).astype(np.float32)


def _packed_experts(layer, ex):
    """(kind code, typed List) per projection, made once per layer."""
    cache = getattr(layer, "_moe_lists", None)
    if cache is None:
        cache = layer._moe_lists = [expert_list(e) for e in ex]
    return cache


def _prefill_moe_blas(h, ex, sel, wts, m, act_code):
    """Block-quantized experts with float32 activations: per expert, its tokens' rows through
    the tiled widening matmul (the weights widened once per batch)."""
    gates, ups, downs = ex
    out = np.zeros_like(h)
    flat = sel.reshape(-1)
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(m.num_experts + 1))
    for e in range(m.num_experts):
        idx = order[bounds[e]:bounds[e + 1]]
        if not len(idx):
            continue
        rows = idx // m.top_k  # each token at most once per expert
        x = np.ascontiguousarray(h[rows])
        g = km.matmul(gates[e], x)
        u = km.matmul(ups[e], x)
        a = np.empty_like(g)
        ko.gated_act_serial(g, u, act_code, a)
        y = km.matmul(downs[e], a)
        out[rows] += wts.reshape(-1)[idx][:, None] * y
    return out


MOE_TENSORS = ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps") + SHARED_TENSORS
