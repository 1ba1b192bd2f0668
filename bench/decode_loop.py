#!/usr/bin/env python
"""Decode speed of one process, with a profile of where the time goes.

    python bench/decode_loop.py MODEL [--quantize q8_0|q4_0] [--act-quant] [--tokens 20]
"""
import argparse
import cProfile
import pstats
import time

import torchless

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--quantize", default=None)
ap.add_argument("--act-quant", action="store_true")
ap.add_argument("--tokens", type=int, default=20)
ap.add_argument("--context", type=int, default=97)
a = ap.parse_args()
m = torchless.ModelLoader.load_auto(a.model, quantize=a.quantize, act_quant=a.act_quant or None)
st = m.new_state()
m.prefill(st, [3 + i % 300 for i in range(a.context)])
for _ in range(3):
    m.fast_forward(st, 5)
t = time.perf_counter()
for _ in range(a.tokens):
    m.fast_forward(st, 5)
print(f"decode: {a.tokens / (time.perf_counter() - t):.1f} tokens/s")
pr = cProfile.Profile()
pr.enable()
for _ in range(a.tokens):
    m.fast_forward(st, 5)
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(10)
