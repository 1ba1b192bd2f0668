#!/usr/bin/env python
"""A bare streaming client for a running server (``torchless serve`` or ``llama-server``): C
concurrent ``/v1/completions`` requests, each a fresh prompt (a random salt, so no prefix is
cached) of about ``--words`` x 7 words, after one warm-up round; prints aggregate decode
tokens/s and each request's time to first token.

    python bench/serve_client.py http://127.0.0.1:8000 C [--words 4] [--tokens 64]
"""
import argparse
import asyncio
import random
import time

import httpx

WORDS = "mountain lantern quiet engine violet marble harbor "


async def one(client, base, i, salt, a):
    body = {"prompt": f"river {i} {salt} " + WORDS * a.words, "max_tokens": a.tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    first = now = None
    n = 0
    async with client.stream("POST", base + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                n += 1
                now = time.perf_counter()
                first = first or now
    return first, now, n, first - t0


async def run(a):
    salt = random.random()
    async with httpx.AsyncClient(timeout=600) as c:
        await asyncio.gather(*(one(c, a.base, i, salt, a) for i in range(a.clients)))
        res = await asyncio.gather(*(one(c, a.base, i + 1000, salt, a)
                                     for i in range(a.clients)))
    f = min(r[0] for r in res)
    last = max(r[1] for r in res)
    print(f"{a.clients} clients: {sum(r[2] - 1 for r in res) / (last - f):.1f} tok/s; "
          f"TTFT ms {sorted(round(r[3] * 1e3) for r in res)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("clients", type=int)
    ap.add_argument("--words", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
