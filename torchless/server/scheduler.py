"""Continuous batching: one thread owns the model and a fixed set of slots.

Each slot is an :class:`~torchless.state.InferenceState` (its own KV cache, ``max_seq_len``
= the server's context). At every step the scheduler admits waiting requests into free slots
(prefilling only the part of each prompt the slot does not already hold: the prefix cache),
then decodes every running sequence together in one batched step. The HTTP side talks to it
through :meth:`Scheduler.submit` (thread-safe, bounded) and reads each request's events from
an ``asyncio.Queue`` the scheduler fills with ``loop.call_soon_threadsafe``.
"""
from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import TorchlessError
from ..generation import _Sequence
from ..state import common_prefix_len


class QueueFullError(TorchlessError):
    """Every slot is busy and the admission queue is full (HTTP 429)."""


class NotRunningError(TorchlessError):
    """The scheduler is stopped or has failed (HTTP 503)."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False


class Request:
    """One generation: prompt ids, sampling, and where its events go.

    Events (tuples put on ``queue``): ``("token", piece, info)`` per sampled token, where
    ``info`` is ``None`` or ``(token_id, logprob, [(id, logprob), ...])``; then
    ``("done", finish_reason, usage)`` or ``("error", message)``.
    """

    _ids = itertools.count()

    def __init__(self, prompt_ids, params: SamplingParams, eos_ids, loop, queue):
        self.id = next(self._ids)
        self.prompt = [int(t) for t in prompt_ids]
        self.params = params
        self.eos = set() if params.ignore_eos else set(eos_ids)
        self.loop = loop
        self.queue = queue
        self.cancelled = False  # set by the HTTP side when the client goes away
        self.submitted = time.perf_counter()
        self.first_token_at = None
        self.cached_tokens = 0
        self.generated: list[int] = []

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
            self.cancelled = True


class _Slot:
    def __init__(self, index, state):
        self.index = index
        self.state = state
        self.req: Request | None = None
        self.last_used = 0
        self.seq: _Sequence | None = None  # sampling and stopping of the running request
        self.next_token = None


class Scheduler:
    """Owns the model: ``parallel`` slots of ``ctx`` positions, a bounded admission queue.

    ``submit`` may be called from any thread; everything else runs on the scheduler thread.
    """

    def __init__(self, model, parallel: int = 4, ctx: int = 2048, queue_size: int | None = None):
        if parallel < 1:
            raise ValueError("parallel must be >= 1")
        self.model = model
        self.ctx = int(ctx)
        self.parallel = int(parallel)
        self.queue_size = 4 * self.parallel if queue_size is None else int(queue_size)
        self.slots = [_Slot(i, model.new_state(max_seq_len=self.ctx)) for i in range(parallel)]
        self._pending: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._thread = None
        self._running = False
        self.failure: str | None = None
        self._clock = itertools.count(1)
        # decode steps, rows decoded, prompt tokens computed, prompt tokens reused from a slot
        self.stats = collections.Counter(steps=0, decode_rows=0, prefill_tokens=0,
                                         reused_tokens=0)

    # ---- any thread ----------------------------------------------------------------------
    def start(self, warm_up: bool = True) -> None:
        """Start the scheduler thread; with ``warm_up``, first compile (or load from Numba's
        cache) the prefill and decode kernels there, and return once they are ready.

        Every kernel runs on this one thread. Each thread that starts a Numba parallel loop
        gets its own OpenMP team, and once a process holds more OpenMP threads than cores,
        libgomp stops spin-waiting between loops: every loop of a decode step then costs its
        workers a sleep and a wake-up (a second team cut single-stream decode of a small
        model to less than half in the server; BENCHMARKS.md)."""
        self._running = True
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(warm_up, ready),
                                        name="torchless-scheduler", daemon=True)
        self._thread.start()
        ready.wait()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._running = False
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._running and self.failure is None and self._thread is not None \
            and self._thread.is_alive()

    def submit(self, req: Request) -> None:
        with self._cv:
            if not self.alive:
                raise NotRunningError(self.failure or "the scheduler is not running")
            if len(self._pending) >= self.queue_size + self._free_slot_count():
                raise QueueFullError(
                    f"the server is busy: all {self.parallel} slots are in use and "
                    f"{len(self._pending)} requests are already waiting (queue size "
                    f"{self.queue_size}); retry later")
            self._pending.append(req)
            self._cv.notify_all()

    def _free_slot_count(self) -> int:
        return sum(s.req is None for s in self.slots)

    def snapshot(self) -> dict:
        with self._cv:
            busy = sum(s.req is not None for s in self.slots)
            return {"slots_total": self.parallel, "slots_processing": busy,
                    "slots_idle": self.parallel - busy, "queued": len(self._pending),
                    "ctx": self.ctx, **{k: int(v) for k, v in self.stats.items()}}

    # ---- scheduler thread ----------------------------------------------------------------
    def _warm_up(self) -> None:
        state = self.model.new_state(max_seq_len=8)
        self.model.prefill(state, [0, 1, 2, 3][:max(1, min(4, self.model.config.vocab_size))])
        self.model.decode_batch([state], [int(state.tokens[-1])])
        other = self.model.new_state(max_seq_len=8)
        self.model.prefill(other, [0])
        self.model.decode_batch([state, other], [0, 0])

    def _run(self, warm_up: bool = False, ready: threading.Event | None = None) -> None:
        try:
            if warm_up:
                try:
                    self._warm_up()
                finally:
                    if ready is not None:
                        ready.set()
            elif ready is not None:
                ready.set()
            while True:
                with self._cv:
                    while self._running and not self._pending and \
                            all(s.req is None for s in self.slots):
                        self._cv.wait(0.5)
                    if not self._running:
                        break
                self._admit()
                self._decode_step()
        except BaseException as exc:  # a bug or an exhausted machine: fail every request
            self.failure = f"scheduler failed: {type(exc).__name__}: {exc}"
            for s in self.slots:
                if s.req is not None:
                    s.req.emit(("error", self.failure))
                    s.req = None
            raise
        finally:
            with self._cv:
                self._running = False
                pending, self._pending = list(self._pending), collections.deque()
            for r in pending:
                r.emit(("error", self.failure or "the server is shutting down"))
            for s in self.slots:
                if s.req is not None:
                    s.req.emit(("error", self.failure or "the server is shutting down"))
                    s.req = None

    def _release(self, slot: _Slot) -> None:
        with self._cv:
            slot.req = None
            slot.seq = slot.next_token = None
            slot.last_used = next(self._clock)

    def _pick_slot(self, prompt) -> _Slot | None:
        """The free slot sharing the longest prefix with ``prompt``, else the least recently
        used one."""
        free = [s for s in self.slots if s.req is None]
        if not free:
            return None
        best = max(free, key=lambda s: (common_prefix_len(s.state.tokens, prompt),
                                        -s.last_used))
        if common_prefix_len(best.state.tokens, prompt) == 0:
            best = min(free, key=lambda s: s.last_used)  # keep the others' caches
        return best

    def _admit(self) -> None:
        while True:
            with self._cv:
                while self._pending and self._pending[0].cancelled:
                    self._pending.popleft()
                if not self._pending:
                    return
                slot = self._pick_slot(self._pending[0].prompt)
                if slot is None:
                    return
                req = self._pending.popleft()
                slot.req = req  # claimed: no longer free
            self._start(slot, req)

    def _start(self, slot: _Slot, req: Request) -> None:
        model, state, p = self.model, slot.state, req.params
        try:
            # keep the longest cached prefix a fresh prefill would compute the same way
            keep = state.reuse_prefix(req.prompt)
            req.cached_tokens = keep
            logits = model.prefill(state, req.prompt[keep:])
        except TorchlessError as exc:
            state.reset()
            req.emit(("error", str(exc)))
            self._release(slot)
            return
        self.stats["prefill_tokens"] += len(req.prompt) - keep
        self.stats["reused_tokens"] += keep
        # generate()'s own sampling and stop rules (stop strings across token boundaries)
        slot.seq = _Sequence(model, req.prompt, p.temperature, p.top_k, p.top_p, p.min_p,
                             p.repetition_penalty, p.seed, p.stop, True, True)
        slot.seq.eos = req.eos
        self._advance(slot, logits)

    def _decode_step(self) -> None:
        running = []
        for s in self.slots:
            if s.req is None:
                continue
            if s.req.cancelled:
                self._release(s)
            else:
                running.append(s)
        if not running:
            return
        logits = self.model.decode_batch([s.state for s in running],
                                         [s.next_token for s in running])
        self.stats["steps"] += 1
        self.stats["decode_rows"] += len(running)
        for s, row in zip(running, logits):
            self._advance(s, row)

    def _advance(self, slot: _Slot, logits) -> None:
        """Sample the next token of ``slot`` from ``logits``, emit it, finish or queue it."""
        req, p, seq = slot.req, slot.req.params, slot.seq
        last = len(req.generated) + 1 >= p.max_tokens or slot.state.pos + 1 > self.ctx
        tok, piece = seq.step(logits, last)
        req.generated.append(tok)
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        info = None
        if p.logprobs:  # of the model's distribution (before temperature and filters)
            x = np.asarray(logits, np.float64)
            lp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
            top = []
            if p.top_logprobs:
                order = np.argsort(-lp, kind="stable")[:p.top_logprobs]
                top = [(int(i), float(lp[i])) for i in order]
            info = (tok, float(lp[tok]), top)
        finish = None
        if seq.done:
            finish = "stop" if seq.stopped or tok in req.eos else "length"
            piece += seq.flush()  # the held-back tail is final now (nothing after a stop)
        req.emit(("token", piece, info))
        if finish is None:
            slot.next_token = tok
            return
        n_prompt = len(req.prompt)
        req.emit(("done", finish, {"prompt_tokens": n_prompt,
                                   "completion_tokens": len(req.generated),
                                   "cached_tokens": req.cached_tokens}))
        self._release(slot)
