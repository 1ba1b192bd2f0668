"""Tokenizer BOS handling, streaming across multi-byte characters, stop strings, sampling."""
import numpy as np
import pytest

import torchless
from torchless.generation import sample
from torchless.tokenizer import StreamDecoder


@pytest.fixture
def model(tiny_model_with_tokenizer):
    return torchless.ModelLoader.load_auto(tiny_model_with_tokenizer)


def test_encode_prepends_bos_once(model):
    ids = model.encode("The capital of France is")
    assert ids[0] == 1 and ids.count(1) == 1
    assert model.decode(ids) == "The capital of France is"
    assert model.encode("The", add_special_tokens=False)[0] != 1


def test_stream_decoder_multibyte():
    text = "naïve café 日本語 🙂 ok"
    from conftest import byte_level_tokenizer
    from torchless.tokenizer import Tokenizer

    tok = Tokenizer(byte_level_tokenizer(vocab_size=270))
    ids = tok.encode(text)
    assert len(ids) > len(text.encode()) // 2  # multi-byte characters span several tokens
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_generate_returns_new_ids_and_stream_matches(model):
    ids = model.generate("The capital", max_new_tokens=12, temperature=0.0, ignore_eos=True)
    assert len(ids) == 12 and all(isinstance(i, int) for i in ids)
    text = "".join(model.stream("The capital", max_new_tokens=12, temperature=0.0, ignore_eos=True))
    assert text == model.decode(ids)
    # same continuation from ids as from text
    assert model.generate(model.encode("The capital"), max_new_tokens=12, ignore_eos=True) == ids


def test_greedy_is_argmax_of_fast_forward(model):
    prompt = model.encode("Once upon")
    new = model.generate(prompt, max_new_tokens=5, ignore_eos=True)
    state = torchless.InferenceState(model.config)
    for t in prompt:
        model.forward(state, t)
    for t in new:
        assert int(np.argmax(state.logits)) == t
        model.forward(state, t)


def test_stop_string(model):
    full = "".join(model.stream("The", max_new_tokens=20, ignore_eos=True))
    i = next(i for i in range(2, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    stop = full[i:i + 2]
    got = "".join(model.stream("The", max_new_tokens=20, stop=stop, ignore_eos=True))
    assert got == full[: full.find(stop)]
    ids = model.generate("The", max_new_tokens=20, stop=[stop, "zzzz"], ignore_eos=True)
    assert len(ids) < 20


def test_eos_stops_generation(model):
    state_ids = model.generate("The", max_new_tokens=30, ignore_eos=True)
    first = state_ids[0]
    model.config.eos_token_ids = (first,)
    try:
        assert model.generate("The", max_new_tokens=30) == [first]
    finally:
        model.config.eos_token_ids = (2,)


def test_seeded_sampling_is_reproducible(model):
    a = model.generate("The", max_new_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    b = model.generate("The", max_new_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    assert a == b
    greedy = model.generate("The", max_new_tokens=10, ignore_eos=True)
    assert model.generate("The", max_new_tokens=10, temperature=1.0, top_k=1, seed=3,
                          ignore_eos=True) == greedy


def test_sampler_filters():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    draws = {sample(logits, rng, 1.0, top_p=0.7) for _ in range(200)}
    assert draws == {0, 1}  # smallest set reaching 0.7
    draws = {sample(logits, rng, 1.0, min_p=0.35) for _ in range(200)}
    assert draws == {0, 1}  # 0.3 >= 0.35 * 0.5; 0.15 is not
    draws = {sample(logits, rng, 1.0, top_k=3) for _ in range(300)}
    assert draws == {0, 1, 2}
    # repetition penalty divides positive logits of seen tokens
    lg = np.array([2.0, 1.9, -1.0])
    assert sample(lg, rng, 0.0, history=[0], repetition_penalty=1.2) == 1


def test_generate_errors(model):
    with pytest.raises(torchless.TorchlessError):
        model.generate([], max_new_tokens=3)
    with pytest.raises(torchless.TokenError):
        model.generate([10**6], max_new_tokens=3)
