"""Detection from config and from tensor names, and the descriptive tables."""
import json

import pytest
from safetensors import safe_open

import torchless
from torchless import ActivationType, ArchitectureConfig, ModelArchitecture, NormType
from conftest import fixture_dirs

FIXTURES = {d.name: d for d in fixture_dirs()}

FAMILY = {"llama2_mha": "llama", "llama3_gqa": "llama", "llama_linear": "llama",
          "llama_dynamic": "llama", "llama_yarn": "llama", "llama_bf16": "llama",
          "llama_sharded": "llama", "mistral_window": "mistral", "phi2": "phi", "phi3": "phi",
          "phi3_longrope_short": "phi", "phi3_longrope_long": "phi", "gemma": "gemma",
          "gemma2": "gemma", "gemma3_text": "gemma", "qwen1": "qwen", "qwen2_tied": "qwen",
          "qwen3": "qwen", "mixtral": "mistral", "qwen3_moe": "qwen", "qwen3_moe_mixed": "qwen",
          "olmoe": "olmoe", "qwen2_moe": "qwen"}

# From tensor names alone, where the names differ between families (Gemma 1, Llama and
# Mistral share names; without a config those read as Mistral, as the original design says).
BY_NAMES = {"phi2": "phi", "phi3": "phi", "phi3_longrope_long": "phi", "gemma2": "gemma",
            "gemma3_text": "gemma", "qwen1": "qwen", "qwen2_tied": "qwen", "qwen3": "qwen",
            "llama2_mha": "mistral", "mistral_window": "mistral", "mixtral": "mistral",
            "qwen3_moe": "qwen", "qwen2_moe": "qwen"}
# (OLMoE's tensor names are Qwen3-MoE's: without a config they read as Qwen3-MoE)
VARIANT_BY_NAMES = {"phi2": "phi", "phi3": "phi3", "gemma2": "gemma2", "gemma3_text": "gemma3_text",
                    "qwen1": "qwen", "qwen2_tied": "qwen2", "qwen3": "qwen3", "mixtral": "mixtral",
                    "qwen3_moe": "qwen3_moe", "qwen2_moe": "qwen2_moe"}


def tensor_names(d):
    names = []
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "np") as s:
            names.extend(s.keys())
    return names


def test_every_family_has_a_fixture():
    assert set(FAMILY) <= set(FIXTURES), sorted(set(FAMILY) - set(FIXTURES))


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_detect_from_config(name):
    cfg = json.loads((FIXTURES[name] / "config.json").read_text())
    assert torchless.detect_architecture(cfg, []) == FAMILY[name]
    # config wins over tensor names
    assert torchless.detect_architecture(cfg, tensor_names(FIXTURES[name])) == FAMILY[name]


@pytest.mark.parametrize("name", sorted(BY_NAMES))
def test_detect_from_tensor_names(name):
    names = tensor_names(FIXTURES[name])
    assert torchless.detect_architecture_from_tensors(names) == BY_NAMES[name]
    if name in VARIANT_BY_NAMES:
        assert torchless.registry().detect({}, names).name == VARIANT_BY_NAMES[name]


def test_detect_unknown():
    assert torchless.detect_architecture_from_tensors(["foo.bar"]) == ModelArchitecture.UNKNOWN
    assert torchless.detect_architecture({"model_type": "rwkv"}, []) == ModelArchitecture.UNKNOWN


@pytest.mark.parametrize("text,family", [
    ("llama", "llama"), ("LLaMA-3", "llama"), ("llama2", "llama"), ("Llama-3.1", "llama"),
    ("mistral", "mistral"), ("phi", "phi"), ("phi-3", "phi"), ("Phi3", "phi"), ("phi-2", "phi"),
    ("gemma", "gemma"), ("gemma2", "gemma"), ("Gemma-3", "gemma"), ("gemma3_text", "gemma"),
    ("qwen", "qwen"), ("qwen2", "qwen"), ("Qwen2.5", "qwen"), ("qwen3", "qwen"),
])
def test_from_str(text, family):
    assert ModelArchitecture.from_str(text) == family
    assert ModelArchitecture.from_str(text) == getattr(ModelArchitecture, family.upper())


def test_original_design_detection_example():
    assert torchless.detect_architecture_from_tensors(
        ["model.layers.0.post_feedforward_layernorm.weight"]) == ModelArchitecture.Gemma


def test_architecture_configs():
    phi = ArchitectureConfig.phi()  # Phi-2
    assert phi.parallel_residual and phi.norm_type == NormType.LAYER_NORM
    assert phi.activation == ActivationType.GELU_TANH and not phi.fused_gate_up
    phi3 = ArchitectureConfig.phi3()
    assert phi3.fused_qkv and phi3.fused_gate_up and not phi3.parallel_residual
    gemma = ArchitectureConfig.gemma()
    assert gemma.tie_embeddings and gemma.norm_type == NormType.RMS_NORM_PLUS_ONE
    assert gemma.activation == ActivationType.GEGLU
    assert ArchitectureConfig.gemma2().sandwich_norms and ArchitectureConfig.gemma2().attn_softcap
    assert ArchitectureConfig.qwen().fused_qkv and not ArchitectureConfig.qwen2().fused_qkv
    assert ArchitectureConfig.qwen3().qk_norm
    assert ArchitectureConfig.llama().activation == ActivationType.SWIGLU
    assert ArchitectureConfig.mistral().sliding_window
    assert ArchitectureConfig.qwen().tensor_names.embedding == "transformer.wte.weight"


@pytest.mark.parametrize("name,force,first_missing", [
    ("phi2", "llama", "model.norm.weight"),
    ("gemma2", "phi", "model.final_layernorm.weight"),
    ("qwen1", "llama", "model.embed_tokens.weight"),
])
def test_load_as_forced_family_that_does_not_fit(name, force, first_missing):
    with pytest.raises(torchless.MissingTensorError, match=f"missing tensor '{first_missing}'"):
        torchless.ModelLoader.load_as(FIXTURES[name], force)


def test_load_as_right_family():
    m = torchless.ModelLoader.load_as(FIXTURES["phi3"], "phi-3")
    assert m.architecture == "phi" and m.config.variant == "phi3"
    assert isinstance(torchless.Phi.load(FIXTURES["phi2"]), torchless.Phi)
    lazy = torchless.LazyQwen.load(FIXTURES["qwen2_tied"])
    assert lazy.params.lazy and isinstance(lazy, torchless.LazyQwen)
    assert isinstance(torchless.LLaMA.load(FIXTURES["llama2_mha"]), torchless.LLaMA)
    assert isinstance(torchless.Gemma.load(torchless.Parameters.load(FIXTURES["gemma"])), torchless.Gemma)
    with pytest.raises(torchless.UnknownArchitectureError):
        torchless.ModelLoader.load_as(FIXTURES["phi3"], "gpt-neox")
