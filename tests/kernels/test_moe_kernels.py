"""kernels/moe.py against the NumPy reference (reference.route / reference.moe): routing, the
one-token mixture (only the chosen experts) and the grouped prefill, for every stored kind."""
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from torchless import reference as ref
from torchless.config import MoeConfig
from torchless.kernels import moe as kmoe
from torchless.kernels import ops as ko
from torchless.kernels import quant as Q
from torchless.weights import QUANT_KINDS, Experts, Weight, f32_to_bf16
from quant_blocks import random_blocks

# every block kind: QK_BLOCK is each kind's block length (torchless.kernels.quant)
QK = {k: Q.BLOCK_INFO[k][0] for k in QUANT_KINDS}
KINDS = ["f32", "bf16", "f16", *sorted(QK)]


def _weight(kind, rows, cols, rng, name):
    if kind in QK:
        return Weight(name, kind, (rows, cols), random_blocks(kind, rows, cols // QK[kind], rng))
    a = rng.standard_normal((rows, cols)).astype(np.float32) * 0.3
    if kind == "bf16":
        return Weight(name, "bf16", (rows, cols), f32_to_bf16(a))
    return Weight.from_array(name, a.astype(np.float16 if kind == "f16" else np.float32))


def _layer(kind, E, H, inter, rng):
    w = {"ffn_gate_inp": _weight("f32", E, H, rng, "router")}
    for n, (r, c) in {"ffn_gate_exps": (inter, H), "ffn_up_exps": (inter, H),
                      "ffn_down_exps": (H, inter)}.items():
        w[n] = Experts(n, [_weight(kind, r, c, rng, f"{n}[{e}]") for e in range(E)])
    w["ffn_gate_inp"].data[...] *= 3.0  # routing that changes from token to token
    return SimpleNamespace(w=w)


def _separated(logits, k, margin=1e-3):
    """Whether the k-th and (k+1)-th largest logits of every row are clearly apart (float
    summation order must not decide the choice)."""
    if k == logits.shape[1]:
        return True
    s = -np.sort(-logits, axis=1)
    return bool((s[:, k - 1] - s[:, k] > margin).all())


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(E=st.integers(2, 6), k=st.integers(1, 3),
       T=st.integers(1, 9), router=st.sampled_from(["softmax_topk", "topk_softmax"]),
       renorm=st.booleans(), act_quant=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_moe_kernels_match_reference(kind, E, k, T, router, renorm, act_quant, seed):
    k = min(k, E)
    rng = np.random.default_rng(seed)
    H = inter = 256 if QK.get(kind) == 256 else 64
    layer = _layer(kind, E, H, inter, rng)
    cfg = SimpleNamespace(moe=MoeConfig(E, k, inter, router, renorm), activation="silu")
    x = rng.standard_normal((T, H)).astype(np.float32)
    if kind in ("q4_1", "q5_1"):
        # their q8_1 activations store each block's sum d * sum(q) as float16, as ggml does:
        # random blocks' hidden activations (~1e5) would overflow it to inf, which the
        # float reference never does; smaller inputs keep the sums in range
        x *= np.float32(0.1)
    logits = x @ layer.w["ffn_gate_inp"].to_f32().T
    assume(_separated(logits, k))
    aq = act_quant and kind in QK
    with np.errstate(over="ignore"):  # random blocks make large gate values; silu -> x
        want = ref.moe(x, layer.w["ffn_gate_inp"], layer.w["ffn_gate_exps"],
                       layer.w["ffn_up_exps"], layer.w["ffn_down_exps"], k, router, renorm,
                       "silu", aq)
    scale = float(np.abs(want).max()) + 1e-6
    tol = 2e-3 if aq else 2e-5
    if aq and kind in ("q4_1", "q5_1"):
        # the kernels add each block's min term m * s with ggml's float16 s, the reference
        # m * sum(d * q) unrounded: up to ~2**-11 of the min terms, which random blocks make
        # large against the result (a wrong row function is off by O(1), not by this)
        tol = 1e-2
    got = kmoe.prefill_moe(x, layer, cfg, ko.ACT_SILU, aq, logits)
    assert float(np.abs(got - want).max()) <= tol * scale, "prefill"
    args = kmoe.pack_layer(layer, cfg, ko.ACT_SILU, aq)
    for t in range(T):
        out = np.empty(H, np.float32)
        kmoe.decode_moe(x[t], *args, out)
        assert float(np.abs(out - want[t]).max()) <= tol * scale, f"decode row {t}"


@given(E=st.integers(1, 12), k=st.integers(1, 12), seed=st.integers(0, 2**31 - 1),
       router=st.sampled_from(["softmax_topk", "topk_softmax"]), renorm=st.booleans())
@settings(max_examples=60, deadline=None)
def test_route_row_matches_reference(E, k, seed, router, renorm):
    k = min(k, E)
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((3, E)) * 3).astype(np.float32)
    if rng.random() < 0.3:
        logits[:, : E // 2] = logits[:, :1]  # ties: the lower index first
    experts, weights = ref.route(logits, k, router, renorm)
    sel = np.empty((3, k), np.int64)
    wts = np.empty((3, k), np.float32)
    kmoe.route_rows(logits, k, kmoe.ROUTER_CODES[router], renorm, sel, wts)
    np.testing.assert_array_equal(sel, experts)
    np.testing.assert_allclose(wts, weights, rtol=1e-5, atol=1e-7)
    if router == "topk_softmax" or renorm:
        np.testing.assert_allclose(wts.sum(-1), 1.0, rtol=1e-5)


def test_reference_route_mixtral_formula():
    """Mixtral: softmax over all experts, top-k, renormalise (by hand for one row)."""
    logits = np.array([[0.5, 2.0, -1.0, 1.0]], np.float32)
    experts, weights = ref.route(logits, 2, "softmax_topk", True)
    assert experts.tolist() == [[1, 3]]
    e = np.exp([2.0, 1.0])
    np.testing.assert_allclose(weights[0], e / e.sum(), rtol=1e-6)
    _, w_plain = ref.route(logits, 2, "softmax_topk", False)
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()
    np.testing.assert_allclose(w_plain[0], p[[1, 3]], rtol=1e-6)


def test_moe_config_checks():
    from torchless.errors import ConfigError

    with pytest.raises(ConfigError, match="top_k"):
        MoeConfig(4, 5, 16).check(2)
    with pytest.raises(ConfigError, match="router"):
        MoeConfig(4, 2, 16, router="sigmoid").check(2)
    with pytest.raises(ConfigError, match="layers"):
        MoeConfig(4, 2, 16, layers=[True]).check(2)
