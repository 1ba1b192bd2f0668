"""The fused decode (one Numba call per layer, kernels/decode.py) against the per-op path.

``fast_forward`` takes the fused path whenever the model's layers fit its slots; the parity
tests hold it to transformers in float32. Here it is held to the per-op Numba path (which the
same tests check, and which ``model._packed = False`` selects) on what they do not cover:
quantized and mixed-kind weights, 8-bit activations, lazily loaded (unfused) layouts, GGUF
files, and a long enough context that attention takes its parallel kernel.
"""
from pathlib import Path

import numpy as np
import pytest

import torchless
from quant_blocks import random_blocks
from torchless.kernels import decode as kd
from torchless.kernels import quant as kq

HERE = Path(__file__).parent
FIX = HERE / "fixtures"
GGUF = HERE / "fixtures_gguf"


def _decode(model, ids, steps, fused):
    model._packed = None if fused else False
    st = model.new_state()
    model.prefill(st, ids)
    out = []
    tok = ids[-1]
    for _ in range(steps):
        logits = model.fast_forward(st, tok).copy()
        out.append(logits)
        tok = int(np.argmax(logits))
    return np.stack(out), st


def _check(model, n_prompt=7, steps=4, tol=2e-5):
    ids = [(7 * i + 3) % model.config.vocab_size for i in range(n_prompt)]
    got, st_f = _decode(model, ids, steps, fused=True)
    assert model._packed, "the fused path was not taken"
    want, st_p = _decode(model, ids, steps, fused=False)
    scale = float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    assert err <= tol * scale, f"fused vs per-op: max |diff| {err:.3g} (scale {scale:.3g})"
    # the KV cache the fused path wrote is the one the per-op path wrote
    n = st_p.pos
    for i in range(model.config.num_layers):
        np.testing.assert_allclose(st_f.cache.k[i][:, :n], st_p.cache.k[i][:, :n],
                                   atol=tol * 10, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama3_gqa", "gemma2", "gemma3_text", "phi2", "qwen1",
                                  "qwen2_tied", "mistral_window"])
@pytest.mark.parametrize("lazy", [False, True])
def test_fused_matches_per_op_float(name, lazy):
    model = torchless.ModelLoader.load_auto(FIX / name, lazy=lazy)
    _check(model, n_prompt=9 if name != "mistral_window" else 20)


@pytest.mark.parametrize("quantize", ["q8_0", "q4_0"])
@pytest.mark.parametrize("act_quant", [False, True])
def test_fused_matches_per_op_quantized(quantize, act_quant):
    model = torchless.ModelLoader.load_auto(FIX / "llama3_gqa", quantize=quantize,
                                            act_quant=act_quant)
    kinds = {w.kind for layer in model.layers for w in layer.w.values()}
    assert quantize in kinds
    _check(model, tol=1e-4)


@pytest.mark.parametrize("file", ["qwen2_tied-q8_0.gguf", "llama3_gqa-f16.gguf", "phi3.gguf"])
def test_fused_matches_per_op_gguf(file):
    for act_quant in (False, True):
        _check(torchless.ModelLoader.load_auto(GGUF / file, act_quant=act_quant), tol=1e-4)


def test_parallel_attention_branch():
    """Attention forks above a work threshold; force it on a short context."""
    model = torchless.ModelLoader.load_auto(FIX / "llama3_gqa")
    ids = [3, 9, 27, 81, 243]
    want, _ = _decode(model, ids, 3, fused=False)
    model._packed = None
    for args in model._decode_pack()[0]:
        args[5][kd.C_PAR_ATTN] = 0
    st = model.new_state()
    model.prefill(st, ids)
    tok, got = ids[-1], []
    for _ in range(3):
        got.append(model.fast_forward(st, tok).copy())
        tok = int(np.argmax(got[-1]))
    np.testing.assert_allclose(np.stack(got), want, atol=2e-5 * np.abs(want).max())


def test_unknown_layer_tensor_falls_back_to_per_op():
    model = torchless.ModelLoader.load_auto(FIX / "llama2_mha")
    w = model.layers[0].w
    w["extra_proj"] = next(iter(w.values()))
    try:
        assert model._decode_pack() is False
        st = model.new_state()
        logits = model.fast_forward(st, 5)
        assert np.isfinite(logits).all()
    finally:
        del w["extra_proj"]
        model._packed = None


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0", "q4_0", "q5_0", "q4_k",
                                  "q5_k", "q6_k"])
def test_linear_every_kind(kind):
    """kernels.decode.linear on each stored kind equals the per-kind matvec, with a bias."""
    from torchless.kernels import matmul as km
    from torchless.weights import Weight, f32_to_bf16

    rng = np.random.default_rng(3)
    rows, cols = 40, 512
    a = rng.standard_normal((rows, cols)).astype(np.float32)
    if kind == "f32":
        w = Weight("w", kind, a.shape, a)
    elif kind == "f16":
        w = Weight("w", kind, a.shape, a.astype(np.float16))
    elif kind == "bf16":
        w = Weight("w", kind, a.shape, f32_to_bf16(a))
    else:
        w = Weight("w", kind, a.shape, random_blocks(kind, rows, cols // kq.BLOCK_INFO[kind][0], rng))
    x = rng.standard_normal(cols).astype(np.float32)
    b = rng.standard_normal(rows).astype(np.float32)
    for aq in (False, True):
        want = km.matvec(w, x, act_quant=aq) + b
        code, data = kd.weight_bytes(w)
        got = np.empty(rows, np.float32)
        kd.linear(code, data, kd.f32_vector(b), x, got, aq)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("T", [5, 200])
def test_batched_linear_reuses_the_activation_round_trip_only_for_the_same_input(T):
    """Batched prefill quantizes an input's activations once for all the weights that read it
    (q, k, v); a different input, or a weight whose kind uses another activation format,
    must not see the stored activations. Short inputs (``batch.short_rows``) go through the
    batched 8-bit products (the decode's rows), longer ones through float32 tiles of the
    weight."""
    from torchless.engine import _FastOps
    from torchless.kernels import batch as kb
    from torchless.kernels import matmul as km
    from torchless.weights import Weight

    rng = np.random.default_rng(0)
    ops = _FastOps(act_quant=True)
    w8 = Weight("a", "q8_0", (48, 256), kq.quantize_q8_0(rng.standard_normal((48, 256))
                                                         .astype(np.float32)))
    w4 = Weight("b", "q4_0", (40, 256), kq.quantize_q4_0(rng.standard_normal((40, 256))
                                                         .astype(np.float32)))
    f32 = rng.standard_normal((40, 256)).astype(np.float32)
    wf = Weight("c", "f32", f32.shape, f32)
    wk = Weight("d", "q4_k", (24, 256), random_blocks("q4_k", 24, 1, rng))
    x = rng.standard_normal((T, 256)).astype(np.float32)
    y = (x * 3 + 1).astype(np.float32)
    assert kb.short_rows("q4_k") >= 5 and kb.short_rows("q8_0") < 200
    for w, inp in ((w8, x), (w4, x), (wk, x), (w8, x), (w8, y), (wf, y), (w4, x), (w4, y)):
        if T <= kb.short_rows(w.kind):
            want = kb.linear_rows(w, inp.copy(), True)
            for t in (0, T - 1):  # each row is the decode's product of that row
                np.testing.assert_array_equal(want[t], km.matvec(w, inp[t].copy(),
                                                                 act_quant=True))
        else:
            want = km.matmul(w, inp.copy(), act_quant=True)
        np.testing.assert_array_equal(ops.linear(inp, w, None), want)
