"""``numerics="llama.cpp"``: the decoder's operations in llama.cpp's float order.

torchless's own kernels are accurate, but a model's greedy text can turn on logits a few
hundredths apart, and llama.cpp rounds differently (float16 attention, 8-bit activations
in its own block formats, a float16 GELU table, its own summation orders). With this mode a
GGUF model computes what llama.cpp's CPU backend computes, operation by operation and bit
for bit, so its greedy text is llama.cpp's.

The reference is llama.cpp as built for x86-64 with AVX-512 (``GGML_NATIVE``, the
``llama-cpp-python`` 0.3.36 sources, commit 0c1e570), flash attention off, float16 KV cache;
each kernel documents the order it reproduces. Covered: the weight kinds Q4_K, Q6_K, Q5_0,
Q8_0 (and float32 norms), RMS norm, NeoX RoPE with default or linear scaling, GeGLU (tanh
GELU), causal and sliding-window attention without soft-capping: everything Gemma 3's GGUF
files use. A model needing anything else raises :class:`TorchlessError` naming it.
"""
from __future__ import annotations

import numpy as np

from .errors import TorchlessError
from .kernels import ggml_ops

NUMERICS = ("torchless", "llama.cpp")

_KINDS = ("q4_k", "q6_k", "q5_0", "q8_0")


def check_numerics(numerics: str) -> str:
    if numerics not in NUMERICS:
        raise TorchlessError(f"unknown numerics {numerics!r}; choose one of {', '.join(NUMERICS)}")
    return numerics


def check_supported(model) -> None:
    """Raise naming what the llama.cpp-order kernels do not cover in ``model``."""
    cfg = model.config
    problems = []
    kinds = {w.kind for layer in model.layers for w in layer.w.values()}
    kinds |= {model.output.kind}
    bad = sorted(k for k in kinds if k not in _KINDS)
    if bad:
        problems.append(f"weight kinds {', '.join(bad)} (covered: {', '.join(_KINDS)})")
    if any(layer.b for layer in model.layers) or model.output_bias is not None:
        problems.append("biases")
    if cfg.norm != "rms":
        problems.append(f"norm {cfg.norm!r} (covered: 'rms')")
    if cfg.qk_norm and cfg.qk_norm != "rms":
        problems.append(f"q/k norm {cfg.qk_norm!r} (covered: 'rms')")
    if cfg.head_dim % 64:
        problems.append(f"head size {cfg.head_dim} (covered: multiples of 64)")
    if any(b is not None for b in model.final_norm[1:]):
        problems.append("norm biases")
    if cfg.mlp != "gated" or cfg.activation != "gelu_tanh":
        problems.append(f"MLP {cfg.mlp}/{cfg.activation} (covered: gated gelu_tanh)")
    if cfg.residual not in ("sequential", "sandwich"):
        problems.append(f"residual layout {cfg.residual!r}")
    for key, rc in cfg.ropes.items():
        if rc.rope_type not in ("default", "linear") or rc.rotary_dim != cfg.head_dim:
            problems.append(f"RoPE {key!r} of type {rc.rope_type!r} over {rc.rotary_dim} of "
                            f"{cfg.head_dim} features (covered: default or linear, all features)")
    if cfg.attn_softcap or cfg.final_softcap or cfg.logn_seq_length:
        problems.append("soft-capping / log-n attention scaling")
    if problems:
        raise TorchlessError("numerics='llama.cpp' does not cover this model's "
                             + "; ".join(problems) + "; load it with numerics='torchless'")


def rope_tables(config, positions: np.ndarray) -> dict:
    """cos/sin tables as ggml builds them, keyed like ``config.ropes``."""
    tables = {}
    for key, rc in config.ropes.items():
        n = rc.rotary_dim
        cos = np.empty((len(positions), n // 2), np.float32)
        sin = np.empty_like(cos)
        scale = np.float32(1.0 if rc.rope_type == "default" else 1.0 / rc.factor)
        ggml_ops.rope_cache(np.asarray(positions, np.int64), np.float32(rc.theta), scale, n,
                            cos, sin)
        tables[key] = (cos, sin, n)
    return tables


class GgmlOps:
    """The operations of :class:`torchless.engine.DecoderModel` in llama.cpp's order."""

    act_quant = True

    @staticmethod
    def linear(x, w, b):
        from .kernels import ggml_q8, ggml_qk

        x = np.ascontiguousarray(x, dtype=np.float32)
        if w.kind in ("q5_0", "q8_0"):
            return ggml_q8.matmul_q8_family(w.kernel_view(), w.kind, x)
        return ggml_qk.matmul_k_family(w.kernel_view(), w.kind, x)

    @staticmethod
    def norm(x, kind, w, b, eps):
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty_like(x)
        ggml_ops.rms_norm_rows(x, w, np.float32(eps), out)
        return out

    @staticmethod
    def gated(g, u, kind):
        return ggml_ops.geglu(g, u)

    @staticmethod
    def gated_fused(gu, kind):
        n = gu.shape[1] // 2
        return ggml_ops.geglu(gu[:, :n], gu[:, n:])

    @staticmethod
    def rope(x, cos, sin, rot):
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty_like(x)
        ggml_ops.rope_neox(x, cos, sin, out)
        return out

    @staticmethod
    def kv(x):
        """K and V as the float16 cache holds them."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        flat = x.reshape(-1, x.shape[-1])
        out = np.empty_like(flat)
        ggml_ops.round_f16_rows(flat, out)
        return out.reshape(x.shape)

    @staticmethod
    def attention(q, k_cache, v_cache, P, scale, softcap, window, logn):
        from .kernels import ggml_attn

        q = np.ascontiguousarray(q * np.float32(scale), dtype=np.float32)
        # cells past P + T carry zero weight and leave every sum unchanged, so the graph's
        # own padding (to 256 cells) need not be copied; the kernel wants a multiple of 64
        n_kv = max(64, -(-(P + q.shape[0]) // 64) * 64)
        return ggml_attn.attention_ggml(q, k_cache, v_cache, P, window, n_kv=n_kv)
