#!/usr/bin/env python
"""The batched decode products (``kernels/batch.py linear_rows``, 8-bit activations) of one
model's weights at B rows: time per call and multiply-adds per second.

    python bench/batch_products.py MODEL.gguf [--rows 4,8] [--layer 3]
    # before/after a change: run the same command with PYTHONPATH=<other tree>

The output matrix and each weight of layer ``--layer`` (``--all-layers``: the first layer
holding each (weight, kind) pair); best of 3 runs of 20 calls (the output matrix) or 200 (the
layer's weights), after 5 untimed calls. ``B=1`` times the decode's one-row product
(``matmul.matvec``), larger B the batched one.
"""
import argparse
import time

import torchless  # first: it sets OpenBLAS's thread timeout before NumPy loads OpenBLAS
from torchless.kernels import batch as kb
from torchless.kernels import matmul as km

import numpy as np  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--rows", default="4,8")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--all-layers", action="store_true")
    a = ap.parse_args()
    m = torchless.ModelLoader.load_auto(a.model)
    print(f"torchless from {torchless.__file__}")
    weights = [("output", m.output)]
    seen = set()
    for layer in m.layers if a.all_layers else [m.layers[a.layer]]:
        for name, w in layer.w.items():
            if (name, w.kind) not in seen:
                seen.add((name, w.kind))
                weights.append((name, w))
    for name, w in weights:
        for B in map(int, a.rows.split(",")):
            X = np.random.default_rng(B).standard_normal((B, w.cols)).astype(np.float32)
            out = np.empty(w.rows, np.float32)

            def call():
                if B == 1:
                    km.matvec(w, X[0], out, True)
                else:
                    kb.linear_rows(w, X, True)

            for _ in range(5):
                call()
            n = 20 if name == "output" else 200
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(n):
                    call()
                best = min(best, (time.perf_counter() - t0) / n)
            print(f"{name:12s} {w.kind:6s} {w.rows:7d} x {w.cols:5d}  B={B:2d}  "
                  f"{best * 1e6:8.0f} us  {B * w.rows * w.cols / best / 1e9:6.1f} GMAC/s",
                  flush=True)


if __name__ == "__main__":
    main()
