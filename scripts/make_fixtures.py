#!/usr/bin/env python
"""Build tiny random Hugging Face checkpoints plus reference logits for the torchless tests.

How to run (torch/transformers are only needed here, never by the engine itself)::

    pip install -e ".[reference]"
    python scripts/make_fixtures.py                  # all fixtures -> tests/fixtures/<name>/
    python scripts/make_fixtures.py --only gemma2    # one fixture (repeatable flag)
    python scripts/make_fixtures.py --out /tmp/fx    # another output directory
    python scripts/make_fixtures.py --check          # only re-validate existing reference.npz files
    python scripts/make_fixtures.py --list           # print the fixture table

Every fixture directory holds a small random checkpoint as ``save_pretrained`` writes it
(``config.json``, ``model.safetensors`` -- or shards plus ``model.safetensors.index.json`` --,
``generation_config.json``), a byte-level BPE ``tokenizer.json`` (vocab <= 320, built with the
``tokenizers`` library from inline text) with a matching ``tokenizer_config.json``, and
``reference.npz`` (``np.savez_compressed``) with:

``ids``                  int64 [T]   the token sequence: an English sentence (with a few non-ASCII
                                     words) encoded by the fixture's tokenizer, including the BOS
                                     that the family's post-processor prepends, cut to T tokens.
``logits_full``          float32 [T, V]  ONE float32 forward over all T tokens
                                     (``attn_implementation="eager"``, no cache).
``logits_incremental``   float32 [T, V]  the same ids fed one token per call with a
                                     ``DynamicCache``; row t is the output of the call for token t.
                                     Equal to ``logits_full`` (up to float rounding) except where the
                                     RoPE table depends on the current length: ``llama_dynamic``
                                     (dynamic NTK) and ``phi3_longrope_long`` (short/long switch
                                     while cached keys keep the short-factor rotation).
``greedy_prompt``        int64 [8]   ``ids[:8]``.
``greedy``               int64 [16]  new ids from ``model.generate(greedy_prompt, do_sample=False,
                                     max_new_tokens=16, min_new_tokens=16)`` with EOS disabled
                                     (``eos_token_id=None``), i.e. pure argmax decoding with the
                                     library's own cache handling (Phi-3 LongRoPE: cache dropped and
                                     the sequence recomputed when the length first exceeds
                                     ``original_max_position_embeddings``; dynamic NTK: per-step
                                     base, cached keys not re-rotated).
``logits_prefix_short``  float32 [O, V]  (Phi-3 LongRoPE fixtures only) one call over ``ids[:O]``,
                                     O = ``original_max_position_embeddings`` (short factors).

Weights: the model is built with ``from_config`` under ``torch.manual_seed(seed)`` (fixed seed per
fixture), then every parameter is overwritten from a seeded generator: matrices / embeddings
~ N(0, std) (std 0.2-0.3 per fixture; Gemma 2/3 use a smaller embedding std 0.08, because with
tied, sqrt(H)-scaled embeddings a larger one makes greedy decoding just repeat its input token),
Llama-style RMSNorm and LayerNorm weights 1 + 0.3 N(0,1), Gemma-style (1 + w) norm weights
0.3 N(0,1), every bias 0.1 N(0,1). Reruns are bit-for-bit reproducible.

Mixture-of-experts fixtures (``mixtral``, ``qwen3_moe``, ``qwen3_moe_mixed``, ``olmoe``,
``qwen2_moe``): router
weights ~ N(0, ``router_std`` = 1.0) so that the chosen experts differ from token to token, and
``reference.npz`` also holds ``router_experts`` int64 [L_moe, T, k]: the experts transformers'
routers pick for each token of ``ids`` (each row sorted), from ``output_router_logits``;
``make_fixture`` asserts at least 4 distinct expert sets and 3 experts used per layer.

Special cases:

* ``llama_bf16``: ``model.safetensors`` holds bfloat16 weights. The reference arrays come from a
  float32 model whose weights are exactly those bf16 values upcast to float32 (the model is
  rounded to bf16, saved, then converted back to float32 before any reference run), so an engine
  that upcasts the stored bf16 weights to float32 should match to float32 precision.
* ``llama_sharded``: saved with a small ``max_shard_size`` (several shards + index json).
* ``gemma``: config.json is patched after saving to carry the legacy ``"hidden_act": "gelu"``
  (transformers silently rewrites it to ``gelu_pytorch_tanh`` at load time, so ``save_pretrained``
  would never write it); the reference is computed with the tanh approximation, as
  transformers does for such checkpoints.
* ``qwen1``: the original Qwen (remote-code ``QWenLMHeadModel``, not in transformers). The
  checkpoint is written by hand in Qwen-1 format (``transformer.h.N.attn.c_attn`` etc.); the
  reference logits come from an equivalent transformers ``Qwen2ForCausalLM`` built from the same
  weights (q/k/v = row blocks of c_attn with biases, o = attn.c_proj, gate = w2, up = w1,
  down = mlp.c_proj, MLP width = intermediate_size / 2). ``seq_length`` (2048) exceeds every
  length used, so Qwen-1's dynamic NTK and log-n scaling are inactive and the two are equivalent.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures"

V = 320  # model vocab size for every fixture
PROMPT_LEN = 8
N_NEW = 16

# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

TRAIN_TEXT = """\
The quick brown fox jumps over the lazy dog. The dog did not mind, and the fox ran on.
Once upon a time there was a small model that wanted to read the whole world, one token at a time.
It read about the sea and the sky, about the sun and the rain, and about the people who live there.
In the morning she went to the café and ordered a coffee with milk. A naïve question is still a question.
The children of the town played in the park while their parents talked about the weather and the news.
Numbers like 1, 2, 3, 10, 42 and 2024 appear in text too, as do symbols such as +, -, = and %.
日本語 is written with kanji and kana. Smile 🙂 when the tests pass, and read the error when they fail.
This is a test of the tokenizer: it should split words into pieces, and the pieces into bytes.
What is the capital of France? The capital of France is Paris, and the capital of Japan is Tokyo.
"""

SENTENCE = (
    "The café owner smiled 🙂 and said hello to the quick brown fox in 日本語: "
    "a naïve question is still a good question, and the dog in the park agreed with them."
)

# Special-token layouts (listed in id order; they take ids 0..n-1).
TOKENIZER_LAYOUTS: dict[str, dict[str, Any]] = {
    # Llama 1/2 and Mistral: <unk>=0, <s>=1 (BOS, prepended), </s>=2 (EOS)
    "llama": {
        "specials": ["<unk>", "<s>", "</s>"],
        "bos": "<s>",
        "eos": "</s>",
        "unk": "<unk>",
        "pad": None,
        "add_bos": True,
    },
    # Gemma 1/2/3: <pad>=0, <eos>=1, <bos>=2 (prepended)
    "gemma": {
        "specials": ["<pad>", "<eos>", "<bos>", "<unk>"],
        "bos": "<bos>",
        "eos": "<eos>",
        "unk": "<unk>",
        "pad": "<pad>",
        "add_bos": True,
    },
    # Qwen-1/2/3: no BOS, <|endoftext|> is EOS (and pad)
    "qwen": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None,
        "eos": "<|endoftext|>",
        "unk": None,
        "pad": "<|endoftext|>",
        "add_bos": False,
    },
    # Phi-2: GPT-2 style, <|endoftext|> is both BOS and EOS, never prepended
    "phi2": {
        "specials": ["<|endoftext|>"],
        "bos": "<|endoftext|>",
        "eos": "<|endoftext|>",
        "unk": "<|endoftext|>",
        "pad": None,
        "add_bos": False,
    },
    # Phi-3: <unk>=0, <s>=1 (not prepended: add_bos_token false), </s>=2, <|endoftext|>=3 is EOS
    "phi3": {
        "specials": ["<unk>", "<s>", "</s>", "<|endoftext|>"],
        "bos": "<s>",
        "eos": "<|endoftext|>",
        "unk": "<unk>",
        "pad": "<|endoftext|>",
        "add_bos": False,
    },
}


def build_tokenizer(layout: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    spec = TOKENIZER_LAYOUTS[layout]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=V,
        special_tokens=list(spec["specials"]),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_TEXT.splitlines(), trainer)
    for i, s in enumerate(spec["specials"]):
        assert tok.token_to_id(s) == i, (layout, s, tok.token_to_id(s))
    assert tok.get_vocab_size() <= V, tok.get_vocab_size()
    if spec["add_bos"]:
        bos = spec["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def token_ids(layout: str) -> dict[str, int | None]:
    spec = TOKENIZER_LAYOUTS[layout]
    idx = {s: i for i, s in enumerate(spec["specials"])}
    return {
        "bos": idx[spec["bos"]] if spec["bos"] else None,
        "eos": idx[spec["eos"]],
        "pad": idx[spec["pad"]] if spec["pad"] else None,
    }


def write_tokenizer(tok, layout: str, out: Path) -> None:
    spec = TOKENIZER_LAYOUTS[layout]
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": spec["bos"],
        "eos_token": spec["eos"],
        "unk_token": spec["unk"],
        "pad_token": spec["pad"],
        "add_bos_token": spec["add_bos"],
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
    }
    with open(out / "tokenizer_config.json", "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")


def make_ids(tok, T: int) -> np.ndarray:
    text = SENTENCE
    while True:
        ids = tok.encode(text).ids
        if len(ids) >= T:
            return np.asarray(ids[:T], dtype=np.int64)
        text = text + " " + TRAIN_TEXT


# ---------------------------------------------------------------------------------------------
# Fixture table
# ---------------------------------------------------------------------------------------------

BASE = {
    "vocab_size": V,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}


@dataclass
class Fixture:
    name: str
    family: str  # key into FAMILY_BUILDERS
    tokenizer: str  # key into TOKENIZER_LAYOUTS
    config: dict[str, Any]  # config kwargs (on top of BASE)
    norm_style: str = "rms"  # "rms" (1+0.3n), "gemma" (0.3n), "ln" (1+0.3n, bias 0.1n)
    seed: int = 0
    T: int = 24
    std: float = 0.2  # std of every matrix
    emb_std: float | None = None  # std of the token embedding (None: same as std)
    dtype: str = "float32"  # stored dtype ("bfloat16" for llama_bf16)
    max_shard_size: str | None = None
    prefix_short: bool = False  # store logits_prefix_short (Phi-3 LongRoPE)
    post_config: dict[str, Any] = field(default_factory=dict)  # keys patched into config.json
    router_std: float | None = None  # std of mixture-of-experts router weights (None: std)
    note: str = ""


def _longrope_factors(seed: int, n: int) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(seed)
    short = [round(float(x), 4) for x in rng.uniform(1.0, 2.0, n)]
    long = [round(float(x), 4) for x in rng.uniform(1.0, 8.0, n)]
    return short, long


_SHORT, _LONG = _longrope_factors(1234, 8)  # Phi-3 fixtures: D = 16, R/2 = 8

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

FIXTURES: list[Fixture] = [
    Fixture(
        "llama2_mha", "llama", "llama", {"num_key_value_heads": 4, "rms_norm_eps": 1e-5}, seed=101
    ),
    Fixture(
        "llama3_gqa",
        "llama",
        "llama",
        {
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "rope_scaling": dict(LLAMA3_ROPE),
            "max_position_embeddings": 256,
        },
        seed=102,
        note="llama3 rope, theta 1e4, O=64 so 1 frequency is unchanged, 2 smoothed, 5 divided by 8",
    ),
    Fixture(
        "llama_linear",
        "llama",
        "llama",
        {
            "num_key_value_heads": 4,
            "rms_norm_eps": 1e-5,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        },
        seed=103,
    ),
    Fixture(
        "llama_dynamic",
        "llama",
        "llama",
        {
            "num_key_value_heads": 4,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 16,
            "rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
        },
        seed=104,
        note="T=24 > max_position_embeddings=16: full != incremental",
    ),
    Fixture(
        "llama_yarn",
        "llama",
        "llama",
        {
            "num_key_value_heads": 4,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 1024,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 256,
            },
        },
        seed=105,
        note="O=256 so the YaRN ramp has fractional entries (low=0, high=4)",
    ),
    Fixture(
        "llama_bf16",
        "llama",
        "llama",
        {
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "rope_scaling": dict(LLAMA3_ROPE),
            "max_position_embeddings": 256,
        },
        seed=106,
        dtype="bfloat16",
        note="bf16 weights; reference = float32 run on the bf16 values",
    ),
    Fixture(
        "llama_sharded",
        "llama",
        "llama",
        {"num_key_value_heads": 4, "rms_norm_eps": 1e-5},
        seed=107,
        max_shard_size="150KB",
    ),
    Fixture(
        "mistral_window",
        "mistral",
        "llama",
        {
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5,
            "sliding_window": 5,
            "max_position_embeddings": 4096,
        },
        seed=108,
    ),
    Fixture(
        "phi2",
        "phi",
        "phi2",
        {
            "hidden_size": 80,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "partial_rotary_factor": 0.4,
            "layer_norm_eps": 1e-5,
            "hidden_act": "gelu_new",
            "max_position_embeddings": 2048,
        },
        norm_style="ln",
        seed=109,
        std=0.25,
        note="D=20, R=int(20*0.4)=8",
    ),
    Fixture(
        "phi3",
        "phi3",
        "phi3",
        {
            "num_key_value_heads": 2,
            "sliding_window": 7,
            "max_position_embeddings": 4096,
            "original_max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
        },
        seed=110,
    ),
    Fixture(
        "phi3_longrope_short",
        "phi3",
        "phi3",
        {
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            "original_max_position_embeddings": 16,
            "rms_norm_eps": 1e-5,
            "rope_scaling": {
                "type": "longrope",
                "short_factor": list(_SHORT),
                "long_factor": list(_LONG),
            },
        },
        seed=111,
        T=16,
        prefix_short=True,
        note="T=16=O: every call of the references uses short factors; generate crosses O",
    ),
    Fixture(
        "phi3_longrope_long",
        "phi3",
        "phi3",
        {
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            "original_max_position_embeddings": 16,
            "rms_norm_eps": 1e-5,
            "rope_scaling": {
                "type": "longrope",
                "short_factor": list(_SHORT),
                "long_factor": list(_LONG),
            },
        },
        seed=112,
        T=24,
        prefix_short=True,
        note="T=24>O=16: logits_full uses long factors, incremental switches mid-way",
    ),
    Fixture(
        "gemma",
        "gemma",
        "gemma",
        {
            "num_key_value_heads": 1,
            "head_dim": 32,
            "hidden_act": "gelu",
            "tie_word_embeddings": True,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 8192,
        },
        norm_style="gemma",
        seed=113,
        std=0.25,
        post_config={"hidden_act": "gelu"},
        note="legacy hidden_act 'gelu' (means tanh approximation)",
    ),
    Fixture(
        "gemma2",
        "gemma2",
        "gemma",
        {
            "num_hidden_layers": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "sliding_window": 6,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 3.0,
            "tie_word_embeddings": True,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 8192,
        },
        norm_style="gemma",
        seed=205,
        std=0.2,
        emb_std=0.08,
        note="small embedding std: sqrt(H)-scaled tied embeddings otherwise make greedy repeat its input",
    ),
    Fixture(
        "gemma3_text",
        "gemma3_text",
        "gemma",
        {
            "num_hidden_layers": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "sliding_window": 6,
            "sliding_window_pattern": 4,
            "query_pre_attn_scalar": 24,
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10_000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "tie_word_embeddings": True,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 32768,
        },
        norm_style="gemma",
        seed=327,
        std=0.3,
        emb_std=0.08,
        note="legacy kwargs (rope_theta/rope_local_base_freq/rope_scaling/sliding_window_pattern) in",
    ),
    Fixture(
        "qwen2_tied",
        "qwen2",
        "qwen",
        {
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0,
            "max_position_embeddings": 32768,
        },
        seed=116,
    ),
    Fixture(
        "qwen3",
        "qwen3",
        "qwen",
        {
            "num_key_value_heads": 2,
            "head_dim": 32,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0,
            "tie_word_embeddings": False,
            "max_position_embeddings": 32768,
        },
        seed=117,
    ),
    Fixture(
        "qwen1",
        "qwen1",
        "qwen",
        {
            "num_key_value_heads": 4,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": False,
        },
        seed=118,
        note="Qwen-1 format; reference from an equivalent Qwen2ForCausalLM",
    ),
]

# Mixtures of experts: 8 experts, top-2 (Qwen3-MoE: top-3), routers with std 1.0 so that the
# chosen experts change from token to token (make_fixture asserts it and stores the choices).
MOE_BASE = {"num_key_value_heads": 2, "max_position_embeddings": 4096, "tie_word_embeddings": False}
FIXTURES += [
    Fixture(
        "mixtral",
        "mixtral",
        "llama",
        dict(MOE_BASE, num_local_experts=8, num_experts_per_tok=2, intermediate_size=32,
             rms_norm_eps=1e-5, rope_theta=1_000_000.0, sliding_window=None),
        seed=131,
        router_std=1.0,
        note="softmax over 8 experts, top-2, renormalised",
    ),
    Fixture(
        "qwen3_moe",
        "qwen3_moe",
        "qwen",
        dict(MOE_BASE, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
             norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=1_000_000.0),
        seed=132,
        router_std=1.0,
        note="top-3 of 8, norm_topk_prob (as the released models and llama.cpp's qwen3moe)",
    ),
    Fixture(
        "qwen3_moe_mixed",
        "qwen3_moe",
        "qwen",
        dict(MOE_BASE, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
             intermediate_size=32, norm_topk_prob=False, mlp_only_layers=[0], rms_norm_eps=1e-6),
        seed=136,
        router_std=1.0,
        note="layer 0 dense (mlp_only_layers), top-2 of 6 not renormalised; HF only",
    ),
    Fixture(
        "olmoe",
        "olmoe",
        "phi2",
        # llama.cpp's olmoe wants k_norm of width hidden (no GQA) and writes eps 1e-5
        dict(MOE_BASE, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
             intermediate_size=32, norm_topk_prob=False, rms_norm_eps=1e-5),
        seed=134,
        router_std=1.0,
        note="q/k RMSNorm over the whole projection; top-2 of 8 not renormalised",
    ),
    Fixture(
        "qwen2_moe",
        "qwen2_moe",
        "qwen",
        dict(MOE_BASE, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
             shared_expert_intermediate_size=48, intermediate_size=40, norm_topk_prob=False,
             rms_norm_eps=1e-6, rope_theta=1_000_000.0),
        seed=137,
        router_std=1.0,
        note="q/k/v biases, top-2 of 8 not renormalised, plus a sigmoid-gated shared expert",
    ),
]

FIXTURES_BY_NAME = {f.name: f for f in FIXTURES}


# ---------------------------------------------------------------------------------------------
# Family builders: one per family, each returns a transformers config (float32, eager attention)
# ---------------------------------------------------------------------------------------------


def _ids_kwargs(fx: Fixture) -> dict[str, Any]:
    ids = token_ids(fx.tokenizer)
    kw = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}
    if fx.tokenizer in ("qwen",):  # Qwen2/3 checkpoints: bos_token_id = eos (<|endoftext|>)
        kw["bos_token_id"] = ids["eos"]
    return kw


def _cfg(fx: Fixture) -> dict[str, Any]:
    kw = dict(BASE)
    kw.update(_ids_kwargs(fx))
    kw.update(copy.deepcopy(fx.config))
    return kw


def build_llama(fx):
    from transformers import LlamaConfig

    return LlamaConfig(**_cfg(fx))


def build_mistral(fx):
    from transformers import MistralConfig

    return MistralConfig(**_cfg(fx))


def build_phi(fx):
    from transformers import PhiConfig

    return PhiConfig(**_cfg(fx))


def build_phi3(fx):
    from transformers import Phi3Config

    return Phi3Config(**_cfg(fx))


def build_gemma(fx):
    from transformers import GemmaConfig

    return GemmaConfig(**_cfg(fx))


def build_gemma2(fx):
    from transformers import Gemma2Config

    return Gemma2Config(**_cfg(fx))


def build_gemma3_text(fx):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**_cfg(fx))


def build_qwen2(fx):
    from transformers import Qwen2Config

    return Qwen2Config(**_cfg(fx))


def build_qwen3(fx):
    from transformers import Qwen3Config

    return Qwen3Config(**_cfg(fx))


def build_mixtral(fx):
    from transformers import MixtralConfig

    return MixtralConfig(**_cfg(fx))


def build_qwen3_moe(fx):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**_cfg(fx))


def build_qwen2_moe(fx):
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(**_cfg(fx))


def build_olmoe(fx):
    from transformers import OlmoeConfig

    return OlmoeConfig(**_cfg(fx))


def build_qwen1(fx):
    # The reference model: a Qwen2 with q/k/v biases, which is what Qwen-1 computes below seq_length.
    from transformers import Qwen2Config

    return Qwen2Config(**_cfg(fx))


FAMILY_BUILDERS: dict[str, Callable] = {
    "llama": build_llama,
    "mistral": build_mistral,
    "phi": build_phi,
    "phi3": build_phi3,
    "gemma": build_gemma,
    "gemma2": build_gemma2,
    "gemma3_text": build_gemma3_text,
    "qwen2": build_qwen2,
    "qwen3": build_qwen3,
    "qwen1": build_qwen1,
    "mixtral": build_mixtral,
    "qwen3_moe": build_qwen3_moe,
    "qwen2_moe": build_qwen2_moe,
    "olmoe": build_olmoe,
}


# ---------------------------------------------------------------------------------------------
# Model helpers (torch imported lazily so --check works without it)
# ---------------------------------------------------------------------------------------------


def make_model(config):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    model.eval()
    return model


def randomize(model, fx: Fixture) -> None:
    import torch

    g = torch.Generator().manual_seed(fx.seed * 7919 + 17)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights appear once
            n = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith(".bias"):
                val = 0.1 * n
            elif p.ndim >= 2 and fx.router_std is not None and _is_router(name):
                val = fx.router_std * n
            elif p.ndim >= 2:
                is_emb = name.endswith("embed_tokens.weight")
                val = (fx.emb_std if (is_emb and fx.emb_std is not None) else fx.std) * n
            else:  # 1-D weight: a norm
                if fx.norm_style == "gemma":
                    val = 0.3 * n
                else:
                    val = 1.0 + 0.3 * n
            p.copy_(val.to(p.dtype))


def _is_router(name: str) -> bool:
    return name.endswith((".mlp.gate.weight", ".block_sparse_moe.gate.weight"))


def router_choices(model, ids: np.ndarray):
    """The experts transformers' routers choose, per mixture layer: ``[L_moe, T, k]`` (each
    token's set sorted), from ``output_router_logits``, or None for a dense model."""
    import torch

    k = getattr(model.config, "num_experts_per_tok", None)
    if not k:
        return None
    m = copy.deepcopy(model)
    with torch.no_grad():
        out = m(input_ids=torch.from_numpy(ids)[None], use_cache=False, output_router_logits=True)
    rl = getattr(out, "router_logits", None)
    if not rl:
        return None
    sets = []
    for logits in rl:
        top = torch.topk(torch.softmax(logits.float(), -1), k, dim=-1).indices.numpy()
        sets.append(np.sort(top, axis=-1).astype(np.int64))
    return np.stack(sets)


def _logits(out):
    return out.logits[0].detach().float().numpy()


def forward_full(model, ids: np.ndarray) -> np.ndarray:
    import torch

    m = copy.deepcopy(model)  # fresh rotary state (dynamic / longrope keep state between calls)
    with torch.no_grad():
        out = m(input_ids=torch.from_numpy(ids)[None], use_cache=False)
    return _logits(out).astype(np.float32)


def forward_incremental(model, ids: np.ndarray) -> np.ndarray:
    import torch
    from transformers import DynamicCache

    m = copy.deepcopy(model)
    cache = DynamicCache(config=m.config)
    rows = []
    with torch.no_grad():
        for t in range(len(ids)):
            out = m(
                input_ids=torch.from_numpy(ids[t : t + 1])[None],
                cache=cache,
                use_cache=True,
                position_ids=torch.tensor([[t]]),
            )
            cache = out.cache
            rows.append(_logits(out)[-1])
    return np.stack(rows).astype(np.float32)


def greedy_generate(model, prompt: np.ndarray) -> np.ndarray:
    import torch
    from transformers import GenerationConfig

    m = copy.deepcopy(model)
    # generate() fills every None field of the passed config from model.generation_config, so EOS has
    # to be removed there too; otherwise min_new_tokens would mask the EOS logit (not pure argmax).
    pad = m.config.pad_token_id if m.config.pad_token_id is not None else 0
    m.generation_config = GenerationConfig(eos_token_id=None, bos_token_id=None, pad_token_id=pad)
    gc = GenerationConfig(
        do_sample=False,
        max_new_tokens=N_NEW,
        min_new_tokens=N_NEW,
        eos_token_id=None,
        pad_token_id=pad,
        bos_token_id=None,
    )
    inp = torch.from_numpy(prompt)[None]
    with torch.no_grad():
        out = m.generate(inp, attention_mask=torch.ones_like(inp), generation_config=gc)
    assert m.generation_config.eos_token_id is None
    new = out[0, len(prompt) :].numpy().astype(np.int64)
    assert len(new) == N_NEW, len(new)
    return new


def greedy_recompute(model, prompt: np.ndarray) -> np.ndarray:
    """Argmax decoding with a full forward per step (no cache): cross-check for generate()."""
    seq = list(prompt)
    for _ in range(N_NEW):
        seq.append(int(forward_full(model, np.asarray(seq, dtype=np.int64))[-1].argmax()))
    return np.asarray(seq[len(prompt) :], dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Qwen-1 checkpoint writer
# ---------------------------------------------------------------------------------------------


def save_qwen1(model, fx: Fixture, out: Path) -> None:
    """Write the Qwen2 reference model's weights in the original Qwen-1 (QWenLMHeadModel) layout."""
    import torch
    from safetensors.torch import save_file

    c = model.config
    H, nH, L = c.hidden_size, c.num_attention_heads, c.num_hidden_layers
    assert c.num_key_value_heads == nH and H % nH == 0
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    t: dict[str, torch.Tensor] = {}
    t["transformer.wte.weight"] = sd["model.embed_tokens.weight"]
    for n in range(L):
        p = f"model.layers.{n}."
        q = f"transformer.h.{n}."
        t[q + "ln_1.weight"] = sd[p + "input_layernorm.weight"]
        t[q + "attn.c_attn.weight"] = torch.cat(
            [sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"], 0
        )
        t[q + "attn.c_attn.bias"] = torch.cat(
            [sd[p + f"self_attn.{x}_proj.bias"] for x in "qkv"], 0
        )
        t[q + "attn.c_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        t[q + "ln_2.weight"] = sd[p + "post_attention_layernorm.weight"]
        t[q + "mlp.w1.weight"] = sd[p + "mlp.up_proj.weight"]  # w1 = plain branch
        t[q + "mlp.w2.weight"] = sd[p + "mlp.gate_proj.weight"]  # w2 = silu-gated branch
        t[q + "mlp.c_proj.weight"] = sd[p + "mlp.down_proj.weight"]
    t["transformer.ln_f.weight"] = sd["model.norm.weight"]
    t["lm_head.weight"] = sd["lm_head.weight"]
    t = {k: v.contiguous() for k, v in t.items()}
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})

    ids = token_ids(fx.tokenizer)
    cfg = {
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "hidden_size": H,
        "num_hidden_layers": L,
        "num_attention_heads": nH,
        "kv_channels": H // nH,
        "intermediate_size": 2 * c.intermediate_size,  # Qwen-1 stores twice the MLP width
        "layer_norm_epsilon": c.rms_norm_eps,
        "rotary_emb_base": c.rope_parameters["rope_theta"],
        "rotary_pct": 1.0,
        "seq_length": 2048,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "no_bias": True,
        "max_position_embeddings": c.max_position_embeddings,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": False,
        "bf16": False,
        "fp16": False,
        "fp32": True,
        "use_flash_attn": False,
        "softmax_in_fp32": False,
        "use_cache_quantization": False,
        "initializer_range": 0.02,
        "emb_dropout_prob": 0.0,
        "attn_dropout_prob": 0.0,
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
    }
    with open(out / "config.json", "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    gen = {
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "do_sample": False,
        "max_new_tokens": 512,
    }
    with open(out / "generation_config.json", "w") as f:
        json.dump(gen, f, indent=2)
        f.write("\n")


def qwen1_numpy_logits(d: Path, ids: np.ndarray) -> np.ndarray:
    """Independent NumPy Qwen-1 forward (below seq_length) straight from the Qwen-1 files.

    Used only as a cross-check that the Qwen-1 tensor mapping (w1/w2 order, c_attn row blocks)
    agrees with the Qwen2 reference model.
    """
    from safetensors.numpy import load_file

    cfg = json.loads((d / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(str(d / "model.safetensors")).items()}
    H, nH, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    D, eps, base = cfg["kv_channels"], cfg["layer_norm_epsilon"], cfg["rotary_emb_base"]
    T = len(ids)

    def rms(x, g):
        return g * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))

    inv = 1.0 / base ** (np.arange(0, D, 2) / D)
    ang = np.arange(T)[:, None] * inv[None]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def rope(x):  # [T, nH, D], split halves
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    x = w["transformer.wte.weight"][ids]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for n in range(L):
        p = f"transformer.h.{n}."
        h = rms(x, w[p + "ln_1.weight"])
        qkv = h @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]
        q, k, v = (qkv[:, i * H : (i + 1) * H].reshape(T, nH, D) for i in range(3))
        q, k = rope(q), rope(k)
        s = np.einsum("thd,jhd->htj", q, k) / math.sqrt(D) + mask
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("htj,jhd->thd", a, v).reshape(T, H)
        x = x + o @ w[p + "attn.c_proj.weight"].T
        h = rms(x, w[p + "ln_2.weight"])
        a1 = h @ w[p + "mlp.w1.weight"].T
        a2 = h @ w[p + "mlp.w2.weight"].T
        x = x + (a1 * (a2 / (1 + np.exp(-a2)))) @ w[p + "mlp.c_proj.weight"].T
    x = rms(x, w["transformer.ln_f.weight"])
    return (x @ w["lm_head.weight"].T).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------


def rope_diagnostics(fx: Fixture, model) -> str:
    """Describe the RoPE table of the fixture (regime counts etc.) for the log."""
    rp = model.config.rope_parameters
    if fx.name in ("llama3_gqa", "llama_bf16"):
        D = model.config.head_dim
        base = rp["rope_theta"]
        inv = 1.0 / base ** (np.arange(0, D, 2) / D)
        wl = 2 * math.pi / inv
        O = rp["original_max_position_embeddings"]
        hi, lo = O / rp["high_freq_factor"], O / rp["low_freq_factor"]
        n_keep = int((wl < hi).sum())
        n_scaled = int((wl > lo).sum())
        return f"llama3 regimes: unchanged={n_keep} smoothed={len(wl) - n_keep - n_scaled} scaled={n_scaled}"
    if fx.name == "llama_yarn":
        rot = model.model.rotary_emb
        D = model.config.head_dim
        base = rp["rope_theta"]
        ext = 1.0 / base ** (np.arange(0, D, 2) / D)
        ratio = rot.inv_freq.numpy() / ext
        return f"yarn inv_freq/default = {np.round(ratio, 4).tolist()} attention_scaling={rot.attention_scaling:.6f}"
    if fx.name.startswith("phi3_longrope"):
        rot = model.model.rotary_emb
        return f"longrope attention_scaling={rot.attention_scaling:.6f}"
    return ""


def summarize(name: str, ref: dict[str, np.ndarray]) -> str:
    lf, li = ref["logits_full"], ref["logits_incremental"]
    diff = float(np.abs(lf - li).max())
    std = float(lf.std(axis=-1).mean())
    g = ref["greedy"]
    return (
        f"{name}: T={len(ref['ids'])} logit std/row={std:.3f} |logit|max={np.abs(lf).max():.2f} "
        f"max|full-incr|={diff:.3e} greedy distinct={len(set(g.tolist()))} greedy={g.tolist()}"
    )


# ---------------------------------------------------------------------------------------------
# Main per-fixture pipeline
# ---------------------------------------------------------------------------------------------


def make_fixture(fx: Fixture, out_root: Path) -> dict[str, np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = out_root / fx.name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    # tokenizer
    tok = build_tokenizer(fx.tokenizer)
    write_tokenizer(tok, fx.tokenizer, out)
    ids = make_ids(tok, fx.T)
    layout = TOKENIZER_LAYOUTS[fx.tokenizer]
    if layout["add_bos"]:
        assert ids[0] == token_ids(fx.tokenizer)["bos"]

    # model
    torch.manual_seed(fx.seed)
    config = FAMILY_BUILDERS[fx.family](fx)
    model = make_model(config)
    randomize(model, fx)

    if fx.family == "qwen1":
        save_qwen1(model, fx, out)
    else:
        if fx.dtype == "bfloat16":
            # Round the float32 parameters to bf16 in place (the reference runs on these values in
            # float32) and save a bf16 copy. Never round-trip the model itself through .to(bf16):
            # that would also round the float32 rotary inv_freq buffers.
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.to(torch.bfloat16).to(torch.float32))
            copy.deepcopy(model).to(torch.bfloat16).save_pretrained(out)
        elif fx.max_shard_size:
            model.save_pretrained(out, max_shard_size=fx.max_shard_size)
        else:
            model.save_pretrained(out)
        # generation_config.json: ids only (generate() below passes its own greedy settings)
        from transformers import GenerationConfig

        ids_kw = _ids_kwargs(fx)
        GenerationConfig(
            bos_token_id=ids_kw["bos_token_id"],
            eos_token_id=ids_kw["eos_token_id"],
            pad_token_id=ids_kw["pad_token_id"],
        ).save_pretrained(out)
        if fx.post_config:
            p = out / "config.json"
            cfg = json.loads(p.read_text())
            cfg.update(fx.post_config)
            p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    # references
    ref: dict[str, np.ndarray] = {"ids": ids}
    ref["logits_full"] = forward_full(model, ids)
    ref["logits_incremental"] = forward_incremental(model, ids)
    prompt = ids[:PROMPT_LEN].copy()
    ref["greedy_prompt"] = prompt
    ref["greedy"] = greedy_generate(model, prompt)
    choices = router_choices(model, ids)
    if choices is not None:
        ref["router_experts"] = choices
        for layer, c in enumerate(choices):
            distinct = len({tuple(r) for r in c.tolist()})
            used = len(set(c.reshape(-1).tolist()))
            assert distinct >= 4 and used >= 3, (
                f"{fx.name}: mixture layer {layer} routes too uniformly ({distinct} distinct "
                f"expert sets, {used} experts used)")
    if fx.prefix_short:
        O = model.config.original_max_position_embeddings
        assert len(ids) >= O, (len(ids), O)
        ref["logits_prefix_short"] = forward_full(model, ids[:O])
    np.savez_compressed(out / "reference.npz", **ref)

    # ---- self-checks ----
    msgs = []
    d = rope_diagnostics(fx, model)
    if d:
        msgs.append(d)
    # round trip: reload the saved checkpoint with transformers and compare
    if fx.family != "qwen1":
        re = AutoModelForCausalLM.from_pretrained(
            out, attn_implementation="eager", dtype=torch.float32
        )
        re.eval()
        rdiff = float(np.abs(forward_full(re, ids) - ref["logits_full"]).max())
        msgs.append(f"reload max|diff|={rdiff:.2e}")
        assert rdiff < 1e-5, rdiff
        if fx.post_config:
            for k, v in fx.post_config.items():
                msgs.append(f"config.json {k}={v!r} loads as {getattr(re.config, k)!r}")
    else:
        qdiff = float(np.abs(qwen1_numpy_logits(out, ids) - ref["logits_full"]).max())
        msgs.append(f"numpy Qwen-1 forward from the saved files: max|diff|={qdiff:.2e}")
        assert qdiff < 1e-4, qdiff
    # tokenizer round trip through transformers
    htok = AutoTokenizer.from_pretrained(out)
    hids = htok(SENTENCE)["input_ids"][: fx.T]
    assert list(hids) == ids.tolist()[: len(hids)], (hids, ids)
    dec = tok.decode(tok.encode(SENTENCE).ids, skip_special_tokens=True)
    assert dec == SENTENCE, dec
    # greedy cross-check with recompute-every-step argmax
    rec = greedy_recompute(model, prompt)
    if not np.array_equal(rec, ref["greedy"]):
        msgs.append(f"NOTE greedy(generate) != greedy(recompute): {rec.tolist()}")
    # logits quality
    std = float(ref["logits_full"].std(axis=-1).min())
    assert std > 0.5, f"{fx.name}: logits too flat (min row std {std:.3f})"
    assert len(set(ref["greedy"].tolist())) > 1, (
        f"{fx.name}: greedy output is a single repeated token"
    )
    if fx.prefix_short:
        O = len(ref["logits_prefix_short"])
        pd = float(np.abs(ref["logits_prefix_short"] - ref["logits_full"][:O]).max())
        msgs.append(f"max|prefix_short - full[:O]|={pd:.3e}")
    print(summarize(fx.name, ref))
    for m in msgs:
        print("    " + m)
    return ref


# ---------------------------------------------------------------------------------------------
# --check
# ---------------------------------------------------------------------------------------------


def check_fixture(name: str, out_root: Path) -> list[str]:
    errs: list[str] = []
    d = out_root / name
    p = d / "reference.npz"
    if not p.exists():
        return [f"{name}: missing {p}"]
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if not (d / f).exists():
            errs.append(f"{name}: missing {f}")
    if not (d / "model.safetensors").exists() and not (d / "model.safetensors.index.json").exists():
        errs.append(f"{name}: no weights")
    fx = FIXTURES_BY_NAME.get(name)
    with np.load(p) as z:
        ref = {k: z[k] for k in z.files}
    need = ["ids", "logits_full", "logits_incremental", "greedy_prompt", "greedy"]
    if fx is not None and fx.prefix_short:
        need.append("logits_prefix_short")
    for k in need:
        if k not in ref:
            errs.append(f"{name}: missing array {k}")
    if errs:
        return errs
    T = len(ref["ids"])
    if ref["ids"].dtype != np.int64 or ref["ids"].ndim != 1:
        errs.append(f"{name}: ids dtype/shape {ref['ids'].dtype} {ref['ids'].shape}")
    if fx is not None and T != fx.T:
        errs.append(f"{name}: T={T}, table says {fx.T}")
    for k in ("logits_full", "logits_incremental"):
        a = ref[k]
        if a.dtype != np.float32 or a.shape != (T, V):
            errs.append(f"{name}: {k} dtype/shape {a.dtype} {a.shape}")
        elif not np.isfinite(a).all():
            errs.append(f"{name}: {k} has non-finite values")
    if ref["ids"].max() >= V or ref["ids"].min() < 0:
        errs.append(f"{name}: ids out of range")
    gp, g = ref["greedy_prompt"], ref["greedy"]
    if gp.dtype != np.int64 or g.dtype != np.int64 or g.shape != (N_NEW,):
        errs.append(f"{name}: greedy dtype/shape {gp.dtype} {g.dtype} {g.shape}")
    if not np.array_equal(gp, ref["ids"][: len(gp)]):
        errs.append(f"{name}: greedy_prompt is not a prefix of ids")
    if "logits_prefix_short" in ref:
        a = ref["logits_prefix_short"]
        cfg = json.loads((d / "config.json").read_text())
        O = cfg.get("original_max_position_embeddings")
        if a.dtype != np.float32 or a.shape != (O, V) or not np.isfinite(a).all():
            errs.append(f"{name}: logits_prefix_short bad ({a.dtype} {a.shape}, O={O})")
    if not errs:
        print(summarize(name, ref))
    return errs


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--only", action="append", metavar="NAME", help="build/check only this fixture (repeatable)"
    )
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output root (default tests/fixtures)")
    ap.add_argument(
        "--check", action="store_true", help="validate existing reference.npz files and exit"
    )
    ap.add_argument("--list", action="store_true", help="list fixtures and exit")
    args = ap.parse_args(argv)
    out_root = Path(args.out)

    names = args.only or [f.name for f in FIXTURES]
    unknown = [n for n in names if n not in FIXTURES_BY_NAME]
    if unknown:
        ap.error(f"unknown fixture(s): {unknown}; known: {sorted(FIXTURES_BY_NAME)}")

    if args.list:
        for f in FIXTURES:
            print(f"{f.name:22s} {f.family:12s} T={f.T:2d} {f.note}")
        return 0

    if args.check:
        errs = []
        for n in names:
            errs += check_fixture(n, out_root)
        for e in errs:
            print("ERROR", e)
        print("OK" if not errs else f"{len(errs)} error(s)")
        return 1 if errs else 0

    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    out_root.mkdir(parents=True, exist_ok=True)
    for n in names:
        make_fixture(FIXTURES_BY_NAME[n], out_root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
