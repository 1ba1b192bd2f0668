"""RoPE frequency tables against the worked examples of ARCHITECTURES.md 2.9."""
import math

import numpy as np
import pytest

from torchless.errors import ConfigError
from torchless.rope import RopeConfig, qwen_ntk_alpha, resolve_rope


def test_default_table():
    rc = RopeConfig(rotary_dim=8, theta=10000.0)
    inv, af = rc.table()
    np.testing.assert_allclose(inv, 1 / 10000 ** (np.arange(0, 8, 2) / 8), rtol=1e-6)
    assert af == 1.0


def test_yarn_worked_example():
    # R=128, base=1e6, factor=4, O=32768 -> low=23, high=40, attention_factor 1.13863
    rc = resolve_rope({"rope_theta": 1e6, "max_position_embeddings": 131072,
                       "rope_scaling": {"type": "yarn", "factor": 4.0,
                                        "original_max_position_embeddings": 32768}},
                      head_dim=128)
    inv, af = rc.table()
    assert af == pytest.approx(0.1 * math.log(4) + 1, rel=1e-6)
    base = rc.default_inv_freq()
    assert np.array_equal(inv[:24], base[:24])  # i <= low keep their frequency
    np.testing.assert_allclose(inv[40:], base[40:] / 4, rtol=1e-6)  # i >= high are divided
    assert np.all((inv[24:40] < base[24:40]) & (inv[24:40] > base[24:40] / 4))


def test_llama3_worked_example():
    # Llama 3.1: 29 unchanged, 29 divided by 8, 6 smoothed
    rc = resolve_rope({"rope_theta": 5e5, "max_position_embeddings": 131072,
                       "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192}}, head_dim=128)
    inv, _ = rc.table()
    base = rc.default_inv_freq()
    unchanged = np.isclose(inv, base, rtol=1e-6)
    divided = np.isclose(inv, base / 8, rtol=1e-6)
    assert unchanged.sum() == 29 and divided.sum() == 29 and (~unchanged & ~divided).sum() == 6


def test_longrope_attention_factor_and_switch():
    R = 96
    short = list(np.linspace(1, 2, R // 2))
    long = list(np.linspace(1, 8, R // 2))
    hf = {"rope_theta": 10000.0, "max_position_embeddings": 131072,
          "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75,
          "rope_scaling": {"type": "su", "short_factor": short, "long_factor": long}}
    rc = resolve_rope(hf, head_dim=128, legacy_types={"su": "longrope"})
    assert rc.rotary_dim == 96
    inv_s, af = rc.table(4096)
    inv_l, af2 = rc.table(4097)
    assert af == af2 == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    assert af == pytest.approx(1.190238, abs=1e-6)
    np.testing.assert_allclose(inv_s * np.array(short, np.float32), rc.default_inv_freq(), rtol=1e-5)
    np.testing.assert_allclose(inv_l * np.array(long, np.float32), rc.default_inv_freq(), rtol=1e-5)


def test_dynamic_only_grows_past_max():
    rc = resolve_rope({"max_position_embeddings": 16,
                       "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, head_dim=16)
    np.testing.assert_array_equal(rc.table(10)[0], rc.default_inv_freq())
    np.testing.assert_array_equal(rc.table(16)[0], rc.default_inv_freq())
    base = 10000 * (2 * 24 / 16 - 1) ** (16 / 14)
    np.testing.assert_allclose(rc.table(24)[0], rc.default_inv_freq(base), rtol=1e-6)


def test_linear():
    rc = resolve_rope({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, head_dim=8)
    np.testing.assert_allclose(rc.table()[0], rc.default_inv_freq() / 4, rtol=1e-6)


def test_new_style_rope_parameters():
    rc = resolve_rope({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}},
                      head_dim=8)
    assert rc.theta == 500.0 and rc.rope_type == "linear" and rc.factor == 2.0


def test_qwen_ntk_alpha():
    assert [qwen_ntk_alpha(n, 8192) for n in (100, 8192, 8193, 16384, 16385, 32768, 32769)] == \
        [1, 1, 3, 3, 7, 7, 15]


@pytest.mark.parametrize("bad", [{"rope_scaling": {"rope_type": "linear"}},
                                 {"rope_scaling": {"rope_type": "nope", "factor": 2}}])
def test_bad_rope_config(bad):
    with pytest.raises(ConfigError):
        resolve_rope(bad, head_dim=8)
