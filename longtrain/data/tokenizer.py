"""Tokenizers: a built-in byte tokenizer (no files, no downloads) and a local HF tokenizer.json.

Both expose the same small surface the rest of `longtrain.data` relies on:
`encode(text) -> list[int]` (never adds special tokens: packing and the needle task place
bos/eos themselves), `decode(ids) -> str` (special ids dropped), `vocab_size`, `bos_id`,
`eos_id`, `pad_id` (`bos_id` may be None for tokenizers without one, e.g. Qwen).
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional, Protocol


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: Optional[int]
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """ids 0..255 are UTF-8 bytes; 256 = bos, 257 = eos, 258 = pad."""

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if i < 0 or i >= self.vocab_size:
                raise ValueError(f"token id {i} is outside the byte tokenizer's vocabulary [0, {self.vocab_size})")
            if i < 256:  # bos/eos/pad carry no text
                out.append(i)
        # A cut inside a multi-byte character (e.g. a model's wrong guess) must not raise.
        return out.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


# Names used by common model families, most specific first (Llama 3, GPT/Qwen, Llama 2/Mistral, Gemma).
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eos|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class HFTokenizer:
    """A local HF `tokenizer.json` loaded with the `tokenizers` library.

    Special tokens come from a `tokenizer_config.json` next to the file when it names them
    (the HF convention), else from the first common name present in the vocabulary. Without
    a pad token, pad = eos: padded positions are never labelled and sit in their own document,
    so the pad id's value does not matter.
    """

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _HFTok

        self.path = str(path)
        if not os.path.isfile(self.path):
            raise ValueError(f"tokenizer file {self.path!r} does not exist: point data.tokenizer at a local tokenizer.json or use 'byte'")
        self._tok = _HFTok.from_file(self.path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        configured = self._configured_special_tokens()
        self.bos_id = self._find("bos_token", configured, _BOS_NAMES)
        self.eos_id = self._find("eos_token", configured, _EOS_NAMES)
        if self.eos_id is None:
            raise ValueError(
                f"tokenizer {self.path!r} has no end-of-sequence token (looked for {', '.join(_EOS_NAMES)} and "
                f"eos_token in a tokenizer_config.json beside it): add one of these tokens, or write a "
                f'tokenizer_config.json with {{"eos_token": "<your eos>"}} next to the file'
            )
        pad = self._find("pad_token", configured, _PAD_NAMES)
        self.pad_id = self.eos_id if pad is None else pad
        self._special = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}

    def _configured_special_tokens(self) -> dict:
        cfg = os.path.join(os.path.dirname(os.path.abspath(self.path)), "tokenizer_config.json")
        if not os.path.isfile(cfg):
            return {}
        with open(cfg, encoding="utf-8") as f:
            data = json.load(f)
        out = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            tok = data.get(key)
            if isinstance(tok, dict):  # older configs store an AddedToken dict
                tok = tok.get("content")
            if isinstance(tok, str):
                out[key] = tok
        return out

    def _find(self, key: str, configured: dict, names: tuple) -> Optional[int]:
        for name in ((configured[key],) if key in configured else ()) + names:
            i = self._tok.token_to_id(name)
            if i is not None:
                return i
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        return self._tok.decode([i for i in ids if i not in self._special], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"


def load_tokenizer(spec: str) -> Tokenizer:
    """`"byte"` -> ByteTokenizer; otherwise a path to a tokenizer.json (or a folder holding one)."""
    if spec == "byte":
        return ByteTokenizer()
    path = str(spec)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise ValueError(f"data.tokenizer={spec!r}: no such file {path!r}; use 'byte' or the path of a local tokenizer.json")
    return HFTokenizer(path)
