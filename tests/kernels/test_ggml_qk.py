"""Property tests for ``torchless.kernels.ggml_qk`` (Q4_K / Q6_K GGUF weights x float32
activations quantized to Q8_K).

Every kernel result is compared, bit for bit, with a small NumPy statement of the algorithm
the module docstring describes (llama.cpp's x86 CPU backend), written here from that
description and ggml's block layouts, not from the kernel's code:

1. Q8_K activations, per 256-element block (quantize_row_q8_K_ref): ``max`` = the signed
   value of the FIRST element of largest magnitude; ``iscale = -127/max`` (float32);
   ``q = min(127, round_half_even(f32(iscale * x)))``; ``d = 1/iscale``; ``bsums`` = sums of
   16 consecutive ``q``. An all-zero block gives ``d = 0``, ``q = 0``.
2. The GGUF blocks: Q4_K = fp16 ``d``, fp16 ``dmin``, 12 bytes of packed 6-bit scales/mins,
   128 bytes of nibbles (byte ``32h + l``: low nibble is element ``64h + l`` of sub-block
   ``2h``, high nibble element ``64h + 32 + l`` of sub-block ``2h + 1``);
   Q6_K = ``ql[128]``, ``qh[64]``, int8 ``scales[16]``, fp16 ``d`` (element ``e`` has scale
   ``scales[e // 16]``).
3. The float accumulation of the route ggml takes for the batch row (see the docstring):
   Q4_K gemm for the rows ``t < 4 * (T // 4)``, gemv for the others; Q6_K vec_dot (8 lanes
   and hsum_float_8) for T < 8, the tiled kernel for T >= 8.

NumPy has no fused multiply-add; :func:`fma_f32` emulates float32 FMA with one rounding:
a float64 route where it is provably exact, exact rational arithmetic elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from torchless.kernels import ggml_qk

F32, F64 = np.float32, np.float64
QK_K = 256
BLOCK_BYTES = {"q4_k": 144, "q6_k": 210}
KINDS = ("q4_k", "q6_k")
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------
# exact float32 arithmetic helpers
# ---------------------------------------------------------------------------------------


def f32_of_fraction(v: Fraction) -> np.float32:
    """The exact rational ``v`` rounded ONCE to float32 (nearest, ties to even)."""
    if v == 0:
        return F32(0.0)
    neg, v = v < 0, abs(v)
    e = v.numerator.bit_length() - v.denominator.bit_length()
    if Fraction(2) ** e > v:
        e -= 1  # now 2**e <= v < 2**(e + 1)
    lsb = max(e - 23, -149)  # weight of the last significand bit (subnormals: 2**-149)
    m = round(v / Fraction(2) ** lsb)  # Fraction.__round__: nearest integer, ties to even
    r = math.ldexp(m, lsb)  # m <= 2**24: exact in float64, hence exact in float32
    return F32(-r if neg else r)


def fma_f32(a, b, c):
    """Elementwise ``a * b + c`` of float32 arrays with ONE rounding to float32.

    ``p = a * b`` is exact in float64 (24 + 24 significand bits, float32 exponents).
    ``s = p + c`` in float64 with TwoSum's error term ``err`` (exact: ``p + c = s + err``).
    Where ``err == 0``, ``s`` IS the exact sum and ``float32(s)`` rounds once. Elsewhere
    float64 would round twice, so the exact sum is formed in rationals and rounded once.
    """
    a, b, c = np.broadcast_arrays(np.asarray(a, F32), np.asarray(b, F32), np.asarray(c, F32))
    a64, b64, c64 = a.astype(F64), b.astype(F64), c.astype(F64)
    p = a64 * b64
    s = p + c64
    z = s - p
    err = (p - (s - z)) + (c64 - z)
    out = np.atleast_1d(s.astype(F32))
    a, b, c, err = (np.atleast_1d(v) for v in (a, b, c, err))
    for i in zip(*np.nonzero(err)):
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        out[i] = f32_of_fraction(exact)
    return out.reshape(s.shape)


def f32_of_int(v):
    """Integers (|v| < 2**53) to float32 with one rounding (vcvtdq2ps): exact to float64 first."""
    v = np.asarray(v, np.int64)
    assert np.all(np.abs(v) < 2**53)
    return v.astype(F64).astype(F32)


def assert_same_bits(got, want, what=""):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == F32 and want.dtype == F32, (what, got.dtype, want.dtype)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.isfinite(want).all(), f"{what}: reference not finite (bad test case)"
    bad = got.view(np.uint32) != want.view(np.uint32)
    if bad.any():
        i = tuple(int(k) for k in np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} differ; first at {i}: "
                             f"got {got[i]!r} want {want[i]!r}")


# ---------------------------------------------------------------------------------------
# the reference: the docstring's algorithm, step by step
# ---------------------------------------------------------------------------------------


def ref_quantize_q8k(x):
    """Step 1 for float32 ``x [T, K]``: ``(q int64 [T, K], d float32 [T, K/256],
    bsums int64 [T, K/16])``."""
    T, K = x.shape
    q = np.zeros((T, K), np.int64)
    d = np.zeros((T, K // QK_K), F32)
    for t in range(T):
        for b in range(K // QK_K):
            blk = x[t, QK_K * b: QK_K * (b + 1)]
            mx = blk[int(np.argmax(np.abs(blk)))]  # argmax: the first of equal magnitudes
            if mx == 0:
                continue
            iscale = F32(-127.0) / mx  # float32 division
            v = np.rint(iscale * blk)  # float32 product, then round half to even
            q[t, QK_K * b: QK_K * (b + 1)] = np.minimum(v, 127)
            d[t, b] = F32(1.0) / iscale
    return q, d, q.reshape(T, K // 16, 16).sum(axis=2)


def f16_field(blk, off):
    """The little-endian fp16 at byte ``off`` of every block, as float32 (exact)."""
    return blk[..., off:off + 2].copy().view("<f2")[..., 0].astype(F32)


def ref_decode_q4k(raw):
    """Step 2, Q4_K: ``(d, dmin [R, nb] float32, sc, mn [R, 8 nb], q [R, 256 nb] int64)``."""
    R = raw.shape[0]
    blk = raw.reshape(R, -1, 144)
    nb = blk.shape[1]
    s = blk[..., 4:16].astype(np.int64)  # the 12 scale bytes
    sc = np.empty((R, nb, 8), np.int64)
    mn = np.empty((R, nb, 8), np.int64)
    for j in range(8):  # get_scale_min_k4
        if j < 4:
            sc[..., j] = s[..., j] & 63
            mn[..., j] = s[..., j + 4] & 63
        else:
            sc[..., j] = (s[..., j + 4] & 0xF) | ((s[..., j - 4] >> 6) << 4)
            mn[..., j] = (s[..., j + 4] >> 4) | ((s[..., j] >> 6) << 4)
    qs = blk[..., 16:].astype(np.int64).reshape(R, nb, 4, 1, 32)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=3)  # [R, nb, h, nibble, l]: 64h + 32nibble + l
    return (f16_field(blk, 0), f16_field(blk, 2), sc.reshape(R, -1), mn.reshape(R, -1),
            q.reshape(R, -1))


def ref_decode_q6k(raw):
    """Step 2, Q6_K: ``(d [R, nb] float32, sc [R, 16 nb], u [R, 256 nb] int64)`` with ``u``
    the unsigned 6-bit codes (the weight is ``d * sc[e // 16] * (u[e] - 32)``)."""
    R = raw.shape[0]
    blk = raw.reshape(R, -1, 210)
    nb = blk.shape[1]
    ql = blk[..., :128].astype(np.int64).reshape(R, nb, 2, 64)  # per 128-half n
    qh = blk[..., 128:192].astype(np.int64).reshape(R, nb, 2, 32)
    lo, hi = ql[..., :32], ql[..., 32:]
    u = np.stack([(lo & 0xF) | (((qh >> 0) & 3) << 4),  # element 128n + 32v + l, v = 0..3
                  (hi & 0xF) | (((qh >> 2) & 3) << 4),
                  (lo >> 4) | (((qh >> 4) & 3) << 4),
                  (hi >> 4) | (((qh >> 6) & 3) << 4)], axis=3)
    sc = blk[..., 192:208].copy().view(np.int8).astype(np.int64)
    return f16_field(blk, 208), sc.reshape(R, -1), u.reshape(R, -1)


def ref_q4k(raw, x, route):
    """Step 3, Q4_K, every batch row through ``route`` ('gemm' or 'gemv'): float32 [T, R]."""
    d, dmin, sc, mn, q = ref_decode_q4k(raw)
    q8, dx, bsums = ref_quantize_q8k(x)
    T, K = x.shape
    R, nb = raw.shape[0], K // QK_K
    dot = np.einsum("tjk,rjk->trj", q8.reshape(T, K // 32, 32), q.reshape(R, K // 32, 32))
    bs = bsums.reshape(T, K // 32, 2).sum(axis=2)  # sums of the 32 codes of each sub-block
    scdot = sc[None] * dot  # [T, R, K/32], exact
    mnbs = mn[None] * bs[:, None]
    acc = np.zeros((T, R), F32)
    accm = np.zeros((T, R), F32)
    for b in range(nb):
        dd = d[None, :, b] * dx[:, None, b]  # float32 products
        ddm = dmin[None, :, b] * dx[:, None, b]
        j = 8 * b
        if route == "gemm":
            for p in range(4):
                i = j + 2 * p
                acc = fma_f32(f32_of_int(scdot[..., i] + scdot[..., i + 1]), dd, acc)
                accm = fma_f32(f32_of_int(mnbs[..., i] + mnbs[..., i + 1]), ddm, accm)
        else:
            acc = fma_f32(f32_of_int(scdot[..., j:j + 8].sum(axis=-1)), dd, acc)
            accm = fma_f32(f32_of_int(mnbs[..., j:j + 8].sum(axis=-1)), ddm, accm)
    return acc - accm


def ref_q6k(raw, x, route):
    """Step 3, Q6_K, every batch row through ``route`` ('tiled' or 'vec_dot'): [T, R]."""
    d, sc, u = ref_decode_q6k(raw)
    q8, dx, bsums = ref_quantize_q8k(x)
    T, K = x.shape
    R, nb = raw.shape[0], K // QK_K
    if route == "tiled":
        w = (u - 32) * np.repeat(sc, 16, axis=1)  # [R, K]: sc * (q6 - 32)
        S = np.einsum("tbk,rbk->trb", q8.reshape(T, nb, QK_K), w.reshape(R, nb, QK_K))
        buf = np.zeros((T, R), F32)
        for b in range(nb):
            buf = fma_f32(f32_of_int(S[..., b]) * d[None, :, b], dx[:, None, b], buf)
        return buf
    # vec_dot: P[t, r, b, s, g] = sum of u * q8 over elements 16s + 4g .. 16s + 4g + 3
    P = np.einsum("tbsgk,rbsgk->trbsg", q8.reshape(T, nb, 16, 4, 4), u.reshape(R, nb, 16, 4, 4))
    P = P * sc.reshape(1, R, nb, 16, 1)
    # lane m = 4 * (s % 2) + g, summed over the 8 sub-blocks s of that parity
    lanes = P.reshape(T, R, nb, 8, 2, 4).sum(axis=3).reshape(T, R, nb, 8)
    # minus 32 * (sc[2m] * bsum[2m] + sc[2m + 1] * bsum[2m + 1])
    corr = (sc.reshape(1, R, nb, 8, 2) * bsums.reshape(T, 1, nb, 8, 2)).sum(axis=4)
    lanes = lanes - 32 * corr
    acc = np.zeros((T, R, 8), F32)
    for b in range(nb):
        dxd = dx[:, None, b] * d[None, :, b]  # float32 product
        acc = fma_f32(dxd[..., None], f32_of_int(lanes[..., b, :]), acc)
    l = [acc[..., m] for m in range(8)]  # noqa: E741
    return ((l[4] + l[0]) + (l[6] + l[2])) + ((l[5] + l[1]) + (l[7] + l[3]))  # hsum_float_8


def n_gemm_rows(kind, T):
    """How many leading batch rows take ggml's gemm / tiled kernel (docstring)."""
    if kind == "q4_k":
        return 4 * (T // 4)
    return T if T >= 8 else 0


def ref_matmul(raw, kind, x):
    """The docstring's MUL_MAT for a batch of ``T = len(x)`` rows: float32 [T, R]."""
    T = x.shape[0]
    n = n_gemm_rows(kind, T)
    ref = ref_q4k if kind == "q4_k" else ref_q6k
    parts = []
    if n:
        parts.append(ref(raw, x[:n], "gemm" if kind == "q4_k" else "tiled"))
    if n < T:
        parts.append(ref(raw, x[n:], "gemv" if kind == "q4_k" else "vec_dot"))
    return np.concatenate(parts, axis=0)


# ---------------------------------------------------------------------------------------
# test cases: random GGUF bytes (finite fp16 scales) and activations with edge cases
# ---------------------------------------------------------------------------------------

X_FLAVOURS = ("normal", "zero", "ties", "signed_tie", "neg_max", "pos_max", "same_sign",
              "wide")
W_FLAVOURS = ("random", "high", "sparse_scales", "special_d", "mixed")
SPECIAL_F16 = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF,
                        0x3C00, 0xBC00, 0x3555, 0x1400], np.uint16)


def x_block(rng, flavour):
    """One 256-element float32 activation block."""
    k = int(rng.integers(-12, 13))
    v = rng.standard_normal(QK_K) * 2.0**k
    if flavour == "zero":
        return np.where(rng.random(QK_K) < 0.5, 0.0, -0.0).astype(F32)
    if flavour == "ties":
        # max = +-127 * 2^e: iscale = -+2^-e exactly, iscale * x = -+(k + 0.5): a tie for
        # every half-integer k + 0.5 (np.rint and round-half-away disagree on half of them)
        e = int(rng.integers(-8, 9))
        n = rng.integers(-127, 127, QK_K).astype(F64)
        n = np.where(rng.random(QK_K) < 0.7, n + 0.5, n)
        n[rng.integers(QK_K)] = 127.0 if rng.random() < 0.5 else -127.0
        return (n * 2.0**e).astype(F32)
    if flavour == "signed_tie":  # +a and -a both of the largest magnitude: the first wins
        v = v.astype(F32)
        a = F32(np.abs(v).max() * 1.5)
        i, j = rng.choice(QK_K, 2, replace=False)
        s = F32(1.0 if rng.random() < 0.5 else -1.0)
        v[i], v[j] = s * a, -s * a
        return v
    if flavour in ("neg_max", "pos_max"):
        i = int(np.argmax(np.abs(v)))
        v[i] = -abs(v[i]) if flavour == "neg_max" else abs(v[i])
    elif flavour == "same_sign":  # codes of one sign near 127: integer sums beyond 2^24
        v = (0.8 + 0.2 * rng.random(QK_K)) * (2.0**k if rng.random() < 0.5 else -(2.0**k))
    elif flavour == "wide":  # magnitudes over 24 octaves: most codes 0 or +-1, some -0.0
        v = rng.standard_normal(QK_K) * 2.0 ** rng.integers(-24, 1, QK_K)
        v[rng.random(QK_K) < 0.1] = -0.0
    return v.astype(F32)


def finite_f16_bits(rng, n):
    bits = rng.integers(0, 2**16, n).astype(np.uint16)
    inf_nan = (bits & 0x7C00) == 0x7C00
    return np.where(inf_nan, bits ^ np.uint16(0x4000), bits).astype(np.uint16)


def put_f16(blk, off, bits):
    blk[..., off:off + 2] = bits.reshape(blk.shape[:-1] + (1,)).view(np.uint8).reshape(
        blk.shape[:-1] + (2,))


def weight_rows(rng, kind, R, nb, flavour):
    """``raw [R, nb * block_bytes]`` uint8: random bytes, finite fp16 d (and dmin)."""
    bb = BLOCK_BYTES[kind]
    blk = rng.integers(0, 256, (R, nb, bb), dtype=np.uint8)
    flav = np.array([flavour] * R if flavour != "mixed" else
                    rng.choice(W_FLAVOURS[:-1], R).tolist())
    f16_offs = (0, 2) if kind == "q4_k" else (208,)
    for off in f16_offs:
        put_f16(blk, off, finite_f16_bits(rng, R * nb).reshape(R, nb))
    for r in range(R):
        b = blk[r]  # [nb, bb], a view
        if flav[r] == "high" and kind == "q4_k":
            b[:, 4:16] = rng.integers(0xF0, 0x100, (nb, 12))  # every scale and min in 48..63
            b[:, 16:] = rng.integers(12, 16, (nb, 128)) * 17  # both nibbles 12..15
        elif flav[r] == "high":  # per block: codes 0..7 or 56..63, scales of one sign
            for i in range(nb):
                up = rng.random() < 0.5
                b[i, :128] = rng.integers(8 if up else 0, 16 if up else 8, 128) * 17
                b[i, 128:192] = 0xFF if up else 0
                s = rng.integers(96, 128, 16) * (1 if rng.random() < 0.5 else -1)
                b[i, 192:208] = s.astype(np.int8).view(np.uint8)
        elif flav[r] == "sparse_scales":
            sl = slice(4, 16) if kind == "q4_k" else slice(192, 208)
            b[:, sl] = np.where(rng.random(b[:, sl].shape) < 0.5, 0, b[:, sl])
        elif flav[r] == "special_d":
            for off in f16_offs:
                put_f16(b, off, rng.choice(SPECIAL_F16, nb))
    return blk.reshape(R, nb * bb)


@dataclass
class Case:
    kind: str
    T: int
    R: int
    n: int
    seed: int
    w_flavour: str
    x_flavours: tuple
    zero_rows: tuple

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        self.raw = weight_rows(rng, self.kind, self.R, self.n, self.w_flavour)
        blocks = [x_block(rng, self.x_flavours[i % len(self.x_flavours)])
                  for i in range(self.T * self.n)]
        x = np.concatenate(blocks).reshape(self.T, self.n * QK_K)
        for t in self.zero_rows:
            x[t % self.T] = 0.0
        self.x = np.ascontiguousarray(x, dtype=F32)

    def __repr__(self):
        return (f"Case({self.kind!r}, T={self.T}, R={self.R}, n={self.n}, seed={self.seed}, "
                f"w_flavour={self.w_flavour!r}, x_flavours={self.x_flavours!r}, "
                f"zero_rows={self.zero_rows!r})")


@st.composite
def cases(draw, kinds=KINDS):
    # T in 1..12 with the route boundaries (T % 4, Q6_K's 8) drawn often on purpose; R mostly
    # small, sometimes past the kernel's 16 output rows per work item
    T = st.one_of(st.sampled_from([1, 3, 4, 5, 7, 8, 9, 11, 12]), st.integers(1, 12))
    R = st.one_of(st.integers(1, 9), st.sampled_from([16, 17, 19]))
    return Case(kind=draw(st.sampled_from(kinds)), T=draw(T), R=draw(R),
                n=draw(st.integers(1, 3)), seed=draw(st.integers(0, 2**32 - 1)),
                w_flavour=draw(st.sampled_from(W_FLAVOURS)),
                x_flavours=tuple(draw(st.lists(st.sampled_from(X_FLAVOURS), min_size=1,
                                               max_size=6))),
                zero_rows=tuple(draw(st.lists(st.integers(0, 11), max_size=2))))


# ---------------------------------------------------------------------------------------
# the properties
# ---------------------------------------------------------------------------------------


FINITE32 = st.floats(width=32, min_value=-(2.0**60), max_value=2.0**60)  # no overflow


@st.composite
def near_midpoints(draw):
    """``(a, b, c)`` with ``a * b + c`` just below the midpoint of ``c`` and its upper
    neighbour, within half a float64 ulp of it: float64 rounds onto the midpoint, and then
    float32 rounds to even, away from ``c`` when ``c``'s significand is odd (one rounding
    keeps ``c``). ``a = 1 + j 2^-23``, ``b = (1 - j 2^-23) ulp(c) / 2``, ``j^2 < 2^17``."""
    c = F32(draw(st.integers(2**23, 2**24 - 1)) * 2.0 ** draw(st.integers(-40, 10)))
    ulp = float(np.spacing(c))
    j = draw(st.integers(1, 361))
    a, b = F32(1 + j * 2.0**-23), F32((1 - j * 2.0**-23) * ulp / 2)
    sign = draw(st.sampled_from([1, -1]))
    return F32(sign * a), b, F32(sign * c)


@settings(max_examples=300, **SETTINGS)
@given(abc=st.one_of(st.tuples(FINITE32, FINITE32, FINITE32), near_midpoints()))
@example(abc=(1 + 2**-23, (1 - 2**-23) * 2**-24, 1 + 2**-23))  # float64 then float32: wrong
@example(abc=(2**-149, 0.5, 0.0))  # subnormal tie, to even: +0
@example(abc=(-(2**-149), 0.75, 0.0))  # rounds to -2^-149
@example(abc=(1.0, -0.0, -0.0))  # -0 + -0 = -0
@example(abc=(1.0, -0.0, 0.0))  # -0 + +0 = +0
@example(abc=(3.0, 0.5, -1.5))  # exact cancellation: +0
def test_fma_f32_is_correctly_rounded(abc):
    """The reference's FMA against exact rational arithmetic rounded once (self-check)."""
    a, b, c = (F32(v) for v in abc)
    got = fma_f32(np.array([a]), np.array([b]), np.array([c]))[0]
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    want = f32_of_fraction(exact)
    if exact == 0:  # IEEE, round to nearest: -0 only if the product and c are both -0
        neg = np.signbit(a) != np.signbit(b) and np.signbit(c) and c == 0 and (a == 0 or b == 0)
        want = F32(-0.0) if neg else F32(0.0)
    assert got.view(np.uint32) == want.view(np.uint32), (got, want)


@settings(max_examples=25, **SETTINGS)
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32 - 1),
       flavour=st.sampled_from(W_FLAVOURS))
def test_reference_decoding_matches_gguf_dequantize(kind, seed, flavour):
    """The reference's block decoding against the gguf package's dequantizer (self-check),
    in that dequantizer's float32 order: Q4_K (d*sc)*q - dmin*m, Q6_K (d*sc)*(u - 32)."""
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(seed)
    raw = weight_rows(rng, kind, 3, 2, flavour)
    if kind == "q4_k":
        d, dmin, sc, mn, q = ref_decode_q4k(raw)
        dsc = np.repeat(d, 8, axis=1) * sc.astype(F32)
        dmn = np.repeat(dmin, 8, axis=1) * mn.astype(F32)
        mine = np.repeat(dsc, 32, axis=1) * q.astype(F32) - np.repeat(dmn, 32, axis=1)
        qtype = gguf.GGMLQuantizationType.Q4_K
    else:
        d, sc, u = ref_decode_q6k(raw)
        dsc = np.repeat(d, 16, axis=1) * sc.astype(F32)
        mine = np.repeat(dsc, 16, axis=1) * (u - 32).astype(F32)
        qtype = gguf.GGMLQuantizationType.Q6_K
    theirs = gguf.quants.dequantize(raw, qtype).astype(F32)
    assert_same_bits(mine, theirs, f"{kind} decode")


@settings(max_examples=200, **SETTINGS)
@given(case=cases(kinds=("q4_k",)))
@example(case=Case("q4_k", T=1, R=1, n=1, seed=0, w_flavour="random", x_flavours=("ties",),
                   zero_rows=()))
@example(case=Case("q4_k", T=4, R=1, n=1, seed=1, w_flavour="random",
                   x_flavours=("signed_tie",), zero_rows=()))
def test_quantize_q8k_matches_reference(case):
    """Step 1: codes, d (bits) and bsums of ``quantize_q8k`` equal the reference: first
    largest-magnitude element's sign, round half to even of the float32 product, zero blocks."""
    qs, d, bsums = ggml_qk.quantize_q8k(case.x)
    rq, rd, rb = ref_quantize_q8k(case.x)
    assert qs.dtype == np.int8 and np.array_equal(qs.astype(np.int64), rq), case
    assert_same_bits(d, rd, "Q8_K d")
    assert np.array_equal(bsums.astype(np.int64), rb), case


def _check_matmul(case):
    got = ggml_qk.matmul_k_family(case.raw, case.kind, case.x)
    assert_same_bits(got, ref_matmul(case.raw, case.kind, case.x), repr(case))


@settings(max_examples=250, **SETTINGS)
@given(case=cases(kinds=("q4_k",)))
@example(case=Case("q4_k", T=21, R=17, n=1, seed=2, w_flavour="mixed",
                   x_flavours=("same_sign", "normal", "ties"), zero_rows=(3,)))
def test_q4k_matches_reference(case):
    """Q4_K, every batch row through the docstring's route: gemm (sub-block pairs) for
    t < 4*(T//4), gemv (whole superblocks) for the T % 4 leftover rows and for T < 4.
    (The explicit example spans two 16-row chunks and two 16-row output groups.)"""
    _check_matmul(case)


@settings(max_examples=250, **SETTINGS)
@given(case=cases(kinds=("q6_k",)))
@example(case=Case("q6_k", T=21, R=17, n=1, seed=3, w_flavour="mixed",
                   x_flavours=("same_sign", "normal", "ties"), zero_rows=(3,)))
@example(case=Case("q6_k", T=8, R=3, n=2, seed=4, w_flavour="high",
                   x_flavours=("same_sign",), zero_rows=()))
@example(case=Case("q6_k", T=7, R=3, n=2, seed=4, w_flavour="high",
                   x_flavours=("same_sign",), zero_rows=()))
def test_q6k_matches_reference(case):
    """Q6_K, every batch row through the docstring's route: vec_dot (8 lanes, hsum) for
    T < 8, the tiled kernel for T >= 8."""
    _check_matmul(case)


@settings(max_examples=120, **SETTINGS)
@given(case=cases())
def test_batch_row_equals_the_row_alone_on_the_same_route(case):
    """A batch row's result depends only on that row and its route. Rows on ggml's gemv /
    vec_dot route (Q4_K: the T % 4 leftover rows and T < 4; Q6_K: T < 8) equal the row
    computed alone (1-D x, T = 1). Rows on the gemm / tiled route equal the row repeated to
    the smallest batch that takes that route (4 rows for Q4_K, 8 for Q6_K). Each output
    column equals that weight row computed alone."""
    raw, kind, x = case.raw, case.kind, case.x
    out = ggml_qk.matmul_k_family(raw, kind, x)
    n = n_gemm_rows(kind, case.T)
    min_batch = 4 if kind == "q4_k" else 8
    for t in range(case.T):
        if t >= n:
            alone = ggml_qk.matmul_k_family(raw, kind, x[t])
            assert alone.shape == (case.R,)
            assert_same_bits(out[t], alone, f"row {t} vs alone, {case!r}")
        else:
            rep = ggml_qk.matmul_k_family(raw, kind, np.repeat(x[t:t + 1], min_batch, axis=0))
            for i in range(min_batch):
                assert_same_bits(out[t], rep[i], f"row {t} vs repeated, {case!r}")
    for r in range(case.R):
        col = ggml_qk.matmul_k_family(raw[r:r + 1], kind, x)
        assert_same_bits(out[:, r], col[:, 0], f"column {r} vs alone, {case!r}")
