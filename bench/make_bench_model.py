#!/usr/bin/env python
"""Write a random ~134M-parameter LLaMA checkpoint for speed benchmarks.

Usage::

    python bench/make_bench_model.py OUTPUT_DIR [--seed 0]

The model is ``LlamaForCausalLM(LlamaConfig(...))`` with hidden 768, 12 layers, 12 heads
(no GQA), intermediate 2048, vocab 32000, untied input/output embeddings, float32, random
init from ``torch.manual_seed(seed)``.  Only speed is measured with it, so the weights are
meaningless.  A trivial Llama-style byte-fallback BPE ``tokenizer.json`` of exactly 32000
entries (no merges) is written next to it so that tools which insist on a tokenizer (e.g.
llama.cpp's ``convert_hf_to_gguf.py``, which also imports ``sentencepiece``) accept the
directory.

torch / transformers / tokenizers are only needed by this script, never by the engine.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

VOCAB = 32000


def build_tokenizer(out: Path) -> None:
    """Llama-2-style byte-fallback BPE with exactly VOCAB entries and no merges.

    ``<unk>``, ``<s>``, ``</s>``, the 256 byte tokens ``<0x00>``..``<0xFF>``, ``▁`` and the
    printable ASCII characters, then filler pieces ``▁t<i>``.  The shape (BPE +
    byte_fallback + Sequence decoder) is what llama.cpp's ``convert_hf_to_gguf.py``
    recognises as a Llama HF tokenizer, so the conversion works without a
    ``tokenizer.model``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in ["\u2581"] + [chr(c) for c in range(33, 127)]:
        vocab[ch] = len(vocab)
    i = 0
    while len(vocab) < VOCAB:
        vocab[f"\u2581t{i}"] = len(vocab)
        i += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    assert tok.get_vocab_size() == VOCAB
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "model_max_length": 2048,
            },
            indent=2,
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(args.out, safe_serialization=True)
    build_tokenizer(args.out)
    print(f"wrote {args.out} ({n_params / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    main()
