"""Perplexity and KL divergence against llama-perplexity's numbers and an independent NumPy
statement of its definitions (fixtures: scripts/make_ppl_fixtures.py, make_ppl_text.py)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import torchless
from torchless.cli import main
from torchless.perplexity import (
    BaseLogProbs,
    PerplexityError,
    compact_rows,
    kld_rows,
    load_base,
    perplexity,
    save_base,
)

HERE = Path(__file__).parent
DATA = HERE / "data"
GGUF = HERE / "fixtures_gguf" / "llama2_mha.gguf"
HF = HERE / "fixtures" / "llama2_mha"
REC = json.loads((DATA / "llama2_mha_llamacpp_ppl.json").read_text())
LLAMA_BASE = DATA / "llama2_mha_llamacpp_base.kld"
TEXT = (DATA / "devils_dictionary.txt").read_text(encoding="utf-8")
SLICE = TEXT[: REC["text_chars"]]


@pytest.fixture(scope="module")
def model():
    return torchless.ModelLoader.load_auto(str(GGUF))


def test_shipped_text_is_the_public_domain_one():
    assert "A Public Domain Text, Copyright Expired" in TEXT[:600]
    assert 100_000 < len(TEXT.encode()) < 300_000


def test_ppl_matches_llama_perplexity(model):
    r = perplexity(model, SLICE, ctx=REC["ctx"], chunks=REC["chunks"])
    assert r.n_chunks == REC["chunks"] and r.n_tokens == REC["chunks"] * (REC["ctx"] // 2 - 1)
    # llama.cpp prints 4 decimals; float32 rounding of the two engines' logits differs
    assert r.ppl == pytest.approx(REC["ppl"], rel=2e-6)
    assert r.ppl_uncertainty == pytest.approx(REC["ppl_uncertainty"], rel=2e-6)
    # the same tokens as llama.cpp tokenized (its base file holds them)
    base = load_base(LLAMA_BASE)
    assert np.array_equal(base.tokens, model.encode(SLICE)[: len(base.tokens)])


def test_f32_against_llama_cpp_base(model):
    r = perplexity(model, kl_divergence=LLAMA_BASE)
    assert abs(r.kld.mean) <= 1e-5 and r.kld.same_top == 1.0
    assert r.kld.ppl_base == pytest.approx(REC["q4_0"]["ppl_base"], rel=1e-6)


def test_kld_statistics_match_llama_perplexity():
    # the Q4_0 file against the float model's llama.cpp base: the same 248 tokens scored by
    # both engines (torchless's 8-bit activations round as llama.cpp's x86 path)
    q4 = torchless.ModelLoader.load_auto(str(DATA / "llama2_mha-q4_0.gguf"))
    k = perplexity(q4, SLICE, kl_divergence=LLAMA_BASE).kld
    want = REC["q4_0"]
    assert k.mean == pytest.approx(want["kld_mean"], rel=1e-3)
    assert k.median == pytest.approx(want["kld_median"], rel=1e-3)
    assert k.p99 == pytest.approx(want["kld_p99"], rel=1e-3)
    assert k.max == pytest.approx(want["kld_max"], rel=1e-3)
    assert 100 * k.same_top == pytest.approx(want["same_top_pct"], abs=0.5)
    assert k.ln_ppl_ratio == pytest.approx(want["ln_ppl_ratio"], rel=2e-3)
    assert k.ppl_diff == pytest.approx(want["ppl_diff"], rel=2e-3)
    assert 100 * k.rms_dp == pytest.approx(want["rms_dp_pct"], abs=0.01)


def _reference_ppl(m, tokens, ctx, n_chunk):
    """llama-perplexity's definition in plain NumPy over the reference forward path."""
    first, nll = ctx // 2, []
    for c in range(n_chunk):
        ids = list(tokens[c * ctx:(c + 1) * ctx])
        ids[0] = m.tokenizer.bos_id
        lg = m.forward_tokens(m.new_state(), ids, all_logits=True).astype(np.float64)
        lp = lg - lg.max(1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(1, keepdims=True))
        nll += [-lp[i, ids[i + 1]] for i in range(first, ctx - 1)]
    nll = np.array(nll)
    return math.exp(nll.mean()), math.exp(nll.mean()) * nll.std() / math.sqrt(len(nll) - 1)


@pytest.mark.parametrize("batch", [None, 20])
def test_ppl_against_numpy_reference(batch):
    m = torchless.ModelLoader.load_auto(str(HF))
    tokens = m.encode(SLICE[:1500])
    ref, ref_u = _reference_ppl(m, tokens, 48, len(tokens) // 48)
    r = perplexity(m, SLICE[:1500], ctx=48, batch=batch)
    assert r.n_chunks == len(tokens) // 48
    assert r.ppl == pytest.approx(ref, rel=1e-5)
    assert r.ppl_uncertainty == pytest.approx(ref_u, rel=1e-4)


def test_base_files_round_trip(model, tmp_path):
    npz, raw = tmp_path / "b.npz", tmp_path / "b.kld"
    r1 = perplexity(model, SLICE, ctx=64, chunks=8, save_logits=npz)
    r2 = perplexity(model, SLICE, ctx=64, chunks=8, save_logits=raw)
    a, b = load_base(npz), load_base(raw)
    for f in ("tokens", "scale", "min_log_prob", "q"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    # the header and tokens are llama.cpp's bytes; the compact rows within one step
    ours, theirs = raw.read_bytes(), LLAMA_BASE.read_bytes()
    n_head = 20 + 4 * len(a.tokens)
    assert len(ours) == len(theirs) and ours[:n_head] == theirs[:n_head]
    ll = load_base(LLAMA_BASE)
    assert np.abs(a.q.astype(int) - ll.q.astype(int)).max() <= 1
    k = perplexity(model, kl_divergence=npz)
    assert r1.ppl == r2.ppl and abs(k.kld.mean) < 1e-6 and k.kld.same_top == 1.0
    assert k.ppl == pytest.approx(r1.ppl, rel=1e-6)
    save_base(tmp_path / "c.npz", a)
    assert np.array_equal(load_base(tmp_path / "c.npz").q, a.q)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 300), st.floats(0.1, 8.0))
def test_compact_kld_against_float64(seed, vocab, spread):
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal((5, vocab)) * spread).astype(np.float32)
    other = (base + rng.standard_normal((5, vocab)) * 0.3).astype(np.float32)
    tgt = rng.integers(0, vocab, 5)
    scale, mlp, q = compact_rows(base)
    lpb = (base - base.max(1, keepdims=True)).astype(np.float64)
    lpb -= np.log(np.exp(lpb).sum(1, keepdims=True))
    deq = scale[:, None].astype(np.float64) * q + mlp[:, None]
    live = lpb > lpb.max(1, keepdims=True) - 16 + 1e-3
    assert np.all(np.abs(deq - lpb)[live] <= scale.max() + 1e-5)  # half a step + float32
    lpo = (other - other.max(1, keepdims=True)).astype(np.float64)
    lpo -= np.log(np.exp(lpo).sum(1, keepdims=True))
    pb = np.exp(deq) * (deq > -16)
    want = (pb * (deq - lpo)).sum(1)
    kld, nll, nll_base, same, dp = kld_rows(other, tgt, scale, mlp, q)
    np.testing.assert_allclose(kld, want, atol=1e-4)
    np.testing.assert_allclose(nll, -lpo[np.arange(5), tgt], atol=1e-4)
    np.testing.assert_allclose(nll_base, -deq[np.arange(5), tgt], atol=1e-4)
    assert np.array_equal(same, other.argmax(1) == deq.argmax(1))
    k0 = kld_rows(base, tgt, scale, mlp, q)[0]  # a model against its own base
    assert np.all(np.abs(k0) < 1e-3)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 200))
def test_truncated_or_corrupt_base_files(tmp_path_factory, cut):
    data = LLAMA_BASE.read_bytes()
    p = tmp_path_factory.mktemp("b") / "x.kld"
    p.write_bytes(data[:cut] if cut < 40 else data[: len(data) - cut])
    with pytest.raises(PerplexityError):
        load_base(p)


def test_bad_inputs(model, tmp_path):
    with pytest.raises(PerplexityError, match="at least 128 tokens"):
        perplexity(model, SLICE[:60], ctx=64)
    with pytest.raises(PerplexityError, match="cannot be combined"):
        perplexity(model, SLICE, save_logits=tmp_path / "a.npz", kl_divergence=LLAMA_BASE)
    with pytest.raises(PerplexityError, match="differ from the base"):
        perplexity(model, TEXT[500:4000], kl_divergence=LLAMA_BASE)
    with pytest.raises(PerplexityError, match="ctx"):
        perplexity(model, SLICE, ctx=2)
    with pytest.raises(PerplexityError, match="batch"):
        perplexity(model, SLICE, ctx=64, batch=0)
    (tmp_path / "junk.npz").write_bytes(b"not a base file at all")
    with pytest.raises(PerplexityError, match="neither"):
        perplexity(model, kl_divergence=tmp_path / "junk.npz")
    with pytest.raises(PerplexityError, match="cannot read"):
        load_base(tmp_path / "missing.kld")
    b = load_base(LLAMA_BASE)
    wide = BaseLogProbs(b.n_ctx, 321, b.tokens, b.scale, b.min_log_prob,
                        np.zeros(b.q.shape[:2] + (321,), np.uint16))
    with pytest.raises(PerplexityError, match="vocabulary of 321"):
        perplexity(model, kl_divergence=wide)


def test_cli(tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text(SLICE, encoding="utf-8")
    assert main(["perplexity", str(GGUF), str(f), "--ctx", "64", "--chunks", "8",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["ppl"] == pytest.approx(REC["ppl"], rel=2e-6) and r["kld"] is None
    assert main(["perplexity", str(GGUF), "--kl-divergence", str(LLAMA_BASE)]) == 0
    out = capsys.readouterr().out
    assert "Mean    KLD" in out and "Same top p: 100.000" in out
    assert main(["perplexity", str(GGUF), str(tmp_path / "none.txt")]) == 2
    assert "cannot read text file" in capsys.readouterr().err
    assert main(["perplexity", str(GGUF)]) == 2


def test_prefill_logits_from(model):
    ids = model.encode(SLICE[:400])[:40]
    full = model.prefill(model.new_state(), ids, all_logits=True)
    part = model.prefill(model.new_state(), ids, all_logits=True, logits_from=25)
    assert part.shape == (15, model.config.vocab_size)
    np.testing.assert_allclose(part, full[25:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="logits_from"):
        model.prefill(model.new_state(), ids, all_logits=True, logits_from=40)


def test_progress_line(model):
    import io

    s = io.StringIO()
    perplexity(model, SLICE, ctx=64, chunks=3, progress=s)
    out = s.getvalue()
    assert "1/3 windows" in out and "3/3 windows" in out and out.endswith("\n")
