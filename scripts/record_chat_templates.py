#!/usr/bin/env python
"""Record transformers' own renderings of chat templates, for ``tests/test_chat.py``.

Renders a fixed set of conversations plus seeded random ones (system or not, alternating or
not, unicode, newlines, braces, control-token texts inside messages, with and without the
generation prompt) through transformers' ``apply_chat_template(..., tokenize=False)`` and
writes template, inputs and the expected text (or the error the template raises) to
``tests/data/chat_templates.json``. With the real SmolLM2 file it also records the rendered
text and the token ids transformers' GGUF tokenizer gives (``tokenize=True``) to
``tests/data/smollm2_chat.json`` (bench/record_smollm2_llamacpp.py adds llama.cpp's ids of
the same texts: transformers' GGUF converter gives SmolLM's pre-tokenizer no digit split, so
its ids differ from llama.cpp's where a digit follows spaces).

Run with the reference environment (transformers; no torch needed for this)::

    /work/refvenv/bin/python scripts/record_chat_templates.py \\
        --smollm2 ~/.cache/torchless/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --templates /path/to/llama.cpp/models/templates

Templates: SmolLM2-135M-Instruct's (``tokenizer.chat_template`` of the GGUF), and from
llama.cpp's collection of released models' templates: Gemma 2 (= Gemma 3's turn format),
Llama 3.2 (``strftime_now``, ``tojson``, ``raise_exception``, tools), Qwen2.5 (``tojson``,
tools), Mistral-Nemo (``raise_exception`` on non-alternating turns, ``namespace``).
"""
import argparse
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "data"

TEMPLATES = {  # name -> (file in llama.cpp's models/templates, special tokens)
    "gemma2": ("google-gemma-2-2b-it.jinja", {"bos_token": "<bos>", "eos_token": "<eos>"}),
    "llama3.2": ("meta-llama-Llama-3.2-3B-Instruct.jinja",
                 {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct.jinja", {"eos_token": "<|im_end|>",
                                                  "pad_token": "<|endoftext|>"}),
    "mistral-nemo": ("mistralai-Mistral-Nemo-Instruct-2407.jinja",
                     {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
}
# not a released model's: exercises what released templates rely on -- trim_blocks and
# lstrip_blocks (indented tags without "-"), tojson (unicode, indent), namespace, loop
# controls, the {% generation %} tag, raise_exception, extra variables
FEATURES = """{% set ns = namespace(n=0, sys='') %}
{% for m in messages %}
    {% if m['role'] == 'system' %}
        {% set ns.sys = m['content'] %}
        {% continue %}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
    {% if m['content'] == 'STOP' %}{% break %}{% endif %}
    {% if m['role'] not in ['user', 'assistant'] %}
        {{ raise_exception('unknown role ' + m['role']) }}
    {% endif %}
[{{ ns.n }}|{{ m['role'] }}]
    {% if m['role'] == 'assistant' %}
{% generation %}{{ m['content'] | trim }}{% endgeneration %}{{ eos_token }}
    {% else %}
{{ m | tojson }} / {{ {'c': m['content']} | tojson(indent=2) }}
    {% endif %}
{% endfor %}
{% if ns.sys %}sys={{ ns.sys | tojson }}{% endif %}
{% if add_generation_prompt %}[assistant{{ ' thinking' if enable_thinking else '' }}]
{% endif %}"""
SMOLLM2_TOKENS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                  "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}

FIXED = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke."}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": " Arr! "}, {"role": "user", "content": "Where's the gold?"}],
    [{"role": "user", "content": "  spaces  \n\nand\tnewlines\n"}],
    [{"role": "user", "content": "{{ not a template }} {% raw %} <|im_end|> <end_of_turn>"}],
    [{"role": "user", "content": "Ünïcødé — 日本語 — emoji 🙂"}],
    [{"role": "assistant", "content": "I speak first."}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]

ALPHABET = list("abcdefghij XYZ 0123456789 .,!?'\"\n\t{}%#<>|_-") + [
    "é", "日本", "🙂", "<|im_end|>", "\n\n", "STOP", "  ", "\\", "\u2028"]


def random_conversation(rng: random.Random) -> list:
    msgs = []
    if rng.random() < 0.4:
        msgs.append({"role": "system", "content": random_text(rng)})
    if rng.random() < 0.2:
        return msgs + [{"role": "user", "content": "STOP"}, {"role": "user", "content": "x"}]
    n = rng.randint(1, 5)
    alternate = rng.random() < 0.8
    for i in range(n):
        role = ("user" if i % 2 == 0 else "assistant") if alternate else \
            rng.choice(["user", "assistant", "user", "tool"])
        msgs.append({"role": role, "content": random_text(rng)})
    return msgs


def random_text(rng):
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 24)))


def render_hf(template, messages, tokens, add_generation_prompt, extra):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), **tokens)
    try:
        return {"text": tok.apply_chat_template(messages, chat_template=template,
                                                tokenize=False,
                                                add_generation_prompt=add_generation_prompt,
                                                **extra)}
    except Exception as exc:  # the template's own raise_exception, or a Jinja error
        return {"error": str(exc)}


def cases_for(name, template, tokens, n_random, seed):
    rng = random.Random(seed)
    convs = FIXED + [random_conversation(rng) for _ in range(n_random)]
    out = []
    for i, msgs in enumerate(convs):
        for agp in (True, False):
            extra = {}
            if name == "llama3.2":
                extra = {"date_string": "26 Jul 2024"}
            if name == "features":
                extra = {"enable_thinking": i % 3 == 0}
            out.append({"template": name, "messages": msgs, "add_generation_prompt": agp,
                        "kwargs": extra, "tokens": tokens,
                        **render_hf(template, msgs, tokens, agp, extra)})
    if name in ("llama3.2", "qwen2.5"):  # tools (tojson)
        msgs = FIXED[0]
        extra = {"tools": TOOLS, **({"date_string": "26 Jul 2024"} if name == "llama3.2" else {})}
        out.append({"template": name, "messages": msgs, "add_generation_prompt": True,
                    "kwargs": extra, "tokens": tokens,
                    **render_hf(template, msgs, tokens, True, extra)})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2", required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--templates", required=True, help="llama.cpp's models/templates folder")
    ap.add_argument("--random", type=int, default=12, help="random conversations per template")
    args = ap.parse_args()

    from gguf import GGUFReader

    reader = GGUFReader(args.smollm2)
    smol_tpl = reader.get_field("tokenizer.chat_template").contents()
    templates = {"smollm2": smol_tpl, "features": FEATURES}
    tokens = {"smollm2": SMOLLM2_TOKENS, "features": {"eos_token": "</s>"}}
    for name, (fname, toks) in TEMPLATES.items():
        templates[name] = (Path(args.templates) / fname).read_text(encoding="utf-8")
        tokens[name] = toks
    cases = []
    for k, (name, tpl) in enumerate(templates.items()):
        cases += cases_for(name, tpl, tokens[name], args.random, seed=k)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "chat_templates.json").write_text(json.dumps(
        {"generator": "scripts/record_chat_templates.py (transformers apply_chat_template)",
         "templates": templates, "cases": cases}, ensure_ascii=False, indent=1) + "\n",
        encoding="utf-8")
    n_err = sum("error" in c for c in cases)
    print(f"{len(cases)} cases ({n_err} raise) -> {OUT / 'chat_templates.json'}")

    # token ids with transformers' tokenizer for the SmolLM2 GGUF (tokenize=True)
    from transformers import AutoTokenizer

    p = Path(args.smollm2)
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    rng = random.Random(99)
    convs = FIXED + [random_conversation(rng) for _ in range(args.random)]
    rows = []
    for msgs in convs:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        rows.append({"messages": msgs, "text": text, "ids": list(map(int, ids))})
    (OUT / "smollm2_chat.json").write_text(json.dumps(
        {"generator": "scripts/record_chat_templates.py (transformers, GGUF tokenizer)",
         "cases": rows}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{len(rows)} tokenized conversations -> {OUT / 'smollm2_chat.json'}")


if __name__ == "__main__":
    main()
