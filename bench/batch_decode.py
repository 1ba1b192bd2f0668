#!/usr/bin/env python
"""Aggregate decode speed of ``decode_batch`` at several batch sizes, beside llama.cpp's
``llama-batched-bench`` on the same GGUF, in one run.

    python bench/batch_decode.py MODEL [MODEL ...] [--batch 1,2,4,8,16] [--prompt-tokens 128]
        [--new-tokens 32] [--threads 2] [--rounds 2]
        [--batched-bench PATH/llama-batched-bench] [--out bench/results_batch.json]

For each model and round, torchless runs in a fresh process: B prompts of
``--prompt-tokens`` ids are prefilled (one state each), then ``--new-tokens`` batched steps
are timed (aggregate tokens/s = B * steps / time); the single-sequence ``fast_forward`` rate
is measured in the same process. Then, for a ``.gguf`` model, ``llama-batched-bench``
(``-npp P -ntg N -npl B...``, one prompt per sequence, its ``speed_tg`` is the same
aggregate) runs on the same file. Engines alternate round by round; every round is printed
and the median torchless/llama.cpp ratio is reported per B. ``MODEL`` ``gemma`` means the
default Gemma 3 270M Q4_K_M.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SNIPPET = r"""
import json, sys, time
import numpy as np
import torchless
path, threads, P, N = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
batches = [int(b) for b in sys.argv[5].split(",")]
torchless.set_num_threads(threads)
if path == "gemma":
    from torchless.demo import default_model_path
    path = default_model_path()
m = torchless.ModelLoader.load_auto(path)
V = m.config.vocab_size
rng = np.random.default_rng(0)
def prompt():
    return [int(t) for t in rng.integers(3, min(V, 30000), P)]
# warm every kernel once
st = m.new_state(); m.prefill(st, prompt()); m.fast_forward(st, 5); m.decode_batch([st], [5])
res = {}
st = m.new_state(); m.prefill(st, prompt())
t = time.perf_counter()
for _ in range(N):
    m.fast_forward(st, 5)
res["fast_forward"] = N / (time.perf_counter() - t)
for B in batches:
    states = [m.new_state() for _ in range(B)]
    for s in states:
        m.prefill(s, prompt())
    toks = [5] * B
    m.decode_batch(states, toks)
    t = time.perf_counter()
    for _ in range(N):
        m.decode_batch(states, toks)
    res[str(B)] = B * N / (time.perf_counter() - t)
print(json.dumps(res))
"""


def torchless_run(model, threads, P, N, batches) -> dict:
    res = subprocess.run([sys.executable, "-c", SNIPPET, model, str(threads), str(P), str(N),
                          ",".join(map(str, batches))], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"torchless failed on {model}:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def llama_run(binary, gguf, threads, P, N, batches) -> dict:
    ctx = max(batches) * (P + N) + 64
    res = subprocess.run([binary, "-m", gguf, "-c", str(ctx), "-npp", str(P), "-ntg", str(N),
                          "-npl", ",".join(map(str, batches)), "-t", str(threads),
                          "--output-format", "jsonl"], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"llama-batched-bench failed on {gguf}:\n{res.stderr[-2000:]}")
    out = {}
    for line in res.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            out[str(r["pl"])] = r["speed_tg"]
    return out


def gguf_path(model: str) -> str | None:
    if model == "gemma":
        from torchless.demo import default_model_path

        return default_model_path()
    return model if model.endswith(".gguf") else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--batch", default="1,2,4,8,16")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batched-bench", default=None)
    ap.add_argument("--out", type=Path, default=Path("bench/results_batch.json"))
    a = ap.parse_args(argv)
    batches = [int(b) for b in a.batch.split(",")]
    rounds: dict = {m: [] for m in a.models}
    for r in range(a.rounds):
        for model in a.models:
            load = os.getloadavg()[0]
            row = {"torchless": torchless_run(model, a.threads, a.prompt_tokens,
                                              a.new_tokens, batches), "load": load}
            g = gguf_path(model)
            if a.batched_bench and g:
                row["llama.cpp"] = llama_run(a.batched_bench, g, a.threads, a.prompt_tokens,
                                             a.new_tokens, batches)
            rounds[model].append(row)
            print(f"round {r + 1} {Path(model).name}: {json.dumps(row)}", flush=True)
    a.out.write_text(json.dumps({"args": vars(a) | {"out": str(a.out)}, "rounds": rounds},
                                indent=1))
    print()
    print("| model | B | torchless tok/s (rounds) | x single | llama.cpp tok/s (rounds) "
          "| median ratio |")
    print("|---|---|---|---|---|---|")
    for model, rows in rounds.items():
        single = statistics.median(x["torchless"]["fast_forward"] for x in rows)
        for B in map(str, batches):
            ours = [x["torchless"][B] for x in rows]
            theirs = [x["llama.cpp"][B] for x in rows if "llama.cpp" in x]
            ratio = (f"{statistics.median(o / t for o, t in zip(ours, theirs)):.2f}"
                     if theirs else "-")
            print(f"| {Path(model).name} | {B} | {' / '.join(f'{o:.1f}' for o in ours)} | "
                  f"{statistics.median(ours) / single:.2f} | "
                  f"{' / '.join(f'{t:.1f}' for t in theirs) or '-'} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
