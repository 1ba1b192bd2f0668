"""Sampling and the generation loop shared by ``generate``, ``stream`` and the CLI."""
from __future__ import annotations

import numpy as np

from .errors import TorchlessError


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
           history=(), repetition_penalty: float = 1.0) -> int:
    """Pick the next id: greedy at temperature 0, else softmax sampling after the filters.

    Filter order follows transformers: repetition penalty, temperature, top-k, top-p, min-p.
    """
    logits = np.array(logits, dtype=np.float64)
    if repetition_penalty != 1.0 and len(history):
        idx = np.unique(np.asarray(history, dtype=np.int64))
        vals = logits[idx]
        logits[idx] = np.where(vals > 0, vals / repetition_penalty, vals * repetition_penalty)
    if not temperature or temperature <= 0:
        return int(np.argmax(logits))
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size:
        kth = np.partition(logits, -top_k)[-top_k]
        logits[logits < kth] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p is not None and 0 < top_p < 1:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        cut = np.searchsorted(cum, top_p) + 1  # keep the smallest prefix reaching top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[:cut]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    if min_p is not None and min_p > 0:
        probs = np.where(probs >= min_p * probs.max(), probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


def generate_ids(model, prompt, max_new_tokens, temperature, top_k, top_p, min_p,
                 repetition_penalty, seed, stop, state, ignore_eos, want_text=False):
    """Yield ``(token_id, text_piece)`` for each new token."""
    from .tokenizer import StreamDecoder

    if isinstance(prompt, str):
        ids = model.encode(prompt)
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise TorchlessError("the prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    need_text = want_text or bool(stops)
    if need_text:
        model._tok()
    state = state if state is not None else model.new_state()
    rng = np.random.default_rng(seed)
    eos = set(model.config.eos_token_ids) if not ignore_eos else set()
    if max_new_tokens == 0:
        return
    logits = model.prefill(state, ids)
    history = list(ids)
    decoder = StreamDecoder(model.tokenizer, ids) if need_text else None
    text, shown = "", 0  # all decoded text; how much of it has been yielded
    for n in range(max_new_tokens):
        tok = sample(logits, rng, temperature, top_k, top_p, min_p, history, repetition_penalty)
        history.append(tok)
        if decoder is not None and tok not in eos:
            text += decoder.push(tok)
        if stops:
            hits = [text.find(s) for s in stops if s in text]
            if hits:
                yield tok, text[shown:min(hits)]
                return
            # hold back a tail that could still become a stop string
            hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])),
                       default=0)
            safe = len(text) - hold
        else:
            safe = len(text)
        yield tok, text[shown:safe]
        shown = max(shown, safe)
        if tok in eos or n == max_new_tokens - 1:
            break
        logits = model.fast_forward(state, tok)
    if decoder is not None:
        text += decoder.flush()
        if len(text) > shown:
            yield None, text[shown:]
