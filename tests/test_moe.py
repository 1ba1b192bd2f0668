"""Mixture-of-experts models beyond the logits parity of test_parity.py: the router picks the
experts transformers picks, only those experts' weights are read, prefill reads each expert
once per batch, and bad configs or checkpoints are refused clearly."""
import json
import shutil

import numpy as np
import pytest

import torchless
from torchless import reference as ref
from torchless.errors import ConfigError, MissingTensorError
from conftest import FIXTURES

MOE = ["mixtral", "qwen3_moe", "qwen3_moe_mixed", "olmoe", "qwen2_moe"]


def _fixture(name):
    d = FIXTURES / name
    if not (d / "reference.npz").exists():
        pytest.skip(f"{d} missing: run scripts/make_fixtures.py")
    return d, dict(np.load(d / "reference.npz"))


@pytest.mark.parametrize("name", MOE)
def test_router_picks_the_experts_transformers_picks(name, monkeypatch):
    d, r = _fixture(name)
    want = r["router_experts"]  # [L_moe, T, k], each row sorted
    # the fixture routes differently from token to token (else the test proves little)
    for layer in want:
        assert len({tuple(row) for row in layer.tolist()}) >= 4
    model = torchless.ModelLoader.load_auto(d)
    seen = []
    real = ref.route

    def spy(logits, *a, **kw):
        experts, weights = real(logits, *a, **kw)
        seen.append(np.sort(experts, axis=-1))
        return experts, weights

    monkeypatch.setattr(ref, "route", spy)
    model.forward_tokens(model.new_state(), [int(t) for t in r["ids"]])
    assert len(seen) == len(want) == sum(model.config.moe.layers)
    for got, exp in zip(seen, want):
        np.testing.assert_array_equal(got, exp)


@pytest.mark.parametrize("name", ["qwen3_moe", "olmoe", "qwen2_moe"])
def test_decode_reads_only_the_chosen_experts(name):
    """Poison every expert no token of the sequence chose: decode and prefill do not change."""
    d, r = _fixture(name)
    ids = [int(t) for t in r["ids"]]
    model = torchless.ModelLoader.load_auto(d)
    clean = model.prefill(model.new_state(), ids, all_logits=True)
    used = r["router_experts"]
    moe_layers = [i for i, m in enumerate(model.config.moe.layers) if m]
    poisoned = 0
    for li, chosen in zip(moe_layers, used):
        for e in set(range(model.config.moe.num_experts)) - set(chosen[:8].reshape(-1).tolist()):
            for n in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
                model.layers[li].w[n][e].data[...] = np.nan
            poisoned += 1
    assert poisoned > 0
    model._packed = None
    state = model.new_state()
    for t in ids[:8]:  # only the first 8 tokens: the experts they chose are intact
        model.fast_forward(state, t)
        assert np.isfinite(state.logits).all()
    np.testing.assert_allclose(state.logits, clean[7], rtol=0, atol=1e-4 * np.abs(clean).max())
    got = model.prefill(model.new_state(), ids[:8], all_logits=True)
    np.testing.assert_allclose(got, clean[:8], rtol=0, atol=1e-4 * np.abs(clean).max())


def test_prefill_reads_each_expert_once_per_batch(monkeypatch):
    """Prefill groups the tokens by expert: one pass per projection, in which each chunk of
    rows of each chosen expert is one work item (read once) serving all its tokens."""
    from torchless.kernels import moe as kmoe

    d, r = _fixture("mixtral")
    model = torchless.ModelLoader.load_auto(d)
    calls = []
    real = kmoe.grouped_matmul

    def spy(kind, mats, items, starts, order, xrow, X, out):
        calls.append((items.copy(), starts.copy(), out.shape))
        return real(kind, mats, items, starts, order, xrow, X, out)

    monkeypatch.setattr(kmoe, "grouped_matmul", spy)
    ids = [int(t) for t in r["ids"]]
    model.prefill(model.new_state(), ids)
    k, L = model.config.moe.top_k, model.config.num_layers
    assert len(calls) == 3 * L  # gate, up, down per layer
    for items, starts, shape in calls:
        assert shape[0] == len(ids) * k  # one output row per (token, choice)
        pairs = {tuple(p) for p in items.tolist()}
        assert len(pairs) == len(items), "a chunk of an expert was read twice"
        used = set(np.nonzero(np.diff(starts))[0].tolist())
        assert {e for e, _ in pairs} == used
        chunks = -(-shape[1] // kmoe._CHUNK)
        assert len(items) == len(used) * chunks
        assert starts[-1] == len(ids) * k


def test_lazy_experts_are_views_of_the_file():
    d, _ = _fixture("olmoe")
    lazy = torchless.ModelLoader.load_auto(d, lazy=True)
    ex = lazy.layers[0].w["ffn_down_exps"]
    assert ex.shape == (8, 64, 32)
    assert not any(w.data.flags.owndata for w in ex.experts)


def _copy(name, tmp_path, mutate_cfg=None):
    d, _ = _fixture(name)
    dst = tmp_path / name
    shutil.copytree(d, dst)
    if mutate_cfg:
        p = dst / "config.json"
        cfg = json.loads(p.read_text())
        mutate_cfg(cfg)
        p.write_text(json.dumps(cfg))
    return dst


def test_top_k_above_expert_count_is_refused(tmp_path):
    d = _copy("mixtral", tmp_path, lambda c: c.update(num_experts_per_tok=9))
    with pytest.raises(ConfigError, match="top_k"):
        torchless.ModelLoader.load_auto(d)


def test_olmoe_clip_qkv_is_refused(tmp_path):
    d = _copy("olmoe", tmp_path, lambda c: c.update(clip_qkv=8.0))
    with pytest.raises(ConfigError, match="clip_qkv"):
        torchless.ModelLoader.load_auto(d)


def test_missing_expert_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _copy("qwen3_moe", tmp_path)
    t = load_file(str(d / "model.safetensors"))
    del t["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(MissingTensorError, match=r"experts\.5\.up_proj.*expert 5 of 8"):
        torchless.ModelLoader.load_auto(d)


def test_more_experts_in_config_than_in_checkpoint(tmp_path):
    d = _copy("mixtral", tmp_path, lambda c: c.update(num_local_experts=9))
    with pytest.raises(MissingTensorError, match="expert 8 of 9"):
        torchless.ModelLoader.load_auto(d)


def test_mixed_dense_and_moe_layers():
    d, _ = _fixture("qwen3_moe_mixed")
    model = torchless.ModelLoader.load_auto(d)
    assert model.config.moe.layers == [False, True]
    assert "ffn_gate_inp" not in model.layers[0].w and "ffn_gate_up" in model.layers[0].w
    assert "ffn_gate_inp" in model.layers[1].w


def test_quantize_on_load_quantizes_experts_not_router():
    d, r = _fixture("mixtral")
    model = torchless.ModelLoader.load_auto(d, quantize="q8_0")
    layer = model.layers[0]
    assert layer.w["ffn_gate_inp"].kind == "f32"
    assert layer.w["ffn_gate_exps"].kind == "q8_0" and layer.w["ffn_down_exps"].kind == "q8_0"
    ids = [int(t) for t in r["ids"]]
    a = model.prefill(model.new_state(), ids, all_logits=True)
    state = model.new_state()
    b = np.stack([model.fast_forward(state, t).copy() for t in ids])
    assert float(np.abs(a - b).max()) <= 1e-4 * float(np.abs(a).max())


def test_qwen2_moe_shared_expert_in_the_fused_decode():
    """Qwen2-MoE's decode runs the one-call fused layer with its shared expert, and the shared
    expert matters: zeroing its gate's weights (sigmoid 0.5 instead of the trained gate)
    changes the logits."""
    d, r = _fixture("qwen2_moe")
    ids = [int(t) for t in r["ids"]][:6]
    model = torchless.ModelLoader.load_auto(d)
    st = model.new_state()
    model.prefill(st, ids[:-1])
    fused = model.fast_forward(st, ids[-1]).copy()
    assert model._packed, "the fused decode was not taken"
    want = r["logits_full"][len(ids) - 1]
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(fused, want, rtol=0, atol=1e-4 * scale)
    for layer in model.layers:
        layer.w["ffn_gate_inp_shexp"].data[...] = 0
    model._packed = None
    st = model.new_state()
    model.prefill(st, ids[:-1])
    assert np.abs(model.fast_forward(st, ids[-1]) - fused).max() > 1e-3 * scale
