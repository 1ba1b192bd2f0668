"""Tiny Llama GGUF files in every block format, for the end-to-end format tests (importable
from every test folder, like quant_blocks).

:func:`float_model` draws a small float32 Llama (``H = 256`` so that the 256-element formats
fit every matrix); :func:`write_gguf` writes it with each 2-D weight stored in a chosen ggml
type, quantized by ``gguf.quants.quantize`` where gguf has a quantizer for the type, or given
as ready-made block bytes (e.g. from llama-quantize); :func:`dequantized_twin` is the same
file with every quantized tensor replaced by its ``gguf.quants.dequantize`` values in F32 --
the float model whose logits the quantized one must reproduce."""
from __future__ import annotations

import gguf
import numpy as np

H, INTER, N_HEADS, N_KV, LAYERS, VOCAB = 256, 256, 4, 2, 2, 64
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def float_model(seed: int = 0) -> dict:
    """name -> float32 array (NumPy order [out, in]) of a random Llama."""
    rng = np.random.default_rng(seed)

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    D = H // N_HEADS
    t = {"token_embd.weight": mat(VOCAB, H), "output.weight": mat(VOCAB, H),
         "output_norm.weight": (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)}
    shapes = {"attn_q": (H, H), "attn_k": (N_KV * D, H), "attn_v": (N_KV * D, H),
              "attn_output": (H, H), "ffn_gate": (INTER, H), "ffn_up": (INTER, H),
              "ffn_down": (H, INTER)}
    for i in range(LAYERS):
        for n in ("attn_norm", "ffn_norm"):
            t[f"blk.{i}.{n}.weight"] = (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)
        for n in MATRICES:
            t[f"blk.{i}.{n}.weight"] = mat(*shapes[n])
    return t


def write_gguf(path, tensors: dict) -> None:
    """Write a Llama GGUF; ``tensors`` maps name -> float32 array or (uint8 blocks, type)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(H)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(INTER)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)
    # a SentencePiece-style vocabulary: specials, then single letters
    w.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>"] + [chr(0x41 + i) for i in range(VOCAB - 3)]
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 3 + [-float(i) for i in range(VOCAB - 3)])
    w.add_token_types([2, 3, 3] + [1] * (VOCAB - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            data, qtype = value
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantized(tensors: dict, qtype) -> dict:
    """The 2-D weights of ``tensors`` quantized to ``qtype`` by gguf.quants."""
    return {n: (gguf.quants.quantize(a, qtype), qtype) if a.ndim == 2 else a
            for n, a in tensors.items()}


def dequantized_twin(tensors: dict) -> dict:
    """Every (blocks, type) entry replaced by its float32 gguf.quants dequantization."""
    return {n: gguf.quants.dequantize(v[0], v[1]).astype(np.float32) if isinstance(v, tuple)
            else v for n, v in tensors.items()}


def read_quantized(path) -> dict:
    """The tensors of a GGUF file (e.g. one llama-quantize wrote) as :func:`write_gguf` takes
    them: float32 arrays, or (uint8 blocks [rows, bytes], type) for block formats."""
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        qt = gguf.GGMLQuantizationType(t.tensor_type)
        if qt == gguf.GGMLQuantizationType.F32:
            out[t.name] = np.array(t.data, dtype=np.float32).reshape(
                tuple(int(s) for s in reversed(t.shape)))
        else:
            out[t.name] = (np.array(t.data, dtype=np.uint8).reshape(int(t.shape[-1]), -1), qt)
    return out
