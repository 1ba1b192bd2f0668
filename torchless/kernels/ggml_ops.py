"""Element-wise and row operations in llama.cpp's float order (``numerics="llama.cpp"``).

Each function does the float operations ggml's CPU backend does, in the same order and with
the same roundings (x86-64 build, gcc with its default ``-ffp-contract=fast``), so that with
the matching matrix and attention kernels a GGUF model's logits equal llama.cpp's bit for
bit. The formulas (all float32 unless said):

* RMS norm (``ggml_compute_forward_rms_norm_f32``): the squares ``x*x`` rounded to float32
  and summed left to right in float64; ``mean = float32(sum / n)``;
  ``scale = 1 / sqrtf(mean + eps)``; ``y = (x * scale) * w`` (the weight is a separate MUL).
* RoPE, NeoX layout (``ggml_rope_cache_init`` + ``rotate_pairs``): ``theta_scale =
  powf(base, -2/n_dims)``; ``theta`` starts at the position and is multiplied by
  ``theta_scale`` pair after pair (not recomputed by a power); ``cos``/``sin`` are libm's
  ``cosf``/``sinf`` of ``freq_scale * theta``; the rotation is ``fma(x0, cos, -(x1*sin))``
  and ``fma(x0, sin, x1*cos)`` (what gcc contracts ``x0*cos - x1*sin`` and
  ``x0*sin + x1*cos`` to).
* GeGLU with ``GGML_GELU_FP16``: ``gelu(g)`` is looked up in a table of the 65,536 float16
  values (``g`` rounded to float16 to index it), each entry
  ``fp16(0.5*x * (1 + tanhf(S*x * fma(A*x, x, 1))))``; ``0`` for ``g <= -10`` and ``g`` for
  ``g >= 10``; then multiplied by ``u``.
"""
import math

import numpy as np
from numba import njit, prange

from .bits import f16_to_f32, f32_to_f16_bits, fma32, round_f16


@njit(inline="always", cache=True)
def _round_f16_row(x, out, i):
    for j in range(x.shape[1]):
        out[i, j] = round_f16(x[i, j])


@njit(cache=True, parallel=True)
def _round_f16_rows_par(x, out):
    for i in prange(x.shape[0]):
        _round_f16_row(x, out, i)


@njit(cache=True)
def _round_f16_rows_ser(x, out):
    for i in range(x.shape[0]):
        _round_f16_row(x, out, i)


# Below this many rows the element-wise kernels run on one thread: a decode step launches
# a dozen of them per layer, and a parallel launch costs more than the work.
SERIAL_ROWS = 8


def round_f16_rows(x, out):
    """``out = float32(float16(x))`` for a 2-D float32 array."""
    (_round_f16_rows_ser if x.shape[0] < SERIAL_ROWS else _round_f16_rows_par)(x, out)


@njit(inline="always", cache=True)
def _rms_row(x, w, eps, out, i):
    n = x.shape[1]
    s = 0.0
    for j in range(n):
        sq = x[i, j] * x[i, j]
        s += np.float64(sq)
    mean = np.float32(s / n)
    scale = np.float32(1.0) / np.sqrt(mean + eps)
    for j in range(n):
        out[i, j] = (x[i, j] * scale) * w[j]


@njit(cache=True, parallel=True)
def _rms_norm_rows_par(x, w, eps, out):
    for i in prange(x.shape[0]):
        _rms_row(x, w, eps, out, i)


@njit(cache=True)
def _rms_norm_rows_ser(x, w, eps, out):
    for i in range(x.shape[0]):
        _rms_row(x, w, eps, out, i)


def rms_norm_rows(x, w, eps, out):
    """RMS norm of each row of ``x`` times ``w`` (ggml's order, see the module docstring);
    ``eps`` a float32."""
    (_rms_norm_rows_ser if x.shape[0] < SERIAL_ROWS else _rms_norm_rows_par)(
        x, w, np.float32(eps), out)


@njit(cache=True)
def rope_cache(positions, base, freq_scale, n_dims, cos, sin):
    """cos/sin tables [T, n_dims/2] as ``ggml_rope_cache_init`` builds them (no YaRN ramp,
    attention factor 1)."""
    theta_scale = np.float32(base) ** (np.float32(-2.0) / np.float32(n_dims))
    for t in range(positions.shape[0]):
        theta = np.float32(positions[t])
        for i in range(n_dims // 2):
            th = freq_scale * theta
            cos[t, i] = math.cos(th)
            sin[t, i] = math.sin(th)
            theta = theta * theta_scale


@njit(inline="always", cache=True)
def _rope_row(x, cos, sin, out, th):
    T, H, D = x.shape
    half = cos.shape[1]
    t = th // H
    h = th % H
    for i in range(half):
        c = cos[t, i]
        s = sin[t, i]
        x0 = x[t, h, i]
        x1 = x[t, h, i + half]
        out[t, h, i] = fma32(x0, c, -(x1 * s))
        out[t, h, i + half] = fma32(x0, s, x1 * c)
    for j in range(2 * half, D):
        out[t, h, j] = x[t, h, j]


@njit(cache=True, parallel=True)
def _rope_neox_par(x, cos, sin, out):
    for th in prange(x.shape[0] * x.shape[1]):
        _rope_row(x, cos, sin, out, th)


@njit(cache=True)
def _rope_neox_ser(x, cos, sin, out):
    for th in range(x.shape[0] * x.shape[1]):
        _rope_row(x, cos, sin, out, th)


def rope_neox(x, cos, sin, out):
    """NeoX-layout rotation of ``x`` [T, H, D] (first ``2 * cos.shape[1]`` features) with
    gcc's contraction of ggml's ``rotate_pairs``; features past the rotary part are copied."""
    (_rope_neox_ser if x.shape[0] < SERIAL_ROWS else _rope_neox_par)(x, cos, sin, out)


_GELU_A = np.float32(0.044715)
_SQRT_2_OVER_PI = np.float32(0.79788456080286535587989211986876)


@njit(cache=True)
def _gelu_f16_table():
    table = np.zeros(65536, np.uint16)
    for i in range(65536):
        x = f16_to_f32(np.uint16(i))
        if not (abs(x) < 10.0):  # only |x| < 10 is looked up (and NaN/inf never)
            continue
        inner = fma32(_GELU_A * x, x, np.float32(1.0))
        t = np.float32(math.tanh(np.float64(_SQRT_2_OVER_PI * x * inner)))
        # tanhf: glibc's float tanh; float64 tanh rounded once agrees on every table entry
        y = (np.float32(0.5) * x) * (np.float32(1.0) + t)
        table[i] = f32_to_f16_bits(y)
    return table


_TABLE = None


def gelu_table() -> np.ndarray:
    """ggml's float16 GELU table (uint16 bits, indexed by the float16 bits of the input)."""
    global _TABLE
    if _TABLE is None:
        _TABLE = _gelu_f16_table()
    return _TABLE


@njit(inline="always", cache=True)
def _geglu_row(g, u, table, out, i):
    for j in range(g.shape[1]):
        x = g[i, j]
        if x <= -10.0:
            out[i, j] = 0.0
        elif x >= 10.0:
            out[i, j] = x * u[i, j]
        else:
            out[i, j] = f16_to_f32(table[f32_to_f16_bits(x)]) * u[i, j]


@njit(cache=True, parallel=True)
def _geglu_par(g, u, table, out):
    for i in prange(g.shape[0]):
        _geglu_row(g, u, table, out, i)


@njit(cache=True)
def _geglu_ser(g, u, table, out):
    for i in range(g.shape[0]):
        _geglu_row(g, u, table, out, i)


def geglu(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``gelu_tanh(g) * u`` through ggml's float16 GELU table; g and u are [T, n] float32
    (views allowed)."""
    out = np.empty(g.shape, np.float32)
    (_geglu_ser if g.shape[0] < SERIAL_ROWS else _geglu_par)(g, u, gelu_table(), out)
    return out
