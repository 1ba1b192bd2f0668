"""OLMoE (``model_type: olmoe``): a Llama block with q/k RMSNorm over the *whole* projection
(not per head) and a mixture of experts as its MLP.

transformers' ``OlmoeAttention``: ``q_norm`` is an RMSNorm of width ``hidden_size`` applied to
``q_proj(x)`` before the split into heads (``k_norm``: width ``kv_dim``). The router
(``mlp.gate``) takes a softmax over all experts and keeps the ``num_experts_per_tok`` largest,
renormalised only when ``norm_topk_prob`` (false in the released models; llama.cpp's ``olmoe``
graph never renormalises).
"""
from torchless import ArchitectureConfig, ArchitectureSpec, ModelArchitecture, TensorNamePattern
from torchless import hookimpl
from torchless.config import MoeConfig, get
from torchless.errors import ConfigError
from torchless.hf_config import llama_tensor_map, make_config

OLMOE = "olmoe"
DEFAULTS = dict(hidden_size=2048, intermediate_size=2048, num_hidden_layers=16,
                num_attention_heads=16, num_key_value_heads=None, eps=1e-5, vocab_size=50304,
                tie_word_embeddings=False, max_position_embeddings=4096, rope_theta=10000.0)


def config_from_hf(hf):
    if hf.get("clip_qkv") is not None:
        raise ConfigError(f"OLMoE clip_qkv = {hf['clip_qkv']!r} is not supported")
    if hf.get("attention_bias"):
        raise ConfigError("OLMoE attention_bias = true is not supported")
    inter = get(hf, "intermediate_size", DEFAULTS["intermediate_size"], kind=int)
    moe = MoeConfig(num_experts=get(hf, "num_experts", 64, kind=int),
                    top_k=get(hf, "num_experts_per_tok", 8, kind=int), intermediate_size=inter,
                    router="softmax_topk", renorm=bool(hf.get("norm_topk_prob", False)))
    return make_config(OLMOE, "olmoe", hf, DEFAULTS, qk_norm="rms", qk_norm_full=True, moe=moe)


def tensor_map(cfg=None):
    return llama_tensor_map(drop=("ffn_gate", "ffn_up", "ffn_down"), extra_layers={
        "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
        "ffn_gate_inp": "mlp.gate",
        "ffn_gate_exps": "mlp.experts.{j}.gate_proj",
        "ffn_up_exps": "mlp.experts.{j}.up_proj",
        "ffn_down_exps": "mlp.experts.{j}.down_proj",
    })


def config_from_gguf(g):
    from torchless.gguf_config import gguf_config, gguf_moe

    moe = gguf_moe(g, renorm=False)  # llama.cpp src/models/olmoe.cpp: norm_w = false
    if moe is None:
        raise ConfigError(f"{g.path}: an olmoe GGUF without olmoe.expert_count")
    return gguf_config(OLMOE, "olmoe", g, qk_norm="rms", qk_norm_full=True, moe=moe)


OLMOE_SPEC = ArchitectureSpec(
    name="olmoe",
    family=OLMOE,
    model_types=("olmoe",),
    hf_architectures=("OlmoeForCausalLM",),
    gguf_architectures=("olmoe",),
    aliases=("olmoe-1b-7b",),
    tensor_pattern=TensorNamePattern(required=(r"\.mlp\.gate\.weight$",
                                               r"\.mlp\.experts\.0\.gate_proj\.weight$",
                                               r"self_attn\.q_norm\.weight$"),
                                     priority=-1),
    describe=ArchitectureConfig(ModelArchitecture(OLMOE), qk_norm=True, variant="olmoe"),
    config_from_hf=config_from_hf,
    config_from_gguf=config_from_gguf,
    tensor_map=tensor_map,
)


@hookimpl
def register_architectures(register):
    register(OLMOE_SPEC)
