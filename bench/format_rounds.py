#!/usr/bin/env python
"""Decode and prefill speed per block format: torchless beside llama-bench on the same GGUF,
and optionally an older torchless tree (before/after a kernel change), alternating engines
round by round in one run.

    python bench/format_rounds.py --gguf-dir /work/peer --llama-bench PATH \\
        [--before-tree DIR] [--formats q4_0,q4_1,...] [--rounds 3] \\
        [--prompt-tokens 128] [--new-tokens 32] [--threads 2] [--out results.json]

Files are ``<gguf-dir>/llama134m-<fmt>.gguf``. torchless runs ``torchless bench`` in a fresh
process (8-bit activations, its default for quantized weights); decode is from an empty cache
(``decode_depth0_tokens_per_s``) to match llama-bench's ``tg`` test, prefill is the whole
prompt in one batch (llama-bench ``pp``). ``--before-tree`` runs the same command with that
source tree first on ``PYTHONPATH`` (e.g. ``git archive`` of the commit before the change).
Every round is printed and kept; the JSON has all of them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_peers import run_json  # noqa: E402


def torchless(path, threads, P, N, tree=None) -> dict:
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = str(tree)
    cmd = [sys.executable, "-m", "torchless.cli", "bench", str(path), "--prompt-tokens", str(P),
           "--new-tokens", str(N), "--threads", str(threads), "--json"]
    r = run_json(cmd, env=env)
    return {"prefill": r["prefill_tokens_per_s"], "decode": r["decode_depth0_tokens_per_s"]}


def llama(binary, path, threads, P, N) -> dict:
    res = subprocess.run([binary, "-m", str(path), "-t", str(threads), "-p", str(P), "-n", str(N),
                          "-r", "2", "-o", "json"], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"llama-bench failed on {path}:\n{res.stderr[-2000:]}")
    out = {}
    for r in json.loads(res.stdout):
        out["prefill" if r.get("n_gen", 0) == 0 else "decode"] = r["avg_ts"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf-dir", required=True)
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--before-tree")
    ap.add_argument("--before-formats", default="q8_0,q4_0,q5_0,q4_k_m,q5_k_m,q6_k")
    ap.add_argument("--formats", default="q8_0,q4_0,q4_1,q5_0,q5_1,iq4_nl,q2_k,q3_k_m,q4_k_m,"
                                         "q5_k_m,q6_k,iq4_xs,tq1_0,tq2_0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results_formats.json")
    a = ap.parse_args(argv)
    before = set(a.before_formats.split(",")) if a.before_tree else set()
    results = []
    for rnd in range(1, a.rounds + 1):
        for fmt in a.formats.split(","):
            path = Path(a.gguf_dir) / f"llama134m-{fmt}.gguf"
            engines = [("torchless", lambda p=path: torchless(p, a.threads, a.prompt_tokens,
                                                                a.new_tokens))]
            if fmt in before:
                engines.append(("before", lambda p=path: torchless(
                    p, a.threads, a.prompt_tokens, a.new_tokens, a.before_tree)))
            engines.append(("llama.cpp", lambda p=path: llama(a.llama_bench, p, a.threads,
                                                               a.prompt_tokens, a.new_tokens)))
            if rnd % 2 == 0:
                engines.reverse()
            for name, run in engines:
                try:
                    r = run()
                except RuntimeError as e:
                    r = {"error": str(e)[-300:]}
                row = {"round": rnd, "format": fmt, "engine": name, **r}
                results.append(row)
                print(json.dumps(row), flush=True)
                Path(a.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
