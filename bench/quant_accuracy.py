#!/usr/bin/env python
"""Accuracy cost of quantize-on-load (q8_0, q4_0) against float32, on real weights.

    python bench/quant_accuracy.py [MODEL] [--tokens 256]

MODEL defaults to the Gemma 3 270M GGUF. Its stored weights are first widened to float32
(the baseline); then the same float32 weights are quantized to q8_0 and q4_0 on load. Over a
teacher-forced English passage (tests/data/gemma3_270m_llamacpp_teacher.npz ids) we report
the max and mean absolute logit error relative to the logit scale, and top-1 agreement,
with 8-bit activations (the default for quantized weights) and with float32 activations.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import torchless
from torchless.quantize import quantize_weight
from torchless.weights import Weight

HERE = Path(__file__).resolve().parent


def widen(model):
    """Replace every matrix by its float32 values (the baseline)."""
    for layer in model.layers:
        for k, w in list(layer.w.items()):
            layer.w[k] = Weight(w.name, "f32", w.shape, np.ascontiguousarray(w.to_f32()))
    emb = model.embed
    f32 = Weight(emb.name, "f32", emb.shape, np.ascontiguousarray(emb.to_f32()))
    if model.output is model.embed:
        model.output = f32
    else:
        model.output = Weight(model.output.name, "f32", model.output.shape,
                              np.ascontiguousarray(model.output.to_f32()))
    model.embed = f32
    return model


def requantize(model, kind):
    cache = {}
    for layer in model.layers:
        for k, w in list(layer.w.items()):
            layer.w[k] = quantize_weight(w, kind)
    cache[id(model.embed)] = quantize_weight(model.embed, kind)
    model.output = cache.get(id(model.output)) or quantize_weight(model.output, kind)
    model.embed = cache[id(model.embed)]
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--tokens", type=int, default=256)
    a = ap.parse_args(argv)
    if a.model is None:
        from torchless.demo import default_model_path

        a.model = default_model_path()
    ids = [int(t) for t in np.load(HERE.parent / "tests/data/gemma3_270m_llamacpp_teacher.npz")["ids"]]
    ids = ids[: a.tokens]
    base = widen(torchless.ModelLoader.load_auto(a.model, act_quant=False))
    ref = base.prefill(base.new_state(), ids, all_logits=True)
    scale = float(np.abs(ref).max())
    rows = {}
    for kind, act_quant in (("q8_0", True), ("q4_0", True), ("q8_0", False), ("q4_0", False)):
        m = requantize(widen(torchless.ModelLoader.load_auto(a.model, act_quant=act_quant)), kind)
        got = m.prefill(m.new_state(), ids, all_logits=True)
        err = np.abs(got - ref)
        rows[kind + ("" if act_quant else " float-act")] = {
            "max_abs_err_over_scale": float(err.max() / scale),
            "mean_abs_err_over_scale": float(err.mean() / scale),
            "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
        }
    print(json.dumps({"model": str(a.model), "tokens": len(ids), "logit_scale": scale,
                      "results": rows}, indent=2))


if __name__ == "__main__":
    main()
