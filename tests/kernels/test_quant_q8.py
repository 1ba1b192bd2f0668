"""Quantized weights x quantized activations (llama.cpp's integer path).

* the activation quantizers equal a scalar transcription of ggml's reference C code;
* every kernel equals, bit for bit, a NumPy transcription of ggml's ``*_generic`` dot
  products, and the exact sum over blocks of ``dequantize(W) * dequantize(x)`` to float32
  tolerance;
* the result stays within the error the activation quantization explains of the
  float32-activation kernel ``quant.matvec``.
"""

import os
import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as G
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchless.errors import TensorShapeError, UnsupportedError
from torchless.kernels import quant as Q
from quant_blocks import random_blocks
from torchless.kernels import batch as KB
from torchless.kernels import quant_q8 as Q8
from torchless.weights import Weight

KINDS = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q4_k", "q5_k", "q6_k", "q2_k",
         "q3_k", "iq4_xs", "tq1_0", "tq2_0"]
# the kinds whose kernels are vector IR that depends on the ISA tier (the others are plain Numba)
IR_KINDS = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q4_k", "q5_k", "q6_k"]
TILED_KINDS = IR_KINDS  # the kinds whose batched products run in tiles
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
F32 = np.float32


# ---------------------------------------------------------------------------------------
# ggml's reference quantizers, transcribed statement by statement (float32 scalars)
# ---------------------------------------------------------------------------------------


def c_roundf(v):
    """C roundf: half away from zero."""
    a = abs(float(v))
    r = np.floor(a + 0.5)  # exact in float64 for float32 inputs
    return int(-r if v < 0 else r)


def c_nearest_int(fval):
    """ggml's nearest_int: add 1.5 * 2**23 in float32 and read the mantissa bits."""
    val = np.float32(fval) + np.float32(12582912.0)
    i = int(np.array([val], np.float32).view(np.int32)[0])
    return (i & 0x007FFFFF) - 0x00400000


def fp32_to_fp16_to_fp32(v):
    with np.errstate(over="ignore"):
        return np.float32(np.float16(np.float32(v)))


def ggml_quantize_row_q8_0_ref(x):
    nb = len(x) // 32
    d_out = np.zeros(nb, np.float32)
    qs = np.zeros(len(x), np.int8)
    for i in range(nb):
        amax = F32(0)
        for j in range(32):
            v = x[i * 32 + j]
            amax = amax if amax > abs(v) else F32(abs(v))  # MAX(amax, fabsf(v))
        d = F32(amax / F32(127))
        ident = F32(F32(1) / d) if d else F32(0)
        d_out[i] = fp32_to_fp16_to_fp32(d)
        for j in range(32):
            x0 = F32(x[i * 32 + j] * ident)
            qs[i * 32 + j] = c_roundf(x0)
    return d_out, qs


def ggml_quantize_row_q8_0_x86(x):
    """arch/x86/quants.c quantize_row_q8_0 (AVX2 branch)."""
    nb = len(x) // 32
    d_out = np.zeros(nb, np.float32)
    qs = np.zeros(len(x), np.int8)
    for i in range(nb):
        max_scalar = F32(max(abs(float(v)) for v in x[i * 32 : i * 32 + 32]))
        d_out[i] = fp32_to_fp16_to_fp32(F32(max_scalar / F32(127)))
        ident = F32(F32(127) / max_scalar) if max_scalar != 0 else F32(0)
        for j in range(32):
            qs[i * 32 + j] = int(np.rint(F32(x[i * 32 + j] * ident)))  # _MM_ROUND_NEAREST
    return d_out, qs


def ggml_q8_1_sums(x, qs):
    """block_q8_1.s: GGML_FP32_TO_FP16(sum * d), d = amax / 127 (unrounded, float32)."""
    nb = len(x) // 32
    s = np.zeros(nb, np.float32)
    for i in range(nb):
        amax = F32(max(abs(float(v)) for v in x[i * 32 : i * 32 + 32]))
        d = F32(amax / F32(127))
        s[i] = fp32_to_fp16_to_fp32(F32(F32(int(qs[i * 32 : i * 32 + 32].astype(int).sum())) * d))
    return s


def ggml_quantize_row_q8_K_ref(x):
    nb = len(x) // 256
    d_out = np.zeros(nb, np.float32)
    qs = np.zeros(len(x), np.int8)
    bsums = np.zeros(nb * 16, np.int16)
    for i in range(nb):
        xb = x[i * 256 : i * 256 + 256]
        mx = F32(0)
        amax = F32(0)
        for j in range(256):
            ax = F32(abs(xb[j]))
            if ax > amax:
                amax = ax
                mx = xb[j]
        if not amax:
            d_out[i] = 0
            continue  # qs (and, in our version, bsums) stay zero
        iscale = F32(F32(-127) / mx)
        for j in range(256):
            v = c_nearest_int(F32(iscale * xb[j]))
            qs[i * 256 + j] = min(127, v)
        for j in range(16):
            bsums[i * 16 + j] = int(qs[i * 256 + 16 * j : i * 256 + 16 * j + 16].astype(int).sum())
        d_out[i] = F32(F32(1) / iscale)
    return d_out, qs, bsums


@st.composite
def activations(draw, qk):
    nblocks = draw(st.integers(1, 3))
    n = nblocks * qk
    style = draw(st.sampled_from(["normal", "wide", "ties", "tiny", "huge", "floats"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if style == "normal":
        x = rng.standard_normal(n) * draw(st.sampled_from([1e-3, 1.0, 30.0]))
    elif style == "wide":
        x = rng.standard_normal(n) * np.exp(rng.uniform(-8, 8, n))
    elif style == "ties":  # block max 127 -> scale 1: halves are exact ties
        x = rng.integers(-254, 255, n) / 2.0
        x[::qk] = 127.0
    elif style == "tiny":
        x = rng.standard_normal(n) * 1e-7  # q8_0's half-float d goes subnormal
    elif style == "huge":
        x = rng.standard_normal(n) * 1e7  # q8_0's d overflows the half range
    else:
        x = np.array(
            draw(
                st.lists(
                    st.floats(-(2.0**99), 2.0**99, width=32, allow_subnormal=True),
                    min_size=n,
                    max_size=n,
                )
            )
        )
    x = x.astype(np.float32)
    for b in range(nblocks):  # sometimes an all-zero or all-negative block
        kind = draw(st.sampled_from(["keep", "keep", "zero", "neg"]))
        if kind == "zero":
            x[b * qk : (b + 1) * qk] = 0
        elif kind == "neg":
            x[b * qk : (b + 1) * qk] = -np.abs(x[b * qk : (b + 1) * qk])
    return x


@settings(max_examples=60, deadline=None)
@given(x=activations(32))
def test_quantize_q8_0_act_equals_ggml_reference(x):
    d_ref, q_ref = ggml_quantize_row_q8_0_ref(x)
    for fn in (Q8.quantize_q8_0_act, Q8.quantize_q8_0_act_np):
        d, q = fn(x)
        assert d.dtype == np.float32 and q.dtype == np.int8
        np.testing.assert_array_equal(d, d_ref)
        np.testing.assert_array_equal(q, q_ref)
    # and the bytes equal gguf's q8_0 quantizer (the same reference) for finite scales
    if np.all(np.isfinite(d_ref)):
        blob = gguf.quants.quantize(x.reshape(1, -1), G.Q8_0).reshape(-1, 34)
        np.testing.assert_array_equal(blob[:, 2:].view(np.int8).reshape(-1), q_ref)
        np.testing.assert_array_equal(
            blob[:, :2].copy().view("<f2").astype(np.float32)[:, 0], d_ref
        )


@settings(max_examples=60, deadline=None)
@given(x=activations(32))
def test_quantize_q8_0_act_x86_equals_ggml_avx2(x):
    d_ref, q_ref = ggml_quantize_row_q8_0_x86(x)
    for fn in (Q8.quantize_q8_0_act_x86, Q8.quantize_q8_0_act_x86_np):
        d, q = fn(x)
        np.testing.assert_array_equal(d, d_ref)
        np.testing.assert_array_equal(q, q_ref)


@settings(max_examples=60, deadline=None)
@given(x=activations(32))
def test_quantize_q8_1_act_equals_ggml(x):
    for quantize, numpy_variant, reference in (
        (Q8.quantize_q8_1_act, "ref", ggml_quantize_row_q8_0_ref),
        (Q8.quantize_q8_1_act_x86, "x86", ggml_quantize_row_q8_0_x86),
    ):
        d_ref, q_ref = reference(x)
        s_ref = ggml_q8_1_sums(x, q_ref)
        for d, q, s in (quantize(x), Q8.quantize_q8_1_act_np(x, numpy_variant)):
            assert d.dtype == np.float32 and q.dtype == np.int8 and s.dtype == np.float32
            np.testing.assert_array_equal(d, d_ref)
            np.testing.assert_array_equal(q, q_ref)
            np.testing.assert_array_equal(s, s_ref)


@settings(max_examples=60, deadline=None)
@given(x=activations(256))
def test_quantize_q8_k_act_equals_ggml_reference(x):
    d_ref, q_ref, b_ref = ggml_quantize_row_q8_K_ref(x)
    for fn in (Q8.quantize_q8_k_act, Q8.quantize_q8_k_act_np):
        d, q, bs = fn(x)
        assert d.dtype == np.float32 and q.dtype == np.int8 and bs.dtype == np.int16
        np.testing.assert_array_equal(d, d_ref)
        np.testing.assert_array_equal(q, q_ref)
        np.testing.assert_array_equal(bs, b_ref)


def test_quantizer_edge_cases():
    # q8_0: an all-zero block, rounding ties (half away from zero vs. the x86 half-to-even)
    x = np.zeros(64, np.float32)
    x[32:36] = [127.0, 2.5, -2.5, 0.5]
    d, q = Q8.quantize_q8_0_act(x)
    assert d[0] == 0 and not q[:32].any()
    assert d[1] == np.float32(np.float16(1.0)) and list(q[32:36]) == [127, 3, -3, 1]
    d, q = Q8.quantize_q8_0_act_x86(x)
    assert list(q[32:36]) == [127, 2, -2, 0]
    # the half-float d is what is returned (and what the dot products use)
    x = np.full(32, 0.1, np.float32)
    d, _ = Q8.quantize_q8_0_act(x)
    assert d[0] == np.float32(np.float16(np.float32(0.1) / np.float32(127)))
    # q8_K: iscale = -127/max with the signed max (here -127: iscale = 1, the quants keep
    # their sign); nearest_int rounds ties to even
    x = np.zeros(512, np.float32)
    x[256] = -127.0
    x[257:260] = [2.5, 3.5, 127.0]
    d, q, bs = Q8.quantize_q8_k_act(x)
    assert d[0] == 0 and not q[:256].any() and not bs[:16].any()
    assert d[1] == np.float32(1) / (np.float32(-127) / np.float32(-127))
    assert list(q[256:260]) == [-127, 2, 4, 127]
    assert bs[16] == -127 + 2 + 4 + 127
    # the first element of largest magnitude wins: +M before -M gives a negative iscale
    x = np.zeros(256, np.float32)
    x[3], x[7] = 4.0, -4.0
    d, q, _ = Q8.quantize_q8_k_act(x)
    assert d[0] < 0 and q[3] == -127 and q[7] == 127


def test_quantizers_reject_bad_shapes():
    with pytest.raises(TensorShapeError):
        Q8.quantize_q8_0_act(np.zeros(33, np.float32))
    with pytest.raises(TensorShapeError):
        Q8.quantize_q8_k_act(np.zeros(128, np.float32))
    with pytest.raises(TensorShapeError):
        Q8.quantize_q8_0_act(np.zeros((2, 32), np.float32))


# ---------------------------------------------------------------------------------------
# ggml's generic dot products, transcribed in NumPy (integers exact, float32 in C order)
# ---------------------------------------------------------------------------------------


def f16(b, off):
    return b[..., off : off + 2].copy().view("<f2")[..., 0].astype(np.float32)


def int_weights(kind, data):
    """Per-block integer quants, scales and mins as the generic C code sees them."""
    bpb = Q.BLOCK_INFO[kind][1]
    b = data.reshape(data.shape[0], -1, bpb)
    if kind == "q8_0":
        return f16(b, 0), b[..., 2:34].view(np.int8).astype(np.int64)
    if kind in ("q4_1", "q5_1"):
        qs = b[..., -16:]
        q = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.int64)
        if kind == "q5_1":
            qh = b[..., 4:8].copy().view("<u4").astype(np.int64)
            q |= ((qh >> np.arange(32)) & 1) << 4
        return f16(b, 0), f16(b, 2), q
    if kind == "iq4_nl":
        qs = b[..., 2:18]
        return f16(b, 0), KVALUES[np.concatenate([qs & 15, qs >> 4], axis=-1)]
    if kind in ("q4_0", "q5_0"):
        qs = b[..., -16:]
        q = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.int64)
        if kind == "q5_0":
            qh = b[..., 2:6].copy().view("<u4").astype(np.int64)  # [.., 1]
            q |= ((qh >> np.arange(32)) & 1) << 4
            return f16(b, 0), q - 16
        return f16(b, 0), q - 8
    if kind in ("q4_k", "q5_k"):
        sc, m = Q._k4_scales(b[..., 4:16])
        qs = b[..., -128:].reshape(b.shape[:2] + (4, 1, 32))
        q = ((qs >> np.array([0, 4], np.uint8).reshape(2, 1)) & 15).reshape(b.shape[:2] + (256,))
        q = q.astype(np.int64)
        if kind == "q5_k":
            qh = b[..., 16:48].astype(np.int64)  # [.., 32]
            hb = (qh[..., None, :] >> np.arange(8).reshape(8, 1)) & 1  # [.., 8, 32]
            q |= hb.reshape(b.shape[:2] + (256,)) << 4
        return f16(b, 0), f16(b, 2), sc.astype(np.int64), m.astype(np.int64), q
    # q6_k
    W = Q.dequantize(kind, data, b.shape[1] * 256)
    d = f16(b, 208)
    sc = b[..., 192:208].view(np.int8).astype(np.int64)
    ql = b[..., 0:128].reshape(b.shape[:2] + (2, 1, 64))
    qh = b[..., 128:192].reshape(b.shape[:2] + (2, 1, 32))
    low = ((ql >> np.array([0, 4], np.uint8).reshape(2, 1)) & 15).reshape(b.shape[:2] + (2, 4, 32))
    high = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3
    q = (low.astype(np.int64) | (high.astype(np.int64) << 4)) - 32
    q = q.reshape(b.shape[:2] + (256,))
    # sanity: these integers reproduce the float reference dequantization
    expect = (d[..., None, None] * sc[..., None].astype(np.float32)) * q.reshape(
        b.shape[:2] + (16, 16)
    ).astype(np.float32)
    np.testing.assert_array_equal(expect.reshape(W.shape), W)
    return d, sc, q


KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113])


def low2(qs):
    """2-bit fields of 64 bytes [.., 64] in ggml's order (q2_k, q3_k, tq2_0) -> [.., 256]."""
    q = (qs.reshape(qs.shape[:-1] + (2, 1, 32)).astype(np.int64) >> np.array([0, 2, 4, 6])
         .reshape(4, 1)) & 3
    return q.reshape(qs.shape[:-1] + (256,))


def k_ints(kind, b):
    """Integer quants [.., 256] and per-element integer scales of the new 256-element kinds
    (from the block bytes, as ggml's generic code reads them)."""
    if kind == "q2_k":
        sc = b[..., 0:16].astype(np.int64)
        return low2(b[..., 16:80]), np.repeat(sc & 15, 16, axis=-1), sc >> 4
    if kind == "q3_k":
        hm = b[..., 0:32].astype(np.int64)
        hb = ((hm[..., None, :] >> np.arange(8).reshape(8, 1)) & 1).reshape(b.shape[:-1] + (256,))
        q = low2(b[..., 32:96]) - 4 * (1 - hb)
        a = b[..., 96:108].astype(np.int64)
        lo = np.concatenate([a[..., 0:8] & 15, a[..., 0:8] >> 4], axis=-1)
        hi = np.concatenate([(a[..., 8:12] >> (2 * k)) & 3 for k in range(4)], axis=-1)
        return q, np.repeat((lo | (hi << 4)) - 32, 16, axis=-1), None
    if kind == "iq4_xs":
        h = b[..., 2].astype(np.int64) | (b[..., 3].astype(np.int64) << 8)
        sl = b[..., 4:8].astype(np.int64)
        lo = np.stack([sl & 15, sl >> 4], axis=-1).reshape(b.shape[:-1] + (8,))
        ls = (lo | (((h[..., None] >> (2 * np.arange(8))) & 3) << 4)) - 32
        qs = b[..., 8:136].reshape(b.shape[:-1] + (8, 16))
        q = KVALUES[np.concatenate([qs & 15, qs >> 4], axis=-1)].reshape(b.shape[:-1] + (256,))
        return q, ls, None
    if kind == "tq2_0":
        return low2(b[..., 0:64]) - 1, None, None
    # tq1_0: base-3 digits, in ggml's fixed-point form
    pow3 = np.array([1, 3, 9, 27, 81])
    parts = [(b[..., None, 0:32].astype(np.int64) * pow3.reshape(5, 1)),
             (b[..., None, 32:48].astype(np.int64) * pow3.reshape(5, 1)),
             (b[..., None, 48:52].astype(np.int64) * pow3[:4].reshape(4, 1))]
    v = np.concatenate([p.reshape(b.shape[:-1] + (-1,)) for p in parts], axis=-1) & 255
    return ((v * 3) >> 8) - 1, None, None


def new_k_dot(kind, data, act):
    """ggml_vec_dot_<kind>_q8_K_generic for q2_k, q3_k, iq4_xs, tq1_0, tq2_0."""
    xd, xq, bsums = act
    rows = data.shape[0]
    bpb = Q.BLOCK_INFO[kind][1]
    b = data.reshape(rows, -1, bpb)
    nb = b.shape[1]
    x = xq.reshape(nb, 256).astype(np.int64)
    q, sc, mins = k_ints(kind, b)
    sumf = np.zeros(rows, np.float32)
    sums = np.zeros((rows, 8), np.float32)
    for i in range(nb):
        if kind == "q2_k":
            isum = (sc[:, i] * q[:, i] * x[i]).sum(-1)
            summs = (bsums.reshape(nb, 16)[i].astype(np.int64) * mins[:, i]).sum(-1)
            dall = xd[i] * f16(b[:, i], 80)
            dmin = xd[i] * f16(b[:, i], 82)
            sumf = (sumf + (dall * isum.astype(np.float32) - dmin * summs.astype(np.float32))
                    ).astype(np.float32)
        elif kind == "q3_k":
            aux = (sc[:, i] * q[:, i] * x[i]).reshape(rows, 32, 8).sum(axis=1)
            d = f16(b[:, i], 108) * xd[i]
            sums = (sums + d[:, None] * aux.astype(np.float32)).astype(np.float32)
        elif kind == "iq4_xs":
            d4d8 = f16(b[:, i], 0) * xd[i]
            isum = (q[:, i] * x[i]).reshape(rows, 8, 32).sum(-1)
            for j in range(8):
                d1 = (d4d8 * sc[:, i, j].astype(np.float32)).astype(np.float32)
                sumf = (sumf + d1 * isum[:, j].astype(np.float32)).astype(np.float32)
        else:
            off = 64 if kind == "tq2_0" else 52
            isum = (q[:, i] * x[i]).sum(-1)
            sumf = (sumf + isum.astype(np.float32) * (f16(b[:, i], off) * xd[i])).astype(
                np.float32)
    if kind == "q3_k":
        for lane in range(8):
            sumf = (sumf + sums[:, lane]).astype(np.float32)
    return sumf


def generic_dot(kind, data, act):
    """ggml_vec_dot_<kind>_q8_<0|1|K>_generic for every row of ``data``."""
    rows = data.shape[0]
    sumf = np.zeros(rows, np.float32)
    if kind in ("q2_k", "q3_k", "iq4_xs", "tq1_0", "tq2_0"):
        return new_k_dot(kind, data, act)
    if kind in ("q4_1", "q5_1"):
        xd, xq, xs = act
        wd, wm, q = int_weights(kind, data)
        isum = (q * xq.reshape(-1, 32).astype(np.int64)).sum(axis=-1)
        for b in range(q.shape[1]):
            term = (wd[:, b] * xd[b]) * isum[:, b].astype(np.float32) + wm[:, b] * xs[b]
            sumf = (sumf + term).astype(np.float32)
        return sumf
    if kind in ("q8_0", "q4_0", "q5_0", "iq4_nl"):
        xd, xq = act
        wd, q = int_weights(kind, data)
        isum = (q * xq.reshape(-1, 32).astype(np.int64)).sum(axis=-1)  # [rows, nb] exact
        for b in range(q.shape[1]):
            fi = isum[:, b].astype(np.float32)
            if kind == "iq4_nl":
                term = (xd[b] * wd[:, b]) * fi
            elif kind == "q8_0":
                term = fi * (wd[:, b] * xd[b])
            elif kind == "q4_0":
                term = (fi * wd[:, b]) * xd[b]
            else:
                term = (wd[:, b] * xd[b]) * fi
            sumf = (sumf + term).astype(np.float32)
        return sumf
    xd, xq, bsums = act
    nb = data.shape[1] // Q.BLOCK_INFO[kind][1]
    x = xq.reshape(nb, 256).astype(np.int64)
    sums = np.zeros((rows, 8), np.float32)
    if kind == "q6_k":
        d, sc, q = int_weights(kind, data)
        scale = np.repeat(sc, 16, axis=-1)  # per element
    else:
        d, dmin, sc, m, q = int_weights(kind, data)
        scale = np.repeat(sc, 32, axis=-1)
    for b in range(nb):
        prod = scale[:, b] * q[:, b] * x[b]  # [rows, 256]
        aux = prod.reshape(rows, 32, 8).sum(axis=1)  # lane l = elements e with e % 8 == l
        db = d[:, b] * xd[b]
        sums = (sums + db[:, None] * aux.astype(np.float32)).astype(np.float32)
        if kind != "q6_k":
            msum = (bsums.reshape(nb, 16)[b].astype(np.int64) * np.repeat(m[:, b], 2, axis=-1)).sum(
                axis=-1
            )
            sumf = (sumf - (dmin[:, b] * xd[b]) * msum.astype(np.float32)).astype(np.float32)
    for lane in range(8):
        sumf = (sumf + sums[:, lane]).astype(np.float32)
    return sumf


def deq_act(kind, act):
    qk = 256 if Q8.ACT_FORMAT[kind] == "q8_k" else 32
    return np.repeat(act[0], qk).astype(np.float64) * act[1].astype(np.float64)


def min_term_rounding(kind, data, act):
    """Bound of what q8_1's half-rounded ``s`` adds against dequantized W x dequantized x:
    sum over blocks of |m| * |s| * 2**-11 (+ a subnormal step)."""
    if Q8.ACT_FORMAT[kind] != "q8_1":
        return 0.0
    b = data.reshape(data.shape[0], -1, Q.BLOCK_INFO[kind][1])
    return np.abs(f16(b, 2)).astype(np.float64) @ (np.abs(act[2]) * 2.0**-11 + 2.0**-24)


@SETTINGS
@given(
    kind=st.sampled_from(KINDS),
    rows=st.integers(1, 21),
    nblocks=st.integers(1, 20),
    seed=st.integers(0, 2**32 - 1),
    variant=st.sampled_from(["ref", "x86"]),
)
def test_kernels_equal_generic_reference(kind, rows, nblocks, seed, variant):
    epb, _ = Q.BLOCK_INFO[kind]
    if epb == 256:
        nblocks = 1 + nblocks % 4
    rng = np.random.default_rng(seed)
    data = random_blocks(kind, rows, nblocks, rng)
    cols = nblocks * epb
    x = (rng.standard_normal(cols) * rng.uniform(0.01, 10)).astype(np.float32)
    if rng.random() < 0.3:  # a zero block among them
        z = int(rng.integers(cols // epb if epb == 256 else cols // 32))
        qk = 256 if Q8.ACT_FORMAT[kind] == "q8_k" else 32
        x[z * qk : (z + 1) * qk] = 0
    act = Q8.quantize_act(kind, x, variant)
    out = np.full(rows, np.nan, np.float32)
    res = Q8.matvec_q8act(kind, data, x, out, q8_0_variant=variant)
    assert res is out
    if epb == 256:
        # k-quants: bit for bit the generic C formula
        np.testing.assert_array_equal(out, generic_dot(kind, data, act))
    else:
        # 32-element kinds accumulate in 8 float lanes (llama.cpp's x86 order): the same
        # integers, float32 rounding apart from the generic order
        g = generic_dot(kind, data, act)
        W = np.abs(Q.dequantize(kind, data, cols)).astype(np.float64)
        tol = 4e-6 * (W @ np.abs(deq_act(kind, act))) + 1e-30
        assert np.all(np.abs(out.astype(np.float64) - g) <= tol)
    # and the exact sum over blocks of dequantized weights x dequantized activations
    W = Q.dequantize(kind, data, cols).astype(np.float64)
    xa = deq_act(kind, act)
    exact = W @ xa
    bound = 1e-5 * (np.abs(W) @ np.abs(xa)) + min_term_rounding(kind, data, act) + 1e-30
    assert np.all(np.abs(out - exact) <= bound)
    # precomputed activations give the same result
    np.testing.assert_array_equal(Q8.matvec_q8act(kind, data, None, act=act), out)


@SETTINGS
@given(
    kind=st.sampled_from(KINDS),
    rows=st.integers(1, 12),
    nblocks=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_close_to_float_activation_kernel(kind, rows, nblocks, seed):
    """|y_q8 - y_f32| is bounded by sum_c |W[r, c]| * |x[c] - x_q8[c]| (plus rounding)."""
    epb, _ = Q.BLOCK_INFO[kind]
    if epb == 256:
        nblocks = 1 + nblocks % 3
    rng = np.random.default_rng(seed)
    data = random_blocks(kind, rows, nblocks, rng)
    cols = nblocks * epb
    x = rng.standard_normal(cols).astype(np.float32)
    y8 = Q8.matvec_q8act(kind, data, x)
    yf = Q.matvec(kind, data, x)
    W = np.abs(Q.dequantize(kind, data, cols)).astype(np.float64)
    err = np.abs(deq_act(kind, Q8.quantize_act(kind, x)) - x.astype(np.float64))
    # the activation error is at most half a quantization step (+ d's half-float rounding)
    qk = 256 if Q8.ACT_FORMAT[kind] == "q8_k" else 32
    amax = np.repeat(np.abs(x).reshape(-1, qk).max(axis=1), qk).astype(np.float64)
    assert np.all(err <= amax / 127 * (0.5 + 127 * 2.0**-11) * 1.001 + 1e-30)
    act = Q8.quantize_act(kind, x)
    bound = W @ err + 2e-5 * (W @ np.abs(x).astype(np.float64)) + 1e-30
    bound = bound + min_term_rounding(kind, data, act)
    assert np.all(np.abs(y8.astype(np.float64) - yf) <= bound)
    # and it is a real approximation: typically within a percent of the row's scale
    scale = W @ np.abs(x).astype(np.float64) + 1e-30
    assert np.median(np.abs(y8 - yf) / scale) < 0.02


def test_dispatcher_checks_and_supports():
    assert all(Q8.supports(k) for k in KINDS)
    assert not Q8.supports("f16") and not Q8.supports("iq2_xxs")
    data = np.zeros((3, 34), np.uint8)
    with pytest.raises(UnsupportedError):
        Q8.matvec_q8act("iq2_xxs", data, np.zeros(32, np.float32))
    with pytest.raises(TensorShapeError):
        Q8.matvec_q8act("q8_0", data, np.zeros(64, np.float32))
    with pytest.raises(TensorShapeError):
        Q8.matvec_q8act("q8_0", data, np.zeros(32, np.float32), out=np.zeros(2, np.float32))
    with pytest.raises(TensorShapeError):  # activations of the wrong format / length
        Q8.matvec_q8act("q8_0", data, None, act=Q8.quantize_act("q8_0", np.ones(64, np.float32)))
    with pytest.raises(TensorShapeError):
        Q8.matvec_q8act(
            "q4_k",
            np.zeros((1, 144), np.uint8),
            None,
            act=Q8.quantize_act("q8_0", np.ones(256, np.float32)),
        )
    with pytest.raises(UnsupportedError):
        Q8.quantize_act("q8_0", np.ones(32, np.float32), "avx9")
    # all-zero weights and activations
    np.testing.assert_array_equal(Q8.matvec_q8act("q8_0", data, np.zeros(32, np.float32)), 0)
    # a writable, non-contiguous x and a memory-mapped-like read-only data are accepted
    rng = np.random.default_rng(5)
    d = random_blocks("q4_k", 4, 2, rng)
    x = rng.standard_normal(1024).astype(np.float32)[::2]
    ro = d.copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(
        Q8.matvec_q8act("q4_k", ro, x), Q8.matvec_q8act("q4_k", d, x.copy())
    )


@pytest.mark.parametrize("tier", ["generic", "avx2", "vnni"])
def test_kernel_isa_tiers_agree(tmp_path, tier):
    """The portable (generic LLVM IR), AVX2 and 256-bit VNNI builds give the same bits as
    the host's (the decode products and the batched tiles)."""
    order = ["generic", "avx2", "vnni", "avx512"]
    if order.index(Q8.TIER) <= order.index(tier):
        pytest.skip(f"the host build is already {Q8.TIER}")
    rng = np.random.default_rng(11)
    cases = {}
    for kind in IR_KINDS:
        epb, _ = Q.BLOCK_INFO[kind]
        nb = 11 if epb == 32 else 3
        data = random_blocks(kind, 7, nb, rng)
        x = rng.standard_normal(nb * epb).astype(np.float32)
        np.save(tmp_path / f"{kind}_data.npy", data)
        np.save(tmp_path / f"{kind}_x.npy", x)
        cases[kind] = Q8.matvec_q8act(kind, data, x)
    X = rng.standard_normal((13, 512)).astype(np.float32)  # tiles of 8 and 4, one row left
    np.save(tmp_path / "X.npy", X)
    batched = {}
    for kind in TILED_KINDS:
        data = random_blocks(kind, 7, 512 // Q.BLOCK_INFO[kind][0], rng)
        np.save(tmp_path / f"{kind}_bdata.npy", data)
        batched[kind] = KB.linear_rows(Weight("w", kind, (7, 512), data), X, True)
    script = textwrap.dedent(
        f"""
        import numpy as np
        from torchless.kernels import batch as KB, quant_q8 as Q8
        from torchless.weights import Weight
        assert Q8.TIER == {tier!r}, Q8.TIER
        for kind in {IR_KINDS!r}:
            d = np.load({str(tmp_path)!r} + f"/{{kind}}_data.npy")
            x = np.load({str(tmp_path)!r} + f"/{{kind}}_x.npy")
            np.save({str(tmp_path)!r} + f"/{{kind}}_out.npy", Q8.matvec_q8act(kind, d, x))
        X = np.load({str(tmp_path)!r} + "/X.npy")
        for kind in {TILED_KINDS!r}:
            d = np.load({str(tmp_path)!r} + f"/{{kind}}_bdata.npy")
            out = KB.linear_rows(Weight("w", kind, (7, X.shape[1]), d), X, True)
            np.save({str(tmp_path)!r} + f"/{{kind}}_bout.npy", out)
        """
    )
    env = dict(os.environ, TORCHLESS_Q8ACT_ISA=tier, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=600)
    for kind in IR_KINDS:
        np.testing.assert_array_equal(np.load(tmp_path / f"{kind}_out.npy"), cases[kind])
    for kind in TILED_KINDS:
        np.testing.assert_array_equal(np.load(tmp_path / f"{kind}_bout.npy"), batched[kind])


@SETTINGS
@given(
    kind=st.sampled_from(["q8_0", "q4_k"]),
    rows=st.integers(1, 5),
    nblocks=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_dequantized_activations_equal_the_numpy_quantizers(kind, rows, nblocks, seed):
    """The parallel Numba round trip (batched prefill's activations) equals the NumPy
    quantizers bit for bit, zero blocks included."""
    qk = 32 if kind == "q8_0" else 256
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, nblocks * qk)) * rng.uniform(0.01, 10)).astype(np.float32)
    if rng.random() < 0.3:
        x[0, :qk] = 0
    if rng.random() < 0.5:  # largest magnitude twice, opposite signs: the first one decides
        big = np.float32(np.abs(x[-1, -qk:]).max() + 1)
        i, j = sorted(rng.choice(qk, 2, replace=False))
        x[-1, -qk + i], x[-1, -qk + j] = (big, -big) if rng.random() < 0.5 else (-big, big)
    if kind == "q8_0":
        d, q = Q8.quantize_q8_0_act_x86_np(x.reshape(-1))
    else:
        d, q, _ = Q8.quantize_q8_k_act_np(x.reshape(-1))
    want = (q.reshape(-1, qk).astype(np.float32) * d[:, None]).reshape(x.shape)
    np.testing.assert_array_equal(Q8.dequantized_activations(kind, x), want)
    with pytest.raises(TensorShapeError):
        Q8.dequantized_activations(kind, np.ones((2, qk + 1), np.float32))
