"""Lazy loading maps the file: resident memory grows by pages touched, not by file size."""
import gc
import json

import numpy as np
from safetensors.numpy import save_file

import torchless
from conftest import TINY_LLAMA, llama_tensors


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_lazy_load_of_large_checkpoint_stays_small(tmp_path):
    # ~400 MB of float32: a 400k x 256 embedding and output matrix, two small layers
    cfg = dict(TINY_LLAMA, hidden_size=256, intermediate_size=256, num_attention_heads=4,
               num_key_value_heads=4, vocab_size=200_000)
    d = tmp_path / "big"
    d.mkdir()
    small = dict(cfg, vocab_size=8)
    t = llama_tensors(small)
    t["model.embed_tokens.weight"] = np.ones((200_000, 256), np.float32)
    t["lm_head.weight"] = np.ones((200_000, 256), np.float32)
    save_file(t, str(d / "model.safetensors"))
    del t
    (d / "config.json").write_text(json.dumps(cfg))
    gc.collect()
    size = (d / "model.safetensors").stat().st_size
    assert size > 400e6
    before = rss_bytes()
    model = torchless.ModelLoader.load_auto(d, lazy=True)
    grown = rss_bytes() - before
    assert grown < 50e6, f"lazy load of {size / 1e6:.0f} MB grew RSS by {grown / 1e6:.1f} MB"
    assert not model.embed.data.flags.owndata
    # and it runs (touching only what a forward needs)
    state = torchless.InferenceState(model.config)
    model.fast_forward(state, 5)
    assert np.isfinite(state.logits).all()
