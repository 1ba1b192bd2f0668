"""LLaMA 1/2/3 (``model_type: llama``): the reference decoder; every RoPE scaling type."""
from torchless import ArchitectureConfig, ArchitectureSpec, ModelArchitecture
from torchless import hookimpl
from torchless.architecture import RopeScaling
from torchless.hf_config import llama_tensor_map, make_config

DEFAULTS = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=None, eps=1e-6, vocab_size=32000,
                tie_word_embeddings=False, max_position_embeddings=2048, rope_theta=10000.0)


def config_from_hf(hf):
    return make_config("llama", "llama", hf, DEFAULTS)


def tensor_map(cfg):
    if cfg is not None and cfg.moe is not None:  # a Mixtral GGUF (arch llama, ffn_*_exps)
        from torchless_plugins.mixtral import tensor_map as mixtral_map

        return mixtral_map(cfg)
    return llama_tensor_map()


LLAMA = ArchitectureSpec(
    name="llama",
    family="llama",
    model_types=("llama",),
    hf_architectures=("LlamaForCausalLM",),
    gguf_architectures=("llama",),
    aliases=("llama1", "llama2", "llama3", "llama-3", "llama3.1", "llama3.2", "codellama"),
    describe=ArchitectureConfig(ModelArchitecture.LLAMA, rope_scaling=RopeScaling.LLAMA3,
                                variant="llama"),
    config_from_hf=config_from_hf,
    tensor_map=tensor_map,
)


@hookimpl
def register_architectures(register):
    register(LLAMA)


def config_from_gguf(g):
    from torchless.gguf_config import gguf_config, gguf_moe

    # Mixtral is converted to arch "llama" with experts; llama.cpp's llama graph renormalises
    # the top-k softmax weights (src/models/llama.cpp: build_moe_ffn(..., norm_w = true))
    moe = gguf_moe(g, renorm=True)
    if moe is not None:
        return gguf_config("llama", "mixtral", g, moe=moe)
    return gguf_config("llama", "llama", g)


def gguf_fixup(canonical, w, cfg):
    # llama.cpp's converter permutes q/k rows for interleaved RoPE; we rotate split halves.
    from torchless.gguf_config import unpermute_rows

    if canonical == "attn_q":
        return unpermute_rows(w, cfg.num_heads)
    if canonical == "attn_k":
        return unpermute_rows(w, cfg.num_kv_heads)
    return w


LLAMA.config_from_gguf = config_from_gguf
LLAMA.gguf_fixup = gguf_fixup
