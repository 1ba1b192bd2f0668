"""Batched decode: B sequences, one token each, in one pass through a layer.

``linear_rows(w, X)`` multiplies a weight by ``X [B, in]`` reading each weight row from
memory once for all B rows (the row stays in cache while every activation row meets it).
Every ``(weight row, activation row)`` dot product is computed by the same per-row code as
the decode product (:func:`kernels.matmul.matvec` and the 8-bit activation kernels), in the
same order, whatever B is and wherever the row sits in the batch: a sequence gets the same
bits in a batch as alone.

``attention_slots`` writes each row's key/value into its own KV cache (each sequence has its
own cache, capacity and position) and attends, all rows and heads in one compiled call; the
caches reach the kernel as addresses so one specialisation serves any B.
"""
import weakref

import numpy as np
from numba import carray, njit, prange, types
from numba.extending import intrinsic

from ..weights import Weight
from . import matmul as km
from . import ops as ko
from . import quant as kq
from . import quant_q8 as q8

# ---- float weights ---------------------------------------------------------------------------


@njit(inline="always", cache=True)
def _matmul_rows_float(w, X, out, kind):
    rows, cols = w.shape
    B = X.shape[0]
    c0 = cols - cols % km._LANES
    for g in prange(rows // 4):
        r = 4 * g
        res = np.empty(4, np.float32)
        for b in range(B):
            x = X[b]
            if kind == 0:
                km._rows4_f32(w, r, x, res)
            elif kind == 1:
                km._rows4_bf16(w, r, x, res)
            else:
                km._rows4_f16(w, r, x, res)
            for k in range(4):
                acc = res[k]
                for c in range(c0, cols):
                    acc += km._widen(w[r + k, c], kind) * x[c]
                out[b, r + k] = acc
    for r in range(rows - rows % 4, rows):
        for b in range(B):
            acc = np.float32(0.0)
            for c in range(cols):
                acc += km._widen(w[r, c], kind) * X[b, c]
            out[b, r] = acc


@njit(parallel=True, cache=True)
def matmul_rows_f32(w, X, out):
    """``out[b] = W @ X[b]``, each row exactly as :func:`kernels.matmul.matvec_f32`."""
    _matmul_rows_float(w, X, out, 0)


@njit(parallel=True, cache=True)
def matmul_rows_bf16(w, X, out):
    _matmul_rows_float(w, X, out, 1)


@njit(parallel=True, cache=True)
def matmul_rows_f16(w, X, out):
    _matmul_rows_float(w, X, out, 2)


_FLOAT = {"f32": matmul_rows_f32, "bf16": matmul_rows_bf16, "f16": matmul_rows_f16}

# ---- block-quantized weights, 8-bit activations ----------------------------------------------


@njit(cache=True)
def quantize_rows_q8_0(X, xd, xq):
    """Each row of ``X [B, n]`` to q8_0 activations (the x86 quantizer the decode uses)."""
    for b in range(X.shape[0]):
        q8._q8_0_act_x86_into(X[b], xd[b], xq[b])


@njit(cache=True)
def quantize_rows_q8_k(X, xd, xq, bsums):
    """Each row of ``X [B, n]`` to q8_K activations."""
    for b in range(X.shape[0]):
        q8._q8_k_act_into(X[b], xd[b], xq[b], bsums[b])


@njit(inline="always", cache=True)
def _rows2_q8act(data, xd, xq, out, kind):
    rows = data.shape[0]
    B = xq.shape[0]
    C = q8._CHUNK
    for ch in prange((rows + C - 1) // C):
        res = np.empty(2, np.float32)
        end = min(rows, ch * C + C)
        for r in range(ch * C, end, 2):
            r1 = min(r + 1, end - 1)  # an odd last row is paired with itself
            for b in range(B):
                if kind == 0:
                    q8._rows2_q8_0(data[r], data[r1], xq[b], xd[b], res)
                elif kind == 1:
                    q8._rows2_q4_0(data[r], data[r1], xq[b], xd[b], res)
                else:
                    q8._rows2_q5_0(data[r], data[r1], xq[b], xd[b], res)
                out[b, r] = res[0]
                out[b, r1] = res[1]


@njit(parallel=True, cache=True)
def matmul_rows_q8act_q8_0(data, xd, xq, out):
    """``out[b, r]`` = row r of q8_0 ``data`` . (xd[b], xq[b]), as the decode kernel."""
    _rows2_q8act(data, xd, xq, out, 0)


@njit(parallel=True, cache=True)
def matmul_rows_q8act_q4_0(data, xd, xq, out):
    _rows2_q8act(data, xd, xq, out, 1)


@njit(parallel=True, cache=True)
def matmul_rows_q8act_q5_0(data, xd, xq, out):
    _rows2_q8act(data, xd, xq, out, 2)


@njit(inline="always", cache=True)
def _rows_k_q8act(data, xd, x16, bsums, out, kind):
    rows = data.shape[0]
    B = x16.shape[0]
    C = q8._CHUNK
    for ch in prange((rows + C - 1) // C):
        aux = np.empty(8, np.int32)
        sums = np.empty(8, np.float32)
        for r in range(ch * C, min(rows, ch * C + C)):
            u = data[r]
            for b in range(B):
                if kind == 0:
                    out[b, r] = q8._row_k4(u, xd[b], x16[b], bsums[b], aux, sums, 144, False)
                elif kind == 1:
                    out[b, r] = q8._row_k4(u, xd[b], x16[b], bsums[b], aux, sums, 176, True)
                else:
                    out[b, r] = q8._row_q6_k(u, xd[b], x16[b], aux, sums)


@njit(parallel=True, cache=True)
def matmul_rows_q8act_q4_k(data, xd, x16, bsums, out):
    """``out[b, r]`` = row r of q4_k ``data`` . row b of the q8_K activations (x16 = the
    quants widened to int16)."""
    _rows_k_q8act(data, xd, x16, bsums, out, 0)


@njit(parallel=True, cache=True)
def matmul_rows_q8act_q5_k(data, xd, x16, bsums, out):
    _rows_k_q8act(data, xd, x16, bsums, out, 1)


@njit(parallel=True, cache=True)
def matmul_rows_q8act_q6_k(data, xd, x16, bsums, out):
    _rows_k_q8act(data, xd, x16, bsums, out, 2)


_Q8ACT = {"q8_0": matmul_rows_q8act_q8_0, "q4_0": matmul_rows_q8act_q4_0,
          "q5_0": matmul_rows_q8act_q5_0, "q4_k": matmul_rows_q8act_q4_k,
          "q5_k": matmul_rows_q8act_q5_k, "q6_k": matmul_rows_q8act_q6_k}


def quantize_rows(kind: str, X: np.ndarray) -> tuple:
    """The rows of ``X [B, n]`` in the 8-bit activation format of weights of ``kind``:
    ``(xd, xq)`` for q8_0/q4_0/q5_0, ``(xd, x16, bsums)`` for the k-quants."""
    B, n = X.shape
    if q8.ACT_FORMAT[kind] == "q8_0":
        xd = np.empty((B, n // 32), np.float32)
        xq = np.empty((B, n), np.int8)
        quantize_rows_q8_0(X, xd, xq)
        return xd, xq
    xd = np.empty((B, n // 256), np.float32)
    xq = np.empty((B, n), np.int8)
    bsums = np.empty((B, n // 16), np.int16)
    quantize_rows_q8_k(X, xd, xq, bsums)
    return xd, xq.astype(np.int16), bsums


class ActCache:
    """Remembers the quantized activations of the last input per format, so q, k and v
    (three weights, one input) quantize it once."""

    def __init__(self):
        self._key = (None, None)
        self._val = None

    def get(self, kind: str, X: np.ndarray) -> tuple:
        fmt = q8.ACT_FORMAT[kind]
        ref, f = self._key
        if ref is None or ref() is not X or f != fmt:
            self._val = quantize_rows(kind, X)
            self._key = (weakref.ref(X), fmt)
        return self._val


def linear_rows(w: Weight, X: np.ndarray, act_quant: bool = False,
                cache: ActCache | None = None) -> np.ndarray:
    """``X @ W.T`` for ``X [B, in]`` (float32, C-contiguous): row b bit for bit what
    :func:`kernels.matmul.matvec` gives for ``X[b]``, any B."""
    B = X.shape[0]
    out = np.empty((B, w.rows), np.float32)
    data = w.kernel_view()
    kernel = _FLOAT.get(w.kind)
    if kernel is not None:
        kernel(data, X, out)
    elif act_quant and q8.supports(w.kind):
        act = cache.get(w.kind, X) if cache is not None else quantize_rows(w.kind, X)
        _Q8ACT[w.kind](kq._readonly(data, np.uint8), *act, out)
    else:
        kq.MATMUL[w.kind](kq._readonly(data, np.uint8), X, out)
    return out


# ---- attention over one KV cache per row -----------------------------------------------------


@intrinsic
def _f32_ptr(typingctx, addr):
    """An int64 address as a float32 pointer (for :func:`numba.carray`)."""
    if not isinstance(addr, types.Integer):
        return None
    sig = types.CPointer(types.float32)(addr)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return sig, codegen


@njit(inline="always", cache=True)
def _write_kv(k, v, kaddr, vaddr, caps, pos):
    B, nKV, D = k.shape
    for b in range(B):
        kc = carray(_f32_ptr(kaddr[b]), (nKV, caps[b], D))
        vc = carray(_f32_ptr(vaddr[b]), (nKV, caps[b], D))
        p = pos[b]
        for g in range(nKV):
            for d in range(D):
                kc[g, p, d] = k[b, g, d]
                vc[g, p, d] = v[b, g, d]


@njit(parallel=True, cache=True, fastmath=ko._ATTN_MATH)
def attention_slots(q, k, v, kaddr, vaddr, caps, pos, scale, softcap, window, logn, out,
                    parallel):
    """Row b: store ``k[b], v[b]`` at position ``pos[b]`` of its caches (float32
    ``[nKV, caps[b], D]`` at addresses ``kaddr[b]``, ``vaddr[b]``), then causal attention of
    ``q[b] [nH, D]`` over positions ``0..pos[b]`` (the same per-head code as
    :func:`ops.attention`). ``logn [B]`` scales each query; writes ``out [B, nH, D]``."""
    B, nH, D = q.shape
    nKV = k.shape[1]
    _write_kv(k, v, kaddr, vaddr, caps, pos)
    if parallel:
        for job in prange(B * nH):
            b = job // nH
            h = job % nH
            kc = carray(_f32_ptr(kaddr[b]), (nKV, caps[b], D))
            vc = carray(_f32_ptr(vaddr[b]), (nKV, caps[b], D))
            ko._attend(q[b:b + 1], kc, vc, pos[b], scale, softcap, window, logn[b:b + 1],
                       out[b:b + 1], 0, h)
    else:
        for job in range(B * nH):
            b = job // nH
            h = job % nH
            kc = carray(_f32_ptr(kaddr[b]), (nKV, caps[b], D))
            vc = carray(_f32_ptr(vaddr[b]), (nKV, caps[b], D))
            ko._attend(q[b:b + 1], kc, vc, pos[b], scale, softcap, window, logn[b:b + 1],
                       out[b:b + 1], 0, h)
