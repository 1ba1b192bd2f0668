"""Bad input gets a TorchlessError that names the problem."""
import os

import numpy as np
import pytest

import torchless
from torchless import (ConfigError, CorruptFileError, MissingTensorError, SequenceLengthError,
                       TensorShapeError, TokenError, TorchlessError, UnknownArchitectureError)


def test_loads_and_runs(make_checkpoint):
    model = torchless.ModelLoader.load_auto(make_checkpoint())
    state = torchless.InferenceState(model.config)
    model.fast_forward(state, 3)
    assert state.logits.shape == (64,) and state.logits.dtype == np.float32
    assert np.isfinite(state.logits).all()


def test_unknown_model_type_lists_registered(make_checkpoint):
    cfg = dict(model_type="falcon", architectures=["FalconForCausalLM"], hidden_size=32,
               num_attention_heads=4)
    d = make_checkpoint(config=cfg, tensors={"x.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(UnknownArchitectureError) as e:
        torchless.ModelLoader.load_auto(d)
    msg = str(e.value)
    assert "falcon" in msg and "llama" in msg and "gemma" in msg


def test_from_str_unknown_lists_registered():
    with pytest.raises(UnknownArchitectureError, match="registered: .*llama"):
        torchless.ModelArchitecture.from_str("gpt-j")


def test_missing_tensor_is_named(make_checkpoint):
    d = make_checkpoint(mutate=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(MissingTensorError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        torchless.ModelLoader.load_auto(d)


def test_wrong_shape_names_tensor_and_shapes(make_checkpoint):
    def bad(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)

    d = make_checkpoint(mutate=bad)
    with pytest.raises(TensorShapeError) as e:
        torchless.ModelLoader.load_auto(d)
    msg = str(e.value)
    assert "model.layers.0.self_attn.k_proj.weight" in msg and "[8, 32]" in msg and "[16, 32]" in msg


@pytest.mark.parametrize("cut", [4, 20, -100, -1])
def test_truncated_safetensors(make_checkpoint, cut):
    d = make_checkpoint()
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(CorruptFileError):
        torchless.ModelLoader.load_auto(d)


def test_garbage_header(make_checkpoint):
    d = make_checkpoint()
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json!!!!"
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="JSON"):
        torchless.ModelLoader.load_auto(d)


def test_bad_config_value(make_checkpoint):
    from conftest import TINY_LLAMA

    cfg = dict(TINY_LLAMA, num_key_value_heads=3)
    d = make_checkpoint(config=cfg)
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        torchless.ModelLoader.load_auto(d)


def test_token_out_of_range(make_checkpoint):
    model = torchless.ModelLoader.load_auto(make_checkpoint())
    state = torchless.InferenceState(model.config)
    for bad in (64, -1, 10**9):
        with pytest.raises(TokenError, match=str(bad)):
            model.forward(state, bad)
        with pytest.raises(TokenError):
            model.fast_forward(state, bad)
    with pytest.raises(TokenError):
        model.generate([1, 2, 99], max_new_tokens=2)


def test_max_seq_len(make_checkpoint):
    model = torchless.ModelLoader.load_auto(make_checkpoint())
    state = torchless.InferenceState(model.config, max_seq_len=4)
    model.prefill(state, [1, 2, 3])
    model.fast_forward(state, 4)
    with pytest.raises(SequenceLengthError, match="max_seq_len=4"):
        model.fast_forward(state, 5)
    state2 = torchless.InferenceState(model.config, max_seq_len=4)
    with pytest.raises(SequenceLengthError):
        model.prefill(state2, [1, 2, 3, 4, 5])


def test_cache_grows_without_cap(make_checkpoint):
    model = torchless.ModelLoader.load_auto(make_checkpoint())
    state = torchless.InferenceState(model.config)
    ids = list(np.random.default_rng(0).integers(0, 64, 150))
    model.prefill(state, ids)  # past the initial capacity and past max_position_embeddings
    assert state.pos == 150 and state.cache.capacity >= 150


def test_not_a_model(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"hello")
    with pytest.raises(TorchlessError):
        torchless.ModelLoader.load_auto(p)
    with pytest.raises(TorchlessError):
        torchless.ModelLoader.load_auto(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError):
        torchless.ModelLoader.load_auto(tmp_path / "empty")


def test_single_file_without_config(make_checkpoint, tmp_path):
    d = make_checkpoint()
    os.remove(d / "config.json")
    with pytest.raises(ConfigError, match="config"):
        torchless.ModelLoader.load_auto(d / "model.safetensors")


def test_unsupported_dtype(make_checkpoint):
    def bad(t):
        t["model.norm.weight"] = t["model.norm.weight"].astype(np.float64)

    d = make_checkpoint(mutate=bad)
    with pytest.raises(torchless.UnsupportedError, match="model.norm.weight"):
        torchless.ModelLoader.load_auto(d)
