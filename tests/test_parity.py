"""Every architecture fixture against transformers' logits (made by scripts/make_fixtures.py).

Each fixture is a small random checkpoint with weights large enough (std >= 0.1, random norm
weights and biases) that a wrong formula shows. We check full logits at every position through
the NumPy reference (`forward`), the Numba path (`fast_forward`), batched `prefill`, a lazily
loaded copy, and transformers' greedy continuation.
"""
import json

import numpy as np
import pytest

import torchless
from conftest import fixture_dirs

FIXTURES = fixture_dirs()
TOL = 1e-4  # of the logit scale


def _ref(d):
    return dict(np.load(d / "reference.npz"))


def _expected_per_token(d, r):
    """What one-token-at-a-time decoding must give at each position (transformers semantics)."""
    cfg = json.loads((d / "config.json").read_text())
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rtype = scaling.get("rope_type") or scaling.get("type")
    if rtype in ("longrope", "su"):
        # Short factors while the sequence fits the original window; at the first longer step
        # the cache is recomputed with long factors, so from then on it equals the full call.
        O = cfg["original_max_position_embeddings"]
        full = r["logits_full"]
        if len(r["ids"]) <= O:
            return full
        out = full.copy()
        out[:O] = r["logits_prefix_short"][:O]
        return out
    return r["logits_incremental"]


def _assert_close(got, expected, what):
    scale = float(np.abs(expected).max())
    err = float(np.abs(got - expected).max())
    assert err <= TOL * scale, f"{what}: max |diff| {err:.3g} > {TOL} x logit scale {scale:.3g}"


@pytest.fixture(scope="module", params=FIXTURES, ids=[d.name for d in FIXTURES])
def case(request):
    d = request.param
    return d, _ref(d), torchless.ModelLoader.load_auto(d)


@pytest.mark.parametrize("path", ["forward", "fast_forward"])
def test_per_token_logits(case, path):
    d, r, model = case
    expected = _expected_per_token(d, r)
    state = torchless.InferenceState(model.config)
    got = []
    for tok in r["ids"]:
        getattr(model, path)(state, int(tok))
        assert state.logits.dtype == np.float32 and state.logits.shape == (model.config.vocab_size,)
        got.append(state.logits.copy())
    _assert_close(np.array(got), expected, f"{d.name} {path}")


def test_prefill_all_logits(case):
    d, r, model = case
    state = torchless.InferenceState(model.config)
    got = model.prefill(state, [int(t) for t in r["ids"]], all_logits=True)
    _assert_close(got, r["logits_full"], f"{d.name} prefill")
    assert state.pos == len(r["ids"])
    np.testing.assert_array_equal(state.logits, got[-1])


def test_prefill_then_decode_matches_per_token(case):
    d, r, model = case
    ids = [int(t) for t in r["ids"]]
    expected = _expected_per_token(d, r)
    state = torchless.InferenceState(model.config)
    half = len(ids) // 2
    model.prefill(state, ids[:half])
    for pos in range(half, len(ids)):
        model.fast_forward(state, ids[pos])
        _assert_close(state.logits, expected[pos], f"{d.name} decode after prefill @{pos}")


def test_greedy_matches_transformers(case):
    d, r, model = case
    new = model.generate([int(t) for t in r["greedy_prompt"]], max_new_tokens=16,
                         temperature=0.0, ignore_eos=True)
    assert new == [int(t) for t in r["greedy"]]


def test_lazy_load_same_logits(case):
    d, r, model = case
    lazy = torchless.ModelLoader.load_auto(d, lazy=True)
    # lazy weights are views of the file's pages; eager ones are RAM copies
    assert not lazy.layers[0].w["attn_output"].data.flags.owndata
    assert model.layers[0].w["attn_output"].data.flags.owndata
    state = torchless.InferenceState(lazy.config)
    got = lazy.prefill(state, [int(t) for t in r["ids"]], all_logits=True)
    _assert_close(got, r["logits_full"], f"{d.name} lazy prefill")


def test_detected_from_config(case):
    d, r, model = case
    cfg = json.loads((d / "config.json").read_text())
    assert model.spec.model_types[0] == cfg["model_type"] or cfg["model_type"] in model.spec.model_types
