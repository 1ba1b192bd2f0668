"""Quantization on load: ``ModelLoader.load_auto(path, quantize="q8_0")`` or ``"q4_0"``.

Every matrix a decode step reads (projections, MLP, output, and the embedding table) is
converted to GGUF's block layout (blocks of 32 values with an f16 scale), so the same kernels
serve quantized safetensors and GGUF files (a mixture's experts are converted one by one; its
router stays float32). Norm weights and biases stay float32. Matrices
whose rows are not a multiple of 32 are kept as they are.
"""
from __future__ import annotations

from .errors import UnsupportedError
from .weights import Experts, Weight

QUANTIZERS = ("q8_0", "q4_0")


def quantize_weight(w: Weight, kind: str) -> Weight:
    from .kernels import quant

    if w.kind == kind or len(w.shape) != 2 or w.cols % 32:
        return w
    fn = {"q8_0": quant.quantize_q8_0, "q4_0": quant.quantize_q4_0}[kind]
    q = Weight(w.name, kind, tuple(w.shape), fn(w.to_f32()))
    if hasattr(w, "source"):
        q.source = w.source
    return q


def quantize_tensors(tensors: dict, kind: str) -> dict:
    if kind not in QUANTIZERS:
        raise UnsupportedError(f"unknown quantization {kind!r}; choose one of {QUANTIZERS}")
    out = {}
    done = {}
    for name, w in tensors.items():
        if isinstance(w, Experts):
            # every expert as its own matrix; the router stays float32, as llama.cpp keeps it
            out[name] = Experts(w.name, [quantize_weight(e, kind) for e in w.experts])
            continue
        if not name.endswith(".weight") or len(w.shape) != 2 or ".ffn_gate_inp" in name:
            out[name] = w
            continue
        key = id(w)
        if key not in done:
            done[key] = quantize_weight(w, kind)
        out[name] = done[key]
    return out
