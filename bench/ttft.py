#!/usr/bin/env python
"""Time to first token in a fresh process: import, load, prefill a 20-token prompt.

    python bench/ttft.py MODEL [--lazy]

Run it twice: the first run after a fresh clone includes Numba's one-time compile; later
runs load the compiled kernels from the cache.
"""
import time

t0 = time.perf_counter()
import sys  # noqa: E402

import torchless  # noqa: E402

model = torchless.ModelLoader.load_auto(sys.argv[1], lazy="--lazy" in sys.argv)
model.prefill(model.new_state(), list(range(3, 23)))
print(f"time to first token: {time.perf_counter() - t0:.2f} s")
