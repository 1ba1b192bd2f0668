"""Block-quantized kinds: NumPy reference vs gguf.quants, Numba kernels vs the reference,
quantizers bit for bit against gguf.quants (ggml's reference rounding)."""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as G
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numba import njit

from torchless.errors import TensorShapeError, TorchlessError, UnsupportedError
from torchless.kernels import quant as Q
from quant_blocks import random_blocks

GGML = {
    "q8_0": G.Q8_0,
    "q4_0": G.Q4_0,
    "q4_1": G.Q4_1,
    "q5_0": G.Q5_0,
    "q4_k": G.Q4_K,
    "q5_k": G.Q5_K,
    "q6_k": G.Q6_K,
    "q5_1": G.Q5_1,
    "iq4_nl": G.IQ4_NL,
    "q2_k": G.Q2_K,
    "q3_k": G.Q3_K,
    "iq4_xs": G.IQ4_XS,
    "tq1_0": G.TQ1_0,
    "tq2_0": G.TQ2_0,
}
KINDS = list(GGML)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference(kind, data):
    return gguf.quants.dequantize(data, GGML[kind]).astype(np.float32)


def test_block_info_matches_gguf():
    for kind, qt in GGML.items():
        assert Q.BLOCK_INFO[kind] == tuple(gguf.GGML_QUANT_SIZES[qt])
    assert Q.bytes_per_row("q4_k", 512) == 288
    with pytest.raises(UnsupportedError):
        Q.bytes_per_row("q4_k", 100)
    with pytest.raises(UnsupportedError):
        Q.block_info("iq2_xxs")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wild", [False, True])
def test_dequantize_matches_gguf_exactly(kind, wild):
    rng = np.random.default_rng(2 * KINDS.index(kind) + int(wild))
    data = random_blocks(kind, 9, 3, rng, wild_scales=wild)
    epb, _ = Q.BLOCK_INFO[kind]
    ref = reference(kind, data)
    got = Q.dequantize(kind, data, 3 * epb)
    assert got.dtype == np.float32 and got.shape == (9, 3 * epb)
    np.testing.assert_array_equal(got, ref)
    tile = Q.dequantize_rows_into(kind, data, 0, 9)
    np.testing.assert_array_equal(tile, ref)


@SETTINGS
@given(
    kind=st.sampled_from(KINDS),
    rows=st.integers(1, 40),
    nblocks=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    wild=st.booleans(),
)
def test_matvec_matches_reference(kind, rows, nblocks, seed, wild):
    rng = np.random.default_rng(seed)
    data = random_blocks(kind, rows, nblocks, rng, wild_scales=wild)
    epb, _ = Q.BLOCK_INFO[kind]
    cols = nblocks * epb
    W = Q.dequantize(kind, data, cols)
    x = rng.standard_normal(cols).astype(np.float32)
    out = np.full(rows, np.nan, np.float32)
    res = Q.matvec(kind, data, x, out)
    assert res is out
    exact = W.astype(np.float64) @ x.astype(np.float64)
    bound = 2e-5 * (np.abs(W).astype(np.float64) @ np.abs(x).astype(np.float64)) + 1e-30
    assert np.all(np.abs(out - exact) <= bound), (out, exact)
    # the float32 BLAS product agrees to float32 tolerance as well
    np.testing.assert_allclose(
        out, W @ x, rtol=1e-4, atol=1e-4 * float(np.abs(W).max() * np.abs(x).max()) + 1e-30
    )
    # dequantization inside the kernel is the reference one, bit for bit: a one-hot x picks a column
    c = int(rng.integers(cols))
    onehot = np.zeros(cols, np.float32)
    onehot[c] = 1.0
    np.testing.assert_array_equal(Q.matvec(kind, data, onehot), W[:, c])


@SETTINGS
@given(
    kind=st.sampled_from(KINDS),
    rows=st.integers(1, 40),
    nblocks=st.integers(1, 4),
    T=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_matmul_equals_matvec_bitwise(kind, rows, nblocks, T, seed):
    rng = np.random.default_rng(seed)
    data = random_blocks(kind, rows, nblocks, rng)
    epb, _ = Q.BLOCK_INFO[kind]
    cols = nblocks * epb
    X = rng.standard_normal((T, cols)).astype(np.float32)
    got = Q.matmul(kind, data, X)
    assert got.shape == (T, rows)
    for t in range(T):
        np.testing.assert_array_equal(got[t], Q.matvec(kind, data, X[t]))
    W = Q.dequantize(kind, data, cols).astype(np.float64)
    np.testing.assert_allclose(
        got,
        X.astype(np.float64) @ W.T,
        rtol=1e-4,
        atol=1e-5 * float(np.abs(W).max() * np.abs(X).max() * cols),
    )


@SETTINGS
@given(
    kind=st.sampled_from(KINDS),
    rows=st.integers(1, 40),
    nblocks=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_dequantize_rows_into_matches_reference(kind, rows, nblocks, seed, data):
    rng = np.random.default_rng(seed)
    q = random_blocks(kind, rows, nblocks, rng, wild_scales=True)
    r0 = data.draw(st.integers(0, rows))
    r1 = data.draw(st.integers(r0, rows))
    epb, _ = Q.BLOCK_INFO[kind]
    out = np.full((r1 - r0, nblocks * epb), np.nan, np.float32)
    Q.dequantize_rows_into(kind, q, r0, r1, out)
    np.testing.assert_array_equal(out, reference(kind, q)[r0:r1])
    # a taller tile is filled at the top, the rest untouched
    tile = np.full((rows + 2, nblocks * epb), 7.0, np.float32)
    got = Q.dequantize_rows_into(kind, q, r0, r1, tile)
    assert got.shape == (r1 - r0, nblocks * epb)
    assert r1 == r0 or np.shares_memory(got, tile)
    np.testing.assert_array_equal(tile[: r1 - r0], reference(kind, q)[r0:r1])
    assert np.all(tile[r1 - r0 :] == 7.0)


def test_kernels_accept_memmap_like_readonly_views():
    rng = np.random.default_rng(3)
    data = random_blocks("q8_0", 5, 2, rng)
    ro = data.view()
    ro.flags.writeable = False
    x = rng.standard_normal(64).astype(np.float32)
    np.testing.assert_array_equal(Q.matvec("q8_0", ro, x), Q.matvec("q8_0", data, x))
    # float64 / non-contiguous x is converted
    x64 = np.repeat(x.astype(np.float64), 2)[::2]
    np.testing.assert_array_equal(Q.matvec("q8_0", data, x64), Q.matvec("q8_0", data, x))


def test_dispatcher_errors():
    rng = np.random.default_rng(4)
    data = random_blocks("q4_0", 3, 2, rng)
    with pytest.raises(UnsupportedError):
        Q.matvec("iq2_xxs", data, np.zeros(64, np.float32))
    with pytest.raises(TensorShapeError):
        Q.matvec("q4_0", data, np.zeros(63, np.float32))
    with pytest.raises(TensorShapeError):
        Q.matvec("q4_0", data[:, :-1], np.zeros(64, np.float32))
    with pytest.raises(TensorShapeError):
        Q.matvec("q4_0", data, np.zeros(64, np.float32), out=np.zeros(4, np.float32))
    with pytest.raises(TensorShapeError):
        Q.matvec("q4_0", data.astype(np.int16), np.zeros(64, np.float32))
    with pytest.raises(TensorShapeError):
        Q.matmul("q4_0", data, np.zeros((2, 32), np.float32))
    with pytest.raises(TensorShapeError):
        Q.dequantize_rows_into("q4_0", data, 2, 1)
    with pytest.raises(TensorShapeError):
        Q.dequantize("q4_0", data, 32)
    with pytest.raises(UnsupportedError):
        Q.dequantize("q4_0", data, 48)
    with pytest.raises(TorchlessError):
        Q.dequantize("bogus", data, 64)


# ------------------------------------------------------------------ quantizers

# finite float32 values, kept away from the range where 1/d overflows (as in real weights)
finite32 = st.one_of(
    st.just(0.0),
    st.floats(2.0**-64, 2.0**13, width=32),
    st.floats(-(2.0**13), -(2.0**-64), width=32),
)


@st.composite
def weight_matrices(draw):
    rows = draw(st.integers(1, 6))
    nblocks = draw(st.integers(1, 3))
    style = draw(st.sampled_from(["normal", "tiny", "ints", "free", "zeros"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (rows, nblocks * 32)
    if style == "normal":
        w = rng.standard_normal(shape) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    elif style == "tiny":
        w = rng.standard_normal(shape) * 1e-6  # half-float scales go subnormal
    elif style == "ints":
        w = rng.integers(-16, 17, shape) / 2.0  # many exact ties for the rounding
    elif style == "zeros":
        w = np.zeros(shape)
        w[0, : draw(st.integers(0, 32))] = draw(finite32)
    else:
        w = np.array(
            draw(st.lists(finite32, min_size=rows * nblocks * 32, max_size=rows * nblocks * 32))
        )
    return w.astype(np.float32).reshape(shape)


@settings(max_examples=100, deadline=None)
@given(w=weight_matrices())
def test_quantize_q8_0_bitwise_equal_to_gguf(w):
    got = Q.quantize_q8_0(w)
    assert got.dtype == np.uint8 and got.shape == (w.shape[0], w.shape[1] // 32 * 34)
    np.testing.assert_array_equal(got, gguf.quants.quantize(w, G.Q8_0))


@settings(max_examples=100, deadline=None)
@given(w=weight_matrices())
def test_quantize_q4_0_bitwise_equal_to_gguf(w):
    got = Q.quantize_q4_0(w)
    assert got.dtype == np.uint8 and got.shape == (w.shape[0], w.shape[1] // 32 * 18)
    np.testing.assert_array_equal(got, gguf.quants.quantize(w, G.Q4_0))


def test_quantize_rounds_half_away_from_zero():
    w = np.zeros((1, 32), np.float32)
    w[0, :4] = [127.0, 63.5, -63.5, 0.5]
    q = Q.quantize_q8_0(w)[0, 2:6].view(np.int8)
    assert list(q) == [127, 64, -64, 1]


@settings(max_examples=60, deadline=None)
@given(w=weight_matrices())
def test_round_trip_error_bounds(w):
    blocks = np.abs(w).reshape(w.shape[0], -1, 32).max(axis=-1, keepdims=True)
    back8 = Q.dequantize("q8_0", Q.quantize_q8_0(w), w.shape[1]).reshape(blocks.shape[:2] + (32,))
    err8 = np.abs(back8 - w.reshape(back8.shape))
    # half a step of d = amax/127, plus the half-float rounding of d (relative 2**-11, absolute
    # 2**-25 once d is subnormal) times |q| <= 127
    d8 = blocks / 127
    assert np.all(err8 <= (d8 / 2 + 127 * (d8 * 2.0**-11 + 2.0**-25)) * 1.001 + 1e-30)
    back4 = Q.dequantize("q4_0", Q.quantize_q4_0(w), w.shape[1]).reshape(back8.shape)
    err4 = np.abs(back4 - w.reshape(back4.shape))
    # one step of d = amax/8 at worst (the +8 level is clipped to +7), plus d's rounding (|q| <= 8)
    d4 = blocks / 8
    assert np.all(err4 <= (d4 + 8 * (d4 * 2.0**-11 + 2.0**-25)) * 1.001 + 1e-30)


def test_quantize_rejects_bad_shapes():
    with pytest.raises(UnsupportedError):
        Q.quantize_q8_0(np.zeros((2, 48), np.float32))
    with pytest.raises(UnsupportedError):
        Q.quantize_q4_0(np.zeros((2, 33), np.float32))
    with pytest.raises(TorchlessError):
        Q.quantize_q8_0(np.zeros(64, np.float32))


@pytest.mark.parametrize("kind", KINDS)
def test_weight_to_f32_uses_reference(kind):
    from torchless.weights import Weight

    rng = np.random.default_rng(5)
    data = random_blocks(kind, 4, 2, rng)
    epb, _ = Q.BLOCK_INFO[kind]
    w = Weight("w", kind, (4, 2 * epb), data)
    np.testing.assert_array_equal(w.to_f32(), reference(kind, data))
    np.testing.assert_array_equal(w.rows_f32(2), reference(kind, data)[2])


@njit(cache=False)
def _halves_soft(u):
    out = np.empty(u.shape[0] // 2, np.float32)
    for i in range(out.shape[0]):
        out[i] = Q._h2f_soft(u[2 * i], u[2 * i + 1])
    return out


@njit(cache=False)
def _halves_selected(u):
    out = np.empty(u.shape[0] // 2, np.float32)
    for i in range(out.shape[0]):
        out[i] = Q._h2f(u[2 * i], u[2 * i + 1])
    return out


@njit(cache=False)
def _bits_of(v, shift, mask):
    return Q._ubits(v, shift, mask)


@pytest.mark.parametrize("decode", [_halves_soft, _halves_selected])
def test_half_decoding_is_exact_for_every_bit_pattern(decode):
    bits = np.arange(1 << 16, dtype=np.uint32).astype("<u2")
    ref = bits.view("<f2").astype(np.float32)
    got = decode(bits.view(np.uint8))
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32))


def test_ubits_extracts_fields():
    assert _bits_of(np.uint8(0xB7), 4, 15) == 11.0
    assert _bits_of(np.uint8(0xB7), 0, 15) == 7.0
    assert _bits_of(np.uint32(0x80000000), 31, 1) == 1.0
    assert _bits_of(np.uint8(0xC0), 6, 3) == 3.0
