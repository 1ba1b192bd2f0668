"""Text <-> token ids with the ``tokenizers`` library, honouring each family's BOS rule.

The rule (ARCHITECTURES.md section 4): an explicit ``add_bos_token`` in tokenizer_config.json
(or GGUF ``tokenizer.ggml.add_bos_token``) decides; otherwise the tokenizer.json
post-processor does whatever it was saved to do.
"""
from __future__ import annotations

from tokenizers import Tokenizer as _HFTokenizer

from .errors import TorchlessError


class Tokenizer:
    def __init__(self, hf: _HFTokenizer, bos_id: int | None = None, add_bos: bool | None = None,
                 eos_ids=()):
        self.hf = hf
        self.bos_id = bos_id
        self.add_bos = add_bos
        self.eos_ids = tuple(eos_ids)

    @classmethod
    def from_file(cls, path: str, tokenizer_config: dict | None = None, bos_id=None, eos_ids=()):
        try:
            hf = _HFTokenizer.from_file(path)
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise TorchlessError(f"{path}: cannot load tokenizer ({exc})") from exc
        tc = tokenizer_config or {}
        add_bos = tc.get("add_bos_token")
        bos_tok = tc.get("bos_token")
        if isinstance(bos_tok, dict):
            bos_tok = bos_tok.get("content")
        if bos_id is None and isinstance(bos_tok, str):
            bos_id = hf.token_to_id(bos_tok)
        return cls(hf, bos_id=bos_id, add_bos=add_bos, eos_ids=eos_ids)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.add_bos is None:
            return list(self.hf.encode(text, add_special_tokens=add_special_tokens).ids)
        ids = list(self.hf.encode(text, add_special_tokens=False).ids)
        if add_special_tokens and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int):
        return self.hf.id_to_token(int(i))


class StreamDecoder:
    """Turns a growing list of ids into text pieces, holding back incomplete UTF-8 characters.

    Byte-level and byte-fallback vocabularies split one character across several tokens;
    decoding a partial character gives U+FFFD, so a piece is released only once it no longer
    ends in one.
    """

    def __init__(self, tokenizer: Tokenizer, prefix_ids=()):
        self.tok = tokenizer
        self.ids: list[int] = list(prefix_ids)[-4:]  # context so leading spaces decode right
        self.offset = len(self.tok.decode(self.ids)) if self.ids else 0
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tok.decode(self.ids)[self.offset:]
        if text.endswith("\ufffd"):
            return ""
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else text
        self.emitted = text
        return piece

    def flush(self) -> str:
        text = self.tok.decode(self.ids)[self.offset:]
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return piece
