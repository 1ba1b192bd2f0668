#!/usr/bin/env python
"""Where a mixture-of-experts decode step goes: the fused ``decode_moe`` of layer 0 and its
parts (gate, down, router) timed alone in a loop (the layer's weights then sit in cache),
against one whole decode step, and a cProfile of the decode loop (per-layer calls read their
weights from memory).

    python bench/moe_decode_parts.py MODEL.gguf
"""
import cProfile
import pstats
import sys
import time

import numpy as np

import torchless
from torchless.kernels import decode as kd
from torchless.kernels import moe as kmoe


def per_call_ms(f, n=200):
    f()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n * 1e3


def main(path):
    m = torchless.ModelLoader.load_auto(path)
    st = m.new_state()
    m.prefill(st, [1, 2, 3, 4])
    for _ in range(3):
        m.fast_forward(st, 5)
    layers, head, moe = m._decode_pack()
    first = next(i for i, a in enumerate(moe) if a is not None)
    a = moe[first][:12]  # decode_moe's arguments (the rest: the shared expert's)
    H = m.config.hidden_size
    h = np.random.default_rng(0).standard_normal(H).astype(np.float32)
    out = np.empty(H, np.float32)
    rkind, rw, kinds, gates, ups, downs, k, router, renorm, act, aq, nb = a
    sel = np.arange(0, 7 * k, 7, dtype=np.int64) % len(gates)
    inter = gates[0].shape[0]
    g = np.empty((k, inter), np.float32)
    A = np.random.default_rng(1).standard_normal((k, inter)).astype(np.float32)
    d = np.empty((k, H), np.float32)
    logits = np.empty(len(gates), np.float32)
    print(f"layer {first}: kinds {kinds.tolist()}, {k} of {len(gates)} experts of width {inter}")
    print(f"decode_moe (from cache)  {per_call_ms(lambda: kmoe.decode_moe(h, *a, out)):.3f} ms")
    print(f"  gate                   "
          f"{per_call_ms(lambda: kmoe.experts_matvec(kinds[0], gates, sel, h[None], g, aq, nb)):.3f} ms")
    print(f"  down                   "
          f"{per_call_ms(lambda: kmoe.experts_matvec(kinds[2], downs, sel, A, d, aq, nb)):.3f} ms")
    print(f"  router                 "
          f"{per_call_ms(lambda: kd.linear(rkind, rw, nb, h, logits, aq)):.3f} ms")
    print(f"one decode step          {per_call_ms(lambda: m.fast_forward(st, 7), 30):.3f} ms")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(20):
        m.fast_forward(st, 7)
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(6)


if __name__ == "__main__":
    main(sys.argv[1])
