#!/usr/bin/env python
"""Measure torchless beside llama.cpp and transformers on the same weights, in one run.

    python bench/compare_peers.py --hf DIR --gguf-dir DIR --llama-bench PATH [--threads 2]
                                  [--rounds 2] [--prompt-tokens 512] [--new-tokens 128]
                                  [--out bench/results.json]

``--hf`` is a float32 Hugging Face checkpoint (e.g. the one ``bench/make_bench_model.py``
writes); a bfloat16 copy is written next to it on first use. ``--gguf-dir`` holds the same
weights converted with llama.cpp's ``convert_hf_to_gguf.py`` (``<name>-f32.gguf``,
``-f16.gguf``, ``-q8_0.gguf``) and ``llama-quantize`` (``-q4_k_m.gguf``). ``--llama-bench``
is a llama-bench binary built for measurement only from the llama.cpp sources in PyPI's
``llama-cpp-python`` sdist. transformers comes from the ``reference`` extra.

Decode is measured at two depths: after the ``--prompt-tokens`` prompt (torchless's
``decode_tokens_per_s``; llama-bench ``-d P``) and from an empty cache (llama-bench's default
``tg`` test; torchless's ``decode_depth0_tokens_per_s``), so each pair compares like with like.

Every engine runs in its own process, engines alternate round by round (so drift in machine
load affects all of them alike), and the best round of each is kept. The result is a JSON
file and a Markdown table of tokens/s and ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

TRANSFORMERS_SNIPPET = r"""
import json, sys, time, torch
from transformers import AutoModelForCausalLM
path, dtype, threads, P, N = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
m = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
m.eval()
V = m.config.vocab_size
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, V, (1, P), generator=g)
def decode(out, n):
    cache = out.past_key_values
    tok = out.logits[:, -1:].argmax(-1)
    out = m(tok, past_key_values=cache, use_cache=True)  # warm
    cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t = time.perf_counter()
    for _ in range(n):
        out = m(tok, past_key_values=cache, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - t
with torch.inference_mode():
    m(ids[:, :16])
    t = time.perf_counter(); out = m(ids, use_cache=True); pre = time.perf_counter() - t
    dec = decode(out, N)
    dec0 = decode(m(ids[:, :1], use_cache=True), N)
print(json.dumps({"prefill_tokens_per_s": P / pre, "decode_tokens_per_s": N / dec,
                  "decode_depth0_tokens_per_s": N / dec0}))
"""


def run_json(cmd, env=None) -> dict:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def bf16_copy(hf: Path) -> Path:
    """A bfloat16 copy of the checkpoint (written once, with transformers)."""
    out = hf.parent / (hf.name + "-bf16")
    if (out / "model.safetensors").exists():
        return out
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(hf, dtype=torch.bfloat16).save_pretrained(out)
    for f in hf.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    return out


def torchless_run(path, threads, P, N, quantize=None, act_quant=None) -> dict:
    """``torchless bench`` in a fresh process; ``act_quant`` None keeps its default (8-bit
    activations for quantized weights), False asks for float32 activations."""
    cmd = [sys.executable, "-m", "torchless.cli", "bench", str(path), "--prompt-tokens", str(P),
           "--new-tokens", str(N), "--threads", str(threads), "--json"]
    if quantize:
        cmd += ["--quantize", quantize]
    if act_quant is not None:
        cmd += ["--act-quant" if act_quant else "--no-act-quant"]
    return run_json(cmd)


def llama_bench_run(binary, gguf, threads, P, N) -> dict:
    """pp``P`` and tg``N`` from an empty cache (llama-bench's defaults), then tg``N`` at depth
    ``P`` (``-d``), which is what torchless's and transformers' decode numbers measure."""
    out = {}
    for depth, args in ((0, ["-p", str(P), "-n", str(N)]), (P, ["-p", "0", "-n", str(N)])):
        res = subprocess.run([binary, "-m", str(gguf), "-t", str(threads), *args, "-d",
                              str(depth), "-r", "3", "-o", "json"], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"llama-bench failed on {gguf}:\n{res.stderr[-2000:]}")
        for r in json.loads(res.stdout):
            if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0:
                out["prefill_tokens_per_s"] = r["avg_ts"]
            elif r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0:
                key = "decode_tokens_per_s" if depth else "decode_depth0_tokens_per_s"
                out[key] = r["avg_ts"]
    return out


def transformers_run(hf, dtype, threads, P, N, python=None) -> dict:
    return run_json([python or sys.executable, "-c", TRANSFORMERS_SNIPPET, str(hf), dtype, str(threads),
                     str(P), str(N)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hf", required=True, type=Path)
    ap.add_argument("--gguf-dir", required=True, type=Path)
    ap.add_argument("--gguf-stem", default=None, help="file stem (default: the --hf folder name)")
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--transformers-python", default=None,
                    help="the Python that has torch + transformers (default: this one)")
    ap.add_argument("--out", type=Path, default=Path("bench/results.json"))
    ap.add_argument("--engines", default=None,
                    help="comma-separated engine names to run (default: all), e.g. "
                         "'torchless f32,llama.cpp F32'")
    a = ap.parse_args(argv)
    stem = a.gguf_stem or a.hf.name
    P, N, T = a.prompt_tokens, a.new_tokens, a.threads
    bf16 = bf16_copy(a.hf)
    engines = {
        "torchless f32": lambda: torchless_run(a.hf, T, P, N),
        "torchless bf16": lambda: torchless_run(bf16, T, P, N),
        "torchless q8_0": lambda: torchless_run(a.hf, T, P, N, "q8_0"),
        "torchless q4_0": lambda: torchless_run(a.hf, T, P, N, "q4_0"),
        "torchless q8_0 float-act": lambda: torchless_run(a.hf, T, P, N, "q8_0", False),
        "torchless q4_0 float-act": lambda: torchless_run(a.hf, T, P, N, "q4_0", False),
        "llama.cpp F32": lambda: llama_bench_run(a.llama_bench, a.gguf_dir / f"{stem}-f32.gguf", T, P, N),
        "llama.cpp F16": lambda: llama_bench_run(a.llama_bench, a.gguf_dir / f"{stem}-f16.gguf", T, P, N),
        "llama.cpp Q8_0": lambda: llama_bench_run(a.llama_bench, a.gguf_dir / f"{stem}-q8_0.gguf", T, P, N),
        "llama.cpp Q4_K_M": lambda: llama_bench_run(a.llama_bench, a.gguf_dir / f"{stem}-q4_k_m.gguf", T, P, N),
    }
    if not a.skip_transformers:
        engines["transformers float32"] = lambda: transformers_run(a.hf, "float32", T, P, N,
                                                                          a.transformers_python)
        engines["transformers bfloat16"] = lambda: transformers_run(a.hf, "bfloat16", T, P, N,
                                                                           a.transformers_python)
    if a.engines:
        wanted = [e.strip() for e in a.engines.split(",")]
        unknown = [e for e in wanted if e not in engines]
        if unknown:
            ap.error(f"unknown engine(s) {unknown}; known: {sorted(engines)}")
        engines = {k: v for k, v in engines.items() if k in wanted}
    best: dict = {}
    rounds: dict = {}
    for r in range(a.rounds):
        for name, fn in engines.items():
            if name.startswith("llama.cpp") and not (a.gguf_dir / f"{stem}-{name.split()[1].lower()}.gguf").exists():
                continue
            t = time.time()
            res = fn()
            print(f"round {r} {name:24s} {json.dumps(res)} ({time.time() - t:.0f}s)", flush=True)
            rounds.setdefault(name, []).append(res)
            b = best.setdefault(name, dict(res))
            for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_depth0_tokens_per_s"):
                if k in res:
                    b[k] = max(b.get(k, 0), res[k])
            for k in ("ceiling_fraction", "first_token_s", "peak_rss_mb", "bandwidth_gb_s"):
                if k in res:
                    b[k] = res[k] if k != "ceiling_fraction" else max(b.get(k, 0), res[k])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"threads": T, "prompt_tokens": P, "new_tokens": N,
                                 "results": best, "rounds": rounds}, indent=2))
    pairs = [("torchless f32", "llama.cpp F32"), ("torchless bf16", "llama.cpp F16"),
             ("torchless q8_0", "llama.cpp Q8_0"), ("torchless q4_0", "llama.cpp Q4_K_M"),
             ("torchless q8_0 float-act", "llama.cpp Q8_0"),
             ("torchless q4_0 float-act", "llama.cpp Q4_K_M"),
             ("torchless f32", "transformers float32")]
    keys = ("decode_tokens_per_s", "decode_depth0_tokens_per_s", "prefill_tokens_per_s")
    print(f"\n| engine | decode tok/s at depth {P} | decode tok/s at depth 0 | prefill {P} tok/s |"
          "\n|---|---|---|---|")
    for name, b in best.items():
        print(f"| {name} | " + " | ".join(f"{b.get(k, 0):.1f}" for k in keys) + " |")
    print(f"\n| ratio | decode at depth {P} | decode at depth 0 | prefill |\n|---|---|---|---|")
    for x, y in pairs:
        if x in best and y in best:
            r = [best[x].get(k, 0) / best[y][k] if best[y].get(k) else float("nan") for k in keys]
            print(f"| {x} / {y} | " + " | ".join(f"{v:.2f}" for v in r) + " |")
    # the same pairs round by round (each round runs both engines back to back), and the
    # median of those ratios: less sensitive to one lucky or unlucky run than best-of
    print(f"\n| ratio, round by round (median) | decode at depth {P} | decode at depth 0 | prefill |"
          "\n|---|---|---|---|")
    for x, y in pairs:
        if x in rounds and y in rounds:
            cells = []
            for k in keys:
                rs = [rx.get(k, 0) / ry[k] for rx, ry in zip(rounds[x], rounds[y]) if ry.get(k)]
                cells.append(" ".join(f"{v:.2f}" for v in rs)
                             + (f" ({statistics.median(rs):.2f})" if rs else ""))
            print(f"| {x} / {y} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
