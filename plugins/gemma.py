"""Gemma 1, 2 and 3 (text): Gemma (1 + w) RMSNorm, embeddings scaled by sqrt(hidden), GeGLU
with tanh GELU, tied output; Gemma 2 adds sandwich norms, soft-capping and alternating
sliding layers; Gemma 3 adds q/k norms and separate RoPE tables for local and global layers."""
import math

from torchless import ArchitectureConfig, ArchitectureSpec, ModelArchitecture, TensorNamePattern
from torchless import hookimpl
from torchless.architecture import ActivationType, NormType
from torchless.errors import ConfigError
from torchless.hf_config import layer_types_windows, llama_tensor_map, make_config
from torchless.rope import resolve_rope

GEMMA_DEFAULTS = dict(hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                      num_attention_heads=16, num_key_value_heads=16, head_dim=256, eps=1e-6,
                      vocab_size=256000, tie_word_embeddings=True, max_position_embeddings=8192,
                      rope_theta=10000.0)
GEMMA2_DEFAULTS = dict(GEMMA_DEFAULTS, hidden_size=2304, intermediate_size=9216,
                       num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4)
GEMMA3_DEFAULTS = dict(GEMMA2_DEFAULTS, rope_theta=1_000_000.0, vocab_size=262208,
                       max_position_embeddings=131072)

SANDWICH = {"post_attention_norm": "post_attention_layernorm",
            "ffn_norm": "pre_feedforward_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm"}


def _gemma_common(hf, defaults):
    # Gemma 1 configs say "gelu" but mean the tanh approximation (ARCHITECTURES.md 3.5).
    return dict(norm="rms1p", activation="gelu_tanh",
                embed_scale=math.sqrt(hf.get("hidden_size", defaults["hidden_size"])))


def gemma_config(hf):
    return make_config("gemma", "gemma", hf, GEMMA_DEFAULTS, **_gemma_common(hf, GEMMA_DEFAULTS))


def gemma2_config(hf):
    d = GEMMA2_DEFAULTS
    n = hf.get("num_hidden_layers", d["num_hidden_layers"])
    windows, _ = layer_types_windows(
        hf, n, hf.get("sliding_window", 4096),
        lambda i: "sliding_attention" if (i + 1) % 2 else "full_attention")
    return make_config(
        "gemma", "gemma2", hf, d, **_gemma_common(hf, d), residual="sandwich",
        attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
        attn_softcap=hf.get("attn_logit_softcapping", 50.0),
        final_softcap=hf.get("final_logit_softcapping", 30.0),
        layer_windows=windows,
    )


def gemma3_config(hf):
    if hf.get("model_type") == "gemma3" and "text_config" in hf:
        raise ConfigError("multimodal gemma3 checkpoints: load the text model (gemma3_text)")
    d = GEMMA3_DEFAULTS
    n = hf.get("num_hidden_layers", d["num_hidden_layers"])
    pattern = hf.get("sliding_window_pattern", 6)
    windows, types = layer_types_windows(
        hf, n, hf.get("sliding_window", 4096),
        lambda i: "sliding_attention" if (i + 1) % pattern else "full_attention")
    return make_config(
        "gemma", "gemma3_text", hf, d, **_gemma_common(hf, d), residual="sandwich",
        qk_norm="rms1p", attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
        attn_softcap=None, final_softcap=hf.get("final_logit_softcapping"),
        layer_windows=windows,
        layer_rope=["local" if t == "sliding_attention" else "global" for t in types],
        ropes=_gemma3_ropes(hf, d),
    )


def _gemma3_ropes(hf, d):
    D = hf.get("head_dim") or d["head_dim"]
    rp = hf.get("rope_parameters")
    if isinstance(rp, dict) and any(isinstance(v, dict) for v in rp.values()):
        full = dict(rp.get("full_attention") or {})
        full.setdefault("rope_theta", hf.get("rope_theta", d["rope_theta"]))
        local = dict(rp.get("sliding_attention") or {})
        local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10000.0))
        return {"global": resolve_rope(hf, head_dim=D, rope_dict=full),
                "local": resolve_rope(hf, head_dim=D, rope_dict=local)}
    glob = resolve_rope(hf, head_dim=D, default_theta=d["rope_theta"])
    local = resolve_rope(hf, head_dim=D, rope_dict={
        "rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", 10000.0)})
    return {"global": glob, "local": local}


GEMMA = ArchitectureSpec(
    name="gemma",
    family="gemma",
    model_types=("gemma",),
    hf_architectures=("GemmaForCausalLM",),
    gguf_architectures=("gemma",),
    aliases=("gemma1", "gemma-1", "codegemma"),
    describe=ArchitectureConfig(
        ModelArchitecture.GEMMA, tie_embeddings=True, activation=ActivationType.GEGLU,
        norm_type=NormType.RMS_NORM_PLUS_ONE, embed_scale=True, variant="gemma"),
    config_from_hf=gemma_config,
    tensor_map=lambda cfg: llama_tensor_map(),
)

GEMMA2 = ArchitectureSpec(
    name="gemma2",
    family="gemma",
    model_types=("gemma2",),
    hf_architectures=("Gemma2ForCausalLM",),
    gguf_architectures=("gemma2",),
    aliases=("gemma-2",),
    tensor_pattern=TensorNamePattern(required=(r"_feedforward_layernorm\.weight$",),
                                     forbidden=(r"self_attn\.q_norm",)),
    describe=ArchitectureConfig(
        ModelArchitecture.GEMMA, tie_embeddings=True, activation=ActivationType.GEGLU,
        norm_type=NormType.RMS_NORM_PLUS_ONE, sandwich_norms=True, sliding_window=True,
        attn_softcap=True, embed_scale=True, variant="gemma2"),
    config_from_hf=gemma2_config,
    tensor_map=lambda cfg: llama_tensor_map(extra_layers=SANDWICH),
)

GEMMA3 = ArchitectureSpec(
    name="gemma3_text",
    family="gemma",
    model_types=("gemma3_text",),
    hf_architectures=("Gemma3ForCausalLM",),
    gguf_architectures=("gemma3",),
    aliases=("gemma3", "gemma-3"),
    tensor_pattern=TensorNamePattern(required=(r"_feedforward_layernorm\.weight$",
                                               r"self_attn\.q_norm\.weight$")),
    describe=ArchitectureConfig(
        ModelArchitecture.GEMMA, tie_embeddings=True, activation=ActivationType.GEGLU,
        norm_type=NormType.RMS_NORM_PLUS_ONE, sandwich_norms=True, sliding_window=True,
        qk_norm=True, embed_scale=True, variant="gemma3_text"),
    config_from_hf=gemma3_config,
    tensor_map=lambda cfg: llama_tensor_map(extra_layers=dict(
        SANDWICH, attn_q_norm="self_attn.q_norm", attn_k_norm="self_attn.k_norm")),
)


@hookimpl
def register_architectures(register):
    register(GEMMA)
    register(GEMMA2)
    register(GEMMA3)


# ---- GGUF ------------------------------------------------------------------------------
# llama.cpp's converter stores Gemma norm weights with the +1 already added, so a GGUF Gemma
# uses plain RMSNorm (w * x / rms), which is the same function.

def _gguf_common(g):
    from torchless.gguf_config import gguf_fields

    f = gguf_fields(g)
    f.update(norm="rms", activation="gelu_tanh", embed_scale=math.sqrt(f["hidden_size"]))
    return f


def gemma_from_gguf(g):
    from torchless import ModelConfig

    return ModelConfig(architecture="gemma", variant="gemma", **_gguf_common(g))


def _gguf_attn_scale(f, layers_27b):
    # llama.cpp: the 27B models scale by (hidden / heads)^-0.5, the others by head_dim^-0.5,
    # which is what query_pre_attn_scalar gives in each released config.
    if f["num_layers"] == layers_27b:
        return (f["hidden_size"] / f["num_heads"]) ** -0.5
    return f["head_dim"] ** -0.5


def _gguf_rope_swa(g, glob, default_base, default_factor):
    """The RoPE table of sliding layers: llama.cpp's ``{arch}.rope.freq_base_swa`` (via
    ``llama_model::get_rope_freq_base/_scale``, src/llama-model.cpp) and the per-arch
    defaults of ``rope_freq_base_train_swa`` / ``rope_freq_scale_train_swa``."""
    from torchless.rope import RopeConfig

    base = g.get(f"{g.architecture}.rope.freq_base_swa", float, default_base)
    if default_factor:
        return RopeConfig(rotary_dim=glob.rotary_dim, theta=base, rope_type="linear",
                          factor=default_factor)
    return RopeConfig(rotary_dim=glob.rotary_dim, theta=base)


def gemma2_from_gguf(g):
    # llama.cpp src/models/gemma2.cpp (load_arch_hparams): n_swa defaults to 4096,
    # load_swa_pattern(ml, 2) (sliding_window_pattern key, else every other layer from the
    # first); sliding layers use rope.freq_base_swa, defaulting to the global base and scale.
    from torchless import ModelConfig
    from torchless.gguf_config import gguf_swa_layers

    f = _gguf_common(g)
    a = g.architecture
    W = g.get(f"{a}.attention.sliding_window", int, 4096)
    swa = gguf_swa_layers(g, f["num_layers"], 2)
    glob = f["ropes"]["default"]
    if glob.rope_type in ("default", "linear"):
        local = _gguf_rope_swa(g, glob, glob.theta,
                               glob.factor if glob.rope_type == "linear" else None)
    else:  # other scalings (none in released Gemma 2): the global table for every layer
        local = glob
    f.update(residual="sandwich", attn_scale=_gguf_attn_scale(f, 46),
             attn_softcap=g.get(f"{a}.attn_logit_softcapping", float, 50.0),
             final_softcap=g.get(f"{a}.final_logit_softcapping", float, 30.0),
             layer_windows=[W if s else None for s in swa],
             layer_rope=["local" if s else "global" for s in swa],
             ropes={"global": glob, "local": local})
    return ModelConfig(architecture="gemma", variant="gemma2", **f)


def gemma3_from_gguf(g):
    # llama.cpp src/models/gemma3.cpp (load_arch_hparams): sliding layers only when
    # attention.sliding_window is present and > 0; then load_swa_pattern(ml, 6) and
    # rope.freq_base_swa (hparams default 10000, freq scale 1: the linear factor of
    # rope.scaling.* applies to global layers only).
    from torchless import ModelConfig
    from torchless.gguf_config import gguf_swa_layers

    f = _gguf_common(g)
    a = g.architecture
    W = g.get(f"{a}.attention.sliding_window", int, 0)
    if W > 0:
        local = gguf_swa_layers(g, f["num_layers"], 6)
    else:
        local = [False] * f["num_layers"]
    glob = f["ropes"]["default"]
    f.update(residual="sandwich", qk_norm="rms", attn_scale=_gguf_attn_scale(f, 62),
             final_softcap=g.get(f"{a}.final_logit_softcapping", float, None),
             layer_windows=[W if s else None for s in local],
             layer_rope=["local" if s else "global" for s in local],
             ropes={"global": glob, "local": _gguf_rope_swa(g, glob, 10000.0, None)})
    return ModelConfig(architecture="gemma", variant="gemma3_text", **f)


GEMMA.config_from_gguf = gemma_from_gguf
GEMMA2.config_from_gguf = gemma2_from_gguf
GEMMA3.config_from_gguf = gemma3_from_gguf
