"""GGUF files written by llama.cpp's own converter give the transformers reference logits.

``tests/fixtures_gguf/*.gguf`` are the tiny HF fixtures (``tests/fixtures/<name>/``) run through
llama.cpp's ``convert_hf_to_gguf.py`` by ``scripts/make_gguf_fixtures.py`` (see its docstring
for the few converter patches: tokenizer-only, plus two Gemma hyper-parameters GGUF cannot
carry). Each file is loaded with ``ModelLoader.load_auto`` and its logits -- batched prefill,
per-token ``fast_forward`` and per-token reference ``forward`` -- are compared with the
fixture's ``reference.npz`` (``logits_full``, computed by transformers from the safetensors).

Tolerances, as fractions of ``max |logits|`` of the reference:

* f32 files: 1e-4 (measured <= 2e-6: float32 summation order only).
* ``llama3_gqa-f16``: 1e-2, argmax agreement >= 90%. Measured 2.3e-3 with 100% argmax
  agreement: every matrix is rounded to f16 (relative error <= 2^-11 = 4.9e-4 per weight),
  which two layers and the output projection amplify about 5x; 1e-2 leaves a 4x margin.
  ``test_f16_tensors_are_the_f32_ones_rounded`` separately checks the stored values exactly.
* ``qwen2_tied-q8_0``: 0.1, argmax agreement >= 80%. Measured 6.3e-2 with 22/24 argmax
  agreement. This is the error of q8_0 weights themselves on this model (random weights of
  std ~0.25; the tied embedding is quantized too, so it enters twice): torchless's own q8_0
  quantization of the safetensors writes the very same bytes and gives the same logits, which
  ``test_q8_0_is_torchless_q8_0_of_the_safetensors`` checks to 1e-5.

``mistral_window``: llama.cpp converts ``MistralForCausalLM`` to its ``llama`` architecture,
which has no sliding window (``src/models/llama.cpp``), so the GGUF model attends to all
previous tokens. It equals the reference for the first ``sliding_window`` (5) positions only,
and everywhere equals the same safetensors model run without a window.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

import torchless

TESTS = Path(__file__).resolve().parents[1]
GGUF_DIR = TESTS / "fixtures_gguf"
FIXTURES = TESTS / "fixtures"

F32_TOL = 1e-4

# file -> fixture, expected (family, variant), tolerance, min argmax agreement, rows compared
CASES = {
    "llama2_mha.gguf": dict(fixture="llama2_mha", family="llama", variant="llama"),
    "llama3_gqa.gguf": dict(fixture="llama3_gqa", family="llama", variant="llama"),
    "llama3_gqa-f16.gguf": dict(fixture="llama3_gqa", family="llama", variant="llama",
                                tol=1e-2, argmax=0.9),
    # GGUF arch "llama": llama.cpp drops Mistral's window; rows beyond it differ.
    "mistral_window.gguf": dict(fixture="mistral_window", family="llama", variant="llama",
                                rows=5),
    "qwen2_tied.gguf": dict(fixture="qwen2_tied", family="qwen", variant="qwen2"),
    "qwen2_tied-q8_0.gguf": dict(fixture="qwen2_tied", family="qwen", variant="qwen2",
                                 tol=0.1, argmax=0.8),
    "qwen3.gguf": dict(fixture="qwen3", family="qwen", variant="qwen3"),
    "gemma.gguf": dict(fixture="gemma", family="gemma", variant="gemma"),
    "gemma2.gguf": dict(fixture="gemma2", family="gemma", variant="gemma2"),
    "gemma3_text.gguf": dict(fixture="gemma3_text", family="gemma", variant="gemma3_text"),
    "phi3.gguf": dict(fixture="phi3", family="phi", variant="phi3"),
    # mixtures of experts: the converter stacks the experts into 3-D ffn_*_exps tensors
    "mixtral.gguf": dict(fixture="mixtral", family="llama", variant="mixtral"),
    "qwen3_moe.gguf": dict(fixture="qwen3_moe", family="qwen", variant="qwen3_moe"),
    "qwen3_moe-q8_0.gguf": dict(fixture="qwen3_moe", family="qwen", variant="qwen3_moe",
                                tol=0.25, argmax=0.9),
    "olmoe.gguf": dict(fixture="olmoe", family="olmoe", variant="olmoe"),
    "qwen2_moe.gguf": dict(fixture="qwen2_moe", family="qwen", variant="qwen2_moe"),
}
NAMES = sorted(CASES)

STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces\nand\ttabs, trailing  ",
    "naïve café — 東京 😀",
    "it's 1234567 o'clock, isn't it?",
    "",
]


def _path(name: str) -> Path:
    p = GGUF_DIR / name
    if not p.is_file():
        pytest.skip(f"{p} missing: run scripts/make_gguf_fixtures.py")
    return p


@functools.cache
def _model(name: str, lazy: bool = False):
    return torchless.ModelLoader.load_auto(_path(name), lazy=lazy)


@functools.cache
def _reference(fixture: str):
    r = np.load(FIXTURES / fixture / "reference.npz")
    return r["ids"].astype(np.int64), r["logits_full"].astype(np.float32)


def _check(name: str, out: np.ndarray, what: str) -> None:
    case = CASES[name]
    ids, ref = _reference(case["fixture"])
    rows = case.get("rows", len(ids))
    scale = float(np.abs(ref).max())
    assert out.shape == ref.shape, f"{name} {what}: shape {out.shape} != {ref.shape}"
    err = float(np.abs(out[:rows] - ref[:rows]).max()) / scale
    tol = case.get("tol", F32_TOL)
    assert err <= tol, f"{name} {what}: max |error| = {err:.3g} x max|logits| > {tol:g}"
    agree = float((out[:rows].argmax(-1) == ref[:rows].argmax(-1)).mean())
    assert agree >= case.get("argmax", 1.0), f"{name} {what}: argmax agreement {agree:.0%}"


def _per_token(model, ids, fast: bool) -> np.ndarray:
    state = torchless.InferenceState(model.config)
    step = model.fast_forward if fast else model.forward
    return np.stack([np.array(step(state, int(t)), dtype=np.float32, copy=True) for t in ids])


def test_every_committed_gguf_has_a_case():
    present = {p.name for p in GGUF_DIR.glob("*.gguf")}
    if not present:
        pytest.skip("no GGUF fixtures: run scripts/make_gguf_fixtures.py")
    assert present == set(CASES), (
        f"untested: {present - set(CASES)}, missing: {set(CASES) - present}")


@pytest.mark.parametrize("name", NAMES)
def test_detects_variant(name):
    model = _model(name)
    case = CASES[name]
    assert model.config.architecture == case["family"]
    assert model.config.variant == case["variant"]
    assert str(model.architecture) == case["family"]


@pytest.mark.parametrize("name", NAMES)
def test_prefill_matches_transformers(name):
    model = _model(name)
    ids, _ = _reference(CASES[name]["fixture"])
    state = torchless.InferenceState(model.config)
    _check(name, np.asarray(model.prefill(state, ids.tolist(), all_logits=True)), "prefill")


@pytest.mark.parametrize("name", NAMES)
def test_fast_forward_matches_transformers(name):
    model = _model(name)
    ids, _ = _reference(CASES[name]["fixture"])
    _check(name, _per_token(model, ids, fast=True), "fast_forward")


@pytest.mark.parametrize("name", NAMES)
def test_forward_matches_transformers(name):
    model = _model(name)
    ids, _ = _reference(CASES[name]["fixture"])
    _check(name, _per_token(model, ids, fast=False), "forward")


@pytest.mark.parametrize("name", ["gemma3_text.gguf", "llama3_gqa.gguf", "olmoe.gguf",
                                  "qwen3_moe-q8_0.gguf"])
def test_lazy_load_matches(name):
    model = _model(name, lazy=True)
    assert model.params.lazy
    assert not model.embed.data.flags.owndata  # a view of the memory map
    ids, _ = _reference(CASES[name]["fixture"])
    state = torchless.InferenceState(model.config)
    _check(name, np.asarray(model.prefill(state, ids.tolist(), all_logits=True)), "lazy prefill")
    _check(name, _per_token(model, ids, fast=True), "lazy fast_forward")


@pytest.mark.parametrize("name", NAMES)
def test_tokenizer_from_metadata_matches_tokenizer_json(name):
    from tokenizers import Tokenizer

    model = _model(name)
    assert model.tokenizer is not None, "the converter wrote a vocabulary; no tokenizer built"
    fixture = FIXTURES / CASES[name]["fixture"]
    hf = Tokenizer.from_file(str(fixture / "tokenizer.json"))
    # BOS: tokenizer.json's post-processor prepends it for the Llama/Gemma fixtures, and the
    # converter copies add_bos_token from tokenizer_config.json; both must agree.
    add_bos = json.loads((fixture / "tokenizer_config.json").read_text()).get("add_bos_token")
    for s in STRINGS:
        ours = model.encode(s)
        theirs = hf.encode(s).ids
        assert ours == theirs, f"{name}: {s!r}: {ours} != {theirs}"
        assert model.encode(s, add_special_tokens=False) == hf.encode(
            s, add_special_tokens=False).ids
        if add_bos and s:
            assert ours[0] == model.config.bos_token_id
    ids, _ = _reference(CASES[name]["fixture"])
    text = hf.decode(ids.tolist(), skip_special_tokens=True)
    assert model.decode(model.encode(text)).endswith(text)


def test_mistral_window_gguf_is_full_attention():
    """Past the window the GGUF (llama arch) model is the safetensors model without it."""
    gg = _model("mistral_window.gguf")
    assert all(w is None for w in gg.config.layer_windows)
    hf = torchless.ModelLoader.load_auto(FIXTURES / "mistral_window")
    assert set(hf.config.layer_windows) == {5}
    hf.config.layer_windows = [None] * hf.config.num_layers
    ids, ref = _reference("mistral_window")
    a = gg.prefill(torchless.InferenceState(gg.config), ids.tolist(), all_logits=True)
    b = hf.prefill(torchless.InferenceState(hf.config), ids.tolist(), all_logits=True)
    scale = float(np.abs(ref).max())
    assert float(np.abs(a - b).max()) <= F32_TOL * scale
    # and the window did matter for the reference
    assert float(np.abs(a[5:] - ref[5:]).max()) > 1e-2 * scale


def test_f16_tensors_are_the_f32_ones_rounded():
    from torchless.gguf import GGUFFile

    h = GGUFFile(_path("llama3_gqa-f16.gguf"))
    f = GGUFFile(_path("llama3_gqa.gguf"))
    assert set(h.tensor_infos) == set(f.tensor_infos)
    n16 = 0
    for name in h.tensor_infos:
        a, b = h.tensor(name), f.tensor(name)
        if a.kind == "f16":
            n16 += 1
            np.testing.assert_array_equal(
                a.to_f32(), b.to_f32().astype(np.float16).astype(np.float32), err_msg=name)
        else:  # norms and rope_freqs stay float32
            np.testing.assert_array_equal(a.to_f32(), b.to_f32(), err_msg=name)
    assert n16 >= 7 * 2


def test_q8_0_is_torchless_q8_0_of_the_safetensors():
    from torchless.gguf import GGUFFile
    from torchless.kernels import quant

    q = GGUFFile(_path("qwen2_tied-q8_0.gguf"))
    f = GGUFFile(_path("qwen2_tied.gguf"))
    nq = 0
    for name in q.tensor_infos:
        a = q.tensor(name)
        if a.kind == "q8_0":
            nq += 1
            mine = quant.quantize_q8_0(f.tensor(name).to_f32())
            assert np.array_equal(np.asarray(a.data).view(np.uint8).reshape(-1),
                                  np.asarray(mine).view(np.uint8).reshape(-1)), name
    assert nq >= 7 * 2
    gg = _model("qwen2_tied-q8_0.gguf")
    st = torchless.ModelLoader.load_auto(FIXTURES / "qwen2_tied", quantize="q8_0")
    ids, ref = _reference("qwen2_tied")
    a = gg.prefill(torchless.InferenceState(gg.config), ids.tolist(), all_logits=True)
    b = st.prefill(torchless.InferenceState(st.config), ids.tolist(), all_logits=True)
    assert float(np.abs(a - b).max()) <= 1e-5 * float(np.abs(ref).max())


def test_moe_q8_0_is_torchless_q8_0_of_the_safetensors():
    """The q8_0 mixture file holds exactly torchless's own q8_0 of the experts (the router
    stays float32 in both), so the two models agree to float rounding, on every path."""
    gg = _model("qwen3_moe-q8_0.gguf")
    layer = gg.layers[0]
    assert layer.w["ffn_gate_inp"].kind == "f32"
    assert {layer.w[n].kind for n in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")} == {
        "q8_0"}
    assert not layer.w["ffn_up_exps"][3].data.flags.owndata  # a view into the 3-D tensor
    st = torchless.ModelLoader.load_auto(FIXTURES / "qwen3_moe", quantize="q8_0")
    ids, ref = _reference("qwen3_moe")
    scale = float(np.abs(ref).max())
    a = gg.prefill(torchless.InferenceState(gg.config), ids.tolist(), all_logits=True)
    b = st.prefill(torchless.InferenceState(st.config), ids.tolist(), all_logits=True)
    assert float(np.abs(a - b).max()) <= 1e-5 * scale
    for fast in (True, False):
        c = _per_token(st, ids, fast=fast)
        assert float(np.abs(c - a).max()) <= 1e-5 * scale, f"fast={fast}"


def test_moe_gguf_hyperparameters():
    """expert_count / expert_used_count / expert_feed_forward_length, and the renormalisation
    llama.cpp's graph code fixes per architecture."""
    mx = _model("mixtral.gguf").config
    assert (mx.moe.num_experts, mx.moe.top_k, mx.moe.intermediate_size) == (8, 2, 32)
    assert mx.moe.renorm and mx.moe.router == "softmax_topk"
    qm = _model("qwen3_moe.gguf").config
    assert (qm.moe.num_experts, qm.moe.top_k, qm.moe.intermediate_size) == (8, 3, 32)
    assert qm.moe.renorm and qm.qk_norm == "rms" and not qm.qk_norm_full
    ol = _model("olmoe.gguf").config
    assert (ol.moe.num_experts, ol.moe.top_k) == (8, 2) and not ol.moe.renorm
    assert ol.qk_norm_full
    q2 = _model("qwen2_moe.gguf").config  # expert_shared_feed_forward_length; never renorm
    assert (q2.moe.num_experts, q2.moe.top_k, q2.moe.intermediate_size) == (8, 2, 32)
    assert q2.moe.shared_intermediate_size == 48 and not q2.moe.renorm
    assert (qm.moe.shared_intermediate_size, ol.moe.shared_intermediate_size) == (0, 0)


def test_gemma_gguf_hyperparameters():
    """The metadata keys llama.cpp reads for Gemma 2/3 (src/models/gemma2.cpp, gemma3.cpp)."""
    g2 = _model("gemma2.gguf").config
    assert g2.attn_softcap == pytest.approx(5.0) and g2.final_softcap == pytest.approx(3.0)
    assert g2.layer_windows == [6, None, 6, None]
    assert g2.attn_scale == pytest.approx(16 ** -0.5)  # llama.cpp: head_dim ** -0.5
    g3 = _model("gemma3_text.gguf").config
    assert g3.layer_windows == [6, 6, 6, None]
    assert g3.layer_rope == ["local", "local", "local", "global"]
    assert g3.ropes["global"].theta == pytest.approx(1e6)
    assert (g3.ropes["global"].rope_type, g3.ropes["global"].factor) == ("linear", 8.0)
    assert g3.ropes["local"].theta == pytest.approx(1e4)
    assert g3.ropes["local"].rope_type == "default"
    assert g3.norm == "rms" and g3.qk_norm == "rms"  # GGUF Gemma norms include the +1
