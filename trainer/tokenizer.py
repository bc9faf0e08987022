"""Tokenizers: a byte-level one that needs no download, and a local Hugging Face tokenizer.

`--tokenizer` takes `bytes`, a `tokenizer.json`, or a model folder. A model folder's tokenizer
works as that model's does: its own special tokens around a document (a BOS where its
post-processor adds one) and its end-of-text token from `tokenizer_config.json`, which also holds
the chat template instruction data is rendered with. A bare `tokenizer.json` adds no special token
and ends documents with the first end-of-text token its vocabulary knows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int
    chat_template: str | None
    template_tokens: dict[str, str]  # what a chat template may name: bos_token, eos_token

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Whole documents: special tokens as the model adds them, then the end-of-text token."""

    def encode(self, text: str, special: bool) -> list[int]:
        """A piece of text, with the model's special tokens or without."""

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of a text (no special tokens added) and each token's character span."""

    def decode(self, ids: list[int]) -> str: ...


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded; its message is one line."""


@dataclass
class ByteTokenizer:
    """UTF-8 bytes are tokens 0–255; then <bos>=256, <eos>=257, <pad>=258."""

    name: str = "bytes"
    vocab_size: int = 259
    bos_id: int = 256
    eos_id: int = 257
    pad_id: int = 258
    chat_template: str | None = None
    template_tokens: dict[str, str] = field(default_factory=dict)

    def encode(self, text: str, special: bool) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(self.encode(text, True) + [self.eos_id], dtype=np.int32) for text in texts]

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids, offsets = [], []
        for i, char in enumerate(text):
            for byte in char.encode("utf-8"):
                ids.append(byte)
                offsets.append((i, i + 1))
        return ids, offsets

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer: a model folder (as that model tokenizes) or a bare tokenizer.json."""

    EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tokenizer

        self.path = Path(path)
        file = self.path / "tokenizer.json" if self.path.is_dir() else self.path
        try:
            self._tok = _Tokenizer.from_file(str(file))
        except Exception as err:  # noqa: BLE001 - the tokenizers package raises plain Exceptions
            raise TokenizerError(f"{file} is not a valid tokenizer.json ({str(err).splitlines()[0]})") from None
        self.name = f"hf:{self.path.name}"
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        settings = _settings(self.path) if self.path.is_dir() else {}
        self.model_specials = self.path.is_dir()  # a model folder: its special tokens, as the model adds them
        self.chat_template: str | None = settings.get("chat_template")
        self.template_tokens = {k: _token(settings.get(k)) for k in ("bos_token", "eos_token") if settings.get(k)}
        eos_name = self.template_tokens.get("eos_token")
        eos = vocab.get(eos_name) if eos_name else next((vocab[n] for n in self.EOS_NAMES if n in vocab), None)
        # A vocabulary without an end-of-text token gets one id past its end.
        self.eos_id = eos if eos is not None else self.vocab_size
        if eos is None:
            self.vocab_size += 1

    def encode(self, text: str, special: bool) -> list[int]:
        return self._tok.encode(text, add_special_tokens=special and self.model_specials).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        for e in self._tok.encode_batch(texts, add_special_tokens=self.model_specials):
            ids = e.ids if e.ids[-1:] == [self.eos_id] else e.ids + [self.eos_id]
            out.append(np.asarray(ids, dtype=np.int32))
        return out

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        e = self._tok.encode(text, add_special_tokens=False)
        return e.ids, e.offsets

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i != self.eos_id])


def _settings(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise TokenizerError(f"{path} is not valid JSON ({err})") from None


def _token(value) -> str:
    """A special token as tokenizer_config.json writes it: a string or {"content": …}."""
    return value["content"] if isinstance(value, dict) else str(value)


def load_tokenizer(spec: str) -> Tokenizer:
    """'bytes', the path of a Hugging Face tokenizer.json, or a model folder holding one."""
    if spec in ("", "bytes"):
        return ByteTokenizer()
    path = Path(spec)
    if not (path.is_file() or (path / "tokenizer.json").is_file()):
        raise TokenizerError(f"tokenizer file not found: {spec}" if not path.is_dir()
                             else f"{spec} holds no tokenizer.json")
    return HFTokenizer(path)
