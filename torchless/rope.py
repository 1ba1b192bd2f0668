"""Rotary position embeddings: frequency tables for every scaling type (ARCHITECTURES.md 2.8-2.9).

A :class:`RopeConfig` is resolved once from a model config; :meth:`RopeConfig.table` returns
``(inv_freq, attention_factor)`` for the total length ``S`` of the current call, which only
the length-dependent types (dynamic NTK, LongRoPE, Qwen-1's NTK alpha) look at.
Everything is computed in float32 as transformers does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope", "qwen_ntk")


@dataclass
class RopeConfig:
    rotary_dim: int
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float | None = None
    max_position_embeddings: int | None = None
    original_max_position_embeddings: int | None = None
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
            )
        if self.rotary_dim % 2:
            raise ConfigError(f"rotary dimension must be even, got {self.rotary_dim}")
        self._cache: dict = {}

    @property
    def length_dependent(self) -> bool:
        return self.rope_type in ("dynamic", "longrope", "qwen_ntk")

    def default_inv_freq(self, base: float | None = None) -> np.ndarray:
        base = self.theta if base is None else base
        idx = np.arange(0, self.rotary_dim, 2, dtype=np.int64).astype(np.float32)
        return (1.0 / (np.float32(base) ** (idx / np.float32(self.rotary_dim)))).astype(np.float32)

    def regime(self, seq_len: int):
        """A hashable key that changes exactly when the table for ``seq_len`` changes."""
        if self.rope_type == "dynamic":
            return max(seq_len, self.max_position_embeddings)
        if self.rope_type == "longrope":
            return seq_len > self.original_max_position_embeddings
        if self.rope_type == "qwen_ntk":
            return qwen_ntk_alpha(seq_len, self.params["seq_length"])
        return None

    def table(self, seq_len: int = 1) -> tuple[np.ndarray, float]:
        key = self.regime(seq_len)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._compute(seq_len)
            self._cache[key] = hit
        return hit

    def _compute(self, seq_len: int) -> tuple[np.ndarray, float]:
        t, R = self.rope_type, self.rotary_dim
        p = self.params
        if t == "default":
            return self.default_inv_freq(), 1.0
        if t == "linear":
            return (self.default_inv_freq() / np.float32(self.factor)).astype(np.float32), 1.0
        if t == "dynamic":
            M = self.max_position_embeddings
            s = max(seq_len, M)
            base = self.theta * (self.factor * s / M - (self.factor - 1)) ** (R / (R - 2))
            return self.default_inv_freq(base), 1.0
        if t == "qwen_ntk":
            alpha = qwen_ntk_alpha(seq_len, p["seq_length"])
            return self.default_inv_freq(self.theta * alpha ** (R / (R - 2))), 1.0
        if t == "yarn":
            return _yarn(self)
        if t == "llama3":
            return _llama3(self)
        if t == "longrope":
            return _longrope(self, seq_len)
        raise AssertionError(t)


def qwen_ntk_alpha(n: int, seq_length: int) -> float:
    """Qwen-1's dynamic NTK alpha for a sequence of length ``n`` (1 up to ``seq_length``)."""
    c = math.log(n / seq_length, 2) + 1
    return max(2 ** math.ceil(c) - 1, 1)


def _yarn(rc: RopeConfig):
    p, R = rc.params, rc.rotary_dim
    O = rc.original_max_position_embeddings
    factor = rc.factor if rc.factor is not None else rc.max_position_embeddings / O

    def m(s, k):
        return 1.0 if s <= 1 else 0.1 * k * math.log(s) + 1.0

    if p.get("attention_factor") is not None:
        af = p["attention_factor"]
    elif p.get("mscale") and p.get("mscale_all_dim"):
        af = m(factor, p["mscale"]) / m(factor, p["mscale_all_dim"])
    else:
        af = m(factor, 1)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1
    base = rc.theta

    def corr(r):
        return R * math.log(O / (2 * math.pi * r)) / (2 * math.log(base))

    low, high = corr(beta_fast), corr(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, R - 1)
    if low == high:
        high += 0.001
    i = np.arange(R // 2, dtype=np.float32)
    ramp = np.clip((i - np.float32(low)) / np.float32(high - low), 0, 1).astype(np.float32)
    extrap = rc.default_inv_freq()
    interp = extrap / np.float32(factor)
    inv = interp * ramp + extrap * (1 - ramp)
    return inv.astype(np.float32), float(af)


def _llama3(rc: RopeConfig):
    p = rc.params
    O = rc.original_max_position_embeddings
    lo, hi, factor = p["low_freq_factor"], p["high_freq_factor"], rc.factor
    inv = rc.default_inv_freq()
    low_wl, high_wl = O / lo, O / hi
    wl = 2 * math.pi / inv
    out = np.where(wl > low_wl, inv / factor, inv)
    sm = (O / wl - lo) / (hi - lo)
    smoothed = (1 - sm) * out / factor + sm * out
    medium = ~(wl < high_wl) & ~(wl > low_wl)
    out = np.where(medium, smoothed, out)
    return out.astype(np.float32), 1.0


def _longrope(rc: RopeConfig, seq_len: int):
    p, R = rc.params, rc.rotary_dim
    O = rc.original_max_position_embeddings
    f = rc.factor if rc.factor is not None else rc.max_position_embeddings / O
    if p.get("attention_factor") is not None:
        af = p["attention_factor"]
    elif f <= 1:
        af = 1.0
    else:
        af = math.sqrt(1 + math.log(f) / math.log(O))
    ext = p["long_factor"] if seq_len > O else p["short_factor"]
    ext = np.asarray(ext, dtype=np.float32)
    if ext.shape != (R // 2,):
        raise ConfigError(f"longrope factor list has {ext.size} entries, expected {R // 2}")
    idx = np.arange(0, R, 2, dtype=np.int64).astype(np.float32)
    inv = 1.0 / (ext * np.float32(rc.theta) ** (idx / np.float32(R)))
    return inv.astype(np.float32), float(af)


def resolve_rope(
    hf: dict,
    *,
    head_dim: int,
    default_theta: float = 10000.0,
    default_partial: float = 1.0,
    rope_dict: dict | None = None,
    legacy_types: dict | None = None,
) -> RopeConfig:
    """Merge the legacy (``rope_theta`` + ``rope_scaling``) and new (``rope_parameters``)
    serialisations into one :class:`RopeConfig` (ARCHITECTURES.md 2.1).

    ``rope_dict`` overrides where the parameters are read from (Gemma 3 nests them per layer
    type); ``legacy_types`` maps old type names to current ones (Phi-3: su/yarn -> longrope).
    """
    merged: dict = {}
    if rope_dict is None:
        rp = hf.get("rope_parameters")
        if isinstance(rp, dict) and not any(isinstance(v, dict) for v in rp.values()):
            merged.update(rp)
        scaling = hf.get("rope_scaling")
        if isinstance(scaling, dict):
            merged.update({k: v for k, v in scaling.items()})
    else:
        merged.update(rope_dict)
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    if legacy_types:
        rope_type = legacy_types.get(rope_type, rope_type)
    theta = merged.get("rope_theta", hf.get("rope_theta", default_theta))
    partial = merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", default_partial))
    if partial is None:
        partial = default_partial
    rotary_dim = int(head_dim * partial)
    max_pos = hf.get("max_position_embeddings")
    orig = hf.get("original_max_position_embeddings") or merged.get(
        "original_max_position_embeddings"
    )
    if rope_type in ("llama3", "yarn", "longrope") and orig is None:
        orig = max_pos
    if rope_type in ("linear", "dynamic", "llama3") and merged.get("factor") is None:
        raise ConfigError(f"rope type {rope_type!r} needs a 'factor'")
    if rope_type in ("dynamic", "yarn", "longrope") and max_pos is None and orig is None:
        raise ConfigError(f"rope type {rope_type!r} needs max_position_embeddings")
    factor = merged.get("factor")
    params = {
        k: v
        for k, v in merged.items()
        if k not in ("rope_type", "type", "rope_theta", "partial_rotary_factor", "factor")
    }
    return RopeConfig(
        rotary_dim=rotary_dim,
        theta=float(theta),
        rope_type=rope_type,
        factor=None if factor is None else float(factor),
        max_position_embeddings=max_pos,
        original_max_position_embeddings=orig,
        params=params,
    )
