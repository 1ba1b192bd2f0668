"""Build a :class:`~torchless.tokenizer.Tokenizer` from the vocabulary stored in GGUF metadata.

A GGUF file carries no ``tokenizer.json``; it stores the vocabulary under ``tokenizer.ggml.*``
keys and llama.cpp rebuilds the tokenizer at load time. This module rebuilds an equivalent
``tokenizers.Tokenizer`` so that our ids match llama.cpp's
(``llama_tokenize(..., add_special=True, parse_special=True)``).

Two vocabulary kinds are supported (``tokenizer.ggml.model``):

``"llama"`` -- SentencePiece BPE (Llama 1/2, Mistral v0.1, Gemma, ...)
    ``tokens``, ``scores`` and ``token_type`` (1 normal, 2 unknown, 3 control,
    4 user-defined, 5 unused, 6 byte). llama.cpp's SPM tokenizer starts from single
    characters and repeatedly merges the adjacent pair whose concatenation is the
    highest-scoring token (ties: leftmost pair); characters left over that are not tokens
    become ``<0xNN>`` byte tokens. That is exactly BPE whose merge list is every split
    ``(a, b)`` of every token ``a + b``, ranked by the score of ``a + b`` -- built here from
    the vocabulary, with ``byte_fallback``. Spaces become ``"▁"`` (normalizer); when
    ``tokenizer.ggml.add_space_prefix`` is true (the default for this model kind; Gemma
    stores false) a ``"▁"`` is also prepended to every run of plain text, i.e. at the start
    and after each special token, as llama.cpp does. The decoder undoes all that.
``"gpt2"`` -- byte-level BPE (GPT-2, Llama 3, Qwen2, ...)
    ``tokens`` and ``merges`` (``"a b"`` strings), with the pre-tokenizer regex chosen by
    ``tokenizer.ggml.pre`` as llama.cpp does (see ``PRE_TOKENIZERS``): GPT-2's for
    ``"gpt-2"``, Llama 3's for ``"llama-bpe"``/``"llama3"`` (which also look a whole
    pre-token up in the vocabulary before merging), Qwen2's for ``"qwen2"``, llama.cpp's own
    four-regex split for ``"default"`` (or no key); anything else falls back to GPT-2's with
    a warning. ``tokenizers``' ByteLevel decoder turns the pieces back into text.

In both, control and unknown tokens (types 3, 2) are added as *special* tokens and
user-defined ones (type 4) as plain added tokens: both are matched as whole pieces in the raw
text before the model runs, and never built by merges. ``decode(skip_special_tokens=True)``
drops the special ones.

BOS is ``tokenizer.ggml.bos_token_id``; whether to prepend it is
``tokenizer.ggml.add_bos_token`` (default: true for ``"llama"``, and for ``"gpt2"`` with a
Llama-3 pre-tokenizer as in llama.cpp, false otherwise). The end-of-generation ids are
``tokenizer.ggml.eos_token_id``, ``tokenizer.ggml.eot_token_id`` (or, when the file names
no EOT, a control token llama.cpp recognises as one by its text, e.g. ``<end_of_turn>``)
and ``cfg.eos_token_ids``.

Known differences from llama.cpp, all in corner cases:

* llama.cpp finds special tokens longest-first over the whole text, ``tokenizers`` scans
  left to right taking the longest match; they differ only for overlapping special tokens.
* For two *different* tokens of exactly equal score llama.cpp merges the leftmost pair
  first; here the token with the smaller id wins.
* llama.cpp can merge a character that is not in the vocabulary when the merged pair is a
  token; here such a character is already byte-fallback and does not merge.
* User-defined tokens of a byte-level vocabulary are stored as plain text; one with
  non-ASCII characters decodes wrongly through the ByteLevel decoder.
"""
from __future__ import annotations

import gc
import re
import warnings

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from .errors import ConfigError, UnsupportedError
from .tokenizer import Tokenizer

# tokenizer.ggml.token_type values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE_MARK = "\u2581"  # "▁", SentencePiece's visible space

# pre-tokenizer regexes for byte-level BPE (as in the models' tokenizer.json)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                  r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                 r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# llama.cpp's "default" BPE pre-tokenizer: these four regexes, each splitting the pieces the
# previous one left
DEFAULT_PATTERNS = (r"[\p{P}\$\+<=>\^~\|]+",
                    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
                    r"\p{N}+",
                    r"[0-9][0-9][0-9]")

# tokenizer.ggml.pre -> (regexes, each splitting the pieces the previous one left; None:
# GPT-2's, via ByteLevel; ignore_merges; default add_bos), as llama.cpp reads them
_GPT2_SPEC = (None, False, False)
_LLAMA3_SPEC = ((LLAMA3_PATTERN,), True, True)
_QWEN2_SPEC = ((QWEN2_PATTERN,), False, False)
PRE_TOKENIZERS = {
    "default": (DEFAULT_PATTERNS, False, False),
    **dict.fromkeys(("gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "trillion", "exaone4",
                     "granite-docling", "roberta-bpe", "gigachat", "a.x-4.0", "mellum"),
                    _GPT2_SPEC),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2"), _LLAMA3_SPEC),
    **dict.fromkeys(("dbrx", "smaug-bpe"), ((LLAMA3_PATTERN,), False, False)),
    # digits one by one, then GPT-2's regex (SmolLM's tokenizer.json: Digits + ByteLevel)
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b"), ((r"\p{N}", GPT2_PATTERN), False, False)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan", "kormo",
                     "f2llmv2", "solar-open"), _QWEN2_SPEC),
}


# texts llama.cpp takes for an end-of-turn token when the file names none
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<end_of_utterance>")

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>\Z")
_MISSING = object()


# ---------------------------------------------------------------- metadata access
def _get(md: dict, key: str, default=_MISSING):
    if key in md:
        return md[key]
    if default is _MISSING:
        raise ConfigError(f"GGUF metadata has no {key!r}, needed to build the tokenizer")
    return default


def _get_str(md, key, default=_MISSING):
    v = _get(md, key, default)
    if v is not default and not isinstance(v, str):
        raise ConfigError(f"GGUF metadata {key!r} must be a string, got {type(v).__name__}")
    return v


def _get_bool(md, key, default=_MISSING):
    v = _get(md, key, default)
    if v is default:
        return v
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    raise ConfigError(f"GGUF metadata {key!r} must be a bool, got {type(v).__name__}")


def _get_id(md, key, n_vocab, default=_MISSING):
    v = _get(md, key, default)
    if v is default:
        return v
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise ConfigError(f"GGUF metadata {key!r} must be an integer token id, "
                          f"got {type(v).__name__}")
    v = int(v)
    if not 0 <= v < n_vocab:
        raise ConfigError(f"GGUF metadata {key!r} = {v} is outside the vocabulary "
                          f"(0..{n_vocab - 1})")
    return v


def _get_str_list(md, key, default=_MISSING):
    v = _get(md, key, default)
    if v is default:
        return v
    if isinstance(v, np.ndarray) or not isinstance(v, (list, tuple)):
        raise ConfigError(f"GGUF metadata {key!r} must be an array of strings, "
                          f"got {type(v).__name__}")
    v = list(v)
    bad = next((s for s in v if not isinstance(s, str)), None) if v else None
    if bad is not None:
        raise ConfigError(f"GGUF metadata {key!r} must be an array of strings, "
                          f"holds a {type(bad).__name__}")
    return v


def _get_num_array(md, key, n, dtype, default=_MISSING):
    v = _get(md, key, default)
    if v is default:
        return v
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple, np.ndarray)):
        raise ConfigError(f"GGUF metadata {key!r} must be a numeric array, got {type(v).__name__}")
    try:
        arr = np.asarray(v)
        if arr.dtype == object or arr.dtype.kind not in "biuf" or arr.ndim != 1:
            raise TypeError
        arr = arr.astype(dtype)
    except (TypeError, ValueError):
        raise ConfigError(f"GGUF metadata {key!r} must be a numeric array") from None
    if len(arr) != n:
        raise ConfigError(f"GGUF metadata {key!r} has {len(arr)} entries but there are {n} tokens")
    return arr


# ---------------------------------------------------------------- vocabulary helpers
def _clean_tokens(tokens: list) -> tuple[list, dict]:
    """Every token as a distinct, encodable string (so ``tokenizers`` keeps every id), and
    the text -> id map.

    Tokens holding bytes that are not UTF-8 (our GGUF reader keeps them as lone surrogates)
    cannot be passed to ``tokenizers``; a repeated token text would leave the earlier ids
    without a text. Both get an unmatchable placeholder, as does an empty token (llama.cpp's
    text lookup also finds only the last of repeated texts).
    """
    out = tokens
    try:
        "".join(tokens).encode("utf-8")
    except UnicodeEncodeError:
        out = list(tokens)
        for i, t in enumerate(out):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                out[i] = f"<torchless:invalid-utf8:{i}>"
    vocab = dict(zip(out, range(len(out))))
    if len(vocab) != len(out) or "" in vocab:
        out = list(out)
        seen: dict = {}
        for i, t in enumerate(out):
            if t in seen:
                out[seen[t]] = f"<torchless:duplicate:{seen[t]}>"
            seen[t] = i
        out = [t if t else f"<torchless:empty:{i}>" for i, t in enumerate(out)]
        vocab = dict(zip(out, range(len(out))))
    return out, vocab


def _sentencepiece_merges(tokens: list, types: np.ndarray, scores: np.ndarray) -> list:
    """Every split ``(a, b)`` of a mergeable token ``a + b`` into two mergeable tokens, ranked
    best first: higher score of ``a + b``, then smaller id of ``a + b``, then shorter ``a``.

    Mergeable: normal and unused tokens (llama.cpp merges into any vocabulary entry, but
    control, user-defined and unknown ones are split out of the text before merging, and
    byte tokens are only ever a fallback).
    """
    ids = np.flatnonzero((types == NORMAL) | (types == UNUSED))
    pieces = [tokens[i] for i in ids.tolist()]
    found = _splits_by_hash(pieces) if pieces else None
    if found is None:
        found = _splits_by_lookup(pieces)
    owner, left, right = found
    # merge priority of every token: higher score first, then smaller id (stable sort)
    prio = np.empty(len(tokens), dtype=np.int64)
    prio[np.argsort(-scores, kind="stable")] = np.arange(len(tokens))
    # the splits come grouped by token, shorter left piece first; a stable sort keeps that
    order = np.argsort(prio[ids[owner]], kind="stable")
    get = pieces.__getitem__
    return list(zip(map(get, left[order].tolist()), map(get, right[order].tolist())))


def _splits_by_lookup(pieces: list):
    """(owner, left, right) index arrays into ``pieces``: ``pieces[owner] == pieces[left] +
    pieces[right]``, grouped by owner in order, then by the length of the left piece."""
    index = {t: j for j, t in enumerate(pieces)}
    owner, left, right = [], [], []
    for t, j in index.items():
        for k in range(1, len(t)):
            a = index.get(t[:k])
            if a is not None:
                b = index.get(t[k:])
                if b is not None:
                    owner.append(j)
                    left.append(a)
                    right.append(b)
    return (np.asarray(owner, dtype=np.int64), np.asarray(left, dtype=np.int64),
            np.asarray(right, dtype=np.int64))


_HASH_BASES = (0x100000001B3, 0xC2B2AE3D27D4EB4F)  # odd, so invertible modulo 2**64
_LEN_MIX = np.uint64(0x9E3779B97F4A7C15)


def _substring_hasher(cps: np.ndarray, base: int):
    """h(s, e): a polynomial hash (mod 2**64) of ``cps[s:e]`` that does not depend on where
    the substring sits, for whole arrays of (s, e), from one prefix sum over ``cps``."""
    n = len(cps)
    pw = np.full(n + 1, base, dtype=np.uint64)
    pw[0] = 1
    pw = np.cumprod(pw, dtype=np.uint64)  # base**q
    ipw = np.full(n + 1, pow(base, -1, 1 << 64), dtype=np.uint64)
    ipw[0] = 1
    ipw = np.cumprod(ipw, dtype=np.uint64)  # base**-q
    acc = np.zeros(n + 1, dtype=np.uint64)
    np.cumsum(cps * ipw[:n], dtype=np.uint64, out=acc[1:])

    def h(s, e):  # sum over q in [s, e) of cps[q] * base**(e-1-q), plus the length
        return pw[e - 1] * (acc[e] - acc[s]) + (e - s).astype(np.uint64) * _LEN_MIX
    return h


def _splits_by_hash(pieces: list):
    """What :func:`_splits_by_lookup` returns, about twice as fast for big vocabularies:
    every substring is identified by two independent 64-bit hashes, computed vectorised.
    Returns None (caller falls back to the exact lookup) if two pieces share a hash."""
    lens = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    cps = np.frombuffer("".join(pieces).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    ends = np.cumsum(lens)
    starts = ends - lens
    nsplit = lens - 1
    owner = np.repeat(np.arange(len(pieces)), nsplit)
    # split points start+1 .. end-1 of every piece, all pieces concatenated
    split = np.arange(len(owner)) + np.repeat(starts + 1 - (np.cumsum(nsplit) - nsplit), nsplit)
    qs = np.concatenate((starts[owner], split))  # left pieces, then right pieces
    qe = np.concatenate((split, ends[owner]))
    with np.errstate(over="ignore"):
        h1, h2 = (_substring_hasher(cps, b) for b in _HASH_BASES)
        t1, t2 = h1(starts, ends), h2(starts, ends)
        q1, q2 = h1(qs, qe), h2(qs, qe)
    order = np.argsort(t1)
    sorted_t1 = t1[order]
    if len(sorted_t1) > 1 and (sorted_t1[1:] == sorted_t1[:-1]).any():
        return None
    qorder = np.argsort(q1)  # searching sorted queries is much faster
    pos = np.empty(len(q1), dtype=np.int64)
    pos[qorder] = np.searchsorted(sorted_t1, q1[qorder])
    np.minimum(pos, len(sorted_t1) - 1, out=pos)
    match = order[pos]
    hit = (sorted_t1[pos] == q1) & (t2[match] == q2)
    m = len(owner)
    keep = hit[:m] & hit[m:]
    return owner[keep], match[:m][keep], match[m:][keep]


def _add_vocab_tokens(hf: _HFTokenizer, tokens: list, types: np.ndarray) -> None:
    """Control/unknown tokens as special added tokens, user-defined ones as plain added tokens."""
    special, plain = [], []
    wanted = (types == CONTROL) | (types == UNKNOWN) | (types == USER_DEFINED)
    for i in np.flatnonzero(wanted).tolist():
        t = tokens[i]
        if t.startswith("<torchless:"):
            continue
        is_special = int(types[i]) != USER_DEFINED
        (special if is_special else plain).append(
            AddedToken(t, special=is_special, normalized=False, lstrip=False, rstrip=False,
                       single_word=False))
    if special:
        hf.add_special_tokens(special)
    if plain:
        hf.add_tokens(plain)


def _infer_types(tokens: list) -> np.ndarray:
    return np.array([BYTE if _BYTE_TOKEN.match(t) else NORMAL for t in tokens], dtype=np.int32)


# ---------------------------------------------------------------- the two model kinds
def _build_llama(md: dict, tokens: list, vocab: dict) -> tuple[_HFTokenizer, bool]:
    n = len(tokens)
    scores = _get_num_array(md, "tokenizer.ggml.scores", n, np.float64)
    types = _get_num_array(md, "tokenizer.ggml.token_type", n, np.int32, None)
    if types is None:
        types = _infer_types(tokens)
    add_prefix = _get_bool(md, "tokenizer.ggml.add_space_prefix", True)

    merges = _sentencepiece_merges(tokens, types, scores)

    unk_id = _get_id(md, "tokenizer.ggml.unknown_token_id", n, None)
    if unk_id is None:
        unk = np.flatnonzero(types == UNKNOWN)
        unk_id = int(unk[0]) if len(unk) else None
    unk_token = tokens[unk_id] if unk_id is not None else None

    hf = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk_token,
                                 fuse_unk=True, byte_fallback=True))
    replace = normalizers.Replace(" ", SPACE_MARK)
    hf.normalizer = (normalizers.Sequence([normalizers.Prepend(SPACE_MARK), replace])
                     if add_prefix else replace)
    steps = [decoders.Replace(SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    hf.decoder = decoders.Sequence(steps)
    _add_vocab_tokens(hf, tokens, types)
    return hf, True


def _build_gpt2(md: dict, tokens: list, vocab: dict) -> tuple[_HFTokenizer, bool]:
    n = len(tokens)
    types = _get_num_array(md, "tokenizer.ggml.token_type", n, np.int32, None)
    if types is None:
        types = np.full(n, NORMAL, dtype=np.int32)
    raw_merges = _get_str_list(md, "tokenizer.ggml.merges")
    pre = _get_str(md, "tokenizer.ggml.pre", "default")

    merges, dropped = [], 0
    for m in raw_merges:
        pos = m.find(" ", 1)  # llama.cpp: the first space after the first character
        if pos < 0:
            dropped += 1
            continue
        a, b = m[:pos], m[pos + 1:]
        if a in vocab and b in vocab and (a + b) in vocab:
            merges.append((a, b))
        else:
            dropped += 1
    if dropped:
        warnings.warn(f"GGUF tokenizer: ignored {dropped} of {len(raw_merges)} merges "
                      "that are malformed or name tokens not in the vocabulary", stacklevel=3)

    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        warnings.warn(f"GGUF tokenizer: pre-tokenizer {pre!r} is not known to torchless; "
                      "using the GPT-2 regex, so some texts may tokenize differently "
                      "from llama.cpp", stacklevel=3)
        spec = ((GPT2_PATTERN,), False, False)
    patterns, ignore_merges, default_add_bos = spec
    hf = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    if patterns is None:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in patterns]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    _add_vocab_tokens(hf, tokens, types)
    return hf, default_add_bos


_BUILDERS = {"llama": _build_llama, "gpt2": _build_gpt2}


def tokenizer_from_gguf(g, cfg=None) -> Tokenizer:
    """A :class:`Tokenizer` for the vocabulary in ``g.metadata`` (see the module doc).

    ``cfg`` (a ModelConfig, optional) contributes ``eos_token_ids`` and, when the file has
    no ``tokenizer.ggml.bos_token_id`` / ``add_bos_token``, ``bos_token_id`` / ``add_bos``.
    Raises UnsupportedError for a vocabulary kind other than ``llama``/``gpt2`` and
    ConfigError for missing or mistyped keys.
    """
    md = getattr(g, "metadata", None)
    if not isinstance(md, dict):
        raise ConfigError("GGUF object has no metadata dict to build a tokenizer from")
    kind = _get_str(md, "tokenizer.ggml.model")
    if kind not in _BUILDERS:
        raise UnsupportedError(
            f"GGUF tokenizer model {kind!r} is not supported (torchless reads 'llama' "
            "SentencePiece and 'gpt2' byte-level BPE vocabularies)")
    tokens = _get_str_list(md, "tokenizer.ggml.tokens")
    if not tokens:
        raise ConfigError("GGUF metadata 'tokenizer.ggml.tokens' is empty")
    n = len(tokens)
    # the small keys first, so a bad file fails before the expensive part
    bos_id = _get_id(md, "tokenizer.ggml.bos_token_id", n, None)
    add_bos = _get_bool(md, "tokenizer.ggml.add_bos_token", None)
    eos_id = _get_id(md, "tokenizer.ggml.eos_token_id", n, None)
    eot_id = _get_id(md, "tokenizer.ggml.eot_token_id", n, None)

    gc_was_enabled = gc.isenabled()
    gc.disable()  # hundreds of thousands of small objects: the cyclic GC only slows this down
    try:
        clean, vocab = _clean_tokens(tokens)
        hf, default_add_bos = _BUILDERS[kind](md, clean, vocab)
    finally:
        if gc_was_enabled:
            gc.enable()

    if bos_id is None and cfg is not None and getattr(cfg, "bos_token_id", None) is not None:
        bos_id = int(cfg.bos_token_id)
    if add_bos is None:
        cfg_add = getattr(cfg, "add_bos", None) if cfg is not None else None
        add_bos = bool(cfg_add) if cfg_add is not None else default_add_bos

    eos: list[int] = [] if eos_id is None else [eos_id]
    if eot_id is None:  # llama.cpp recognises an end-of-turn control token by its text
        types = md.get("tokenizer.ggml.token_type")
        for text in _EOT_TEXTS:
            i = vocab.get(text)
            if i is not None and (types is None or int(types[i]) == CONTROL):
                eot_id = i
                break
    if eot_id is not None:
        eos.append(eot_id)
    if cfg is not None:
        eos.extend(int(i) for i in (getattr(cfg, "eos_token_ids", ()) or ()))
    return Tokenizer(hf, bos_id=bos_id, add_bos=add_bos, eos_ids=tuple(dict.fromkeys(eos)))
