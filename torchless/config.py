"""The resolved hyper-parameters one model runs with.

A plugin translates a checkpoint's config (``config.json`` or GGUF metadata) into a
:class:`ModelConfig`; the shared decoder reads nothing else. Every field that differs between
families is here as data, so the engine has no ``if family == ...`` branches.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError
from .rope import RopeConfig

NORMS = ("rms", "rms1p", "layernorm")  # Llama RMSNorm, Gemma (1+w) RMSNorm, LayerNorm+bias
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
MLPS = ("gated", "dense")  # down(act(gate) * up)  |  fc2(act(fc1))
RESIDUALS = ("sequential", "parallel", "sandwich")
ROUTERS = ("softmax_topk", "topk_softmax")


@dataclass
class MoeConfig:
    """A mixture-of-experts MLP: a router picks ``top_k`` of ``num_experts`` gated MLPs per
    token and sums their outputs weighted by the routing probabilities.

    ``router``: ``softmax_topk`` (softmax over all experts, keep the k largest; Mixtral,
    Qwen3-MoE, OLMoE) or ``topk_softmax`` (k largest logits, softmax over those).
    ``renorm``: divide the k kept probabilities by their sum (Mixtral always; Qwen3-MoE and
    OLMoE when ``norm_topk_prob``); meaningless for ``topk_softmax`` (already sums to 1).
    ``layers``: per layer, True where the MLP is the mixture and False where it is the dense
    gated MLP of width ``ModelConfig.intermediate_size`` (Qwen3-MoE's ``mlp_only_layers`` /
    ``decoder_sparse_step``). Expert MLPs have the model's ``mlp`` form and ``activation``.
    ``shared_intermediate_size``: when positive, every mixture layer also has one shared
    expert of that width, always used and scaled by ``sigmoid(w_gate . x)`` (Qwen2-MoE's
    ``shared_expert`` and ``shared_expert_gate``); 0: none (Mixtral, Qwen3-MoE, OLMoE).
    """

    num_experts: int
    top_k: int
    intermediate_size: int
    router: str = "softmax_topk"
    renorm: bool = True
    layers: list = field(default_factory=list)
    shared_intermediate_size: int = 0

    def check(self, num_layers: int) -> None:
        s = self.shared_intermediate_size
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise ConfigError(f"moe shared_intermediate_size must be a non-negative integer, "
                              f"got {s!r}")
        for name in ("num_experts", "top_k", "intermediate_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"moe {name} must be a positive integer, got {v!r}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"moe top_k ({self.top_k}) exceeds num_experts "
                              f"({self.num_experts})")
        if self.router not in ROUTERS:
            raise ConfigError(f"moe router must be one of {ROUTERS}, got {self.router!r}")
        if not self.layers:
            self.layers = [True] * num_layers
        if len(self.layers) != num_layers:
            raise ConfigError(f"moe layers has {len(self.layers)} entries for {num_layers} "
                              "layers")
        self.layers = [bool(v) for v in self.layers]


@dataclass
class ModelConfig:
    architecture: str  # family name, e.g. "llama"
    variant: str  # plugin variant, usually the HF model_type, e.g. "llama", "gemma2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm: str = "rms"
    norm_eps: float = 1e-6
    activation: str = "silu"
    mlp: str = "gated"
    residual: str = "sequential"
    qk_norm: str | None = None  # per-head norm of q and k before RoPE ("rms" or "rms1p")
    qk_norm_full: bool = False  # q/k norm over the whole projection, not per head (OLMoE)
    attn_scale: float | None = None  # default head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    embed_scale: float | None = None  # multiply looked-up embeddings (Gemma: sqrt(hidden))
    tie_embeddings: bool = False
    layer_windows: list = field(default_factory=list)  # per layer: None or window size W
    layer_rope: list = field(default_factory=list)  # per layer: key into `ropes`
    ropes: dict = field(default_factory=dict)  # key -> RopeConfig
    max_position_embeddings: int | None = None
    logn_seq_length: int | None = None  # Qwen-1 log-n query scaling
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    add_bos: bool | None = None  # None: whatever the tokenizer's post-processor does
    moe: MoeConfig | None = None  # mixture-of-experts MLP (None: every layer dense)
    raw: dict = field(default_factory=dict, repr=False)  # the source config, for inspection

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        for name, allowed in (("norm", NORMS), ("activation", ACTIVATIONS), ("mlp", MLPS),
                              ("residual", RESIDUALS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.attn_scale is None:
            self.attn_scale = self.head_dim ** -0.5
        if not self.layer_windows:
            self.layer_windows = [None] * self.num_layers
        if not self.layer_rope:
            self.layer_rope = ["default"] * self.num_layers
        if len(self.layer_windows) != self.num_layers or len(self.layer_rope) != self.num_layers:
            raise ConfigError("per-layer lists must have one entry per layer")
        for key in set(self.layer_rope):
            if key not in self.ropes:
                raise ConfigError(f"layer uses rope table {key!r} which is not defined")
        for key, rc in self.ropes.items():
            if not isinstance(rc, RopeConfig) or rc.rotary_dim > self.head_dim:
                raise ConfigError(f"rope table {key!r} is invalid for head_dim {self.head_dim}")
        self.eos_token_ids = tuple(self.eos_token_ids or ())
        if self.moe is not None:
            if not isinstance(self.moe, MoeConfig):
                raise ConfigError(f"moe must be a MoeConfig, got {self.moe!r}")
            if self.mlp != "gated":
                raise ConfigError("mixture-of-experts layers need gated expert MLPs")
            self.moe.check(self.num_layers)

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and self.moe.layers[i]

    @property
    def n_rep(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rope_length_dependent(self) -> bool:
        return any(r.length_dependent for r in self.ropes.values())

    def summary(self) -> dict:
        """The fields a person wants to see (used by ``torchless inspect``)."""
        out = {k: getattr(self, k) for k in (
            "architecture", "variant", "vocab_size", "hidden_size", "num_layers", "num_heads",
            "num_kv_heads", "head_dim", "intermediate_size", "norm", "norm_eps", "activation",
            "mlp", "residual", "qk_norm", "qk_norm_full", "attn_scale", "attn_softcap",
            "final_softcap",
            "embed_scale", "tie_embeddings", "max_position_embeddings", "bos_token_id",
            "eos_token_ids")}
        windows = sorted({w for w in self.layer_windows if w is not None})
        out["sliding_window"] = windows[0] if len(windows) == 1 else (windows or None)
        out["sliding_layers"] = sum(w is not None for w in self.layer_windows)
        if self.moe is not None:
            m = self.moe
            out["moe"] = {"num_experts": m.num_experts, "top_k": m.top_k,
                          "expert_intermediate_size": m.intermediate_size,
                          "router": m.router, "renorm": m.renorm,
                          "moe_layers": sum(m.layers)}
        out["rope"] = {k: {"type": r.rope_type, "theta": r.theta, "rotary_dim": r.rotary_dim,
                           "factor": r.factor} for k, r in self.ropes.items()}
        return out


def get(hf: dict, key: str, default=None, *, required: bool = False, kind=None):
    """Read ``key`` from a config dict with an optional type check and a clear error."""
    if key not in hf or (hf[key] is None and required):
        if required:
            raise ConfigError(f"config is missing required field {key!r}")
        return default
    value = hf[key]
    if kind is not None and value is not None:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"config field {key!r} should be {kind.__name__}, got {value!r}")
    return value
