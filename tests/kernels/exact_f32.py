"""Exact float32 helpers for the llama.cpp-order kernel tests: a correctly rounded fused
multiply-add, float16 rounding, bit-for-bit comparison."""
import numpy as np

F32, F64 = np.float32, np.float64


def fma_f32(a, b, c):
    """``a * b + c`` for float32 arrays with ONE rounding to float32 (what FMA3 does).

    * ``a * b`` is exact in float64 (24 + 24 significant bits <= 53, and the exponent range
      of float32 products fits float64).
    * ``p + c`` is rounded to float64 and its error recovered exactly by TwoSum (Knuth), so
      the exact sum is ``s + err``.
    * Rounding ``s`` to *odd* (if ``err != 0`` and ``s``'s last bit is even, step one float64
      ulp towards ``err``) and then rounding that to float32 to nearest even gives the
      correctly rounded float32 sum, because float64 has at least 2 * 24 + 2 bits (Boldo and
      Melquiond, "Emulation of FMA and correctly rounded sums: proved algorithms using
      rounding to odd", IEEE TC 2008). Plain float64 ``p + c`` then float32 would round twice.
    """
    a = np.asarray(a, F32).astype(F64)
    b = np.asarray(b, F32).astype(F64)
    c = np.asarray(c, F32).astype(F64)
    with np.errstate(invalid="ignore", over="ignore"):
        p = a * b
        s = p + c
        bv = s - p
        err = (p - (s - bv)) + (c - bv)
        err = np.where(np.isfinite(s), err, 0.0)
        even = (s.view(np.uint64) & np.uint64(1)) == 0
        s = np.where((err != 0) & even, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
        return s.astype(F32)


def f16(x):
    """float32 -> nearest float16 (ties to even, overflow to inf) -> float32 (NumPy's cast)."""
    with np.errstate(over="ignore"):
        return np.asarray(x, F32).astype(np.float16).astype(F32)


def assert_same_bits(got, want, what=""):
    """Equal float32 bit patterns (any NaN matches any NaN)."""
    got, want = np.asarray(got, F32), np.asarray(want, F32)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    bad = (got.view(np.uint32) != want.view(np.uint32)) & ~(np.isnan(got) & np.isnan(want))
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} differ; first at {i}: "
                             f"got {got[i]!r} want {want[i]!r}")
