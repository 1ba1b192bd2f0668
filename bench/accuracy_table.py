#!/usr/bin/env python
"""Perplexity and KL divergence of every weight kind, torchless beside llama-perplexity.

    python bench/accuracy_table.py --set llama134m --llama-perplexity <build>/bin/llama-perplexity \
        [--text tests/data/devils_dictionary.txt] [--ctx 512] [--chunks 4] \
        [--work /work/peer/ppl/run] [--out bench/results_accuracy_llama134m.json]
    python bench/accuracy_table.py --set gemma3 --gemma-dir /work/peer/ppl/gemma ...

``--set llama134m``: the float model is the HF float32 checkpoint ``/work/peer/llama134m``
(``--hf``); its GGUF copies are ``/work/peer/llama134m-<fmt>.gguf`` (``--gguf-dir``);
torchless also quantizes the float32 checkpoint to q8_0/q4_0 on load.
``--set gemma3``: only Gemma 3 270M's Q4_K_M file exists offline, so the float model is that
file dequantized to F32 (``llama-quantize --allow-requantize gemma-3-270m-q4_k_m.gguf
gemma-f32.gguf F32``) and the other kinds are requantized from it (``llama-quantize
gemma-f32.gguf gemma-<fmt>.gguf <FMT>``), all in ``--gemma-dir``; the original Q4_K_M file is
a row of its own.

The base: torchless's log-probabilities of the float model, written in llama-perplexity's
``--kl-divergence-base`` format, so that both engines score every file against the same
base (``torchless perplexity --kl-divergence`` and ``llama-perplexity --kl-divergence``).
Two cross-engine rows compare the float models themselves: torchless against llama.cpp's
own base of the float GGUF, and llama.cpp against torchless's.

llama-perplexity runs with ``-b CTX`` (one window per batch), ``-fa off`` and its default
float16 KV cache; torchless with its default numerics and, where the model's kinds are
covered, ``numerics="llama.cpp"``. Rows whose weight kind an engine cannot load read "—".
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA_GGUF = ["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_1", "q5_0", "q4_k_m", "q4_1",
              "q4_0", "iq4_xs", "iq4_nl", "q3_k_m", "q2_k", "tq2_0", "tq1_0"]
COLS = ["torchless (torchless)", "torchless (llama.cpp)", "torchless (float activations)"]
GEMMA_GGUF = ["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_0"]


def torchless_row(path, quantize, numerics, text, ctx, chunks, base, save=None,
                  act_quant=None):
    import torchless
    from torchless.perplexity import perplexity

    try:
        m = torchless.ModelLoader.load_auto(str(path), quantize=quantize, numerics=numerics,
                                            act_quant=act_quant)
        if act_quant is False and not any(
                w.kind not in ("f32", "f16", "bf16") for layer in m.layers
                for w in layer.w.values()):
            return {"error": "float weights (no activation quantization to turn off)"}
    except torchless.TorchlessError as e:
        return {"error": str(e).splitlines()[0][:200]}
    r = perplexity(m, None if base else text, ctx=ctx, chunks=chunks, kl_divergence=base,
                   save_logits=save)
    return r.to_dict()



def exit_delay_env(env: dict) -> dict:
    """``env`` with LD_PRELOAD of bench/exit_delay.c, built once with the system's C compiler:
    llama.cpp's logger thread otherwise often loses llama-perplexity's last lines at exit."""
    so = Path(tempfile.gettempdir()) / "torchless_exit_delay.so"
    if not so.exists():
        src = Path(__file__).resolve().parent.parent / "bench" / "exit_delay.c"
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(so), str(src)], check=True)
    return dict(env, LD_PRELOAD=str(so))


NUM = r"(-?[0-9.]+(?:e[-+]?[0-9]+)?|nan|-nan|inf)"


def llama_row(binary, gguf, text, ctx, threads, base=None, save=None, chunks=None):
    cmd = [binary, "-m", str(gguf), "-f", str(text), "-c", str(ctx), "-b", str(ctx),
           "-t", str(threads), "-fa", "off"]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    if base:
        cmd += ["--kl-divergence-base", str(base), "--kl-divergence"]
    elif save:
        cmd += ["--kl-divergence-base", str(save)]
    env = exit_delay_env(dict(os.environ, LD_LIBRARY_PATH=str(Path(binary).parent)))
    want = "Same top p" if base else "Final estimate"
    for _ in range(3):  # llama.cpp's asynchronous logger sometimes loses the last lines at exit
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        out = p.stdout + p.stderr
        if p.returncode == 0 and want in out:
            break
    else:
        tail = [ln for ln in out.splitlines() if ln.strip()][-3:]
        return {"error": " | ".join(tail)[:300]}

    def grab(label):
        m = re.search(re.escape(label) + r"\s*:\s*" + NUM, out)
        return float(m.group(1)) if m else None

    res = {"seconds": time.perf_counter() - t}
    if base:
        res.update(ppl=grab("Mean PPL(Q)"), ppl_base=grab("Mean PPL(base)"),
                   ln_ppl_ratio=grab("Mean ln(PPL(Q)/PPL(base))"),
                   ppl_diff=grab("Mean PPL(Q)-PPL(base)"), kld_mean=grab("Mean    KLD"),
                   kld_median=grab("Median  KLD"), kld_p99=grab("99.0%   KLD"),
                   same_top=grab("Same top p"))
    else:
        m = re.search(r"Final estimate: PPL = " + NUM + r" \+/- " + NUM, out)
        res.update(ppl=float(m.group(1)), ppl_uncertainty=float(m.group(2)))
    return res


def flat_torchless(r):
    if "error" in r:
        return r
    k = r.get("kld") or {}
    return {"ppl": r["ppl"], "ppl_base": k.get("ppl_base"), "ln_ppl_ratio": k.get("ln_ppl_ratio"),
            "ppl_diff": k.get("ppl_diff"), "kld_mean": k.get("mean"),
            "kld_median": k.get("median"), "kld_p99": k.get("p99"),
            "same_top": None if not k else 100 * k["same_top"], "seconds": r["seconds"]}


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


def cell(r, key, spec):
    if r is None:
        return "—"
    if "error" in r:
        return "—"
    return fmt(r.get(key), spec)


def markdown(rows, numerics_cols):
    """One line per engine and weight kind; the last column: torchless's mean KLD against
    llama.cpp's on the same file (the target: ≤)."""
    head = ["weights", "engine", "PPL", "Δppl", "mean KLD", "median KLD", "p99 KLD",
            "same top %", "KLD ≤ llama.cpp's"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lc = row["results"].get("llama.cpp")
        lk = None if not lc or "error" in lc else lc.get("kld_mean")
        for eng, r in row["results"].items():
            if eng not in numerics_cols and eng != "llama.cpp":
                continue
            if (r is None or "error" in r) and eng in COLS[1:]:
                continue  # kinds llama.cpp numerics do not cover; float weights
            verdict = ""
            if eng != "llama.cpp" and r and "error" not in r and lk is not None:
                tk = r.get("kld_mean")
                # llama-perplexity prints 6 decimals: compare at that precision
                verdict = "yes" if round(tk, 6) <= lk else f"no ({tk / lk:.2f}×)"
            name = {"torchless (torchless)": "torchless",
                    "torchless (llama.cpp)": "torchless, numerics=llama.cpp",
                    "torchless (float activations)": "torchless, float activations",
                    }.get(eng, eng)
            out.append("| " + " | ".join([
                row["label"], name, cell(r, "ppl", ".2f"), cell(r, "ppl_diff", "+.2f"),
                cell(r, "kld_mean", ".6f"), cell(r, "kld_median", ".6f"),
                cell(r, "kld_p99", ".6f"), cell(r, "same_top", ".2f"), verdict]) + " |")
    return "\n".join(out)


def render(path) -> str:
    """The Markdown table of a results file (``--render FILE``)."""
    doc = json.loads(Path(path).read_text())
    return markdown(doc["rows"], COLS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--render":
        print(render(sys.argv[2]))
        return 0
    ap.add_argument("--set", choices=["llama134m", "gemma3"], required=True)
    ap.add_argument("--llama-perplexity", required=True)
    ap.add_argument("--text", type=Path, default=ROOT / "tests/data/devils_dictionary.txt")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hf", type=Path, default=Path("/work/peer/llama134m"))
    ap.add_argument("--gguf-dir", type=Path, default=Path("/work/peer"))
    ap.add_argument("--gemma-dir", type=Path, default=Path("/work/peer/ppl/gemma"))
    ap.add_argument("--gemma-q4km", type=Path, default=None,
                    help="the original Gemma 3 270M Q4_K_M file (default: the pip package's)")
    ap.add_argument("--work", type=Path, default=Path("/work/peer/ppl/run"))
    ap.add_argument("--only", default=None, help="comma-separated row labels to run")
    ap.add_argument("--float-act", action="store_true",
                    help="also torchless with float32 activations (act_quant=False)")
    ap.add_argument("--float-act-only", action="store_true",
                    help="with an earlier --out: only add the float-activation results")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)

    import torchless

    torchless.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    text = a.text.read_text(encoding="utf-8")
    if a.set == "llama134m":
        float_model, float_gguf = a.hf, a.gguf_dir / "llama134m-f32.gguf"
        g = {f: a.gguf_dir / f"llama134m-{f}.gguf" for f in LLAMA_GGUF}
        rows = [("f32 (HF safetensors)", a.hf, None, None),
                ("q8_0 on load", a.hf, "q8_0", g["q8_0"]),
                ("q4_0 on load", a.hf, "q4_0", g["q4_0"])]
        rows += [(f"GGUF {f.upper()}", g[f], None, g[f]) for f in LLAMA_GGUF]
    else:
        from torchless.demo import default_model_path

        float_model = float_gguf = a.gemma_dir / "gemma-f32.gguf"
        q4km = a.gemma_q4km or Path(default_model_path())
        g = {f: a.gemma_dir / f"gemma-{f}.gguf" for f in GEMMA_GGUF}
        rows = [("original Q4_K_M file", q4km, None, q4km),
                ("q8_0 on load", float_model, "q8_0", g["q8_0"]),
                ("q4_0 on load", float_model, "q4_0", g["q4_0"])]
        rows += [(f"GGUF {f.upper()}", g[f], None, g[f]) for f in GEMMA_GGUF]
    rows = [r for r in rows if r[0].startswith("q") or Path(r[1]).exists()]
    all_rows = list(rows)
    if a.only:
        keep = set(a.only.split(","))
        rows = [r for r in rows if r[0] in keep]

    base = a.work / f"{a.set}-torchless-base.kld"
    llama_base = a.work / f"{a.set}-llamacpp-base.kld"
    old = json.loads(a.out.read_text()) if a.out and a.out.exists() else None
    if old and base.exists() and (old["ctx"], old["chunks"]) == (a.ctx, a.chunks):
        # add or redo rows of an earlier run against its base (same text, ctx and chunks)
        results = [r for r in old["rows"] if r["label"] not in {x[0] for x in rows}]
        prev = {r["label"]: r for r in old["rows"]}
        doc = dict(old)
        for row in rows:
            if a.float_act_only and row[0] in prev:  # keep the row, add float activations
                r = prev[row[0]]
                r["results"]["torchless (float activations)"] = flat_torchless(torchless_row(
                    row[1], row[2], "torchless", text, a.ctx, a.chunks, base,
                    act_quant=False))
                results.append(r)
            else:
                results.append(run_row(a, text, base, *row))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        order = {r[0]: i for i, r in enumerate(all_rows)}
        doc["rows"] = sorted(results, key=lambda r: order.get(r["label"], 1e9))
        finish(a, doc)
        return 0
    print(f"# base: torchless on {float_model}", file=sys.stderr, flush=True)
    base_run = torchless_row(float_model, None, "torchless", text, a.ctx, a.chunks, None,
                             save=base)
    print(f"# llama.cpp base on {float_gguf}", file=sys.stderr, flush=True)
    llama_base_run = llama_row(a.llama_perplexity, float_gguf, a.text, a.ctx, a.threads,
                               save=llama_base, chunks=a.chunks)
    cross = {
        "torchless float vs llama.cpp F32 base": flat_torchless(torchless_row(
            float_model, None, "torchless", text, a.ctx, a.chunks, llama_base)),
        "llama.cpp F32 vs torchless base": llama_row(a.llama_perplexity, float_gguf, a.text,
                                                     a.ctx, a.threads, base=base),
    }
    print(json.dumps(cross), file=sys.stderr, flush=True)
    results = []
    for row in rows:
        results.append(run_row(a, text, base, *row))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    doc = {"set": a.set, "ctx": a.ctx, "chunks": a.chunks, "text": str(a.text),
           "base": base_run, "llama_base": llama_base_run, "cross": cross, "rows": results}
    finish(a, doc)
    return 0


def run_row(a, text, base, label, path, quantize, llama_path):
    """One weight kind: torchless (each numerics mode that applies) and llama.cpp on
    ``llama_path`` (for the on-load kinds: llama.cpp's file of the same kind)."""
    res = {}
    for numerics in ("torchless", "llama.cpp"):
        if numerics == "llama.cpp" and (a.set != "gemma3" or quantize):
            continue
        res[f"torchless ({numerics})"] = flat_torchless(torchless_row(
            path, quantize, numerics, text, a.ctx, a.chunks, base))
    if a.float_act:
        res["torchless (float activations)"] = flat_torchless(torchless_row(
            path, quantize, "torchless", text, a.ctx, a.chunks, base, act_quant=False))
    ok = llama_path is not None and Path(llama_path).exists() and Path(llama_path).is_file()
    res["llama.cpp"] = (llama_row(a.llama_perplexity, llama_path, a.text, a.ctx, a.threads,
                                  base=base) if ok else None)
    return {"label": label, "path": str(path), "quantize": quantize, "results": res}


def finish(a, doc) -> None:
    print(markdown(doc["rows"], COLS))
    if a.out:
        a.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
