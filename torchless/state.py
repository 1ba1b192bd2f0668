"""``InferenceState``: the KV cache, the position, and the latest logits of one sequence."""
from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .errors import SequenceLengthError


class KVCache:
    """Keys (after RoPE and q/k norms) and values per layer, laid out ``[nKV, capacity, D]``.

    Grows by doubling unless a ``max_seq_len`` fixes the capacity.
    """

    def __init__(self, config: ModelConfig, capacity: int):
        self.n_layers = config.num_layers
        self.shape = (config.num_kv_heads, config.head_dim)
        self.capacity = 0
        self.k: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        self._alloc(max(capacity, 1))

    def _alloc(self, capacity: int) -> None:
        nkv, d = self.shape
        new_k = [np.zeros((nkv, capacity, d), np.float32) for _ in range(self.n_layers)]
        new_v = [np.zeros((nkv, capacity, d), np.float32) for _ in range(self.n_layers)]
        for old, new in ((self.k, new_k), (self.v, new_v)):
            for a, b in zip(old, new):
                b[:, : self.capacity] = a[:, : self.capacity]
        self.k, self.v, self.capacity = new_k, new_v, capacity

    def ensure(self, length: int) -> None:
        if length > self.capacity:
            cap = self.capacity
            while cap < length:
                cap *= 2
            self._alloc(cap)


class InferenceState:
    """What one sequence carries between calls.

    ``max_seq_len`` (optional) caps the sequence: going past it raises
    :class:`SequenceLengthError`. Without it the cache grows as needed.
    """

    def __init__(self, config: ModelConfig, max_seq_len: int | None = None):
        if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len <= 0):
            raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
        self.config = config
        self.max_seq_len = max_seq_len
        self.cache = KVCache(config, max_seq_len or 64)
        self.pos = 0
        self.tokens: list[int] = []
        self.logits = np.zeros(config.vocab_size, dtype=np.float32)
        self.rope_fixed_len: dict = {}  # rope key -> length its table was fixed at (Qwen-1)

    def reset(self) -> None:
        self.pos = 0
        self.tokens = []
        self.rope_fixed_len = {}
        self.logits[:] = 0

    def check_room(self, n_new: int) -> None:
        if self.max_seq_len is not None and self.pos + n_new > self.max_seq_len:
            raise SequenceLengthError(
                f"sequence would reach {self.pos + n_new} tokens, past max_seq_len="
                f"{self.max_seq_len} set for this state"
            )
