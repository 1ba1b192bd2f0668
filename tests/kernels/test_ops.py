"""Each Numba kernel against its plain-NumPy reference on random shapes."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from torchless import reference as ref
from torchless.kernels import matmul as km
from torchless.kernels import ops as ko
from torchless.weights import Weight, f32_to_bf16

SETTINGS = settings(max_examples=25, deadline=None)


def _rand(seed, *shape, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


@SETTINGS
@given(rows=st.integers(1, 70), cols=st.integers(1, 130), kind=st.sampled_from(["f32", "f16", "bf16"]),
       seed=st.integers(0, 10_000))
def test_matvec_matches_numpy(rows, cols, kind, seed):
    w32 = _rand(seed, rows, cols)
    x = _rand(seed + 1, cols)
    if kind == "f32":
        w = Weight("w", "f32", w32.shape, w32)
    elif kind == "f16":
        w = Weight("w", "f16", w32.shape, w32.astype(np.float16))
    else:
        w = Weight("w", "bf16", w32.shape, f32_to_bf16(w32))
    expected = w.to_f32().astype(np.float64) @ x.astype(np.float64)
    got = km.matvec(w, x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.sqrt(cols))


@SETTINGS
@given(rows=st.integers(1, 40), cols=st.integers(1, 64), T=st.integers(1, 9),
       kind=st.sampled_from(["f32", "f16", "bf16"]), seed=st.integers(0, 10_000))
def test_matmul_matches_numpy(rows, cols, T, kind, seed):
    w32 = _rand(seed, rows, cols)
    w = {"f32": Weight("w", "f32", w32.shape, w32),
         "f16": Weight("w", "f16", w32.shape, w32.astype(np.float16)),
         "bf16": Weight("w", "bf16", w32.shape, f32_to_bf16(w32))}[kind]
    x = _rand(seed + 2, T, cols)
    expected = x.astype(np.float64) @ w.to_f32().astype(np.float64).T
    old = km.TILE_ROWS
    km.TILE_ROWS = 7  # exercise the tiling
    try:
        got = km.matmul(w, x)
    finally:
        km.TILE_ROWS = old
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.sqrt(cols))


@SETTINGS
@given(n=st.integers(2, 100), rows=st.integers(1, 6), kind=st.sampled_from(["rms", "rms1p", "layernorm"]),
       seed=st.integers(0, 10_000))
def test_norm_rows(n, rows, kind, seed):
    x = _rand(seed, rows, n, scale=3.0)
    w = _rand(seed + 1, n)
    b = _rand(seed + 2, n)
    expected = ref.norm(x, kind, w, b if kind == "layernorm" else None, 1e-5)
    for kernel in (ko.norm_rows, ko.norm_rows_serial):
        out = np.empty_like(x)
        kernel(x, w, b, np.float32(1e-5), {"rms": 0, "rms1p": 1, "layernorm": 2}[kind], out)
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@SETTINGS
@given(T=st.integers(1, 4), n=st.integers(1, 50), kind=st.sampled_from(["silu", "gelu_tanh", "gelu"]),
       seed=st.integers(0, 10_000))
def test_gated_activation(T, n, kind, seed):
    g = _rand(seed, T, n, scale=4.0)
    u = _rand(seed + 1, T, n)
    for kernel in (ko.gated_act, ko.gated_act_serial):
        out = np.empty_like(g)
        kernel(g, u, {"silu": 0, "gelu_tanh": 1, "gelu": 2}[kind], out)
        np.testing.assert_allclose(out, ref.activation(g, kind) * u, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(T=st.integers(1, 5), heads=st.integers(1, 4), half=st.integers(1, 8), extra=st.integers(0, 6),
       seed=st.integers(0, 10_000))
def test_rope(T, heads, half, extra, seed):
    rot = 2 * half
    D = rot + extra
    x = _rand(seed, T, heads, D)
    inv = (1.0 / (10000.0 ** (np.arange(0, rot, 2) / rot))).astype(np.float32)
    cos, sin = ref.rope_angles(np.arange(3, 3 + T), inv, 1.1)
    expected = ref.rope(x, cos, sin, rot)
    for kernel in (ko.rope_rows, ko.rope_rows_serial):
        y = x.copy()
        kernel(y, cos, sin, rot)
        np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


@SETTINGS
@given(P=st.integers(0, 12), T=st.integers(1, 6), nkv=st.integers(1, 3), rep=st.integers(1, 3),
       D=st.integers(1, 20), window=st.integers(0, 8), softcap=st.sampled_from([0.0, 2.0]),
       seed=st.integers(0, 10_000))
def test_attention(P, T, nkv, rep, D, window, softcap, seed):
    nH = nkv * rep
    S = P + T
    q = _rand(seed, T, nH, D, scale=2.0)
    cap = S + 3
    k = _rand(seed + 1, nkv, cap, D, scale=2.0)
    v = _rand(seed + 2, nkv, cap, D)
    logn = (1 + np.random.default_rng(seed).random(T)).astype(np.float32)
    expected = ref.attention(q, k[:, :S], v[:, :S], P, 0.3, softcap, window, logn)
    for kernel in (ko.attention, ko.attention_serial):
        out = np.empty_like(q)
        kernel(q, k, v, P, np.float32(0.3), np.float32(softcap), window, logn, out)
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    blas = ko.attention_blas(q, k, v, P, 0.3, softcap, window, logn)
    np.testing.assert_allclose(blas, expected, rtol=1e-4, atol=1e-5)


@SETTINGS
@given(P=st.integers(0, 12), T=st.integers(1, 14), nkv=st.integers(1, 2), rep=st.integers(1, 3),
       window=st.integers(0, 6), block=st.integers(1, 5), softcap=st.sampled_from([0.0, 2.0]),
       seed=st.integers(0, 10_000))
def test_attention_blas_query_blocks(P, T, nkv, rep, window, block, softcap, seed):
    # blocks of queries multiply only the keys in their reach; the result must not change
    nH, D, S = nkv * rep, 8, P + T
    q = _rand(seed, T, nH, D, scale=2.0)
    k = _rand(seed + 1, nkv, S + 2, D, scale=2.0)
    v = _rand(seed + 2, nkv, S + 2, D)
    logn = np.ones(T, np.float32)
    expected = ref.attention(q, k[:, :S], v[:, :S], P, 0.3, softcap, window, logn)
    saved = ko.ATTENTION_BLOCK
    try:
        ko.ATTENTION_BLOCK = block
        got = ko.attention_blas(q, k, v, P, 0.3, softcap, window, logn)
    finally:
        ko.ATTENTION_BLOCK = saved
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_attention_window_sees_exactly_w_keys():
    # Query at position 9 with window 3 must see keys 7, 8, 9 only (ARCHITECTURES.md 2.7).
    D = 1
    k = np.zeros((1, 10, D), np.float32)
    v = np.arange(10, dtype=np.float32).reshape(1, 10, 1)
    q = np.zeros((1, 1, D), np.float32)  # uniform attention over the visible keys
    out = np.empty_like(q)
    ko.attention(q, k, v, 9, np.float32(1.0), np.float32(0.0), 3, np.ones(1, np.float32), out)
    assert out[0, 0, 0] == np.float32(8.0)
