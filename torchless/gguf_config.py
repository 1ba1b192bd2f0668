"""Helpers plugins use to translate GGUF metadata (``{arch}.embedding_length`` ...) into a
:class:`ModelConfig`, and to undo the layout changes GGUF converters make.

Tensor names in GGUF are already torchless's canonical names (``blk.N.attn_q.weight``), so
the default GGUF tensor map is the identity.
"""
from __future__ import annotations

import sys

import numpy as np

from .config import ModelConfig
from .errors import ConfigError
from .plugins import TensorMap
from .rope import RopeConfig
from .weights import Weight


def gguf_fields(g, *, default_theta: float = 10000.0) -> dict:
    """The common hyper-parameters of a GGUF decoder."""
    a = g.architecture

    def key(k, t=int, default=...):
        if default is ...:
            return g.get(f"{a}.{k}", t)
        return g.get(f"{a}.{k}", t, default)

    H = key("embedding_length")
    nH = key("attention.head_count")
    if isinstance(nH, list):  # per-layer head counts
        nH = int(nH[0])
    nKV = key("attention.head_count_kv", default=nH)
    if isinstance(nKV, list):
        nKV = int(nKV[0])
    D = key("attention.key_length", default=H // nH)
    L = key("block_count")
    inter = key("feed_forward_length")
    if isinstance(inter, list):
        inter = int(inter[0])
    eps = key("attention.layer_norm_rms_epsilon", float, None)
    if eps is None:
        eps = key("attention.layer_norm_epsilon", float, 1e-5)
    if "token_embd.weight" not in g.tensor_infos:
        raise ConfigError(f"{g.path}: GGUF has no token_embd.weight")
    vocab = int(g.tensor_infos["token_embd.weight"].shape[0])
    rot = key("rope.dimension_count", default=D)
    theta = key("rope.freq_base", float, default_theta)
    ctx = key("context_length", default=None)
    scaling = key("rope.scaling.type", str, "none")
    factor = key("rope.scaling.factor", float, None)
    orig = key("rope.scaling.original_context_length", default=None)
    if scaling in ("none", "") or not factor or factor == 1.0:
        rope = RopeConfig(rotary_dim=rot, theta=theta, max_position_embeddings=ctx)
    elif scaling == "linear":
        rope = RopeConfig(rotary_dim=rot, theta=theta, rope_type="linear", factor=factor,
                          max_position_embeddings=ctx)
    elif scaling == "yarn":
        rope = RopeConfig(rotary_dim=rot, theta=theta, rope_type="yarn", factor=factor,
                          max_position_embeddings=ctx, original_max_position_embeddings=orig)
    else:
        raise ConfigError(f"{g.path}: unsupported GGUF rope scaling type {scaling!r}")
    if "rope_freqs.weight" in g.tensor_infos:
        rope = _rope_with_freq_factors(g, rope, scaling)
    bos = g.get("tokenizer.ggml.bos_token_id", int, None)
    eos = [g.get(k, int, None) for k in ("tokenizer.ggml.eos_token_id",
                                        "tokenizer.ggml.eot_token_id")]
    return dict(
        vocab_size=vocab, hidden_size=H, num_layers=L, num_heads=nH, num_kv_heads=nKV,
        head_dim=D, intermediate_size=inter, norm_eps=float(eps),
        tie_embeddings="output.weight" not in g.tensor_infos, ropes={"default": rope},
        max_position_embeddings=ctx, bos_token_id=bos,
        eos_token_ids=tuple(dict.fromkeys(e for e in eos if e is not None)),
        raw={k: v for k, v in g.metadata.items() if not k.startswith("tokenizer.ggml.")},
    )


def _rope_with_freq_factors(g, rope: RopeConfig, scaling: str) -> RopeConfig:
    """Per-dimension frequency divisors stored as the ``rope_freqs.weight`` tensor.

    llama.cpp's converter bakes Llama 3's ``rope_type: llama3`` scaling into this tensor
    instead of metadata (``LlamaModel.generate_extra_tensors`` in ``convert_hf_to_gguf.py``:
    factor 1 for high frequencies, ``factor`` for low ones, the smooth blend between), and
    ``llama_model::get_rope_factors`` (src/llama-model.cpp) hands it to ``ggml_rope_ext`` as
    ``freq_factors``: angle = pos * theta^(-2i/d) / f_i (times freq_scale). That is LongRoPE's
    formula with equal short and long factors, no attention factor and no regime switch, so
    it is expressed as such (a linear ``rope.scaling.factor`` multiplies into the factors).
    """
    ff = np.asarray(g.tensor("rope_freqs.weight").to_f32(), dtype=np.float32).reshape(-1)
    if ff.size != rope.rotary_dim // 2:
        raise ConfigError(f"{g.path}: rope_freqs.weight has {ff.size} entries, expected "
                          f"{rope.rotary_dim // 2} (rotary_dim / 2)")
    if rope.rope_type == "linear":
        ff = (ff * np.float32(rope.factor)).astype(np.float32)
    elif rope.rope_type != "default":
        raise ConfigError(f"{g.path}: rope_freqs.weight combined with rope scaling "
                          f"{scaling!r} is not supported")
    factors = ff.tolist()
    return RopeConfig(rotary_dim=rope.rotary_dim, theta=rope.theta, rope_type="longrope",
                      max_position_embeddings=rope.max_position_embeddings,
                      # never switch "regimes": both factor lists are the same
                      original_max_position_embeddings=sys.maxsize,
                      params={"short_factor": factors, "long_factor": factors,
                              "attention_factor": 1.0})


def gguf_swa_layers(g, n_layers: int, default_pattern: int, dense_first: bool = False) -> list:
    """Which layers use the sliding window, as llama.cpp's ``load_swa_pattern`` decides
    (src/llama-model.cpp): ``{arch}.attention.sliding_window_pattern`` as a per-layer bool
    array, else as an int period ``n`` (default ``default_pattern``) where layer ``il`` is
    sliding iff ``il % n < n - 1`` (``llama_hparams::set_swa_pattern``; ``n == 0``: all;
    ``dense_first``: iff ``il % n != 0``)."""
    key = f"{g.architecture}.attention.sliding_window_pattern"
    v = g.get(key, None, None)
    if isinstance(v, (list, tuple, np.ndarray)):
        flags = [bool(x) for x in list(v)]
        if len(flags) < n_layers:
            raise ConfigError(f"{g.path}: {key} has {len(flags)} entries for {n_layers} layers")
        return flags[:n_layers]
    n = default_pattern if v is None else g.get(key, int)
    if dense_first:
        return [n == 0 or il % n != 0 for il in range(n_layers)]
    return [n == 0 or il % n < n - 1 for il in range(n_layers)]


def gguf_config(family: str, variant: str, g, **overrides) -> ModelConfig:
    fields = gguf_fields(g)
    fields.update(overrides)
    return ModelConfig(architecture=family, variant=variant, **fields)


def identity_tensor_map(tmap: TensorMap, rename: dict | None = None) -> TensorMap:
    """GGUF names for the canonical tensors an HF map lists (optionally renamed)."""
    rename = rename or {}
    return TensorMap(globals={k: rename.get(k, k) for k in tmap.globals},
                     layers={k: rename.get(k, k) for k in tmap.layers},
                     layer_prefix="blk.{i}.")


def unpermute_rows(w: Weight, n_heads: int) -> Weight:
    """Undo the llama GGUF converter's q/k row permutation (interleaved RoPE pairs back to
    split halves): within each head, GGUF row ``2i`` is HF row ``i`` and ``2i+1`` is
    ``i + D/2``. Rows are independent in every storage kind, so this works on blocks too."""
    data = w.data
    rows = data.shape[0]
    D = rows // n_heads
    idx = np.arange(rows).reshape(n_heads, D // 2, 2).transpose(0, 2, 1).reshape(-1)
    new = np.ascontiguousarray(data[idx])
    return Weight(w.name, w.kind, w.shape, new)


def gguf_moe(g, *, renorm: bool, shared: bool = False):
    """The mixture-of-experts config of a GGUF decoder (``{arch}.expert_count`` ...), or None
    when it has no experts. ``renorm`` is the family's rule, fixed in llama.cpp's graph code
    (``build_moe_ffn``'s ``norm_w``: true for llama/Mixtral and qwen3moe, false for olmoe);
    the gating function is softmax (``expert_gating_func`` 1 or absent). ``shared``: the
    family has a sigmoid-gated shared expert of ``expert_shared_feed_forward_length``
    (qwen2moe)."""
    from .config import MoeConfig

    a = g.architecture
    n = g.get(f"{a}.expert_count", int, 0) or 0
    if not n:
        return None
    used = g.get(f"{a}.expert_used_count", int, None)
    if not used:
        raise ConfigError(f"{g.path}: {a}.expert_count is {n} but {a}.expert_used_count is "
                          "missing")
    gating = g.get(f"{a}.expert_gating_func", int, 1)
    if gating != 1:
        raise ConfigError(f"{g.path}: {a}.expert_gating_func {gating} is not supported "
                          "(only softmax, 1)")
    for key in (("leading_dense_block_count",) if shared else
                ("expert_shared_count", "expert_shared_feed_forward_length",
                 "leading_dense_block_count")):
        v = g.get(f"{a}.{key}", int, 0)
        if v:
            raise ConfigError(f"{g.path}: {a}.{key} = {v}: shared experts and dense leading "
                              "layers are not supported")
    ff = g.get(f"{a}.expert_feed_forward_length", int, None)
    if ff is None:
        ff = g.get(f"{a}.feed_forward_length", int)
    shexp = 0
    if shared:
        shexp = g.get(f"{a}.expert_shared_feed_forward_length", int, None)
        if shexp is None:  # llama.cpp falls back to the dense width
            shexp = g.get(f"{a}.feed_forward_length", int)
    return MoeConfig(num_experts=int(n), top_k=int(used), intermediate_size=int(ff),
                     router="softmax_topk", renorm=renorm, shared_intermediate_size=int(shexp))
