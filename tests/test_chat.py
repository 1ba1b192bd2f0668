"""Chat templates render as transformers renders them, with exactly one BOS."""
import io

import pytest

import torchless
from torchless.chat import chat_loop, encode_chat, render
from conftest import FIXTURES

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def model():
    m = torchless.ModelLoader.load_auto(FIXTURES / "llama2_mha")
    m.params.tokenizer_config["chat_template"] = TEMPLATE
    return m


def test_render():
    out = render(TEMPLATE, [{"role": "user", "content": "hi"}], bos_token="<s>", eos_token="</s>")
    assert out == "<s><|user|>hi</s><|assistant|>"


def test_encode_chat_single_bos(model):
    ids = encode_chat(model, [{"role": "user", "content": "Hello there"}])
    assert ids[0] == 1 and ids.count(1) == 1


def test_template_errors_are_torchless_errors(model):
    model.params.tokenizer_config["chat_template"] = "{{ raise_exception('no system role') }}"
    with pytest.raises(torchless.TorchlessError, match="no system role"):
        encode_chat(model, [{"role": "system", "content": "x"}])
    model.params.tokenizer_config.pop("chat_template")
    with pytest.raises(torchless.TorchlessError, match="no chat template"):
        encode_chat(model, [{"role": "user", "content": "x"}])


def test_chat_loop(model, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAgain\n"))

    class Args:
        system = None
        max_new_tokens = 5
        temperature = 0.0
        top_k = top_p = min_p = seed = None
        repetition_penalty = 1.0

    assert chat_loop(model, Args()) == 0
    out = capsys.readouterr().out
    assert out.count("> ") >= 2


def test_family_template_when_checkpoint_has_none():
    m = torchless.ModelLoader.load_auto(FIXTURES / "gemma")
    m.params.tokenizer_config.pop("chat_template", None)
    ids = encode_chat(m, [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hello"}])
    text = m.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<bos><start_of_turn>user\nBe brief.\n\nHello<end_of_turn>")
    assert text.endswith("<start_of_turn>model\n") and ids.count(2) == 1
    q = torchless.ModelLoader.load_auto(FIXTURES / "qwen2_tied")
    q.params.tokenizer_config.pop("chat_template", None)
    text = q.tokenizer.decode(encode_chat(q, [{"role": "user", "content": "Hi"}]),
                              skip_special_tokens=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
