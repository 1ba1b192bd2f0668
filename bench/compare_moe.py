#!/usr/bin/env python
"""torchless beside llama-bench on the same mixture-of-experts GGUF files, rounds alternating.

    python bench/compare_moe.py --llama-bench PATH --gguf A.gguf [--gguf B.gguf ...]
                                [--threads 2] [--rounds 3] [--prompt-tokens 128]
                                [--new-tokens 32] [--out bench/results_moe.json]

The files come from ``bench/make_moe_bench_model.py`` (a random Qwen3-MoE, 1.02B total /
~0.2B active parameters) converted with llama.cpp's ``convert_hf_to_gguf.py`` and
``llama-quantize``. Each round runs, for every file, ``torchless bench`` (its own process)
and then llama-bench (``pp`` and ``tg`` from an empty cache, and ``tg`` at depth
``--prompt-tokens``), so machine load drifts alike for both. Reported per round and as the
median of the per-round ratios; torchless's line also gives the weight bytes a decode step
reads (the *active* weights: router, ``top_k`` experts' share of each expert tensor,
attention, output matrix) and that as a fraction of the bandwidth ceiling it measures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_peers import llama_bench_run, torchless_run  # noqa: E402

KEYS = ("decode_tokens_per_s", "decode_depth0_tokens_per_s", "prefill_tokens_per_s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--gguf", action="append", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("bench/results_moe.json"))
    a = ap.parse_args(argv)
    P, N, T = a.prompt_tokens, a.new_tokens, a.threads
    rounds: dict = {}
    for r in range(a.rounds):
        for g in a.gguf:
            for eng in ("torchless", "llama.cpp"):
                load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
                t = time.time()
                res = (torchless_run(g, T, P, N) if eng == "torchless"
                       else llama_bench_run(a.llama_bench, g, T, P, N))
                res["uptime"] = load
                print(f"round {r} {eng:9s} {g.name}: {json.dumps(res)} ({time.time() - t:.0f}s)",
                      flush=True)
                rounds.setdefault(f"{eng} {g.name}", []).append(res)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"threads": T, "prompt_tokens": P, "new_tokens": N,
                                 "rounds": rounds}, indent=2))
    print(f"\n| file | engine | decode tok/s at depth {P} | decode tok/s at depth 0 | "
          f"prefill {P} tok/s |\n|---|---|---|---|---|")
    for name, rs in rounds.items():
        eng, f = name.split(" ", 1)
        print(f"| {f} | {eng} | " + " | ".join(
            " ".join(f"{x.get(k, 0):.1f}" for x in rs) for k in KEYS) + " |")
    print(f"\n| file | torchless / llama.cpp per round (median) | decode at depth {P} | "
          "decode at depth 0 | prefill |\n|---|---|---|---|---|")
    for g in a.gguf:
        tl, lc = rounds[f"torchless {g.name}"], rounds[f"llama.cpp {g.name}"]
        cells = []
        for k in KEYS:
            rs = [x[k] / y[k] for x, y in zip(tl, lc) if y.get(k)]
            cells.append(" ".join(f"{v:.2f}" for v in rs) + f" ({statistics.median(rs):.2f})")
        print(f"| {g.name} | | " + " | ".join(cells) + " |")
    print("\n| file | active bytes/token (MB) | all weights (MB) | bandwidth GB/s | "
          "ceiling tok/s | decode depth-0 / ceiling per round |\n|---|---|---|---|---|---|")
    for g in a.gguf:
        tl = rounds[f"torchless {g.name}"]
        fr = [x["decode_depth0_tokens_per_s"] * x["bytes_per_token_mb"] * 1e6
              / (x["bandwidth_gb_s"] * 1e9) for x in tl]
        x = tl[-1]
        print(f"| {g.name} | {x['bytes_per_token_mb']} | {x.get('weight_bytes_mb')} | "
              f"{' '.join(str(y['bandwidth_gb_s']) for y in tl)} | "
              f"{' '.join(str(y['ceiling_tokens_per_s']) for y in tl)} | "
              + " ".join(f"{v:.2f}" for v in fr) + f" ({statistics.median(fr):.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
