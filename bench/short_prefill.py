#!/usr/bin/env python
"""Prefill of a short prompt: the batched 8-bit products (``kernels/batch.py``) against
widening each weight to float32 for BLAS, per prompt length, in one process.

    python bench/short_prefill.py MODEL.gguf [MODEL.gguf ...] [--lengths 8,16,32,48,64,96]
        [--rounds 3]

For each length, a fresh state prefills the same random prompt with the batched products
forced on (every length) and forced off, alternating, best of ``--rounds``; the prompt is
prefilled once untimed first. ``batch.short_rows`` sets where ``prefill`` switches between
the two by default.
"""
import argparse
import time

import torchless  # first: it sets OpenBLAS's thread timeout before NumPy loads OpenBLAS
from torchless.kernels import batch as kb

import numpy as np  # noqa: E402  (after torchless, see above)


def timed_prefill(m, ids):
    s = m.new_state()
    t0 = time.perf_counter()
    m.prefill(s, ids)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--lengths", default="8,16,32,48,64,96")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    saved = kb.SHORT_ROWS_TILED, kb.SHORT_ROWS_K8, kb.SHORT_ROWS_OTHER
    for path in a.models:
        m = torchless.ModelLoader.load_auto(path)
        for T in map(int, a.lengths.split(",")):
            ids = [int(i) for i in np.random.default_rng(T).integers(10, 1000, T)]
            best = {"batched 8-bit": [], "float32 + BLAS": []}
            for _ in range(a.rounds):
                for name, rows in (("batched 8-bit", 1 << 30), ("float32 + BLAS", 0)):
                    kb.SHORT_ROWS_TILED = kb.SHORT_ROWS_K8 = kb.SHORT_ROWS_OTHER = rows
                    timed_prefill(m, ids)  # untimed: compile, page in
                    best[name].append(timed_prefill(m, ids))
            kb.SHORT_ROWS_TILED, kb.SHORT_ROWS_K8, kb.SHORT_ROWS_OTHER = saved
            print(f"{path.rsplit('/', 1)[-1]} T={T}: " + ", ".join(
                f"{k} {min(v) * 1e3:.1f} ms" for k, v in best.items()), flush=True)


if __name__ == "__main__":
    main()
