#!/usr/bin/env python
"""Where one batched prefill spends its time, by operation (wall time per op kind).

    python bench/prefill_breakdown.py MODEL [--tokens 512] [--quantize q8_0|q4_0]
                                            [--no-act-quant] [--rounds 4]

Wraps the engine's batched operations (projections, norms, activations, RoPE, attention)
with timers and prints the best round's split; "other" is the rest of the step.
"""
import argparse
import collections
import time

import numpy as np

import torchless
import torchless.engine as eng

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--tokens", type=int, default=512)
ap.add_argument("--quantize", default=None)
ap.add_argument("--no-act-quant", action="store_true")
ap.add_argument("--rounds", type=int, default=4)
a = ap.parse_args()
m = torchless.ModelLoader.load_auto(a.model, quantize=a.quantize,
                                    act_quant=False if a.no_act_quant else None)
ids = [int(t) for t in np.random.default_rng(0).integers(0, m.config.vocab_size, a.tokens)]
spent = collections.Counter()


def timed(fn, name):
    def wrapper(*args):
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            spent[name] += time.perf_counter() - t
    return wrapper


for name in ("linear", "norm", "act", "gated", "gated_fused", "rope", "attention"):
    fn = getattr(eng._FastOps, name)
    setattr(eng._FastOps, name, timed(fn, name) if name == "linear" else staticmethod(timed(fn, name)))
best = None
for _ in range(a.rounds):
    spent.clear()
    t = time.perf_counter()
    m.prefill(m.new_state(a.tokens + 1), ids)
    total = time.perf_counter() - t
    if best is None or total < best[0]:
        best = (total, dict(spent))
total, split = best
print(f"prefill {a.tokens} tokens: {total * 1e3:.0f} ms ({a.tokens / total:.0f} tokens/s)")
for k, v in sorted(split.items(), key=lambda kv: -kv[1]):
    print(f"  {k:10s} {v * 1e3:7.1f} ms  {v / total:5.1%}")
print(f"  {'other':10s} {(total - sum(split.values())) * 1e3:7.1f} ms")
