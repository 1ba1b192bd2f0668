#!/usr/bin/env python
"""The chosen experts' products of a mixture-of-experts decode step, from cache:
``kernels.moe.experts_matvec`` for 8 of 64 random experts, 8-bit activations, best of 5 runs
of 200 calls (the 64 experts' weights, 9-13 MB, stay in the L3 cache).

    python bench/moe_experts.py [--kinds q4_k,q6_k]

Shapes: the gate/up projection (256 x 1024, one activation row shared by the experts) and the
down projection (1024 x 256, one 256-wide block per row, one activation row per expert), as
in the random Qwen3-MoE of ``bench/make_moe_bench_model.py``.
"""
import argparse
import sys
import time
from pathlib import Path

import torchless  # noqa: F401  (first: it sets OpenBLAS's thread timeout before NumPy loads it)

import numpy as np  # noqa: E402
from numba.typed import List  # noqa: E402

from torchless.kernels import decode as kd  # noqa: E402
from torchless.kernels import moe  # noqa: E402
from torchless.kernels import quant as kq  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from quant_blocks import random_blocks  # noqa: E402


def bench(kind, rows, cols, nx, rng):
    nb = cols // kq.BLOCK_INFO[kind][0]
    mats = List([np.ascontiguousarray(random_blocks(kind, rows, nb, rng)) for _ in range(64)])
    sel = np.array([3, 9, 17, 22, 40, 41, 50, 63], np.int64)
    X = rng.standard_normal((nx, cols)).astype(np.float32)
    out = np.empty((8, rows), np.float32)
    no_bias = np.zeros(0, np.float32)

    def f():
        moe.experts_matvec(kd.KIND_CODES[kind], mats, sel, X, out, True, no_bias)

    f()
    best = 1e9
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(200):
            f()
        best = min(best, (time.perf_counter() - t0) / 200)
    print(f"{kind} {rows}x{cols} x 8 experts, {nx} input row(s): {best * 1e6:.1f} us, "
          f"{8 * rows * cols / best / 1e9:.1f} GMAC/s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="q4_k,q6_k")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    for kind in a.kinds.split(","):
        bench(kind, 256, 1024, 1, rng)
        bench(kind, 1024, 256, 8, rng)


if __name__ == "__main__":
    main()
