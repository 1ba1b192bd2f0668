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
        # the layers' buffer addresses, for kernels that take several caches at once
        self.addrs = np.array([[a.ctypes.data for a in new_k], [a.ctypes.data for a in new_v]],
                              np.int64)

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

    def truncate(self, n: int) -> int:
        """Keep the first ``n`` positions (KV cache and tokens) and forget the rest, so that a
        shared prefix is reused and the next tokens overwrite what followed it. Returns the
        number of positions kept: ``n``, or 0 when the kept keys would have been rotated
        with another RoPE table than the engine now expects (LongRoPE past its switch,
        dynamic NTK past its base length) -- the state is then reset. ``logits`` are zeroed
        (they belonged to the forgotten last position): feed at least one token next.
        """
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise ValueError(f"truncate needs a non-negative int, got {n!r}")
        n = min(int(n), self.pos)
        for rc in self.config.ropes.values():
            # the engine keeps LongRoPE keys in the regime of the current length (it redoes
            # them when the length crosses the switch), so a cut across it invalidates them;
            # a dynamic-NTK key computed past the base length was rotated with a longer table
            if rc.rope_type == "longrope" and rc.regime(n) != rc.regime(self.pos):
                n = 0
            if rc.rope_type == "dynamic" and rc.regime(self.pos) != rc.regime(1):
                n = 0
        if n == 0:
            self.reset()
            return 0
        self.pos = n
        del self.tokens[n:]
        self.logits[:] = 0
        return n

    def reuse_prefix(self, ids) -> int:
        """Make this state ready to prefill ``ids`` reusing the longest cached prefix that a
        fresh prefill of ``ids`` would compute the same way; returns how many positions were
        kept (then prefill ``ids[kept:]``). At most ``len(ids) - 1`` are kept, so the prefill
        always has a token and yields the last position's logits."""
        ids = [int(t) for t in ids]
        n = min(common_prefix_len(self.tokens, ids), max(len(ids) - 1, 0))
        for key, rc in self.config.ropes.items():
            fixed = self.rope_fixed_len.get(key)
            if rc.rope_type == "qwen_ntk" and fixed is not None and (
                    rc.regime(fixed) != rc.regime(len(ids))):
                n = 0  # Qwen-1 fixes its NTK table at the first prefill's length
            if rc.rope_type == "dynamic" and rc.regime(len(ids)) != rc.regime(1):
                n = 0
        return self.truncate(n)

    def check_room(self, n_new: int) -> None:
        if self.max_seq_len is not None and self.pos + n_new > self.max_seq_len:
            raise SequenceLengthError(
                f"sequence would reach {self.pos + n_new} tokens, past max_seq_len="
                f"{self.max_seq_len} set for this state"
            )


def common_prefix_len(a, b) -> int:
    """How many leading tokens the sequences ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and int(a[i]) == int(b[i]):
        i += 1
    return i
