#!/usr/bin/env python
"""One batched decode step in-process: ``model.decode_batch`` of B sequences against
``fast_forward`` of one, and optionally a cProfile of the batched step.

    python bench/batch_step.py MODEL B [--profile]
"""
import cProfile
import pstats
import sys
import time

import torchless


def main(path, B, profile):
    m = torchless.ModelLoader.load_auto(path)
    states = []
    for b in range(B):
        s = m.new_state()
        m.prefill(s, [2 + b, 10, 20, 30, 40 + b])
        states.append(s)
    toks = [5] * B
    for _ in range(3):
        m.decode_batch(states, toks)
    n = 20
    t0 = time.perf_counter()
    for _ in range(n):
        m.decode_batch(states, toks)
    dt = (time.perf_counter() - t0) / n
    print(f"B={B}: step {dt * 1e3:.1f} ms, {B / dt:.1f} tok/s")
    one = m.new_state()
    m.prefill(one, [2, 10, 20, 30, 40])
    for _ in range(3):
        m.fast_forward(one, 5)
    t0 = time.perf_counter()
    for _ in range(n):
        m.fast_forward(one, 5)
    dt1 = (time.perf_counter() - t0) / n
    print(f"fast_forward: {dt1 * 1e3:.1f} ms, {1 / dt1:.1f} tok/s")
    if profile:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(10):
            m.decode_batch(states, toks)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), "--profile" in sys.argv)
