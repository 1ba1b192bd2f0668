"""Weight x activation products, computed from the weight's stored format.

``matvec(w, x, out)`` is the decode product (one token): every weight is read once, rows in
parallel, float32 accumulation. ``matmul(w, X)`` is the prefill product (T tokens): the weight
is widened to float32 one tile of rows at a time and multiplied with BLAS, so a bf16, f16 or
quantized model never exists as a float32 copy.
"""
import os

import numpy as np
from numba import njit, prange

from ..weights import Weight
from . import quant, quant_q8
from .bits import bf16_to_f32, f16_to_f32

# With act_quant, quantized weights meet 8-bit quantized activations, as in llama.cpp:
# integer dot products, about twice as fast, at the cost of activation rounding noise.
# The default (float32 activations) keeps every path equal to the NumPy reference to
# float32 rounding. TORCHLESS_ACT_QUANT=1 turns it on by default.
ACT_QUANT_DEFAULT = os.environ.get("TORCHLESS_ACT_QUANT", "0") == "1"


# Four rows per step: each x[c] load feeds four multiply-adds, and four independent
# accumulator chains keep the loads in flight (measured ~1.6x on DRAM-bound matrices).

@njit(parallel=True, cache=True, fastmath=True)
def matvec_f32(w, x, out):
    rows, cols = w.shape
    for b in prange(rows // 4):
        r = 4 * b
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        for c in range(cols):
            xc = x[c]
            a0 += w[r, c] * xc
            a1 += w[r + 1, c] * xc
            a2 += w[r + 2, c] * xc
            a3 += w[r + 3, c] * xc
        out[r] = a0
        out[r + 1] = a1
        out[r + 2] = a2
        out[r + 3] = a3
    for r in range(rows - rows % 4, rows):
        acc = np.float32(0.0)
        for c in range(cols):
            acc += w[r, c] * x[c]
        out[r] = acc


@njit(parallel=True, cache=True, fastmath=True)
def matvec_bf16(w, x, out):
    rows, cols = w.shape
    for b in prange(rows // 4):
        r = 4 * b
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        for c in range(cols):
            xc = x[c]
            a0 += bf16_to_f32(w[r, c]) * xc
            a1 += bf16_to_f32(w[r + 1, c]) * xc
            a2 += bf16_to_f32(w[r + 2, c]) * xc
            a3 += bf16_to_f32(w[r + 3, c]) * xc
        out[r] = a0
        out[r + 1] = a1
        out[r + 2] = a2
        out[r + 3] = a3
    for r in range(rows - rows % 4, rows):
        acc = np.float32(0.0)
        for c in range(cols):
            acc += bf16_to_f32(w[r, c]) * x[c]
        out[r] = acc


@njit(parallel=True, cache=True, fastmath=True)
def matvec_f16(w, x, out):
    rows, cols = w.shape
    for b in prange(rows // 4):
        r = 4 * b
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        for c in range(cols):
            xc = x[c]
            a0 += f16_to_f32(w[r, c]) * xc
            a1 += f16_to_f32(w[r + 1, c]) * xc
            a2 += f16_to_f32(w[r + 2, c]) * xc
            a3 += f16_to_f32(w[r + 3, c]) * xc
        out[r] = a0
        out[r + 1] = a1
        out[r + 2] = a2
        out[r + 3] = a3
    for r in range(rows - rows % 4, rows):
        acc = np.float32(0.0)
        for c in range(cols):
            acc += f16_to_f32(w[r, c]) * x[c]
        out[r] = acc


@njit(parallel=True, cache=True)
def widen_rows_bf16(w, r0, r1, out):
    cols = w.shape[1]
    for r in prange(r0, r1):
        for c in range(cols):
            out[r - r0, c] = bf16_to_f32(w[r, c])


@njit(parallel=True, cache=True)
def widen_rows_f16(w, r0, r1, out):
    cols = w.shape[1]
    for r in prange(r0, r1):
        for c in range(cols):
            out[r - r0, c] = f16_to_f32(w[r, c])


def _as2d(w: Weight):
    """The weight's data as the 2-D array the kernels take (uint16 bits for f16)."""
    return w.kernel_view()


_FLOAT_MATVEC = {"f32": matvec_f32, "bf16": matvec_bf16, "f16": matvec_f16}


def matvec(w: Weight, x: np.ndarray, out: np.ndarray | None = None,
           act_quant: bool = False) -> np.ndarray:
    """``out = W @ x`` for a 2-D weight ``[out, in]`` and a float32 vector ``[in]``."""
    if out is None:
        out = np.empty(w.rows, dtype=np.float32)
    kernel = _FLOAT_MATVEC.get(w.kind)
    if kernel is not None:
        kernel(w.kernel_view(), x, out)
    elif act_quant and quant_q8.supports(w.kind):
        # llama.cpp's way: quantize x to 8 bits, integer dot products per block
        quant_q8.matvec_q8act(w.kind, w.kernel_view(), x, out,
                              q8_0_variant=quant_q8.ENGINE_Q8_0_VARIANT)
    else:
        quant.matvec(w.kind, w.kernel_view(), x, out)
    return out


TILE_ROWS = 2048


def widen_rows(w: Weight, r0: int, r1: int, out: np.ndarray) -> np.ndarray:
    """Rows ``r0:r1`` of ``w`` as float32 into ``out[:r1-r0]``."""
    d = _as2d(w)
    if w.kind == "bf16":
        widen_rows_bf16(d, r0, r1, out)
    elif w.kind == "f16":
        widen_rows_f16(d, r0, r1, out)
    elif w.kind == "f32":
        out[: r1 - r0] = d[r0:r1]
    else:
        quant.dequantize_rows_into(w.kind, d, r0, r1, out)
    return out[: r1 - r0]


def matmul(w: Weight, x: np.ndarray, out: np.ndarray | None = None,
           act_quant: bool = False) -> np.ndarray:
    """``out = X @ W.T`` for activations ``X [T, in]``; returns ``[T, out]`` float32."""
    T = x.shape[0]
    if out is None:
        out = np.empty((T, w.rows), dtype=np.float32)
    if T == 1:
        matvec(w, x[0], out[0], act_quant)
        return out
    if w.kind == "f32":
        np.matmul(x, _as2d(w).T, out=out)
        return out
    if act_quant and quant_q8.supports(w.kind):
        x = quant_q8.dequantized_activations(w.kind, x)
    tile = np.empty((min(TILE_ROWS, w.rows), w.cols), dtype=np.float32)
    for r0 in range(0, w.rows, TILE_ROWS):
        r1 = min(r0 + TILE_ROWS, w.rows)
        t = widen_rows(w, r0, r1, tile)
        np.matmul(x, t.T, out=out[:, r0:r1])
    return out
