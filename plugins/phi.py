"""Phi-2 (``phi``: LayerNorm, parallel residual, partial rotary, biases everywhere) and
Phi-3 (``phi3``: fused qkv and gate_up, optional sliding window, LongRoPE)."""
from torchless import ArchitectureConfig, ArchitectureSpec, ModelArchitecture, TensorNamePattern
from torchless import hookimpl
from torchless.activations import activation_name
from torchless.architecture import ActivationType, NormType, RopeScaling
from torchless.hf_config import llama_tensor_map, make_config
from torchless.plugins import TensorMap

PHI2_DEFAULTS = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                     num_attention_heads=32, num_key_value_heads=None, eps=1e-5,
                     eps_key="layer_norm_eps", vocab_size=51200, tie_word_embeddings=False,
                     max_position_embeddings=2048, rope_theta=10000.0,
                     partial_rotary_factor=0.5)


def phi2_config(hf):
    return make_config(
        "phi", "phi", hf, PHI2_DEFAULTS,
        norm="layernorm", activation=activation_name(hf.get("hidden_act", "gelu_new")),
        mlp="dense", residual="parallel",
        qk_norm="layernorm" if hf.get("qk_layernorm") else None,
    )


def phi2_tensors(cfg):
    layers = {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.dense",
        "ffn_up": "mlp.fc1",
        "ffn_down": "mlp.fc2",
    }
    if cfg.qk_norm:
        layers.update(attn_q_norm="self_attn.q_layernorm", attn_k_norm="self_attn.k_layernorm")
    return TensorMap(
        globals={"token_embd": "model.embed_tokens", "output_norm": "model.final_layernorm",
                 "output": "lm_head"},
        layers=layers,
    )


PHI3_DEFAULTS = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=None, eps=1e-5,
                     vocab_size=32064, tie_word_embeddings=False, max_position_embeddings=4096,
                     rope_theta=10000.0, partial_rotary_factor=1.0,
                     legacy_rope_types={"su": "longrope", "yarn": "longrope"})


def phi3_config(hf):
    hf = dict(hf)
    hf.setdefault("original_max_position_embeddings", 4096)
    n = hf.get("num_hidden_layers", PHI3_DEFAULTS["num_hidden_layers"])
    window = hf.get("sliding_window")
    return make_config("phi", "phi3", hf, PHI3_DEFAULTS,
                       activation=activation_name(hf.get("hidden_act", "silu")),
                       layer_windows=[window] * n)


def phi3_tensors(cfg):
    return llama_tensor_map(
        extra_layers={"attn_qkv": "self_attn.qkv_proj", "ffn_gate_up": "mlp.gate_up_proj"},
        drop=("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"),
    )


PHI2 = ArchitectureSpec(
    name="phi",
    family="phi",
    model_types=("phi",),
    hf_architectures=("PhiForCausalLM",),
    gguf_architectures=("phi2",),
    aliases=("phi2", "phi-2", "phi1", "phi1.5"),
    tensor_pattern=TensorNamePattern(required=(r"final_layernorm\.weight$",),
                                     embedding="model.embed_tokens.weight",
                                     final_norm="model.final_layernorm.weight"),
    describe=ArchitectureConfig(
        ModelArchitecture.PHI, activation=ActivationType.GELU_TANH,
        norm_type=NormType.LAYER_NORM, parallel_residual=True, partial_rotary=True,
        variant="phi"),
    config_from_hf=phi2_config,
    tensor_map=phi2_tensors,
)

PHI3 = ArchitectureSpec(
    name="phi3",
    family="phi",
    model_types=("phi3",),
    hf_architectures=("Phi3ForCausalLM",),
    gguf_architectures=("phi3",),
    aliases=("phi-3", "phi3.5", "phi4mini", "phi-4-mini"),
    tensor_pattern=TensorNamePattern(required=(r"self_attn\.qkv_proj\.weight$",
                                               r"mlp\.gate_up_proj\.weight$")),
    describe=ArchitectureConfig(
        ModelArchitecture.PHI, fused_qkv=True, fused_gate_up=True,
        rope_scaling=RopeScaling.LONGROPE, sliding_window=True, variant="phi3"),
    config_from_hf=phi3_config,
    tensor_map=phi3_tensors,
)


@hookimpl
def register_architectures(register):
    register(PHI2)
    register(PHI3)


# ---- GGUF ------------------------------------------------------------------------------
def phi3_from_gguf(g):
    from torchless.gguf_config import gguf_config

    a = g.architecture
    cfg = gguf_config("phi", "phi3", g)
    W = g.get(f"{a}.attention.sliding_window", int, 0) or None
    cfg.layer_windows = [W] * cfg.num_layers
    if "rope_factors_long.weight" in g.tensor_infos:
        from torchless.rope import RopeConfig

        rc = cfg.ropes["default"]
        O = g.get(f"{a}.rope.scaling.original_context_length", int, 4096)
        af = g.get(f"{a}.rope.scaling.attn_factor", float, None)
        cfg.ropes["default"] = RopeConfig(
            rotary_dim=rc.rotary_dim, theta=rc.theta, rope_type="longrope",
            max_position_embeddings=cfg.max_position_embeddings,
            original_max_position_embeddings=O,
            params={"short_factor": g.tensor("rope_factors_short.weight").to_f32().tolist(),
                    "long_factor": g.tensor("rope_factors_long.weight").to_f32().tolist(),
                    "attention_factor": af})
    return cfg


def phi3_gguf_tensors(cfg):
    from torchless.gguf_config import identity_tensor_map

    # llama.cpp keeps Phi-3's fused gate/up projection under the name ffn_up.
    return identity_tensor_map(phi3_tensors(cfg), rename={"ffn_gate_up": "ffn_up"})


def phi2_from_gguf(g):
    from torchless.gguf_config import gguf_config

    return gguf_config("phi", "phi", g, norm="layernorm", activation="gelu_tanh", mlp="dense",
                       residual="parallel")


def phi2_gguf_tensors(cfg):
    from torchless.gguf_config import identity_tensor_map

    return identity_tensor_map(phi2_tensors(cfg))


PHI3.config_from_gguf = phi3_from_gguf
PHI3.gguf_tensor_map = phi3_gguf_tensors
PHI2.config_from_gguf = phi2_from_gguf
PHI2.gguf_tensor_map = phi2_gguf_tensors
