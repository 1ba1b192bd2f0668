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
        # the most likely ids in stable descending order, as far as they reach top_p: sort
        # only the k largest (every id tied with the k-th included), growing k as needed;
        # the same prefix as a full stable sort, without sorting a 256k vocabulary per token
        k = min(probs.size, 64)
        while True:
            cand = np.flatnonzero(probs >= np.partition(probs, -k)[-k])  # by index
            order = cand[np.argsort(-probs[cand], kind="stable")]
            cum = np.cumsum(probs[order])
            if cum[-1] >= top_p or k == probs.size:
                break
            k = min(probs.size, 8 * k)
        cut = np.searchsorted(cum, top_p) + 1  # keep the smallest prefix reaching top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[:cut]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    if min_p is not None and min_p > 0:
        probs = np.where(probs >= min_p * probs.max(), probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


class _Sequence:
    """One sequence's sampling and stopping state, shared by ``generate`` and
    ``generate_batch`` (so both follow the same rules)."""

    def __init__(self, model, ids, temperature, top_k, top_p, min_p, repetition_penalty,
                 seed, stops, ignore_eos, need_text):
        from .tokenizer import StreamDecoder

        self.args = (temperature, top_k, top_p, min_p)
        self.penalty = repetition_penalty
        self.rng = np.random.default_rng(seed)
        self.eos = set(model.config.eos_token_ids) if not ignore_eos else set()
        self.stops = stops
        self.history = list(ids)
        self.decoder = StreamDecoder(model.tokenizer, ids) if need_text else None
        self.text, self.shown = "", 0  # all decoded text; how much of it has been yielded
        self.done = self.stopped = False

    def step(self, logits, last: bool):
        """Sample the next id from ``logits``; returns ``(id, text piece)`` and sets ``done``
        when the sequence ends with it (end-of-sequence id, stop string, or ``last``)."""
        t, k, p, mp = self.args
        tok = sample(logits, self.rng, t, k, p, mp, self.history, self.penalty)
        self.history.append(tok)
        if self.decoder is not None and tok not in self.eos:
            self.text += self.decoder.push(tok)
        text = self.text
        if self.stops:
            hits = [text.find(s) for s in self.stops if s in text]
            if hits:
                self.done = self.stopped = True
                piece = text[self.shown:min(hits)]
                self.shown = len(text)
                return tok, piece
            # hold back a tail that could still become a stop string
            hold = max((k for s in self.stops for k in range(1, len(s))
                        if text.endswith(s[:k])), default=0)
            safe = len(text) - hold
        else:
            safe = len(text)
        piece = text[self.shown:safe]
        self.shown = max(self.shown, safe)
        self.done = tok in self.eos or last
        return tok, piece

    def flush(self) -> str:
        """The text held back at the end (a stop string's unfinished prefix, pending bytes);
        nothing after a stop string was found."""
        if self.decoder is None or self.stopped:
            return ""
        self.text += self.decoder.flush()
        piece = self.text[self.shown:]
        self.shown = len(self.text)
        return piece


def _prompt_ids(model, prompt) -> list:
    if isinstance(prompt, str):
        ids = model.encode(prompt)
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise TorchlessError("the prompt is empty: give at least one token")
    return ids


def _stop_list(model, stop, want_text=False):
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    need_text = want_text or bool(stops)
    if need_text:
        model._tok()
    return stops, need_text


def generate_ids(model, prompt, max_new_tokens, temperature, top_k, top_p, min_p,
                 repetition_penalty, seed, stop, state, ignore_eos, want_text=False):
    """Yield ``(token_id, text_piece)`` for each new token."""
    ids = _prompt_ids(model, prompt)
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    stops, need_text = _stop_list(model, stop, want_text)
    state = state if state is not None else model.new_state()
    if max_new_tokens == 0:
        return
    seq = _Sequence(model, ids, temperature, top_k, top_p, min_p, repetition_penalty, seed,
                    stops, ignore_eos, need_text)
    logits = model.prefill(state, ids)
    for n in range(max_new_tokens):
        tok, piece = seq.step(logits, n == max_new_tokens - 1)
        yield tok, piece
        if seq.done:
            break
        logits = model.fast_forward(state, tok)
    piece = seq.flush()
    if piece:
        yield None, piece


def generate_batch(model, prompts, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None,
                   min_p=None, repetition_penalty=1.0, seed=None, stop=None, states=None,
                   ignore_eos=False) -> list:
    """``generate`` for several prompts at once: each prompt is prefilled on its own, then
    every unfinished sequence advances by one token per batched step
    (:meth:`DecoderModel.decode_batch`). Sequence ``i`` follows exactly the rules of
    ``generate(prompts[i], ...)``: ``seed`` (an int, or one per prompt) seeds its own
    generator, and it stops at its own end-of-sequence id, stop string or token budget.

    ``states`` (optional, one per prompt) are reused: each keeps the longest prefix of its
    prompt already in its cache (:meth:`InferenceState.reuse_prefix`) and prefills the rest.
    """
    prompts = list(prompts)
    ids = [_prompt_ids(model, p) for p in prompts]
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    B = len(ids)
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * B
    if len(seeds) != B:
        raise TorchlessError(f"generate_batch got {len(seeds)} seeds for {B} prompts")
    if states is None:
        states = [model.new_state() for _ in range(B)]
    else:
        states = list(states)
        if len(states) != B:
            raise TorchlessError(f"generate_batch got {len(states)} states for {B} prompts")
    stops, need_text = _stop_list(model, stop)
    out = [[] for _ in range(B)]
    if max_new_tokens == 0 or B == 0:
        return out
    seqs = [_Sequence(model, p, temperature, top_k, top_p, min_p, repetition_penalty, s,
                      stops, ignore_eos, need_text) for p, s in zip(ids, seeds)]
    logits = []
    for st, p in zip(states, ids):
        kept = st.reuse_prefix(p)
        logits.append(model.prefill(st, p[kept:]))
    live = list(range(B))
    for n in range(max_new_tokens):
        nxt = []
        for i, lg in zip(live, logits):
            tok, _ = seqs[i].step(lg, n == max_new_tokens - 1)
            out[i].append(tok)
            if not seqs[i].done:
                nxt.append(i)
        live = nxt
        if not live:
            break
        logits = list(model.decode_batch([states[i] for i in live], [out[i][-1] for i in live]))
    return out
