"""Attention reductions sum in a fixed order, so a kernel gives the same bits however it was
compiled: fresh in this process, fresh in another, or loaded from Numba's cache."""
import os
import subprocess
import sys
import textwrap

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from torchless.kernels.bits import chunked_sum_f64, fixed_dot


@njit(cache=False)
def _dot(a, b):
    return fixed_dot(a, b)


@njit(cache=False)
def _sum(a):
    return chunked_sum_f64(a)


def _lane_tree(v):
    while v.shape[0] > 1:
        h = v.shape[0] // 2
        v = (v[:h] + v[h:]).astype(np.float32)
    return v[0]


def _chunked_sum_emulated(a):
    """ggml's softmax sum: float32 lane tree per 16 elements, float64 across chunks."""
    n = a.shape[0] - a.shape[0] % 16
    s = 0.0
    for c in range(0, n, 16):
        s += float(_lane_tree(a[c:c + 16]))
    for x in a[n:]:
        s += float(x)
    return s


vectors = st.integers(0, 90).flatmap(
    lambda n: st.tuples(*(st.lists(st.floats(-50, 50, width=32), min_size=n, max_size=n)
                          for _ in range(2))))


@settings(max_examples=80, deadline=None)
@given(vectors)
def test_fixed_dot_is_a_dot_product(ab):
    a, b = (np.asarray(v, np.float32) for v in ab)
    got = _dot(a, b)
    exact = float(np.dot(a.astype(np.float64), b.astype(np.float64)))
    bound = 2 * (len(a) + 1) * np.finfo(np.float32).eps * float(np.abs(a * b.astype(np.float64)).sum())
    assert abs(got - exact) <= bound + 1e-30


@settings(max_examples=80, deadline=None)
@given(vectors)
def test_chunked_sum_follows_ggml_order_exactly(ab):
    a = np.asarray(ab[0], np.float32)
    assert _sum(a) == _chunked_sum_emulated(a)


def test_lane_order_is_visible():
    # the emulation above is not vacuous: this vector sums differently in element order
    a = np.array([1e8, 1.0, -1e8, 1.0] * 4 + [0.5] * 3, np.float32)
    seq = np.float64(0)
    for x in a:
        seq = np.float64(np.float32(seq + x))
    assert _sum(a) == _chunked_sum_emulated(a) != seq


_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from torchless.kernels import ops as ko
    rng = np.random.default_rng(7)
    s = (rng.standard_normal((3, 37, 45)) * 4).astype(np.float32)
    ko.masked_softmax_rows(s, 8, 0, np.float32(0), 0)
    T, nH, nKV, D, S = 5, 4, 2, 40, 40
    q = rng.standard_normal((T, nH, D)).astype(np.float32)
    k = rng.standard_normal((nKV, S, D)).astype(np.float32)
    v = rng.standard_normal((nKV, S, D)).astype(np.float32)
    out = np.empty_like(q)
    ko.attention(q, k, v, S - T, np.float32(0.3), np.float32(0), 0, np.ones(T, np.float32), out)
    np.savez(sys.argv[1], s=s, a=out)
""")


def test_same_bits_compiled_fresh_and_loaded_from_cache(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    runs = []
    for i in range(2):  # first run compiles into the empty cache, the second loads it
        out = tmp_path / f"r{i}.npz"
        subprocess.run([sys.executable, str(script), str(out)], env=env, check=True,
                       timeout=600)
        runs.append(np.load(out))
    assert any((tmp_path / "cache").rglob("*.nbc"))
    for key in ("s", "a"):
        assert np.array_equal(runs[0][key], runs[1][key]), key
