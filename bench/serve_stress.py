#!/usr/bin/env python
"""Stress ``torchless serve``: N requests from C concurrent clients, some cancelled at random,
every completed one checked against the same request made alone.

    python bench/serve_stress.py MODEL [--requests 500] [--clients 16] [--cancel 0.25]
        [--parallel 8] [--threads 2] [--seed 0]

The server starts on 127.0.0.1 (a free port) and is stopped at the end. First each distinct
request (prompt x endpoint x greedy-or-seeded sampling, its own max_tokens) runs alone, one
at a time, for its reference text. Then the clients draw requests at random (streaming or
not), cancel a fraction after a random delay (closing the connection), and compare every
finished text, finish_reason and token count with the reference. A request is *lost* when it
errs, hangs past the timeout or ends without its final event; *corrupted* when its result
differs. Exit status 1 if any request was lost or corrupted or a slot stayed busy.
"""
import argparse
import asyncio
import contextlib
import json
import random
import socket
import subprocess
import sys
import time

import httpx

TOPICS = ["rivers", "engines", "violins", "glaciers", "lanterns", "comets", "marbles", "owls",
          "bridges", "tides", "kites", "ferns"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_specs(rng, n_tokens):
    specs = []
    for i, topic in enumerate(TOPICS):
        for chat in (True, False):
            for seeded in (False, True):
                body = {"max_tokens": rng.randint(2, n_tokens), "temperature": 0}
                if seeded:
                    body.update(temperature=0.8, top_p=0.95, seed=1000 + i)
                if chat:
                    body["messages"] = [{"role": "user", "content": f"Tell me about {topic}."}]
                else:
                    body["prompt"] = f"A short note on {topic}:"
                specs.append(("/v1/chat/completions" if chat else "/v1/completions", body))
    return specs


async def call(client, base, path, body, stream):
    """Returns (text, finish_reason, completion_tokens)."""
    if not stream:
        r = await client.post(base + path, json=body)
        r.raise_for_status()
        d = r.json()
        ch = d["choices"][0]
        text = ch["message"]["content"] if "message" in ch else ch["text"]
        return text, ch["finish_reason"], d["usage"]["completion_tokens"]
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    pieces, finish, usage, done = [], None, None, False
    async with client.stream("POST", base + path, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            d = json.loads(line[6:])
            if "error" in d:
                raise RuntimeError(d["error"]["message"])
            for ch in d.get("choices") or []:
                pieces.append((ch.get("delta") or {}).get("content") or ch.get("text") or "")
                finish = ch.get("finish_reason") or finish
            if d.get("usage"):
                usage = d["usage"]["completion_tokens"]
    if not done or usage is None:
        raise RuntimeError("stream ended without its final event")
    return "".join(pieces), finish, usage


async def run(args, base):
    rng = random.Random(args.seed)
    specs = make_specs(rng, args.max_tokens)
    async with httpx.AsyncClient(timeout=args.timeout) as client:
        refs = [await call(client, base, p, b, False) for p, b in specs]
        print(f"{len(specs)} references made alone", flush=True)
        jobs = asyncio.Queue()
        for i in range(args.requests):
            jobs.put_nowait((rng.randrange(len(specs)), rng.random() < 0.5,
                             rng.random() < args.cancel, rng.uniform(0, args.cancel_delay)))
        tally = {"ok": 0, "cancelled": 0, "lost": 0, "corrupted": 0}
        problems = []

        async def worker():
            while not jobs.empty():
                k, stream, cancel, delay = jobs.get_nowait()
                path, body = specs[k]
                task = asyncio.ensure_future(call(client, base, path, body, stream))
                try:
                    if cancel:
                        done, _ = await asyncio.wait({task}, timeout=delay)
                        if not done:
                            task.cancel()
                            with contextlib.suppress(asyncio.CancelledError, Exception):
                                await task
                            tally["cancelled"] += 1
                            continue
                    got = await task
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    tally["lost"] += 1
                    problems.append(f"lost: spec {k} stream={stream}: {exc!r}")
                    continue
                if got == refs[k]:
                    tally["ok"] += 1
                else:
                    tally["corrupted"] += 1
                    problems.append(f"corrupted: spec {k} stream={stream}: {got!r} != "
                                    f"{refs[k]!r}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.clients)))
        wall = time.perf_counter() - t0
        await asyncio.sleep(0.5)
        health = (await client.get(base + "/health")).json()
    return tally, problems, wall, health


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--cancel", type=float, default=0.25, help="fraction cancelled")
    ap.add_argument("--cancel-delay", type=float, default=0.5, help="max seconds before")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "torchless.cli", "serve", args.model, "--port", str(port),
           "--parallel", str(args.parallel), "--threads", str(args.threads), "--ctx", "512",
           "--queue", str(4 * args.clients)]
    proc = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("server did not start")
            time.sleep(0.3)
        tally, problems, wall, health = asyncio.run(run(args, base))
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    for p in problems[:20]:
        print(p)
    idle = health["slots_processing"] == 0 and health["queued"] == 0
    print(f"{args.requests} requests from {args.clients} clients in {wall:.1f} s: {tally}; "
          f"slots idle after: {idle} ({health})")
    sys.exit(0 if idle and not tally["lost"] and not tally["corrupted"] else 1)


if __name__ == "__main__":
    main()
