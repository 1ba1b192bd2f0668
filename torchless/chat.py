"""Chat templates, rendered as transformers renders them, and the ``torchless chat`` loop.

The template is the checkpoint's own: GGUF ``tokenizer.chat_template``, or for a Hugging Face
folder ``chat_template`` in tokenizer_config.json (or ``chat_template.jinja`` /
``chat_template.json`` beside it). A model without one (a base model) is refused with
:class:`NoChatTemplateError`: it continues text, so ``torchless generate`` is the way to
use it; no family template is guessed.

Rendering follows transformers' ``apply_chat_template``: a sandboxed Jinja2 environment with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension and the
``{% generation %}`` tag, a ``tojson`` filter that does not escape HTML, the globals
``raise_exception`` and ``strftime_now``, and as variables ``messages``, ``tools``,
``documents``, ``add_generation_prompt`` and the special tokens (``bos_token``,
``eos_token``, ``unk_token``, ``pad_token``).
"""
from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

from .errors import TorchlessError

# texts of end-of-turn tokens (the list llama.cpp also recognises them by)
END_OF_TURN_TEXTS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|eom_id|>",
                     "<|endoftext|>", "<|end_of_text|>", "<EOT>", "<end_of_utterance>",
                     "<｜end▁of▁sentence｜>")


class NoChatTemplateError(TorchlessError):
    """The model carries no chat template (it is likely a base model)."""


class ChatTemplateError(TorchlessError):
    """The chat template failed to parse or render (or raised on purpose)."""


# ------------------------------------------------------------------------------ the template
def _hf_template(params) -> str | None:
    tpl = params.tokenizer_config.get("chat_template")
    if isinstance(tpl, list):  # named templates: the default one
        tpl = next((t.get("template") for t in tpl if t.get("name") == "default"), None)
    if tpl:
        return tpl
    folder = Path(params.path)
    folder = folder if folder.is_dir() else folder.parent
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    js = folder / "chat_template.json"
    if js.is_file():
        try:
            return json.loads(js.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError) as exc:
            raise ChatTemplateError(f"{js}: not a JSON object with 'chat_template'") from exc
    return None


def chat_template(model) -> str | None:
    """The checkpoint's own chat template, or None."""
    params = model.params
    if params is None:
        return None
    if params.format == "gguf":
        tpl = params.gguf.metadata.get("tokenizer.chat_template")
    else:
        tpl = _hf_template(params)
    if tpl is not None and not isinstance(tpl, str):
        raise ChatTemplateError(f"the chat template must be a string, got {type(tpl).__name__}")
    return tpl or None


def require_chat_template(model) -> str:
    tpl = chat_template(model)
    if tpl:
        return tpl
    where = getattr(model.params, "path", None) or "this model"
    key = ("tokenizer.chat_template" if getattr(model.params, "format", None) == "gguf"
           else "chat_template in tokenizer_config.json")
    raise NoChatTemplateError(
        f"{where} has no chat template ({key}): it is probably a base model, which continues "
        f"text rather than answering. Use `torchless generate` to continue a prompt, e.g.\n"
        f'    torchless generate {where if where != "this model" else "MODEL"} '
        f'"The capital of France is"\n'
        f"or chat with an instruct model that has a template: `torchless chat` (SmolLM2).")


# ------------------------------------------------------------------------------- rendering
_ENV = None


def _environment():
    global _ENV
    if _ENV is not None:
        return _ENV
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks the assistant's text for
        transformers' assistant mask; rendering just emits the body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body) \
                .set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """``namespace()`` that refuses underscore attributes, as transformers' does."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot set underscore attributes ({name!r})")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["namespace"] = Namespace
    _ENV = env
    return env


_COMPILED: dict = {}


def render(template: str, messages: list[dict], add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "", tools=None, documents=None,
           **kwargs) -> str:
    """The conversation as text, as transformers' ``apply_chat_template(..., tokenize=False)``
    renders it. ``kwargs`` reach the template as variables (other special tokens,
    ``enable_thinking`` and the like). Messages' ``None`` values are dropped first."""
    import jinja2

    env = _environment()
    try:
        compiled = _COMPILED.get(template)
        if compiled is None:
            compiled = _COMPILED[template] = env.from_string(template)
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict)
                                                              for m in messages):
            raise ChatTemplateError("messages must be a list of dicts")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        return compiled.render(messages=messages, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **kwargs)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template error: {exc}") from exc


def _token_text(tok_cfg_value):
    if isinstance(tok_cfg_value, dict):  # AddedToken as saved by transformers
        return tok_cfg_value.get("content")
    return tok_cfg_value if isinstance(tok_cfg_value, str) else None


def special_tokens(model) -> dict:
    """``bos_token`` etc. as the template sees them (transformers' special_tokens_map)."""
    tok = model._tok()
    out = {}
    params = model.params
    if params is not None and params.format != "gguf":
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            v = _token_text(params.tokenizer_config.get(key))
            if v:
                out[key] = v
    ids = {"bos_token": tok.bos_id,
           "eos_token": (model.config.eos_token_ids or (None,))[0]}
    if params is not None and params.format == "gguf":
        md = params.gguf.metadata
        ids["eos_token"] = md.get("tokenizer.ggml.eos_token_id", ids["eos_token"])
        ids["unk_token"] = md.get("tokenizer.ggml.unknown_token_id")
        ids["pad_token"] = md.get("tokenizer.ggml.padding_token_id")
    for key, i in ids.items():
        if key not in out and i is not None:
            text = tok.id_to_token(int(i))
            if text:
                out[key] = text
    return out


def encode_chat(model, messages: list[dict], add_generation_prompt: bool = True,
                **kwargs) -> list[int]:
    """Render and tokenize a conversation (special tokens in the text become their ids).

    Hugging Face checkpoints: as transformers' ``apply_chat_template(tokenize=True)``, only
    what the template wrote. GGUF: as llama.cpp, exactly one BOS when the file asks for BOS
    (the template's own, or the tokenizer's when the template writes none)."""
    tpl = require_chat_template(model)
    tok = model._tok()
    text = render(tpl, messages, add_generation_prompt=add_generation_prompt,
                  **{**special_tokens(model), **kwargs})
    ids = model.encode(text, add_special_tokens=False)
    # transformers adds no special tokens to the rendered text; llama.cpp (GGUF) lets its
    # tokenizer add BOS (dropping the template's own), so one BOS either way
    bos_id = tok.bos_id
    gguf = model.params is not None and model.params.format == "gguf"
    if gguf and tok.add_bos and bos_id is not None and (not ids or ids[0] != bos_id):
        ids = [bos_id] + ids
    return ids


def end_of_turn_ids(model) -> set[int]:
    """Ids that end the assistant's turn: the end-of-sequence ids, the control tokens
    llama.cpp takes for end-of-turn by their text, and the token the template itself puts
    after an assistant message."""
    tok = model._tok()
    ids = set(model.config.eos_token_ids) | set(tok.eos_ids or ())
    for text in END_OF_TURN_TEXTS:
        i = tok.hf.token_to_id(text)
        if i is not None and i in _special_ids(tok):
            ids.add(i)
    marker = "torchless-end-of-turn-probe"
    try:
        text = render(require_chat_template(model),
                      [{"role": "user", "content": "hi"},
                       {"role": "assistant", "content": marker}],
                      add_generation_prompt=False, **special_tokens(model))
    except TorchlessError:
        text = ""
    if marker in text:
        after = model.encode(text.split(marker, 1)[1], add_special_tokens=False)
        if after and after[0] in _special_ids(tok):
            ids.add(after[0])
    return ids


def _special_ids(tok) -> set[int]:
    return {i for i, t in tok.hf.get_added_tokens_decoder().items() if t.special}


# -------------------------------------------------------------------------------- the loop
def _reuse_prefix(state, ids) -> int:
    """Keep the cached positions that ``ids`` starts with; return how many."""
    old = state.tokens
    k = 0
    n = min(len(old), len(ids) - 1)  # at least one id must be fed to get logits
    while k < n and old[k] == ids[k]:
        k += 1
    if k < state.pos and state.rope_fixed_len:  # Qwen-1's fixed RoPE table: start over
        k = 0
    if k == 0:
        state.reset()
    else:
        state.pos = k
        del state.tokens[k:]
    return k


class ChatSession:
    """A conversation with a model: ``send(text)`` yields the answer's text pieces.

    The KV cache is kept between turns: each turn's rendered conversation is compared with
    what the cache holds and only the new tokens are run (as llama-server reuses its cache).
    """

    def __init__(self, model, system: str | None = None, **sampling):
        self.model = model
        self.system = system
        self.sampling = sampling
        self.messages: list[dict] = []
        self.eot = end_of_turn_ids(model)
        self.state = model.new_state()
        self.clear()

    def clear(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.state.reset()

    def send(self, text: str, max_new_tokens: int = 512):
        model = self.model
        self.messages.append({"role": "user", "content": text})
        ids = encode_chat(model, self.messages)
        k = _reuse_prefix(self.state, ids)
        saved = model.config.eos_token_ids
        model.config.eos_token_ids = tuple(sorted(self.eot))
        reply = []
        try:
            for piece in model.stream(ids[k:], max_new_tokens=max_new_tokens,
                                      state=self.state, **self.sampling):
                reply.append(piece)
                yield piece
        finally:
            model.config.eos_token_ids = saved
            self.messages.append({"role": "assistant", "content": "".join(reply).strip()})


def chat_loop(model, args, message: str | None = None, stdin=None, stdout=None) -> int:
    """``torchless chat``: one answer to ``message``, else one turn per line of stdin
    (``/clear`` starts over; ``/bye``, ``/exit``, ``/quit`` or end of input stop)."""
    stdin = stdin if stdin is not None else sys.stdin
    out = stdout if stdout is not None else sys.stdout
    session = ChatSession(model, system=args.system, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed)

    def answer(text):
        for piece in session.send(text, max_new_tokens=args.max_new_tokens):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()

    if message is not None:
        answer(message)
        return 0
    interactive = bool(getattr(stdin, "isatty", lambda: False)())
    while True:
        if interactive and stdin is sys.stdin and out is sys.stdout:
            try:
                line = input(">>> ") + "\n"  # with line editing where readline is there
            except EOFError:
                line = ""
        else:
            if interactive:
                out.write(">>> ")
                out.flush()
            line = stdin.readline()
        if not line:
            if interactive:
                out.write("\n")
            return 0
        text = line.rstrip("\n")
        cmd = text.strip()
        if cmd in ("/bye", "/exit", "/quit"):
            return 0
        if cmd == "/clear":
            session.clear()
            continue
        if not cmd:
            continue
        answer(text)
