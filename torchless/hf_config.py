"""Helpers plugins use to translate a Hugging Face ``config.json`` and name its tensors.

Most families are Llama with differences, so the Llama reading of the common fields and the
Llama tensor names live here once; a plugin passes its class defaults and overrides.
"""
from __future__ import annotations

from .config import ModelConfig, get
from .errors import ConfigError
from .plugins import TensorMap
from .rope import resolve_rope

LLAMA_GLOBALS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LLAMA_LAYERS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def llama_tensor_map(extra_layers: dict | None = None, drop: tuple = (),
                     globals_: dict | None = None) -> TensorMap:
    layers = {k: v for k, v in LLAMA_LAYERS.items() if k not in drop}
    layers.update(extra_layers or {})
    return TensorMap(globals=dict(globals_ or LLAMA_GLOBALS), layers=layers)


def common_fields(hf: dict, defaults: dict, *, eps_key: str = "rms_norm_eps") -> dict:
    """The fields every decoder config has, read with the family's class ``defaults``.

    ``defaults`` holds class defaults for missing keys: hidden_size, intermediate_size,
    num_hidden_layers, num_attention_heads, num_key_value_heads (None = same as heads),
    head_dim (None = hidden // heads), eps, vocab_size, tie_word_embeddings,
    max_position_embeddings, rope_theta, partial_rotary_factor.
    """

    def field(key, kind=int):
        if key in hf:
            v = get(hf, key, kind=kind)
            if v is not None:
                return v
        return defaults.get(key)

    H = field("hidden_size")
    nH = field("num_attention_heads")
    if H is None or nH is None:
        raise ConfigError("config needs hidden_size and num_attention_heads")
    if "num_key_value_heads" in hf:
        nKV = hf["num_key_value_heads"] if hf["num_key_value_heads"] is not None else nH
    else:
        nKV = defaults.get("num_key_value_heads") or nH
    D = field("head_dim")
    if D is None:
        if H % nH:
            raise ConfigError(f"hidden_size {H} is not divisible by num_attention_heads {nH}")
        D = H // nH
    vocab = field("vocab_size")
    layers = field("num_hidden_layers")
    inter = field("intermediate_size")
    eps = hf.get(eps_key)
    if eps is None:
        eps = defaults.get("eps", 1e-6)
    tie = hf.get("tie_word_embeddings")
    if tie is None:
        tie = defaults.get("tie_word_embeddings", False)
    rope = resolve_rope(
        hf,
        head_dim=D,
        default_theta=defaults.get("rope_theta", 10000.0),
        default_partial=defaults.get("partial_rotary_factor", 1.0),
        legacy_types=defaults.get("legacy_rope_types"),
    )
    eos = hf.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return dict(
        vocab_size=vocab,
        hidden_size=H,
        num_layers=layers,
        num_heads=nH,
        num_kv_heads=nKV,
        head_dim=D,
        intermediate_size=inter,
        norm_eps=float(eps),
        tie_embeddings=bool(tie),
        ropes={"default": rope},
        max_position_embeddings=hf.get("max_position_embeddings",
                                       defaults.get("max_position_embeddings")),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos,
        raw=hf,
    )


def make_config(family: str, variant: str, hf: dict, defaults: dict, **overrides) -> ModelConfig:
    fields = common_fields(hf, defaults, eps_key=defaults.get("eps_key", "rms_norm_eps"))
    fields.update(overrides)
    return ModelConfig(architecture=family, variant=variant, **fields)


def layer_types_windows(hf: dict, num_layers: int, window, default_type) -> list:
    """Per-layer window from an explicit ``layer_types`` list or a ``default_type(i)`` rule."""
    types = hf.get("layer_types")
    if types is None:
        types = [default_type(i) for i in range(num_layers)]
    if len(types) != num_layers:
        raise ConfigError(f"layer_types has {len(types)} entries for {num_layers} layers")
    return [window if t == "sliding_attention" else None for t in types], types
