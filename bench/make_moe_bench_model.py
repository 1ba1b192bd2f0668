#!/usr/bin/env python
"""Write a random Qwen3-MoE checkpoint of ~1.0B total / ~0.2B active parameters for speed
benchmarks of the mixture-of-experts kernels.

Usage::

    python bench/make_moe_bench_model.py OUTPUT_DIR [--seed 0]
    # then GGUF with llama.cpp's converter (via the fixture script's worker, which adds the
    # tokenizer patch a tiny trained vocabulary needs) and llama-quantize:
    python scripts/make_gguf_fixtures.py --worker CONVERTER OUTPUT_DIR q8_0 OUT-q8_0.gguf
    python scripts/make_gguf_fixtures.py --worker CONVERTER OUTPUT_DIR f16 OUT-f16.gguf
    llama-quantize OUT-f16.gguf OUT-q4_k_m.gguf Q4_K_M

The model is ``Qwen3MoeForCausalLM`` with hidden 1024, 18 layers, 16 query heads and 4 KV
heads of 64, 64 experts of width 256 per layer, 8 chosen per token (``norm_topk_prob``, as the
released Qwen3-MoE models), vocab 32000, untied embeddings, every layer a mixture:

* total: 18 x (2.62M attention + 64 x 0.786M experts + 65.5K router) + 2 x 32.8M embeddings
  = 1.02B parameters;
* active per token: 18 x (2.62M + 8 x 0.786M + 65.5K) = 162M in the layers, 195M with the
  output matrix (228M counting the embedding table).

Weights are transformers' random init (std 0.02) from ``torch.manual_seed(seed)``, stored as
bfloat16 (2 GB); only speed is measured with them. The tokenizer is the test fixtures'
byte-level BPE (``scripts/make_fixtures.py``, vocab 320); the converter pads the GGUF
vocabulary to 32000.

torch / transformers / tokenizers are only needed by this script, never by the engine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=18,
              num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=64,
              num_experts_per_tok=8, moe_intermediate_size=256, norm_topk_prob=True,
              decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=4096,
              rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=False,
              bos_token_id=0, eos_token_id=0, pad_token_id=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    sys.path.insert(0, str(ROOT / "scripts"))
    from make_fixtures import build_tokenizer, write_tokenizer

    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    cfg = Qwen3MoeConfig(**CONFIG)
    with torch.device("cpu"):
        model = Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n / 1e9:.3f}B")
    model.save_pretrained(args.out)
    write_tokenizer(build_tokenizer("qwen"), "qwen", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
