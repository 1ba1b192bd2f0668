"""The vectorisable exp and tanh used by the softmax and activation kernels, against float64."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from torchless.kernels.bits import fast_exp, fast_tanh


@njit(cache=False)  # inlines fast_exp: a cached copy would outlive edits to it
def _exp_all(x, out):
    for i in range(x.shape[0]):
        out[i] = fast_exp(x[i])


@njit(cache=False)  # inlines fast_exp: a cached copy would outlive edits to it
def _tanh_all(x, out):
    for i in range(x.shape[0]):
        out[i] = fast_tanh(x[i])


def _run(kernel, values):
    x = np.asarray(values, np.float32)
    out = np.empty_like(x)
    kernel(x, out)
    return x, out


finite32 = st.floats(-200.0, 200.0, width=32, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite32, min_size=1, max_size=70))
def test_fast_exp_within_one_ulp(values):
    x, got = _run(_exp_all, values)
    want = np.exp(x.astype(np.float64))
    normal = (want >= np.finfo(np.float32).tiny) & (want <= np.finfo(np.float32).max)
    ulp = np.spacing(want[normal].astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(got[normal] - want[normal]) <= 1.0 * ulp)
    assert np.all(got[want < np.finfo(np.float32).tiny] == 0.0)
    assert np.all(np.isposinf(got[want > np.finfo(np.float32).max]))


def test_fast_exp_dense_sweep_and_specials():
    x = np.linspace(-87.33, 88.72, 2_000_001, dtype=np.float32)
    x, got = _run(_exp_all, x)
    want = np.exp(x.astype(np.float64))
    ulp = np.spacing(want.astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(got - want) / ulp) <= 1.0
    _, special = _run(_exp_all, [np.nan, np.inf, -np.inf, 0.0, -0.0, 89.0, -104.0])
    assert np.isnan(special[0])
    assert list(special[1:]) == [np.inf, 0.0, 1.0, 1.0, np.inf, 0.0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-50.0, 50.0, width=32, allow_nan=False), min_size=1, max_size=70))
def test_fast_tanh_absolute_error(values):
    x, got = _run(_tanh_all, values)
    want = np.tanh(x.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-7)
    assert np.all(np.sign(got) == np.sign(want))


def test_fast_tanh_specials():
    _, got = _run(_tanh_all, [np.nan, np.inf, -np.inf, 0.0, 1e-30, -1e-30])
    assert np.isnan(got[0])
    assert list(got[1:]) == [1.0, -1.0, 0.0, np.float32(1e-30), np.float32(-1e-30)]
