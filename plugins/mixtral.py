"""Mixtral (``model_type: mixtral``): Mistral's block with a mixture of experts as its MLP.

The router (``block_sparse_moe.gate``) takes a softmax over all experts, keeps the
``num_experts_per_tok`` largest and renormalises them to sum to 1 (transformers'
``MixtralTopKRouter``); each expert is a SwiGLU MLP (``w1`` gate, ``w3`` up, ``w2`` down).
GGUF files of Mixtral carry ``general.architecture = llama`` with ``ffn_*_exps`` tensors;
the llama plugin reads those.
"""
from torchless import ArchitectureConfig, ArchitectureSpec, ModelArchitecture, TensorNamePattern
from torchless import hookimpl
from torchless.config import MoeConfig, get
from torchless.hf_config import llama_tensor_map, make_config

DEFAULTS = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, eps=1e-5, vocab_size=32000,
                tie_word_embeddings=False, max_position_embeddings=131072, rope_theta=1e6)


def moe_config(hf, intermediate: int) -> MoeConfig:
    return MoeConfig(num_experts=get(hf, "num_local_experts", 8, kind=int),
                     top_k=get(hf, "num_experts_per_tok", 2, kind=int),
                     intermediate_size=intermediate, router="softmax_topk", renorm=True)


def config_from_hf(hf):
    n = hf.get("num_hidden_layers", DEFAULTS["num_hidden_layers"])
    window = hf.get("sliding_window")  # MixtralConfig's default: none
    inter = get(hf, "intermediate_size", DEFAULTS["intermediate_size"], kind=int)
    return make_config("mistral", "mixtral", hf, DEFAULTS, layer_windows=[window] * n,
                       moe=moe_config(hf, inter))


def tensor_map(cfg=None):
    return llama_tensor_map(drop=("ffn_gate", "ffn_up", "ffn_down"), extra_layers={
        "ffn_gate_inp": "block_sparse_moe.gate",
        "ffn_gate_exps": "block_sparse_moe.experts.{j}.w1",
        "ffn_up_exps": "block_sparse_moe.experts.{j}.w3",
        "ffn_down_exps": "block_sparse_moe.experts.{j}.w2",
    })


MIXTRAL = ArchitectureSpec(
    name="mixtral",
    family="mistral",
    model_types=("mixtral",),
    hf_architectures=("MixtralForCausalLM",),
    aliases=("mixtral8x7b", "mixtral-moe"),
    tensor_pattern=TensorNamePattern(required=(r"\.block_sparse_moe\.gate\.weight$",
                                               r"\.block_sparse_moe\.experts\.0\.w1\.weight$")),
    describe=ArchitectureConfig(ModelArchitecture.MISTRAL, variant="mixtral"),
    config_from_hf=config_from_hf,
    tensor_map=tensor_map,
)


@hookimpl
def register_architectures(register):
    register(MIXTRAL)
