#!/usr/bin/env python
"""Prefill speed and the page faults each prefill takes, in one process.

    python bench/prefill_faults.py MODEL [--tokens 512] [--repeats 6]
    TORCHLESS_MALLOC_TUNING=0 python bench/prefill_faults.py MODEL   # glibc's defaults

Like ``torchless bench``: a 20-token prefill first, then ``--repeats`` prefills of
``--tokens`` random ids in fresh states. Prints tokens/s and minor page faults per prefill,
then the median tokens/s.
"""
import argparse
import resource
import statistics
import time

import numpy as np

import torchless
from torchless.threads import set_num_threads

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--tokens", type=int, default=512)
ap.add_argument("--repeats", type=int, default=6)
a = ap.parse_args()
set_num_threads(None)
m = torchless.ModelLoader.load_auto(a.model)
ids = [int(t) for t in np.random.default_rng(0).integers(0, m.config.vocab_size, a.tokens)]
m.prefill(m.new_state(), ids[:20])
speeds, cells = [], []
for _ in range(a.repeats):
    state = m.new_state()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    m.prefill(state, ids)
    dt = time.perf_counter() - t
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    speeds.append(a.tokens / dt)
    cells.append(f"{a.tokens / dt:.0f} tok/s, {faults} faults")
print("; ".join(cells))
print(f"median {statistics.median(speeds[1:]):.0f} tokens/s")
