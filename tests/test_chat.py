"""Chat templates render as transformers renders them; chat refuses models without one; the
chat loop (one answer, or one turn per stdin line) keeps its KV cache between turns."""
import io
import json
from pathlib import Path

import pytest

import torchless
from torchless.chat import (ChatSession, ChatTemplateError, NoChatTemplateError, chat_loop,
                            encode_chat, end_of_turn_ids, render)
from torchless.cli import main
from conftest import FIXTURES

DATA = Path(__file__).parent / "data"
RECORDED = json.loads((DATA / "chat_templates.json").read_text(encoding="utf-8"))

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WITH_BOS = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
            "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


class Args:
    system = None
    max_new_tokens = 5
    temperature = 0.0
    top_k = top_p = min_p = seed = None
    repetition_penalty = 1.0


@pytest.fixture
def model():
    m = torchless.ModelLoader.load_auto(FIXTURES / "llama2_mha")
    m.params.tokenizer_config["chat_template"] = WITH_BOS
    return m


@pytest.mark.parametrize("name", sorted(RECORDED["templates"]))
def test_render_matches_transformers(name):
    """Every recorded conversation (fixed and seeded random ones) renders to transformers'
    text, or raises where transformers' rendering raised, with the template's message."""
    tpl = RECORDED["templates"][name]
    cases = [c for c in RECORDED["cases"] if c["template"] == name]
    assert len(cases) >= 40
    for c in cases:
        kw = {**c["tokens"], **c["kwargs"]}
        if "error" in c:
            with pytest.raises(ChatTemplateError) as e:
                render(tpl, c["messages"], add_generation_prompt=c["add_generation_prompt"],
                       **kw)
            assert c["error"] in str(e.value)
        else:
            got = render(tpl, c["messages"], add_generation_prompt=c["add_generation_prompt"],
                         **kw)
            assert got == c["text"], c["messages"]


def test_environment_features():
    assert render("{{ x | tojson }}", [], x={"a": "<é>"}) == '{"a": "<é>"}'  # no HTML escape
    assert render("{{ x | tojson(indent=2) }}", [], x=[1]) == "[\n  1\n]"
    assert render("{% generation %}hi{% endgeneration %}", []) == "hi"
    assert len(render("{{ strftime_now('%Y') }}", [])) == 4
    assert render("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                  "{{ m.content }}{% endfor %}", [{"content": "a"}, {"content": "b"}]) == "a"
    assert render("  {% if true %}\nx{% endif %}", []) == "x"  # trim_blocks, lstrip_blocks
    assert render("{{ messages[0] | length }}", [{"role": "user", "content": None}]) == "1"
    with pytest.raises(ChatTemplateError, match="underscore"):
        render("{% set ns = namespace(_x=1) %}", [])
    with pytest.raises(ChatTemplateError, match="unsafe|access"):  # the sandbox
        render("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", [])
    with pytest.raises(ChatTemplateError, match="no system role"):
        render("{{ raise_exception('no system role') }}", [])
    with pytest.raises(ChatTemplateError, match="chat template error"):
        render("{% for %}", [])


def test_encode_chat_single_bos(model):
    ids = encode_chat(model, [{"role": "user", "content": "Hello there"}])
    assert ids[0] == 1 and ids.count(1) == 1  # the template's BOS, none added twice
    model.params.tokenizer_config["chat_template"] = CHATML
    ids = encode_chat(model, [{"role": "user", "content": "Hello there"}])
    # transformers tokenizes the rendered text without adding special tokens: no BOS here
    assert 1 not in ids
    assert model.tokenizer.decode(ids, skip_special_tokens=False) == \
        "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("fixture", ["gemma", "qwen2_tied"])
def test_no_template_no_guess(fixture, capsys):
    """A checkpoint without a template is refused (no family template is guessed)."""
    m = torchless.ModelLoader.load_auto(FIXTURES / fixture)
    m.params.tokenizer_config.pop("chat_template", None)
    with pytest.raises(NoChatTemplateError, match="no chat template.*base model") as e:
        encode_chat(m, [{"role": "user", "content": "Hi"}])
    assert "torchless generate" in str(e.value)
    assert main(["chat", str(FIXTURES / fixture), "Hi"]) == 2
    err = capsys.readouterr().err
    assert "has no chat template" in err and "torchless generate" in err


def test_hf_template_files(tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(FIXTURES / "llama2_mha", d)
    (d / "chat_template.jinja").write_text(CHATML)
    m = torchless.ModelLoader.load_auto(d)
    m.params.tokenizer_config.pop("chat_template", None)
    assert m.tokenizer.decode(encode_chat(m, [{"role": "user", "content": "x"}]),
                              skip_special_tokens=False).startswith("<|im_start|>user\nx")
    (d / "chat_template.jinja").unlink()
    (d / "chat_template.json").write_text(json.dumps({"chat_template": WITH_BOS}))
    m = torchless.ModelLoader.load_auto(d)
    m.params.tokenizer_config.pop("chat_template", None)
    assert encode_chat(m, [{"role": "user", "content": "x"}])[0] == 1


def test_one_answer(model, capsys):
    """`torchless chat MODEL "message"` prints the greedy answer to the rendered prompt."""
    ids = encode_chat(model, [{"role": "user", "content": "Hello"}])
    eot = end_of_turn_ids(model)
    new = model.generate(ids, max_new_tokens=5)
    text = model.tokenizer.decode([t for t in new if t not in eot])
    assert chat_loop(model, Args(), message="Hello") == 0
    assert capsys.readouterr().out == text + "\n"


def test_turns_from_stdin(model):
    """One turn per line; /clear forgets; /bye ends. Each turn's answer equals a fresh
    greedy generation from the whole re-rendered conversation (the reused KV cache changes
    nothing)."""
    out = io.StringIO()
    assert chat_loop(model, Args(), stdin=io.StringIO("Hello\n\nAgain\n/clear\nHello\n/bye\nX\n"),
                     stdout=out) == 0
    answers = out.getvalue().split("\n")[:-1]
    assert len(answers) == 3 and ">>>" not in out.getvalue()  # not a terminal: no prompt
    assert answers[2] == answers[0]  # after /clear the conversation starts again

    session = ChatSession(model)
    eot = session.eot
    a1 = "".join(session.send("Hello", max_new_tokens=5))
    cached_before = list(session.state.tokens)
    a2 = "".join(session.send("Again", max_new_tokens=5))
    assert [a1, a2] == answers[:2]
    msgs = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": a1.strip()},
            {"role": "user", "content": "Again"}]
    ids = encode_chat(model, msgs)
    fresh = model.generate(ids, max_new_tokens=5)
    assert a2 == model.tokenizer.decode([t for t in fresh if t not in eot])
    # the second turn reused the first turn's cache
    assert session.state.tokens[:len(ids)] == ids and ids[:5] == cached_before[:5]


def test_system_message_and_sampling(model, capsys):
    class A(Args):
        system = "Be brief."
        temperature, seed = 0.8, 3

    assert chat_loop(model, A(), message="Hello") == 0
    first = capsys.readouterr().out
    assert chat_loop(model, A(), message="Hello") == 0
    assert capsys.readouterr().out == first  # seeded: reproducible


def test_chat_cli_model_or_message(capsys, monkeypatch):
    """One argument is the model when it is a path or a pullable name, else the message."""
    import torchless.cli as cli

    seen = {}

    def fake_loop(model, args, message=None):
        seen["message"] = message
        return 0

    monkeypatch.setattr("torchless.chat.chat_loop", fake_loop)
    monkeypatch.setattr("torchless.chat.require_chat_template", lambda m: "x")
    loaded = []
    monkeypatch.setattr(cli, "_load", lambda path, *a, **k: loaded.append(
        (path, k.get("default"))) or object())
    d = str(FIXTURES / "llama2_mha")
    assert main(["chat", d]) == 0 and seen["message"] is None and loaded[-1] == (d, "smollm2")
    assert main(["chat", "What is 2+2?"]) == 0
    assert seen["message"] == "What is 2+2?" and loaded[-1] == (None, "smollm2")
    assert main(["chat", d, "Hi"]) == 0 and seen["message"] == "Hi"
    assert main(["chat", "a", "b", "c"]) == 2
