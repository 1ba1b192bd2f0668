"""Batched decode (``decode_batch``, kernels/batch.py), prefix reuse and ``generate_batch``.

The contract: a sequence decoded in a batch gets the same logits, bit for bit, as in a batch
of one, whatever B is and whatever the other rows are; a batch of one agrees with
``fast_forward`` (the fused decode) within the parity tolerance. Checked kernel by kernel
(every weight kind, both activation settings) and on whole models (float, f16/bf16 files,
quantized on load, GGUF q8_0, a mixed k-quant model; lazy and eager), with hypothesis
choosing batch sizes, positions and companions.
"""
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import torchless
from quant_blocks import random_blocks
from torchless import TokenError, TorchlessError, common_prefix_len
from torchless.errors import SequenceLengthError
from torchless.kernels import batch as kb
from torchless.kernels import matmul as km
from torchless.kernels import ops as ko
from torchless.kernels import quant as kq
from torchless.weights import Weight, f32_to_bf16

HERE = Path(__file__).parent
FIX = HERE / "fixtures"
GGUF = HERE / "fixtures_gguf"
KINDS = ["f32", "f16", "bf16"] + sorted(kq.BLOCK_INFO)  # every weight kind torchless computes
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.function_scoped_fixture])


def _weight(kind, rows, cols, rng):
    a = rng.standard_normal((rows, cols)).astype(np.float32)
    if kind == "f32":
        return Weight("w", kind, a.shape, a)
    if kind == "f16":
        return Weight("w", kind, a.shape, a.astype(np.float16))
    if kind == "bf16":
        return Weight("w", kind, a.shape, f32_to_bf16(a))
    return Weight("w", kind, a.shape,
                  random_blocks(kind, rows, cols // kq.BLOCK_INFO[kind][0], rng))


# ---- kernels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=8, **SETTINGS)
@given(act_quant=st.booleans(), B=st.integers(1, 13),
       rows=st.integers(1, 19), extra_cols=st.sampled_from([0, 7]), seed=st.integers(0, 99))
@example(act_quant=True, B=13, rows=7, extra_cols=0, seed=1)  # tiles of 8 and 4, one left
def test_linear_rows_is_matvec_per_row(kind, act_quant, B, rows, extra_cols, seed):
    """Every row of the batched product is the decode product of that row, bit for bit (odd
    weight rows and a column remainder exercise the kernels' tails)."""
    rng = np.random.default_rng(seed)
    cols = 512 if kind not in ("f32", "f16", "bf16") else 64 + extra_cols
    w = _weight(kind, rows, cols, rng)
    X = (rng.standard_normal((B, cols)) * rng.uniform(0.1, 10, (B, 1))).astype(np.float32)
    got = kb.linear_rows(w, X, act_quant, kb.ActCache())
    for b in range(B):
        want = km.matvec(w, X[b].copy(), act_quant=act_quant)
        np.testing.assert_array_equal(got[b], want, err_msg=f"row {b} of {B}")


def test_act_cache_requantizes_a_new_input_or_format():
    rng = np.random.default_rng(1)
    cache = kb.ActCache()
    w8, wk = _weight("q8_0", 8, 256, rng), _weight("q4_k", 8, 256, rng)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    y = (x * 2 + 1).astype(np.float32)
    for w, inp in ((w8, x), (wk, x), (w8, x), (w8, y), (wk, y)):
        np.testing.assert_array_equal(kb.linear_rows(w, inp, True, cache),
                                      kb.linear_rows(w, inp, True))


@settings(max_examples=30, **SETTINGS)
@given(B=st.integers(1, 9), data=st.data(), window=st.sampled_from([0, 3]),
       softcap=st.sampled_from([0.0, 5.0]), parallel=st.booleans(), rep=st.sampled_from([1, 2]))
def test_attention_slots_is_attention_per_row(B, data, window, softcap, parallel, rep):
    """Row b writes its key/value into its own cache at its own position and attends as
    ``ops.attention`` does for that cache alone."""
    nKV, D = 2, 16
    nH = nKV * rep
    rng = np.random.default_rng(B)
    pos = np.array(data.draw(st.lists(st.integers(0, 20), min_size=B, max_size=B)), np.int64)
    caps = pos + np.array(data.draw(st.lists(st.integers(1, 5), min_size=B, max_size=B)))
    kcs = [rng.standard_normal((nKV, c, D)).astype(np.float32) for c in caps]
    vcs = [rng.standard_normal((nKV, c, D)).astype(np.float32) for c in caps]
    kcs0 = [k.copy() for k in kcs]
    vcs0 = [v.copy() for v in vcs]
    q = rng.standard_normal((B, nH, D)).astype(np.float32)
    k = rng.standard_normal((B, nKV, D)).astype(np.float32)
    v = rng.standard_normal((B, nKV, D)).astype(np.float32)
    logn = rng.uniform(1, 1.5, B).astype(np.float32)
    out = np.empty_like(q)
    kb.attention_slots(q, k, v, np.array([a.ctypes.data for a in kcs], np.int64),
                       np.array([a.ctypes.data for a in vcs], np.int64), caps.astype(np.int64),
                       pos, np.float32(0.25), np.float32(softcap), window, logn, out, parallel)
    for b in range(B):
        kcs0[b][:, pos[b]] = k[b]
        vcs0[b][:, pos[b]] = v[b]
        np.testing.assert_array_equal(kcs[b], kcs0[b])
        np.testing.assert_array_equal(vcs[b], vcs0[b])
        want = np.empty((1, nH, D), np.float32)
        ko.attention_serial(q[b:b + 1].copy(), kcs0[b], vcs0[b], int(pos[b]), np.float32(0.25),
                            np.float32(softcap), window, logn[b:b + 1].copy(), want)
        np.testing.assert_array_equal(out[b], want[0], err_msg=f"row {b}")


# ---- models ----------------------------------------------------------------------------------

_MODELS: dict = {}


def _kquant_model(tmp_root):
    """A one-layer model whose weights are random k-quant / q5_0 / q4_0 blocks (as in a
    Q4_K_M file: different kinds per tensor)."""
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=256,
               intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=64, rms_norm_eps=1e-5,
               max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    from conftest import llama_tensors
    from safetensors.numpy import save_file

    d = tmp_root / "kquant"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(llama_tensors(cfg), str(d / "model.safetensors"))
    model = torchless.ModelLoader.load_auto(d)
    rng = np.random.default_rng(5)
    kinds = iter(["q4_k", "q5_k", "q6_k", "q5_0", "q4_k", "q6_k"])
    for layer in model.layers:
        for name, w in list(layer.w.items()):
            kind = next(kinds)
            epb = kq.BLOCK_INFO[kind][0]
            blocks = random_blocks(kind, w.rows, w.cols // epb, rng)
            # small scales keep the activations in a sane range through the layer
            layer.w[name] = Weight(name, kind, w.shape, blocks)
    out = model.output
    model.output = Weight("output", "q4_0", out.shape,
                          random_blocks("q4_0", out.rows, out.cols // 32, rng))
    model._packed = None
    return model


MODEL_CASES = [
    ("llama3_gqa", {}), ("llama3_gqa", {"lazy": True}), ("llama_bf16", {}),
    ("llama3_gqa", {"quantize": "q8_0", "act_quant": True}),
    ("llama3_gqa", {"quantize": "q4_0", "act_quant": False}),
    ("llama3_gqa", {"quantize": "q4_0", "act_quant": True, "lazy": True}),
    ("gguf:llama3_gqa-f16.gguf", {}), ("gguf:qwen2_tied-q8_0.gguf", {}),
    ("gguf:qwen2_tied-q8_0.gguf", {"act_quant": False, "lazy": True}),
    ("gemma3_text", {}), ("gemma2", {}), ("qwen1", {}), ("phi3_longrope_long", {}),
    ("mistral_window", {}), ("kquant", {"act_quant": True}), ("kquant", {"act_quant": False}),
]


def _model(name, kw, tmp_root):
    key = (name, tuple(sorted(kw.items())))
    m = _MODELS.get(key)
    if m is None:
        if name == "kquant":
            m = _kquant_model(tmp_root)
            m.act_quant = kw["act_quant"]
        elif name.startswith("gguf:"):
            m = torchless.ModelLoader.load_auto(GGUF / name[5:], **kw)
        else:
            m = torchless.ModelLoader.load_auto(FIX / name, **kw)
        _MODELS[key] = m
    return m


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("batch_models")


def _prompt(model, n, salt):
    V = model.config.vocab_size
    return [(7 * i + 3 + 11 * salt) % V for i in range(n)]


def _states(model, lengths, salts):
    out = []
    for n, s in zip(lengths, salts):
        st_ = model.new_state()
        model.prefill(st_, _prompt(model, n, s))
        out.append(st_)
    return out


@pytest.mark.parametrize("name,kw", MODEL_CASES, ids=lambda v: str(v))
@settings(max_examples=4, **SETTINGS)
@given(data=st.data())
def test_row_independent_of_batch(name, kw, tmp_root, data):
    """The target sequence's logits over three steps, decoded beside hypothesis-chosen
    companions (any count, positions, tokens), equal those of a batch of one bit for bit;
    a batch of one is the fused decode, so the batched kernels must give its bits."""
    model = _model(name, kw, tmp_root)
    V = model.config.vocab_size
    n_target = data.draw(st.integers(1, 24), label="target prompt length")
    B = data.draw(st.integers(1, 9), label="B")
    where = data.draw(st.integers(0, B - 1), label="target row")
    comp_len = data.draw(st.lists(st.integers(1, 30), min_size=B - 1, max_size=B - 1))
    toks = data.draw(st.lists(st.lists(st.integers(0, V - 1), min_size=3, max_size=3),
                              min_size=B, max_size=B))
    alone = _states(model, [n_target], [0])[0]
    ref = _states(model, [n_target], [0])[0]
    target = _states(model, [n_target], [0])[0]
    comps = _states(model, comp_len, range(1, B))
    for step in range(3):
        t = toks[where][step]
        want = model.decode_batch([alone], [t])[0]
        batch = comps[:where] + [target] + comps[where:]
        tokens = [toks[b][step] for b in range(B)]
        tokens[where] = t
        got = model.decode_batch(batch, tokens)
        np.testing.assert_array_equal(got[where], want, err_msg=f"step {step}, B={B}")
        np.testing.assert_array_equal(target.logits, want)
        fused = model.fast_forward(ref, t)
        np.testing.assert_array_equal(want, fused)
    assert target.pos == alone.pos == n_target + 3
    assert target.tokens == alone.tokens == ref.tokens
    for i in range(model.config.num_layers):
        np.testing.assert_array_equal(target.cache.k[i][:, :target.pos],
                                      alone.cache.k[i][:, :alone.pos])


@pytest.mark.parametrize("name,kw", [("llama3_gqa", {}), ("gemma2", {}), ("qwen1", {}),
                                     ("gguf:qwen2_tied-q8_0.gguf", {}),
                                     ("llama3_gqa", {"quantize": "q4_0", "act_quant": True})],
                         ids=lambda v: str(v))
def test_batch_of_one_is_the_fused_decode_bit_for_bit(name, kw, tmp_root):
    """Same per-row kernels, same order: decode_batch of one = fast_forward, bit for bit."""
    model = _model(name, kw, tmp_root)
    a, b = _states(model, [9, 9], [0, 0])
    for t in (4, 5, 6):
        np.testing.assert_array_equal(model.decode_batch([a], [t])[0], model.fast_forward(b, t))
    assert model._packed, "the fused path was not taken"


def test_batch_matches_reference_forward():
    """decode_batch against the plain-NumPy reference (``forward``)."""
    model = torchless.ModelLoader.load_auto(FIX / "gemma3_text")
    sts = _states(model, [3, 17, 8], [0, 1, 2])
    refs = _states(model, [3, 17, 8], [0, 1, 2])
    for step in range(3):
        got = model.decode_batch(sts, [5 + step, 9, 11])
        for b, tok in enumerate([5 + step, 9, 11]):
            want = model.forward(refs[b], tok)
            np.testing.assert_allclose(got[b], want, atol=2e-5 * np.abs(want).max())


def test_longrope_switch_inside_a_batch():
    """A sequence whose next token crosses LongRoPE's switch is recomputed (as in
    ``fast_forward``); the others decode as usual."""
    model = torchless.ModelLoader.load_auto(FIX / "phi3_longrope_long")
    orig = model.config.ropes[model.config.layer_rope[0]].original_max_position_embeddings
    sts = _states(model, [orig, 4], [0, 1])
    refs = _states(model, [orig, 4], [0, 1])
    got = model.decode_batch(sts, [5, 6])
    for b, tok in enumerate([5, 6]):
        want = model.fast_forward(refs[b], tok)
        np.testing.assert_allclose(got[b], want, atol=2e-5 * np.abs(want).max())
    assert sts[0].pos == orig + 1


def test_decode_batch_errors():
    model = torchless.ModelLoader.load_auto(FIX / "llama3_gqa")
    a, b = model.new_state(), model.new_state(max_seq_len=2)
    with pytest.raises(TorchlessError, match="one token per state"):
        model.decode_batch([a, b], [1])
    with pytest.raises(TokenError, match="outside the vocabulary"):
        model.decode_batch([a, b], [1, model.config.vocab_size])
    with pytest.raises(TorchlessError, match="same state twice"):
        model.decode_batch([a, a], [1, 2])
    other = torchless.ModelLoader.load_auto(FIX / "llama2_mha")
    with pytest.raises(TorchlessError, match="this model"):
        model.decode_batch([a, other.new_state()], [1, 2])
    model.decode_batch([a, b], [1, 2])
    model.decode_batch([a, b], [1, 2])
    with pytest.raises(SequenceLengthError, match="max_seq_len=2"):
        model.decode_batch([a, b], [1, 2])
    assert a.pos == 2 and b.pos == 2  # a failed call changes no state
    assert model.decode_batch([], []).shape == (0, model.config.vocab_size)


# ---- prefix reuse ----------------------------------------------------------------------------


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([1, 2], [1, 2]) == 2


@pytest.mark.parametrize("name", ["llama3_gqa", "qwen1", "gemma3_text"])
def test_truncate_and_reuse_prefix(name):
    """A second turn reusing the first turn's KV gives the logits of a fresh prefill."""
    model = torchless.ModelLoader.load_auto(FIX / name)
    first = _prompt(model, 12, 0)
    st_ = model.new_state()
    model.prefill(st_, first)
    for t in (4, 5, 6):
        model.decode_batch([st_], [t])
    k_before = st_.cache.k[0][:, :10].copy()
    second = first[:10] + [9, 8, 7, 6]
    kept = st_.reuse_prefix(second)
    assert kept == 10 and st_.pos == 10 and st_.tokens == first[:10]
    np.testing.assert_array_equal(st_.cache.k[0][:, :10], k_before)
    got = model.prefill(st_, second[kept:])
    fresh = model.new_state()
    want = model.prefill(fresh, second)
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
    # the whole prompt cached: the last token is fed again, for its logits
    assert st_.reuse_prefix(second) == len(second) - 1
    np.testing.assert_allclose(model.prefill(st_, second[-1:]), want,
                               atol=2e-5 * np.abs(want).max())
    assert st_.truncate(100) == len(second)
    assert st_.truncate(0) == 0 and st_.pos == 0 and st_.tokens == []
    with pytest.raises(ValueError):
        st_.truncate(-1)


def test_truncate_across_the_longrope_switch_resets():
    model = torchless.ModelLoader.load_auto(FIX / "phi3_longrope_long")
    orig = model.config.ropes[model.config.layer_rope[0]].original_max_position_embeddings
    st_ = model.new_state()
    model.prefill(st_, _prompt(model, orig + 4, 0))  # long factors for every key
    assert st_.truncate(orig + 2) == orig + 2  # still long: kept
    assert st_.truncate(orig - 2) == 0  # short factors now apply: nothing is reusable
    assert st_.pos == 0 and st_.tokens == []
    ids = _prompt(model, orig + 6, 0)
    model.prefill(st_, ids[:orig - 4])
    kept = st_.reuse_prefix(ids)  # short keys, then a prefill past the switch recomputes
    got = model.prefill(st_, ids[kept:])
    want = model.prefill(model.new_state(), ids)
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())


# ---- generate_batch --------------------------------------------------------------------------


def test_generate_batch_equals_generate():
    """Ragged prompts, sequences ending at different steps (token budget, end-of-sequence
    id), greedy and sampled: each as ``generate`` alone."""
    model = torchless.ModelLoader.load_auto(FIX / "llama3_gqa")
    prompts = [_prompt(model, n, s) for n, s in ((3, 0), (11, 1), (6, 2), (1, 3))]
    want = [model.generate(p, max_new_tokens=9) for p in prompts]
    assert model.generate_batch(prompts, max_new_tokens=9) == want
    want = [model.generate(p, max_new_tokens=7, temperature=0.9, top_p=0.9, seed=4)
            for p in prompts]
    assert model.generate_batch(prompts, max_new_tokens=7, temperature=0.9, top_p=0.9,
                                seed=4) == want
    want = [model.generate(p, max_new_tokens=7, temperature=1.2, seed=s)
            for s, p in enumerate(prompts)]
    assert model.generate_batch(prompts, max_new_tokens=7, temperature=1.2,
                                seed=list(range(4))) == want
    # an end-of-sequence id ends one sequence early; the rest go on
    eos = want[1][2]
    model.config.eos_token_ids = [eos]
    try:
        got = model.generate_batch(prompts, max_new_tokens=7, temperature=1.2,
                                   seed=list(range(4)))
        assert got[1] == want[1][:3]
        assert got == [model.generate(p, max_new_tokens=7, temperature=1.2, seed=s)
                       for s, p in enumerate(prompts)]
    finally:
        model.config.eos_token_ids = []
    assert model.generate_batch(prompts, max_new_tokens=0) == [[], [], [], []]
    with pytest.raises(TorchlessError, match="empty"):
        model.generate_batch([[1], []])


def test_generate_batch_stop_strings_and_states():
    model = torchless.ModelLoader.load_auto(FIX / "qwen2_tied")
    prompts = ["The capital of", "Once upon a time there"]
    free = [model.decode(model.generate(p, max_new_tokens=8)) for p in prompts]
    stop = free[0][2:4] if len(free[0]) >= 4 else free[0][:1]
    want = [model.generate(p, max_new_tokens=8, stop=stop) for p in prompts]
    assert model.generate_batch(prompts, max_new_tokens=8, stop=stop) == want
    # states reused across calls: the second turn keeps the first turn's prefix
    states = [model.new_state() for _ in prompts]
    first = model.generate_batch(prompts, max_new_tokens=4, states=states)
    turn2 = [model.encode(p) + f + model.encode(" and") for p, f in zip(prompts, first)]
    pos = [s.pos for s in states]
    got = model.generate_batch(turn2, max_new_tokens=4, states=states)
    assert got == [model.generate(t, max_new_tokens=4) for t in turn2]
    assert all(s.pos >= p for s, p in zip(states, pos))
