"""Property tests for ``torchless.kernels.ggml_q8`` (Q5_0 / Q8_0 weights x float32 activations).

Every kernel result is compared, bit for bit, with a small NumPy statement of the algorithm
llama.cpp's x86 CPU backend runs (``quantize_row_q8_0`` AVX branch, then
``ggml_vec_dot_q{5,8}_0_q8_0`` / llamafile tinyBLAS), written here from ggml's code and not
from the kernel:

1. each 32-element activation block: ``amax = max|x|``; ``d = half(amax / 127.0f)``
   (float32 division, then round to nearest even half); ``id = 127.0f / amax`` (0 if
   ``amax == 0``); ``q = cvtps_epi32(round_half_even(x * id))`` (float32 product), packed to
   int8 with signed saturation (``cvtps_epi32`` of NaN / out of range is INT_MIN);
2. the weight block's signed quants and its half scale, read from the GGUF bytes;
3. the block's integer products summed in 8 int32 lanes, lane ``i`` = elements ``4i..4i+3``;
   ``s = f32(d_w) * f32(d_x)`` (float32); per lane ``acc[i] = fma(s, float(lane[i]), acc[i])``
   from ``acc = 0``, blocks in order;
4. ``((acc0 + acc4) + (acc2 + acc6)) + ((acc1 + acc5) + (acc3 + acc7))``.

NumPy has no fused multiply-add, so :func:`fma_f32` emulates the float32 one exactly (see its
docstring); :func:`test_fma_f32_is_correctly_rounded` checks that against exact rational
arithmetic.
"""

from fractions import Fraction

import gguf
import numpy as np
from gguf import GGMLQuantizationType as G
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from torchless.kernels.ggml_q8 import matmul_q8_family, matmul_q8_family_act, quantize_act_q8_0

from exact_f32 import assert_same_bits, f16, fma_f32  # (tests/kernels/exact_f32.py)

F32, F64 = np.float32, np.float64
QK = 32
BLOCK = {"q8_0": 34, "q5_0": 22}
GGUF_TYPE = {"q8_0": G.Q8_0, "q5_0": G.Q5_0}
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------
# the reference: ggml's algorithm, step by step
# ---------------------------------------------------------------------------------------


def ref_quantize_q8_0(x):
    """Step 1 for float32 ``x [T, K]``: ``(q int8 [T, K], d float32 [T, K // 32])``."""
    T, K = x.shape
    xb = x.reshape(T, K // QK, QK)
    amax = np.abs(xb).max(axis=2)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = f16(amax / F32(127))
        inv = np.where(amax != 0, F32(127) / amax, F32(0)).astype(F32)
        v = np.rint(xb * inv[..., None])  # float32 product, then round half to even
    # _mm256_cvtps_epi32: NaN and |v| >= 2^31 give INT_MIN; packs: saturate to int8
    i32 = np.where(np.abs(v) < 2.0**31, v, -(2.0**31)).astype(np.int64)
    q = np.clip(i32, -128, 127).astype(np.int8)
    return q.reshape(T, K), d


def ref_weights(raw, kind):
    """Step 2 for GGUF bytes ``raw [rows, nb * block_bytes]``: ``(d float32 [rows, nb], q int32
    [rows, nb, 32])``. q8_0 block: half d, 32 int8. q5_0 block: half d, uint32 qh, 16 bytes qs;
    element j < 16 is the low nibble of qs[j], j >= 16 the high nibble of qs[j - 16], plus bit
    j of qh times 16, minus 16."""
    rows = raw.shape[0]
    blk = raw.reshape(rows, -1, BLOCK[kind])
    d = blk[..., 0:2].copy().view("<f2")[..., 0].astype(F32)
    if kind == "q8_0":
        q = blk[..., 2:].copy().view(np.int8).astype(np.int32)
    else:
        qh = blk[..., 2:6].copy().view("<u4")[..., 0]
        qs = blk[..., 6:].astype(np.int32)
        nibble = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
        bit4 = ((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32)
        q = (nibble | (bit4 << 4)) - 16
    return d, q


def ref_matmul(raw, kind, x):
    """Steps 1-4: ``out [T, rows]``."""
    xq, xd = ref_quantize_q8_0(x)
    wd, wq = ref_weights(raw, kind)
    T, R, nb = x.shape[0], raw.shape[0], wd.shape[1]
    # step 3: 8 int32 lanes per block, lane i = elements 4i .. 4i+3 (exact integers)
    lanes = np.einsum("rbik,tbik->trbi", wq.reshape(R, nb, 8, 4).astype(np.int64),
                      xq.reshape(T, nb, 8, 4).astype(np.int64))
    with np.errstate(invalid="ignore", over="ignore"):
        s = wd[None, :, :] * xd[:, None, :]  # float32 product of the two halves
    acc = np.zeros((T, R, 8), F32)
    for b in range(nb):
        acc = fma_f32(s[:, :, b, None], lanes[:, :, b, :].astype(F32), acc)
    a = [acc[..., i] for i in range(8)]
    with np.errstate(invalid="ignore"):
        return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------


def _ulp_step(x, k):
    """x moved by k float32 ulps (away from zero for k > 0; x != 0)."""
    return (np.asarray(x, F32).view(np.int32) + np.int32(k)).view(F32)


def tie_block(rng, amax):
    """A block whose max |x| is ``amax`` and whose other elements mostly make the float32
    product ``x * (127 / amax)`` land exactly on ``k + 0.5`` (a rounding tie)."""
    amax = F32(amax)
    inv = F32(127) / amax
    target = (rng.integers(-127, 127, QK) + 0.5).astype(F32)
    x0 = (target / inv).astype(F32)
    out, found = x0.copy(), np.zeros(QK, bool)
    for k in (0, 1, -1, 2, -2, 3, -3):
        c = _ulp_step(x0, k)
        hit = (c * inv == target) & (np.abs(c) <= amax) & ~found
        out[hit], found = c[hit], found | hit
    out[rng.integers(QK)] = amax * rng.choice([F32(-1), F32(1)])
    return out


def f16_tie_block(rng):
    """A block whose ``amax / 127`` (float32) is exactly halfway between two halves."""
    h = rng.integers(1, 0x7BFF)  # positive finite halves (subnormal ones too), not the largest
    lo, hi = np.array([h, h + 1], np.uint16).view(np.float16).astype(F32)
    mid = F32((F64(lo) + F64(hi)) / 2)  # exact: 12 significant bits
    amax = F32(F64(mid) * 127)
    for k in (0, 1, -1, 2, -2, 3, -3, 4, -4):
        if _ulp_step(amax, k) / F32(127) == mid:
            amax = _ulp_step(amax, k)
            break
    x = (rng.uniform(-1, 1, QK) * amax).astype(F32)
    x[rng.integers(QK)] = amax * rng.choice([F32(-1), F32(1)])
    return x


ROW_MODES = ["zero", "normal", "scales", "ties", "ties_pow2", "f16_ties", "sparse", "ints",
             "tiny", "huge"]


def activation_row(rng, mode, K):
    nb = K // QK
    if mode == "zero":
        return np.zeros(K, F32)
    if mode == "normal":
        return (rng.standard_normal(K) * 10.0 ** rng.uniform(-3, 3)).astype(F32)
    if mode == "scales":  # every block its own magnitude: half scales from subnormal to large
        s = 10.0 ** rng.uniform(-9, 6, (nb, 1))
        return (rng.standard_normal((nb, QK)) * s).astype(F32).ravel()
    if mode == "ties":
        return np.concatenate([tie_block(rng, 10.0 ** rng.uniform(-5, 5)) for _ in range(nb)])
    if mode == "ties_pow2":  # amax = 127 * 2^e: id = 2^-e exactly, x = (k + 0.5) 2^e
        out = []
        for _ in range(nb):
            e = F32(2.0 ** rng.integers(-20, 10))
            b = (rng.integers(-127, 127, QK) + 0.5).astype(F32) * e
            b[rng.integers(QK)] = F32(127) * e * rng.choice([F32(-1), F32(1)])
            out.append(b)
        return np.concatenate(out)
    if mode == "f16_ties":
        return np.concatenate([f16_tie_block(rng) for _ in range(nb)])
    if mode == "sparse":  # zero blocks, -0.0, isolated values
        x = np.where(rng.random(K) < 0.1, rng.standard_normal(K), 0.0).astype(F32)
        x[rng.random(K) < 0.1] = F32(-0.0)
        x.reshape(nb, QK)[rng.random(nb) < 0.4] = 0
        return x
    if mode == "ints":  # small integers: id is exact when the block holds 127
        x = rng.integers(-127, 128, K).astype(F32)
        x.reshape(nb, QK)[:, rng.integers(QK)] = 127
        return x
    if mode == "tiny":  # amax down to where 127 / amax overflows (ggml: all q = INT_MIN -> -128)
        s = 10.0 ** rng.uniform(-38, -30, (nb, 1))
        return (rng.standard_normal((nb, QK)) * s).astype(F32).ravel()
    if mode == "huge":  # amax / 127 above the largest half: d = inf, results inf / NaN
        s = 10.0 ** rng.uniform(4, 9, (nb, 1))
        return (rng.standard_normal((nb, QK)) * s).astype(F32).ravel()
    raise AssertionError(mode)


def weight_bytes(rng, kind, rows, nb, mode):
    """GGUF blocks: random bytes, with finite half scales."""
    bpb = BLOCK[kind]
    raw = rng.integers(0, 256, (rows, nb, bpb), dtype=np.uint8)
    if mode == "realistic":
        d = np.abs(rng.standard_normal((rows, nb)) * 0.02).astype(np.float16)
    else:  # any finite half: subnormal, zero, negative, up to 65504
        h = raw[..., 0:2].copy().view("<u2")[..., 0]
        d = np.where((h & 0x7C00) == 0x7C00, h ^ 0x4000, h).astype("<u2").view(np.float16)
    raw[..., 0:2] = d.astype("<f2")[..., None].view(np.uint8)
    return raw.reshape(rows, nb * bpb)


@st.composite
def q8_cases(draw, modes=ROW_MODES):
    kind = draw(st.sampled_from(["q8_0", "q5_0"]))
    rows = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 13, 67]))  # 67: two 64-row chunks
    nb = draw(st.one_of(st.integers(1, 6), st.just(20)))  # 20: K = 640 (Gemma 3 270M)
    T = draw(st.integers(1, 9))  # 4x4 tiles plus 0..3 single rows
    row_modes = draw(st.lists(st.sampled_from(modes), min_size=T, max_size=T))
    wmode = draw(st.sampled_from(["any", "realistic"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = np.stack([activation_row(rng, m, nb * QK) for m in row_modes]).astype(F32)
    return kind, weight_bytes(rng, kind, rows, nb, wmode), x


# ---------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------


def exact_round_f32(v: Fraction):
    """The float32 nearest to the rational v (ties to even), found by comparing exact
    distances to the float32 values around float(v)."""
    if abs(v) >= 2**128 - 2**103:  # at or past the midpoint above FLT_MAX (odd): overflow
        return F32(np.inf) if v > 0 else F32(-np.inf)
    c = F32(float(v))
    best = None
    with np.errstate(over="ignore"):
        around = (np.nextafter(c, F32(-np.inf)), c, np.nextafter(c, F32(np.inf)))
    for cand in around:
        if not np.isfinite(cand):
            continue
        key = (abs(Fraction(float(cand)) - v), int(np.array(cand, F32).view(np.uint32)) & 1)
        if best is None or key < best[0]:
            best = (key, cand)
    return best[1]


finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, **SETTINGS)
@given(st.lists(st.tuples(finite_f32, finite_f32, finite_f32), min_size=1, max_size=30),
       st.integers(-40, 40), st.integers(-3, 3))
@example([(2.0**-24 * (1 + 2.0**-23), 1 - 2.0**-23, 1 + 2.0**-23)], 0, 0)
def test_fma_f32_is_correctly_rounded(triples, e, k):
    """The emulated fma equals the exactly rounded a*b + c, also where a*b is about half an
    ulp of c (where plain float64-then-float32 rounds twice and goes wrong)."""
    a, b, c = (np.array(v, F32) for v in zip(*triples))
    # adversarial: c in [1, 2) * 2^e, a*b = half an ulp of c times (1 + k 2^-23)
    c2 = (np.abs(c) % 1 + 1).astype(F32) * F32(2.0**e)
    a2 = (np.spacing(c2) / 2).astype(F32)
    b2 = np.full_like(a2, F32(1 + k * 2.0**-23))
    for a_, b_, c_ in ((a, b, c), (a2, b2, c2), (-a2, b2, c2)):
        with np.errstate(over="ignore"):
            got = fma_f32(a_, b_, c_)
        for x, y, z, g in zip(a_, b_, c_, got):
            exact = Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))
            want = exact_round_f32(exact)
            if exact == 0:  # an exact zero is +0, unless both terms are -0
                neg = np.signbit(z) and (x * y == 0) and (np.signbit(x) != np.signbit(y))
                assert g == 0 and np.signbit(g) == neg, (x, y, z, g)
                continue
            assert np.array(g, F32).view(np.uint32) == np.array(want, F32).view(np.uint32), \
                (x, y, z, g, want)


def test_fma_f32_beats_double_rounding():
    """The case in the @example above: float64 p + c lands on a float32 tie and rounds the
    wrong way; the emulation must not."""
    a, b, c = F32(2.0**-24 * (1 + 2.0**-23)), F32(1 - 2.0**-23), F32(1 + 2.0**-23)
    naive = F32(F64(a) * F64(b) + F64(c))
    assert fma_f32(a, b, c) == F32(1 + 2.0**-23)
    assert naive != F32(1 + 2.0**-23)


@settings(max_examples=40, **SETTINGS)
@given(st.sampled_from(["q8_0", "q5_0"]), st.integers(1, 9), st.integers(1, 8),
       st.integers(0, 2**32 - 1))
def test_weight_decoding_matches_gguf(kind, rows, nb, seed):
    """The reference's reading of the GGUF blocks agrees with gguf-py's dequantizer."""
    rng = np.random.default_rng(seed)
    raw = weight_bytes(rng, kind, rows, nb, "any")
    d, q = ref_weights(raw, kind)
    want = gguf.quants.dequantize(raw, GGUF_TYPE[kind]).astype(F64)
    assert np.array_equal((d[..., None].astype(F64) * q).reshape(rows, -1), want)


@settings(max_examples=150, **SETTINGS)
@given(st.integers(1, 9), st.integers(1, 8),
       st.lists(st.sampled_from([m for m in ROW_MODES if m != "tiny"]), min_size=9,
                max_size=9),
       st.integers(0, 2**32 - 1))
def test_quantize_act_q8_0(T, nb, modes, seed):
    """quantize_act_q8_0 == ggml's quantize_row_q8_0: int8 quants and half scales, including
    rounding ties of x * id, ties of amax / 127 between two halves, zero blocks, half
    subnormal and overflowing scales."""
    rng = np.random.default_rng(seed)
    x = np.stack([activation_row(rng, modes[t], nb * QK) for t in range(T)])
    q, d = quantize_act_q8_0(x)
    rq, rd = ref_quantize_q8_0(x)
    assert q.dtype == np.int8 and d.dtype == np.float32
    assert_same_bits(d, rd, "half scales")
    assert np.array_equal(q, rq), np.argwhere(q != rq)[:5]


# 127/amax overflows to inf for amax < ~3.7e-37: ggml's _mm256_cvtps_epi32 turns +-inf and
# NaN into INT_MIN (-> -128); harmless for the products (the block's half scale is 0)
def test_quantize_act_q8_0_when_127_over_amax_overflows():
    x = np.zeros((1, QK), F32)
    x[0, :3] = [1e-38, -1e-38, 5e-39]
    q, d = quantize_act_q8_0(x)
    rq, rd = ref_quantize_q8_0(x)
    assert_same_bits(d, rd)
    assert np.array_equal(q, rq), (q, rq)


@settings(max_examples=250, **SETTINGS)
@given(q8_cases())
def test_matmul_matches_ggml_reference(case):
    """matmul_q8_family == steps 1-4, bit for bit, for both kinds, any T (tile leftovers),
    row counts not multiple of the tile and across the 64-row parallel chunks."""
    kind, raw, x = case
    out = np.full((x.shape[0], raw.shape[0]), np.nan, F32)  # every element must be written
    got = matmul_q8_family(raw, kind, x, out=out)
    assert got is out
    assert_same_bits(got, ref_matmul(raw, kind, x), f"{kind} T={x.shape[0]} rows={raw.shape[0]}")


@settings(max_examples=60, **SETTINGS)
@given(q8_cases())
def test_matmul_rows_do_not_depend_on_T(case):
    """Row t of a batch equals the same activation row alone (T == 1 runs ggml's vec_dot,
    T > 1 tinyBLAS: the same order), and the pre-quantized entry point agrees."""
    kind, raw, x = case
    full = matmul_q8_family(raw, kind, x)
    for t in range(x.shape[0]):
        one = matmul_q8_family(raw, kind, x[t])
        assert one.shape == (raw.shape[0],)
        assert_same_bits(one, full[t], f"row {t} alone")
    xq, xd = quantize_act_q8_0(x)
    assert_same_bits(matmul_q8_family_act(raw, kind, xq, xd), full, "matmul_q8_family_act")
    # a batch in another order gives the same rows
    perm = np.random.default_rng(x.shape[0]).permutation(x.shape[0])
    assert_same_bits(matmul_q8_family(raw, kind, np.ascontiguousarray(x[perm])), full[perm],
                     "permuted batch")
