#!/usr/bin/env python
"""The server's scheduler without HTTP: C concurrent requests of 64 greedy tokens submitted
to a ``Scheduler`` in this process, aggregate decode tokens/s (a warm-up round first). The
gap to ``bench/serve_bench.py`` is what the HTTP side and the client process cost.

    python bench/scheduler_inprocess.py MODEL C [--tokens 64]
"""
import argparse
import asyncio
import time

import torchless
from torchless.server.scheduler import Request, SamplingParams, Scheduler


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("clients", type=int)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    m = torchless.ModelLoader.load_auto(a.model)
    sch = Scheduler(m, parallel=max(8, a.clients), ctx=1024)
    sch.start()

    async def one(i, loop):
        q = asyncio.Queue()
        sch.submit(Request([1, 5 + i, 9, 10, 11, 12 + i],
                           SamplingParams(max_tokens=a.tokens, ignore_eos=True), [], loop, q))
        first, n = None, 0
        while True:
            ev = await q.get()
            if ev[0] == "token":
                n += 1
                first = first or time.perf_counter()
            else:
                return first, time.perf_counter(), n

    async def run():
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(one(i, loop) for i in range(a.clients)))
        res = await asyncio.gather(*(one(i + 100, loop) for i in range(a.clients)))
        f = min(r[0] for r in res)
        last = max(r[1] for r in res)
        print(f"{a.clients} clients: {sum(r[2] - 1 for r in res) / (last - f):.1f} tok/s")

    asyncio.run(run())
    sch.stop()


if __name__ == "__main__":
    main()
