"""The plugin contract: run-time registration, entry points, TORCHLESS_PLUGINS, clashes."""
import json
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import save_file

import torchless
from torchless import plugins as tp
from torchless import reference as ref

TOY_PLUGIN = textwrap.dedent('''
    """A third-party architecture: Llama math under other tensor names, GELU MLP."""
    from torchless import ArchitectureSpec, TensorMap, TensorNamePattern, hookimpl, ModelConfig
    from torchless.rope import RopeConfig

    def config_from_hf(hf):
        H, nH = hf["dim"], hf["n_heads"]
        return ModelConfig(
            architecture="toy", variant="toy", vocab_size=hf["vocab"], hidden_size=H,
            num_layers=hf["n_layers"], num_heads=nH, num_kv_heads=nH, head_dim=H // nH,
            intermediate_size=hf["ffn"], activation="gelu_tanh",
            ropes={"default": RopeConfig(rotary_dim=H // nH, theta=100.0)})

    def tensor_map(cfg):
        return TensorMap(
            globals={"token_embd": "tok", "output_norm": "final_norm", "output": "head"},
            layers={"attn_norm": "n1", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv",
                    "attn_output": "wo", "ffn_norm": "n2", "ffn_gate": "w1", "ffn_up": "w3",
                    "ffn_down": "w2"},
            layer_prefix="blocks.{i}.")

    TOY = ArchitectureSpec(name="toy", family="toy", model_types=("toy",),
                           tensor_pattern=TensorNamePattern(required=(r"^blocks\\.0\\.wq",)),
                           config_from_hf=config_from_hf, tensor_map=tensor_map)

    @hookimpl
    def register_architectures(register):
        register(TOY)
''')

TOY_CFG = {"model_type": "toy", "dim": 16, "n_heads": 2, "n_layers": 2, "ffn": 24, "vocab": 40}


def write_toy_checkpoint(d, with_config=True):
    rng = np.random.default_rng(1)
    r = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    t = {"tok.weight": r(40, 16), "final_norm.weight": 1 + r(16), "head.weight": r(40, 16)}
    for i in range(2):
        p = f"blocks.{i}."
        t.update({p + "n1.weight": 1 + r(16), p + "wq.weight": r(16, 16), p + "wk.weight": r(16, 16),
                  p + "wv.weight": r(16, 16), p + "wo.weight": r(16, 16), p + "n2.weight": 1 + r(16),
                  p + "w1.weight": r(24, 16), p + "w3.weight": r(24, 16), p + "w2.weight": r(16, 24)})
    d.mkdir(parents=True, exist_ok=True)
    save_file(t, str(d / "model.safetensors"))
    if with_config:
        (d / "config.json").write_text(json.dumps(TOY_CFG))
    return t


def toy_reference_logits(t, ids):
    """An independent NumPy forward of the toy architecture (not the engine's loop)."""
    H, nH, D = 16, 2, 8
    inv = (1.0 / (100.0 ** (np.arange(0, D, 2) / D))).astype(np.float32)
    cos, sin = ref.rope_angles(np.arange(len(ids)), inv, 1.0)
    x = t["tok.weight"][ids]
    rms = lambda v, w: w * (v / np.sqrt((v * v).mean(-1, keepdims=True) + 1e-6))  # noqa: E731
    for i in range(2):
        p = f"blocks.{i}."
        h = rms(x, t[p + "n1.weight"])
        q = (h @ t[p + "wq.weight"].T).reshape(-1, nH, D)
        k = (h @ t[p + "wk.weight"].T).reshape(-1, nH, D)
        v = (h @ t[p + "wv.weight"].T).reshape(-1, nH, D)
        q, k = ref.rope(q, cos, sin, D), ref.rope(k, cos, sin, D)
        T = len(ids)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(D)
        s = np.where(np.tril(np.ones((T, T), bool))[None], s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", a, v).reshape(T, H)
        x = x + o @ t[p + "wo.weight"].T
        h = rms(x, t[p + "n2.weight"])
        g = h @ t[p + "w1.weight"].T
        gelu = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
        x = x + (gelu * (h @ t[p + "w3.weight"].T)) @ t[p + "w2.weight"].T
    return rms(x, t["final_norm.weight"]) @ t["head.weight"].T


@pytest.fixture
def toy_module(tmp_path, monkeypatch):
    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / "torchless_toy.py").write_text(TOY_PLUGIN)
    monkeypatch.syspath_prepend(str(pkg))
    sys.modules.pop("torchless_toy", None)
    import torchless_toy

    yield torchless_toy
    sys.modules.pop("torchless_toy", None)
    tp.reset_plugins()


def test_register_at_runtime_and_load(toy_module, tmp_path):
    t = write_toy_checkpoint(tmp_path / "toy")
    with pytest.raises(torchless.UnknownArchitectureError):
        torchless.ModelLoader.load_auto(tmp_path / "toy")
    name = torchless.register_plugin(toy_module, name="toy")
    try:
        assert "toy" in torchless.registry().families
        assert torchless.ModelArchitecture.from_str("Toy") == "toy"
        model = torchless.ModelLoader.load_auto(tmp_path / "toy")
        assert model.architecture == "toy"
        ids = [3, 1, 4, 1, 5, 9, 2, 6]
        expected = toy_reference_logits(t, ids)
        state = torchless.InferenceState(model.config)
        for pos, tok in enumerate(ids):
            model.fast_forward(state, tok)
            np.testing.assert_allclose(state.logits, expected[pos], rtol=1e-4, atol=1e-4)
        # detection by tensor names when the config does not say
        assert torchless.detect_architecture_from_tensors(list(t)) == "toy"
    finally:
        torchless.unregister_plugin(name)
    with pytest.raises(torchless.UnknownArchitectureError):
        torchless.ModelArchitecture.from_str("toy")


def test_plugin_through_entry_point(tmp_path, monkeypatch):
    """A plugin package found through the `torchless` entry-point group, as pip installs it."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "torchless_toy.py").write_text(TOY_PLUGIN)
    dist = site / "torchless_toy-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torchless-toy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[torchless]\ntoy = torchless_toy\n")
    monkeypatch.syspath_prepend(str(site))
    sys.modules.pop("torchless_toy", None)
    tp.reset_plugins()
    try:
        write_toy_checkpoint(tmp_path / "toy")
        model = torchless.ModelLoader.load_auto(tmp_path / "toy")
        assert model.architecture == "toy"
        assert model.spec.plugin == "toy"
        # built-ins came through the same group
        assert torchless.registry().spec("llama").plugin == "llama"
    finally:
        tp.reset_plugins()
        sys.modules.pop("torchless_toy", None)


def test_torchless_plugins_env_restricts(monkeypatch):
    monkeypatch.setenv("TORCHLESS_PLUGINS", "llama, gemma")
    tp.reset_plugins()
    try:
        assert torchless.registry().families == ["gemma", "llama"]
        with pytest.raises(torchless.UnknownArchitectureError, match="registered: gemma"):
            torchless.ModelArchitecture.from_str("qwen2")
    finally:
        monkeypatch.delenv("TORCHLESS_PLUGINS")
        tp.reset_plugins()


def test_two_plugins_claiming_one_name(toy_module):
    class Clash:
        @torchless.hookimpl
        def register_architectures(self, register):
            register(torchless.ArchitectureSpec(name="llama", family="other",
                                                config_from_hf=None, tensor_map=None))

    with pytest.raises(torchless.PluginError, match="'llama' is registered twice"):
        torchless.register_plugin(Clash(), name="clash")
    # the failed registration leaves the registry usable
    assert "llama" in torchless.registry().families


def test_model_type_claimed_twice():
    class Clash:
        @torchless.hookimpl
        def register_architectures(self, register):
            register(torchless.ArchitectureSpec(name="llama-fork", family="fork",
                                                model_types=("llama",),
                                                config_from_hf=None, tensor_map=None))

    with pytest.raises(torchless.PluginError, match="model_type 'llama'"):
        torchless.register_plugin(Clash(), name="clash2")


def test_register_rejects_non_spec():
    class Bad:
        @torchless.hookimpl
        def register_architectures(self, register):
            register({"name": "x"})

    with pytest.raises(torchless.PluginError, match="not an ArchitectureSpec"):
        torchless.register_plugin(Bad(), name="bad")
