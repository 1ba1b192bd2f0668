#!/usr/bin/env python
"""``torchless serve`` beside ``llama-server`` on one GGUF: aggregate decode tokens/s and time
to first token at 1, 2, 4, 8 concurrent streaming clients, plus a second chat turn's time to
first token (the prefix cache). Both servers run at once on 127.0.0.1 with the same slot
count and threads; the engines alternate level by level, round by round.

    python bench/serve_bench.py MODEL.gguf --llama-server /path/to/llama-server \
        [--threads 2] [--levels 1,2,4,8] [--new-tokens 64] [--rounds 3] [--json out.json]

Each client streams ``/v1/completions`` (temperature 0, ``ignore_eos``, its own prompt of
~``--prompt-words`` words). Per level and engine: aggregate decode tokens/s = all tokens
after each client's first / (last token of any client - first token of the earliest one);
TTFT p50/p95 over the clients of all rounds (from sending the request to the first token).
"""
import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

WORDS = ("river mountain lantern quiet engine violet marble harbor orchard comet glacier "
         "velvet copper meadow thunder ember willow canyon silver falcon").split()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt(i, n_words):
    # distinct per client and round from the first word, so no slot shares a prefix
    return " ".join(WORDS[(i * 7 + k * (i % 5 + 1)) % len(WORDS)] for k in range(n_words))


def start(cmd, base, log, timeout=300):
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[0]} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{cmd[0]} did not become healthy")


async def stream_one(client, base, body):
    t0 = time.perf_counter()
    first = last = None
    n = 0
    async with client.stream("POST", base + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            ch = d.get("choices") or []
            if ch and (ch[0].get("text") or ch[0].get("finish_reason") is None):
                now = time.perf_counter()
                first = first or now
                last = now
                n += 1 if ch[0].get("text") else 0
            if d.get("usage"):
                n = d["usage"]["completion_tokens"]
    return t0, first, last, n


async def level(base, c, args, rnd):
    async with httpx.AsyncClient(timeout=600) as client:
        bodies = [{"prompt": prompt(rnd * 100 + c * 10 + i, args.prompt_words),
                   "max_tokens": args.new_tokens, "temperature": 0, "ignore_eos": True,
                   "stream": True, "stream_options": {"include_usage": True}}
                  for i in range(c)]
        res = await asyncio.gather(*(stream_one(client, base, b) for b in bodies))
    t_first = min(r[1] for r in res)
    t_last = max(r[2] for r in res)
    toks = sum(r[3] - 1 for r in res)
    return {"decode_tps": toks / (t_last - t_first), "ttft": [r[1] - r[0] for r in res],
            "tokens": [r[3] for r in res]}


async def chat_turns(base, args):
    """TTFT of a chat's first turn (a long system prompt, nothing cached) and of its second."""
    system = "You are a careful assistant. " + prompt(999, args.system_words)
    msgs = [{"role": "system", "content": system},
            {"role": "user", "content": "Write one line about rivers."}]
    out = []
    async with httpx.AsyncClient(timeout=600) as client:
        for turn in range(2):
            t0 = time.perf_counter()
            first, text = None, []
            body = {"messages": msgs, "max_tokens": 16, "temperature": 0, "stream": True}
            async with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ch = json.loads(line[6:]).get("choices") or []
                    piece = ch[0].get("delta", {}).get("content") if ch else None
                    if piece:
                        first = first or time.perf_counter()
                        text.append(piece)
            out.append((first or time.perf_counter()) - t0)
            msgs = msgs + [{"role": "assistant", "content": "".join(text)},
                           {"role": "user", "content": "And one about mountains."}]
    return out


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levels", default="1,2,4,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--system-words", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ctx", type=int, default=1024, help="per slot")
    ap.add_argument("--json", default=None)
    ap.add_argument("--log-dir", default=None, help="servers' output (default: a temp dir)")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    par = max(levels)
    ports = {"torchless": free_port(), "llama-server": free_port()}
    bases = {k: f"http://127.0.0.1:{p}" for k, p in ports.items()}
    cmds = {
        "torchless": [sys.executable, "-m", "torchless.cli", "serve", args.model, "--port",
                      str(ports["torchless"]), "--parallel", str(par), "--ctx", str(args.ctx),
                      "--threads", str(args.threads), "--model-name", "m"],
        # -c is llama-server's total context, split over its -np slots
        "llama-server": [args.llama_server, "-m", args.model, "--host", "127.0.0.1", "--port",
                         str(ports["llama-server"]), "-np", str(par), "-c",
                         str(args.ctx * par), "-t", str(args.threads), "-tb",
                         str(args.threads), "--cont-batching", "--no-webui"],
    }
    procs = {}
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="serve_bench_")
    print(f"server logs in {log_dir}", flush=True)
    try:
        for name, cmd in cmds.items():
            procs[name] = start(cmd, bases[name], open(os.path.join(log_dir, name + ".log"), "w"))
        print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)
        res = {n: {c: {} for c in levels} for n in cmds}  # engine -> level -> round -> result
        turns = {n: [] for n in cmds}
        for rnd in range(args.rounds):
            for c in levels:
                for name in (cmds if rnd % 2 == 0 else list(cmds)[::-1]):
                    try:
                        r = asyncio.run(level(bases[name], c, args, rnd))
                    except httpx.HTTPError as exc:
                        print(f"round {rnd} c={c} {name}: FAILED {exc!r}", flush=True)
                        continue
                    res[name][c][rnd] = r
                    print(f"round {rnd} c={c} {name:12s} decode {r['decode_tps']:7.1f} tok/s "
                          f"ttft p50 {statistics.median(r['ttft']) * 1e3:7.1f} ms "
                          f"tokens {r['tokens']}", flush=True)
            for name in cmds:
                try:
                    t = asyncio.run(chat_turns(bases[name], args))
                except httpx.HTTPError as exc:
                    print(f"round {rnd} chat {name}: FAILED {exc!r}", flush=True)
                    continue
                turns[name].append(t)
                print(f"round {rnd} chat {name:12s} turn1 {t[0] * 1e3:7.1f} ms turn2 "
                      f"{t[1] * 1e3:7.1f} ms ratio {t[1] / t[0]:.3f}", flush=True)
        print(f"uptime: {os.popen('uptime').read().strip()}")
        summary = {}
        print("\n| clients | engine | decode tok/s (median of rounds) | vs 1 client | "
              "TTFT p50 ms | TTFT p95 ms |")
        print("| --- | --- | --- | --- | --- | --- |")
        for c in levels:
            for name in cmds:
                if not res[name][c] or not res[name][levels[0]]:
                    continue
                tps = statistics.median(r["decode_tps"] for r in res[name][c].values())
                one = statistics.median(r["decode_tps"] for r in res[name][levels[0]].values())
                tt = [x for r in res[name][c].values() for x in r["ttft"]]
                summary.setdefault(name, {})[c] = {
                    "decode_tps": tps, "rounds": {k: r["decode_tps"] for k, r in res[name][c].items()},
                    "ttft_p50": pct(tt, 0.5), "ttft_p95": pct(tt, 0.95)}
                print(f"| {c} | {name} | {tps:.1f} | {tps / one:.2f}x | "
                      f"{pct(tt, 0.5) * 1e3:.0f} | {pct(tt, 0.95) * 1e3:.0f} |")
        for c in levels:
            a, b = res["torchless"][c], res["llama-server"][c]
            ratios = [a[k]["decode_tps"] / b[k]["decode_tps"] for k in sorted(a) if k in b]
            if not ratios:
                continue
            print(f"c={c}: torchless / llama-server decode, per round "
                  f"{[round(x, 2) for x in ratios]}, median {statistics.median(ratios):.2f}")
        for name in cmds:
            if not turns[name]:
                continue
            ratios = [t[1] / t[0] for t in turns[name]]
            print(f"{name}: second chat turn TTFT / first, per round "
                  f"{[round(x, 3) for x in ratios]}, median {statistics.median(ratios):.3f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"summary": summary, "turns": turns}, f, indent=1)
    finally:
        for p in procs.values():
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
