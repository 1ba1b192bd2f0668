"""Mistral (``model_type: mistral``): Llama's block with a sliding window on every layer."""
from torchless import ArchitectureConfig, ArchitectureSpec, ModelArchitecture, TensorNamePattern
from torchless import hookimpl
from torchless.hf_config import llama_tensor_map, make_config

DEFAULTS = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, eps=1e-6, vocab_size=32000,
                tie_word_embeddings=False, max_position_embeddings=131072, rope_theta=10000.0)


def config_from_hf(hf):
    # A missing key means the class default 4096; an explicit null means no window.
    window = hf.get("sliding_window", 4096)
    n = hf.get("num_hidden_layers", DEFAULTS["num_hidden_layers"])
    return make_config("mistral", "mistral", hf, DEFAULTS, layer_windows=[window] * n)


MISTRAL = ArchitectureSpec(
    name="mistral",
    family="mistral",
    model_types=("mistral",),
    hf_architectures=("MistralForCausalLM",),
    aliases=("mistral7b", "mixtral-dense"),
    # With no config, Llama-style names are taken as Mistral, as the original design does;
    # the two share tensor names and differ only in config (the window).
    tensor_pattern=TensorNamePattern(required=(r"\.self_attn\.q_proj\.weight$",),
                                     forbidden=(r"\.q_proj\.bias$", r"q_norm", r"_feedforward_")),
    describe=ArchitectureConfig(ModelArchitecture.MISTRAL, sliding_window=True, variant="mistral"),
    config_from_hf=config_from_hf,
    tensor_map=lambda cfg: llama_tensor_map(),
)


@hookimpl
def register_architectures(register):
    register(MISTRAL)
