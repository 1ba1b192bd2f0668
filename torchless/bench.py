"""``torchless bench``: load time, time to first token, prefill and decode speed, peak memory,
and decode speed as a fraction of this machine's memory-bandwidth ceiling.

Decoding one token reads every weight once, so tokens/s can be at most
``bandwidth / bytes_read_per_token``; the bandwidth is measured here, by the same kind of
Numba loop the kernels use, reading a buffer much larger than the caches.

``decode_tokens_per_s`` decodes after the ``prompt_tokens`` prompt (attention then also reads
that much KV cache per step); ``decode_depth0_tokens_per_s`` decodes from an empty cache, as
llama-bench's ``tg`` test does by default.
"""
from __future__ import annotations

import os
import time

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True, fastmath=True)
def _row_sums(a, out):
    for r in prange(a.shape[0]):
        s = np.float32(0.0)
        for c in range(a.shape[1]):
            s += a[r, c]
        out[r] = s


def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Sustained read bandwidth in bytes/s: the best of ``repeats`` passes of a parallel,
    vectorised row-sum over ``nbytes`` (far larger than any cache)."""
    a = np.ones((nbytes // 4 // 4096, 4096), dtype=np.float32)
    out = np.zeros(a.shape[0], dtype=np.float32)
    _row_sums(a, out)  # compile and fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        _row_sums(a, out)
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _sig(x: float) -> float:
    """Four significant digits (a tiny model's times must not round to zero)."""
    return float(f"{x:.4g}")


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def bytes_per_token(model) -> int:
    """Weight bytes one decode step reads: every layer weight, the output matrix, one
    embedding row. Of a mixture of experts only the active weights: the router and ``top_k``
    experts' worth of each expert tensor (all experts of a projection have one size)."""
    from .weights import Experts

    moe = model.config.moe
    total = 0
    for layer in model.layers:
        for w in layer.w.values():
            if isinstance(w, Experts):
                total += w.nbytes * moe.top_k // moe.num_experts
            else:
                total += w.nbytes
    total += model.output.nbytes
    total += model.embed.nbytes // max(model.embed.rows, 1)
    return total


def _all_weight_bytes(model) -> int:
    total = sum(w.nbytes for layer in model.layers for w in layer.w.values())
    return total + model.output.nbytes + (model.embed.nbytes if model.embed is not model.output
                                          else 0)


def _decode_time(model, state, tok: int, n: int) -> float:
    """Seconds for ``n`` greedy decode steps after one untimed warm-up step."""
    model.fast_forward(state, tok)
    tok = int(np.argmax(state.logits))
    t0 = time.perf_counter()
    for _ in range(n):
        model.fast_forward(state, tok)
        tok = int(np.argmax(state.logits))
    return time.perf_counter() - t0


def run_bench(model_path=None, prompt_tokens: int = 512, new_tokens: int = 128,
              threads: int | None = None, quantize: str | None = None, lazy: bool = False,
              bandwidth: float | None = None, act_quant: bool | None = None,
              prefill_repeats: int = 3, numerics: str = "torchless") -> dict:
    from .loader import ModelLoader
    from .threads import set_num_threads

    n_threads = set_num_threads(threads)
    if model_path is None:
        from .demo import default_model_path

        model_path = default_model_path()
    t0 = time.perf_counter()
    model = ModelLoader.load_auto(model_path, lazy=lazy, quantize=quantize,
                                  act_quant=act_quant, numerics=numerics)
    load_s = time.perf_counter() - t0
    rss_after_load = current_rss_mb()
    V = model.config.vocab_size
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, V, prompt_tokens)]

    # time to first token: a short prompt in a fresh state (kernels compiled or cached)
    t0 = time.perf_counter()
    state = model.new_state()
    model.prefill(state, prompt[:20])
    first_token_s = time.perf_counter() - t0

    # prefill: one untimed pass, then the mean of ``prefill_repeats`` (as llama-bench does)
    times = []
    for _ in range(1 + prefill_repeats):
        state = model.new_state()
        t0 = time.perf_counter()
        logits = model.prefill(state, prompt)
        times.append(time.perf_counter() - t0)
    prefill_s = float(np.mean(times[1:]))

    decode_s = _decode_time(model, state, int(np.argmax(logits)), new_tokens)
    # llama-bench's "tg" test decodes from an empty cache; the same here, so both depths
    # can be compared like for like (attention reads the whole cache at every step)
    state = model.new_state()
    model.prefill(state, prompt[:1])
    decode0_s = _decode_time(model, state, int(np.argmax(state.logits)), new_tokens)

    peak = peak_rss_mb()  # before the bandwidth probe allocates its buffer
    bw = bandwidth if bandwidth is not None else measure_bandwidth()
    decode_tps = new_tokens / decode_s
    per_token = bytes_per_token(model)
    return {
        "model": str(model_path),
        "architecture": model.config.variant,
        "weights": quantize or sorted({w.kind for L in model.layers for w in L.w.values()}),
        "threads": n_threads,
        "act_quant": model.act_quant,
        "numerics": model.numerics,
        "load_s": _sig(load_s),
        "first_token_s": _sig(first_token_s),
        "prefill_tokens_per_s": round(prompt_tokens / prefill_s, 2),
        "decode_tokens_per_s": round(decode_tps, 2),
        "decode_depth0_tokens_per_s": round(new_tokens / decode0_s, 2),
        "peak_rss_mb": round(peak, 1),
        "rss_after_load_mb": round(rss_after_load, 1),
        "bandwidth_gb_s": round(bw / 1e9, 2),
        "bytes_per_token_mb": round(per_token / 1e6, 2),
        "weight_bytes_mb": round(_all_weight_bytes(model) / 1e6, 2),
        "ceiling_tokens_per_s": round(bw / per_token, 2),
        "ceiling_fraction": _sig(decode_tps * per_token / bw),
        "pid": os.getpid(),
    }
