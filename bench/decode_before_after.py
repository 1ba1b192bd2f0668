#!/usr/bin/env python
"""Decode speed of two source trees on the same GGUF files, robust to a noisy machine.

    python bench/decode_before_after.py --before-tree DIR [--after-tree .] \\
        --gguf A.gguf [--gguf B.gguf ...] [--tokens 96] [--pairs 3] [--out results.json]

For each file and pair, the two trees run alternately, each in a fresh process (the tree
first on ``PYTHONPATH``): load, a 16-token prompt, then ``--tokens`` single-token decode
steps timed one by one. A step time that another process stretched is long, never short, so
each run reports its fastest decile's median step (and the plain median); the file's ratio is
after/before of those, median over the pairs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np
import torchless
m = torchless.ModelLoader.load_auto(sys.argv[1])
st = m.new_state()
m.prefill(st, list(range(2, 18)))
steps = []
tok = 5
for _ in range(int(sys.argv[2])):
    t0 = time.perf_counter()
    logits = m.fast_forward(st, tok)
    steps.append(time.perf_counter() - t0)
    tok = int(np.argmax(logits))
steps = sorted(steps[4:])
fast = steps[:max(1, len(steps) // 10)]
import torchless_plugins
print(json.dumps({"fast_ms": 1e3 * fast[len(fast) // 2],
                  "median_ms": 1e3 * steps[len(steps) // 2], "file": torchless.__file__,
                  "plugins": torchless_plugins.__path__[0]}))
"""


def run(tree: Path, gguf: Path, tokens: int) -> dict:
    # the tree's own plugins too: an alias dir holding ``torchless_plugins`` -> tree/plugins
    # (``tree/_alias``, made if missing), ahead of the installed package
    alias = tree / "_alias"
    if not (alias / "torchless_plugins").exists():
        alias.mkdir(exist_ok=True)
        (alias / "torchless_plugins").symlink_to((tree / "plugins").resolve())
    # only the entry points whose plugin file the tree has (an older tree lacks newer ones)
    names = ",".join(sorted(p.stem for p in (tree / "plugins").glob("[a-z]*.py")))
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{alias}", TORCHLESS_PLUGINS=names)
    res = subprocess.run([sys.executable, "-c", CHILD, str(gguf), str(tokens)], env=env,
                         capture_output=True, text=True, cwd="/")
    if res.returncode:
        raise SystemExit(f"{tree} on {gguf} failed:\n{res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("file", "plugins"):
        if not str(Path(out[key]).resolve()).startswith(str(tree.resolve())):
            raise SystemExit(f"imported {out[key]}, not from the tree {tree}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before-tree", type=Path, required=True)
    ap.add_argument("--after-tree", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--gguf", type=Path, action="append", required=True)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    results = []
    print("| file | before fastest-decile ms/token | after | after/before (median of pairs) |")
    print("| --- | --- | --- | --- |")
    for g in a.gguf:
        pairs = []
        for p in range(a.pairs):
            order = [("before", a.before_tree), ("after", a.after_tree)]
            if p % 2:
                order.reverse()
            r = {name: run(tree, g, a.tokens) for name, tree in order}
            pairs.append(r)
        ratio = statistics.median(r["before"]["fast_ms"] / r["after"]["fast_ms"] for r in pairs)
        b = " ".join(f"{r['before']['fast_ms']:.2f}" for r in pairs)
        f = " ".join(f"{r['after']['fast_ms']:.2f}" for r in pairs)
        print(f"| {g.name} | {b} | {f} | speed {ratio:.2f}x |", flush=True)
        results.append({"file": str(g), "pairs": pairs, "speed_after_over_before": ratio})
    if a.out:
        a.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
