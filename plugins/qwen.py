"""Qwen-1 (``qwen``: remote-code QWenLMHeadModel), Qwen2 (q/k/v biases), Qwen3 (q/k
RMSNorm per head), Qwen2-MoE (Qwen2's attention; a mixture of experts plus one shared expert
as the MLP) and Qwen3-MoE (Qwen3's attention, a mixture of experts, no shared expert)."""
from torchless import ArchitectureConfig, ArchitectureSpec, ModelArchitecture, TensorNamePattern
from torchless import hookimpl
from torchless.config import MoeConfig, get
from torchless.errors import ConfigError
from torchless.hf_config import layer_types_windows, llama_tensor_map, make_config
from torchless.plugins import TensorMap
from torchless.rope import RopeConfig

QWEN2_DEFAULTS = dict(hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, eps=1e-6,
                      vocab_size=151936, tie_word_embeddings=False,
                      max_position_embeddings=32768, rope_theta=10000.0)
QWEN3_DEFAULTS = dict(QWEN2_DEFAULTS, head_dim=128)


def _qwen2_windows(hf, n):
    windows, _ = layer_types_windows(
        hf, n, hf.get("sliding_window", 4096),
        lambda i: "sliding_attention"
        if hf.get("use_sliding_window", False) and i >= hf.get("max_window_layers", 28)
        else "full_attention")
    return windows


def qwen2_config(hf):
    n = hf.get("num_hidden_layers", QWEN2_DEFAULTS["num_hidden_layers"])
    return make_config("qwen", "qwen2", hf, QWEN2_DEFAULTS, layer_windows=_qwen2_windows(hf, n))


def qwen3_config(hf):
    n = hf.get("num_hidden_layers", QWEN3_DEFAULTS["num_hidden_layers"])
    return make_config("qwen", "qwen3", hf, QWEN3_DEFAULTS, qk_norm="rms",
                       layer_windows=_qwen2_windows(hf, n))


def qwen3_moe_config(hf):
    """transformers' ``Qwen3MoeConfig``: layer ``i`` is a mixture unless it is in
    ``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step != 0`` (then a dense MLP of width
    ``intermediate_size``); softmax router, top ``num_experts_per_tok``, renormalised when
    ``norm_topk_prob``. No shared expert (Qwen2-MoE's is absent from Qwen3-MoE)."""
    n = hf.get("num_hidden_layers", QWEN3_DEFAULTS["num_hidden_layers"])
    E = hf.get("num_experts", hf.get("num_local_experts", 128))
    E = get({"num_experts": E}, "num_experts", kind=int)
    layers = _moe_layers(hf, n, E)
    moe = MoeConfig(num_experts=E, top_k=get(hf, "num_experts_per_tok", 8, kind=int),
                    intermediate_size=get(hf, "moe_intermediate_size", 768, kind=int),
                    router="softmax_topk", renorm=bool(hf.get("norm_topk_prob", False)),
                    layers=layers)
    # no head_dim field in Qwen3MoeConfig: attention takes hidden // heads unless one is given
    return make_config("qwen", "qwen3_moe", hf, dict(QWEN2_DEFAULTS, intermediate_size=6144),
                       qk_norm="rms", layer_windows=_qwen2_windows(hf, n), moe=moe)


QWEN2_MOE_DEFAULTS = dict(QWEN2_DEFAULTS, hidden_size=2048, intermediate_size=5632,
                          num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16)


def _moe_layers(hf, n, E):
    step = get(hf, "decoder_sparse_step", 1, kind=int) or 1
    only = set(hf.get("mlp_only_layers") or [])
    return [i not in only and E > 0 and (i + 1) % step == 0 for i in range(n)]


def qwen2_moe_config(hf):
    """transformers' ``Qwen2MoeConfig``: the Qwen3-MoE layer rule (``mlp_only_layers``,
    ``decoder_sparse_step``), a softmax router keeping ``num_experts_per_tok`` (renormalised
    when ``norm_topk_prob``, false by default and in the released models), and in every
    mixture layer a shared expert of ``shared_expert_intermediate_size`` whose output is
    scaled by ``sigmoid(shared_expert_gate(x))`` and added to the experts'."""
    n = hf.get("num_hidden_layers", QWEN2_MOE_DEFAULTS["num_hidden_layers"])
    E = get(hf, "num_experts", 60, kind=int)
    moe = MoeConfig(num_experts=E, top_k=get(hf, "num_experts_per_tok", 4, kind=int),
                    intermediate_size=get(hf, "moe_intermediate_size", 1408, kind=int),
                    router="softmax_topk", renorm=bool(hf.get("norm_topk_prob", False)),
                    layers=_moe_layers(hf, n, E),
                    shared_intermediate_size=get(hf, "shared_expert_intermediate_size", 5632,
                                                 kind=int))
    if moe.shared_intermediate_size <= 0:
        raise ConfigError("Qwen2-MoE shared_expert_intermediate_size must be positive, got "
                          f"{moe.shared_intermediate_size}")
    return make_config("qwen", "qwen2_moe", hf, QWEN2_MOE_DEFAULTS,
                       layer_windows=_qwen2_windows(hf, n), moe=moe)


def qwen1_config(hf):
    """Qwen-1's own field names (ARCHITECTURES.md 3.8)."""
    H = get(hf, "hidden_size", 4096, kind=int)
    nH = get(hf, "num_attention_heads", 32, kind=int)
    D = H // nH
    inter = get(hf, "intermediate_size", 22016, kind=int)
    if inter % 2:
        raise ConfigError(
            f"Qwen-1 intermediate_size must be even (twice the MLP width), got {inter}")
    seq_length = get(hf, "seq_length", 8192, kind=int)
    rot = int(get(hf, "kv_channels", D, kind=int) * float(hf.get("rotary_pct", 1.0)))
    theta = float(hf.get("rotary_emb_base", 10000))
    if hf.get("use_dynamic_ntk", True):
        rope = RopeConfig(rotary_dim=rot, theta=theta, rope_type="qwen_ntk",
                          params={"seq_length": seq_length})
    else:
        rope = RopeConfig(rotary_dim=rot, theta=theta)
    mapped = dict(hf, head_dim=D, intermediate_size=inter // 2, num_key_value_heads=nH,
                  rope_scaling=None, rope_parameters=None)
    return make_config(
        "qwen", "qwen", mapped,
        dict(QWEN2_DEFAULTS, eps_key="layer_norm_epsilon", tie_word_embeddings=False,
             max_position_embeddings=8192),
        ropes={"default": rope},
        logn_seq_length=seq_length if hf.get("use_logn_attn", True) else None,
    )


def qwen1_tensors(cfg):
    return TensorMap(
        globals={"token_embd": "transformer.wte", "output_norm": "transformer.ln_f",
                 "output": "lm_head"},
        layers={"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
                "ffn_norm": "ln_2",
                # c_proj(w1(x) * silu(w2(x))): w2 is the gated branch.
                "ffn_gate": "mlp.w2", "ffn_up": "mlp.w1", "ffn_down": "mlp.c_proj"},
        layer_prefix="transformer.h.{i}.",
    )


QWEN1 = ArchitectureSpec(
    name="qwen",
    family="qwen",
    model_types=("qwen",),
    hf_architectures=("QWenLMHeadModel",),
    aliases=("qwen1", "qwen-1", "qwen1.5"),
    tensor_pattern=TensorNamePattern(required=(r"^transformer\.h\.\d+\.attn\.c_attn\.weight$",),
                                     embedding="transformer.wte.weight",
                                     layer_prefix="transformer.h.{i}.",
                                     final_norm="transformer.ln_f.weight"),
    describe=ArchitectureConfig(ModelArchitecture.QWEN, fused_qkv=True, variant="qwen"),
    config_from_hf=qwen1_config,
    tensor_map=qwen1_tensors,
)

QWEN2 = ArchitectureSpec(
    name="qwen2",
    family="qwen",
    model_types=("qwen2",),
    hf_architectures=("Qwen2ForCausalLM",),
    gguf_architectures=("qwen2",),
    aliases=("qwen2.5", "qwen-2", "qwen-2.5"),
    tensor_pattern=TensorNamePattern(required=(r"self_attn\.q_proj\.bias$",
                                               r"self_attn\.o_proj\.weight$"),
                                     forbidden=(r"self_attn\.o_proj\.bias$", r"q_norm",
                                                r"\.mlp\.experts\.")),
    describe=ArchitectureConfig(ModelArchitecture.QWEN, variant="qwen2"),
    config_from_hf=qwen2_config,
    tensor_map=lambda cfg: llama_tensor_map(),
)

QWEN3 = ArchitectureSpec(
    name="qwen3",
    family="qwen",
    model_types=("qwen3",),
    hf_architectures=("Qwen3ForCausalLM",),
    gguf_architectures=("qwen3",),
    aliases=("qwen-3",),
    tensor_pattern=TensorNamePattern(required=(r"self_attn\.q_norm\.weight$",),
                                     forbidden=(r"_feedforward_layernorm",)),
    describe=ArchitectureConfig(ModelArchitecture.QWEN, qk_norm=True, variant="qwen3"),
    config_from_hf=qwen3_config,
    tensor_map=lambda cfg: llama_tensor_map(extra_layers={
        "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}),
)


QWEN3_MOE = ArchitectureSpec(
    name="qwen3_moe",
    family="qwen",
    model_types=("qwen3_moe",),
    hf_architectures=("Qwen3MoeForCausalLM",),
    gguf_architectures=("qwen3moe",),
    aliases=("qwen3moe", "qwen-3-moe"),
    tensor_pattern=TensorNamePattern(required=(r"self_attn\.q_norm\.weight$",
                                               r"\.mlp\.gate\.weight$",
                                               r"\.mlp\.experts\.0\.gate_proj\.weight$")),
    describe=ArchitectureConfig(ModelArchitecture.QWEN, qk_norm=True, variant="qwen3_moe"),
    config_from_hf=qwen3_moe_config,
    tensor_map=lambda cfg: llama_tensor_map(extra_layers={
        "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
        "ffn_gate_inp": "mlp.gate",
        "ffn_gate_exps": "mlp.experts.{j}.gate_proj",
        "ffn_up_exps": "mlp.experts.{j}.up_proj",
        "ffn_down_exps": "mlp.experts.{j}.down_proj"}),
)


QWEN2_MOE = ArchitectureSpec(
    name="qwen2_moe",
    family="qwen",
    model_types=("qwen2_moe",),
    hf_architectures=("Qwen2MoeForCausalLM",),
    gguf_architectures=("qwen2moe",),
    aliases=("qwen2moe", "qwen1.5-moe", "qwen-2-moe"),
    tensor_pattern=TensorNamePattern(required=(r"\.mlp\.shared_expert_gate\.weight$",
                                               r"\.mlp\.experts\.0\.gate_proj\.weight$")),
    describe=ArchitectureConfig(ModelArchitecture.QWEN, variant="qwen2_moe"),
    config_from_hf=qwen2_moe_config,
    tensor_map=lambda cfg: llama_tensor_map(extra_layers={
        "ffn_gate_inp": "mlp.gate",
        "ffn_gate_exps": "mlp.experts.{j}.gate_proj",
        "ffn_up_exps": "mlp.experts.{j}.up_proj",
        "ffn_down_exps": "mlp.experts.{j}.down_proj",
        "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
        "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
        "ffn_up_shexp": "mlp.shared_expert.up_proj",
        "ffn_down_shexp": "mlp.shared_expert.down_proj"}),
)


@hookimpl
def register_architectures(register):
    register(QWEN1)
    register(QWEN2)
    register(QWEN3)
    register(QWEN2_MOE)
    register(QWEN3_MOE)


def _gguf(variant, **kw):
    def config_from_gguf(g):
        from torchless.gguf_config import gguf_config

        return gguf_config("qwen", variant, g, **kw)

    return config_from_gguf


QWEN2.config_from_gguf = _gguf("qwen2")
QWEN3.config_from_gguf = _gguf("qwen3", qk_norm="rms")


def _qwen3_moe_gguf(g):
    from torchless.gguf_config import gguf_config, gguf_moe

    # llama.cpp src/models/qwen3moe.cpp: every layer a mixture, always renormalised
    moe = gguf_moe(g, renorm=True)
    if moe is None:
        raise ConfigError(f"{g.path}: a qwen3moe GGUF without qwen3moe.expert_count")
    return gguf_config("qwen", "qwen3_moe", g, qk_norm="rms", moe=moe)


QWEN3_MOE.config_from_gguf = _qwen3_moe_gguf


def _qwen2_moe_gguf(g):
    from torchless.gguf_config import gguf_config, gguf_moe

    # llama.cpp src/models/qwen2moe.cpp: never renormalised (norm_w = false), and the
    # shared expert (ffn_*_shexp) of expert_shared_feed_forward_length, sigmoid-gated
    moe = gguf_moe(g, renorm=False, shared=True)
    if moe is None:
        raise ConfigError(f"{g.path}: a qwen2moe GGUF without qwen2moe.expert_count")
    return gguf_config("qwen", "qwen2_moe", g, moe=moe)


def _qwen2_moe_fixup(canonical, w, cfg):
    """llama.cpp stores the shared expert's gate (``ffn_gate_inp_shexp``, one row) as a
    vector ``[n_embd]``: back to the ``[1, n_embd]`` matrix of the checkpoint (same buffer)."""
    if canonical == "ffn_gate_inp_shexp" and len(w.shape) == 1:
        from torchless.weights import Weight

        return Weight(w.name, w.kind, (1, w.shape[0]), w.data.reshape(1, -1))
    return w


QWEN2_MOE.config_from_gguf = _qwen2_moe_gguf
QWEN2_MOE.gguf_fixup = _qwen2_moe_fixup
