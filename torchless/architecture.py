"""Describing and detecting architectures.

``ModelArchitecture`` names a family ("llama", "mistral", "phi", "gemma", "qwen", or whatever a
third-party plugin registers). ``ArchitectureConfig`` is the human-level description of a
family (the comparison table of the original design, corrected per ARCHITECTURES.md).
``TensorNamePattern`` is what detection from tensor names alone looks for.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum


class ActivationType(Enum):
    SWIGLU = "swiglu"  # down(silu(gate) * up)
    GEGLU = "geglu"  # down(gelu_tanh(gate) * up)
    GELU_TANH = "gelu_tanh"  # fc2(gelu_tanh(fc1)), Phi-2
    GELU = "gelu"  # exact erf GELU, two-layer MLP


class NormType(Enum):
    RMS_NORM = "rms"
    RMS_NORM_PLUS_ONE = "rms1p"  # Gemma: x * (1 + w) / rms
    LAYER_NORM = "layernorm"


class RopeScaling(Enum):
    NONE = "default"
    LINEAR = "linear"
    DYNAMIC_NTK = "dynamic"
    YARN = "yarn"
    LLAMA3 = "llama3"
    LONGROPE = "longrope"


class ModelArchitecture(str):
    """A family name. Compares equal to its plain string, so ``arch == "llama"`` works.

    The built-in families are class attributes (``ModelArchitecture.LLAMA`` ...); plugins add
    more at run time. :meth:`from_str` accepts the spellings people use ("LLaMA-3", "phi-3",
    "qwen2") and raises :class:`UnknownArchitectureError` listing what is registered.
    """

    __slots__ = ()

    @classmethod
    def from_str(cls, name: str) -> "ModelArchitecture":
        from .plugins import registry

        return registry().family_for_name(name)

    def __repr__(self) -> str:
        return f"ModelArchitecture({str(self)!r})"


ModelArchitecture.MISTRAL = ModelArchitecture("mistral")
ModelArchitecture.LLAMA = ModelArchitecture("llama")
ModelArchitecture.PHI = ModelArchitecture("phi")
ModelArchitecture.GEMMA = ModelArchitecture("gemma")
ModelArchitecture.QWEN = ModelArchitecture("qwen")
ModelArchitecture.UNKNOWN = ModelArchitecture("unknown")
# The original design's CamelCase spellings.
ModelArchitecture.Mistral = ModelArchitecture.MISTRAL
ModelArchitecture.LLaMA = ModelArchitecture.LLAMA
ModelArchitecture.Phi = ModelArchitecture.PHI
ModelArchitecture.Gemma = ModelArchitecture.GEMMA
ModelArchitecture.Qwen = ModelArchitecture.QWEN
ModelArchitecture.Unknown = ModelArchitecture.UNKNOWN


@dataclass(frozen=True)
class TensorNamePattern:
    """Tensor names that identify a variant when no config says which it is.

    A checkpoint matches when, for every regex in ``required``, some tensor name matches it,
    and no tensor name matches any regex in ``forbidden``. Among matches, the pattern with the
    highest ``specificity`` wins (more required names = more specific, plus ``priority``).
    ``layer_prefix`` and the names are what a person sees in ``torchless inspect``.
    """

    required: tuple = ()
    forbidden: tuple = ()
    priority: int = 0
    embedding: str = "model.embed_tokens.weight"
    layer_prefix: str = "model.layers.{i}."
    final_norm: str = "model.norm.weight"

    @property
    def specificity(self) -> int:
        return len(self.required) * 10 + len(self.forbidden) + self.priority

    def matches(self, names) -> bool:
        names = list(names)
        for rx in self.required:
            r = re.compile(rx)
            if not any(r.search(n) for n in names):
                return False
        for rx in self.forbidden:
            r = re.compile(rx)
            if any(r.search(n) for n in names):
                return False
        return True


@dataclass(frozen=True)
class ArchitectureConfig:
    """What sets a family apart, at the level of the original design's comparison table."""

    architecture: ModelArchitecture
    tensor_names: TensorNamePattern = field(default_factory=TensorNamePattern)
    tie_embeddings: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    rope_scaling: RopeScaling = RopeScaling.NONE
    activation: ActivationType = ActivationType.SWIGLU
    norm_type: NormType = NormType.RMS_NORM
    parallel_residual: bool = False
    sandwich_norms: bool = False
    qk_norm: bool = False
    sliding_window: bool = False
    attn_softcap: bool = False
    embed_scale: bool = False
    partial_rotary: bool = False
    variant: str = ""

    @classmethod
    def for_variant(cls, name: str) -> "ArchitectureConfig":
        """The description a plugin registered for a variant ("llama", "phi3", "gemma2"...)."""
        from .plugins import registry

        return registry().spec(name).describe

    @classmethod
    def mistral(cls):
        return cls.for_variant("mistral")

    @classmethod
    def llama(cls):
        return cls.for_variant("llama")

    @classmethod
    def phi(cls):
        """Phi-2 (``model_type: phi``). Phi-3 is :meth:`phi3`."""
        return cls.for_variant("phi")

    @classmethod
    def phi3(cls):
        return cls.for_variant("phi3")

    @classmethod
    def gemma(cls):
        return cls.for_variant("gemma")

    @classmethod
    def gemma2(cls):
        return cls.for_variant("gemma2")

    @classmethod
    def gemma3(cls):
        return cls.for_variant("gemma3_text")

    @classmethod
    def qwen(cls):
        """Qwen-1 (``QWenLMHeadModel``). Qwen2 is :meth:`qwen2`, Qwen3 :meth:`qwen3`."""
        return cls.for_variant("qwen")

    @classmethod
    def qwen2(cls):
        return cls.for_variant("qwen2")

    @classmethod
    def qwen3(cls):
        return cls.for_variant("qwen3")


def detect_architecture(config: dict | None, tensor_names=()) -> ModelArchitecture:
    """The family of a checkpoint: from its config first, tensor names as the fallback.

    Returns ``ModelArchitecture.UNKNOWN`` when nothing matches.
    """
    from .plugins import registry

    spec = registry().detect(config or {}, tensor_names)
    return ModelArchitecture(spec.family) if spec else ModelArchitecture.UNKNOWN


def detect_architecture_from_tensors(tensor_names) -> ModelArchitecture:
    """The family of a checkpoint from its tensor names alone (UNKNOWN if none matches)."""
    return detect_architecture(None, tensor_names)
