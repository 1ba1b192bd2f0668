import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

FIXTURES = Path(os.environ.get("TORCHLESS_FIXTURES", Path(__file__).parent / "fixtures"))


def llama_tensors(cfg: dict, seed: int = 0, prefix="model.") -> dict:
    """Random Llama-layout tensors for a config dict (no torch needed)."""
    rng = np.random.default_rng(seed)
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nH, nKV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = H // nH

    def r(*s):
        return (rng.standard_normal(s) * 0.2).astype(np.float32)

    t = {f"{prefix}embed_tokens.weight": r(V, H), f"{prefix}norm.weight": 1 + r(H),
         "lm_head.weight": r(V, H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"{prefix}layers.{i}."
        t.update({
            p + "input_layernorm.weight": 1 + r(H),
            p + "self_attn.q_proj.weight": r(nH * D, H),
            p + "self_attn.k_proj.weight": r(nKV * D, H),
            p + "self_attn.v_proj.weight": r(nKV * D, H),
            p + "self_attn.o_proj.weight": r(H, nH * D),
            p + "post_attention_layernorm.weight": 1 + r(H),
            p + "mlp.gate_proj.weight": r(I, H),
            p + "mlp.up_proj.weight": r(I, H),
            p + "mlp.down_proj.weight": r(H, I),
        })
    return t


TINY_LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=32,
                  intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, rms_norm_eps=1e-5,
                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2)


@pytest.fixture
def make_checkpoint(tmp_path):
    """Write a tiny random checkpoint: make_checkpoint(config=..., tensors=..., name=...)."""

    def make(config=None, tensors=None, name="model", mutate=None):
        cfg = dict(TINY_LLAMA if config is None else config)
        t = llama_tensors(cfg) if tensors is None else tensors
        if mutate:
            mutate(t)
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps(cfg))
        save_file(t, str(d / "model.safetensors"))
        return d

    return make


def fixture_dirs():
    if not FIXTURES.exists():
        return []
    return sorted(p for p in FIXTURES.iterdir() if (p / "reference.npz").exists())


CORPUS = (
    "The capital of France is Paris. Once upon a time there was a naïve café owner in 日本語 "
    "land who liked 🙂 and numbers 0123456789. The quick brown fox jumps over the lazy dog. "
) * 4


def byte_level_tokenizer(vocab_size=60, specials=("<unk>", "<s>", "</s>")):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    return tok


@pytest.fixture
def tiny_model_with_tokenizer(make_checkpoint):
    """A tiny random Llama whose vocabulary is a byte-level BPE (multi-byte chars span tokens)."""
    tok = byte_level_tokenizer(vocab_size=300)
    V = tok.get_vocab_size()
    cfg = dict(TINY_LLAMA, vocab_size=V)
    d = make_checkpoint(config=cfg)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<s>"}))
    return d
