"""Chat templates (Jinja2, as transformers renders them) and the ``torchless chat`` loop."""
from __future__ import annotations

import sys

from .errors import TorchlessError


def chat_template(model) -> str | None:
    """The checkpoint's own template, else the one its architecture plugin declares."""
    params = model.params
    tpl = None
    if params is not None and params.format == "gguf":
        tpl = params.gguf.metadata.get("tokenizer.chat_template")
    elif params is not None:
        tpl = params.tokenizer_config.get("chat_template")
        if isinstance(tpl, list):  # named templates: take the default one
            tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
    if not tpl and model.spec is not None:
        tpl = model.spec.chat_template
    return tpl


def render(template: str, messages: list[dict], bos_token: str = "", eos_token: str = "",
           add_generation_prompt: bool = True) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise TorchlessError(f"chat template error: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=messages, bos_token=bos_token, eos_token=eos_token,
            add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as exc:
        raise TorchlessError(f"chat template error: {exc}") from exc


def encode_chat(model, messages: list[dict]) -> list[int]:
    """Render and tokenize a conversation, with exactly one BOS where the model wants one."""
    tpl = chat_template(model)
    if not tpl:
        raise TorchlessError("this model has no chat template; use `torchless generate`")
    tok = model._tok()
    bos_id = tok.bos_id
    bos = tok.id_to_token(bos_id) if bos_id is not None else ""
    eos_ids = model.config.eos_token_ids
    eos = tok.id_to_token(eos_ids[0]) if eos_ids else ""
    text = render(tpl, messages, bos_token=bos or "", eos_token=eos or "")
    ids = model.encode(text, add_special_tokens=False)
    wants_bos = tok.add_bos if tok.add_bos is not None else bool(
        bos_id is not None and model.encode("a")[:1] == [bos_id])
    if wants_bos and bos_id is not None and (not ids or ids[0] != bos_id):
        ids = [bos_id] + ids
    return ids


def end_of_turn_ids(model) -> set:
    ids = set(model.config.eos_token_ids)
    tok = model._tok()
    for name in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>"):
        i = tok.hf.token_to_id(name)
        if i is not None:
            ids.add(i)
    return ids


def chat_loop(model, args) -> int:
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    saved_eos = model.config.eos_token_ids
    model.config.eos_token_ids = tuple(end_of_turn_ids(model))
    try:
        while True:
            try:
                user = input("> ")
            except EOFError:
                print()
                return 0
            if user.strip() in ("/exit", "/quit"):
                return 0
            messages.append({"role": "user", "content": user})
            ids = encode_chat(model, messages)
            # The template re-renders the whole history each turn, so each turn starts from
            # a fresh state: prefill all but the last token, then stream from it.
            state = model.new_state()
            if len(ids) > 1:
                model.prefill(state, ids[:-1])
            new = ids
            reply = []
            for piece in model.stream([new[-1]], max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, top_k=args.top_k,
                                      top_p=args.top_p, min_p=args.min_p,
                                      repetition_penalty=args.repetition_penalty, seed=args.seed,
                                      state=state):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            print()
            messages.append({"role": "assistant", "content": "".join(reply).strip()})
    finally:
        model.config.eos_token_ids = saved_eos
