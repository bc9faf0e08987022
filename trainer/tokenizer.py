"""Tokenizers: a byte-level one that needs no download, and a local Hugging Face `tokenizer.json`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class ByteTokenizer:
    """UTF-8 bytes are tokens 0–255; then <bos>=256, <eos>=257, <pad>=258."""

    name: str = "bytes"
    vocab_size: int = 259
    bos_id: int = 256
    eos_id: int = 257
    pad_id: int = 258

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        for text in texts:
            raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
            ids = np.empty(raw.size + 1, dtype=np.int32)
            ids[:-1] = raw
            ids[-1] = self.eos_id
            out.append(ids)
        return out

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded; its message is one line."""


class HFTokenizer:
    """A local `tokenizer.json` through the `tokenizers` package; an end-of-text token is appended."""

    EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tokenizer

        self.path = Path(path)
        try:
            self._tok = _Tokenizer.from_file(str(self.path))
        except Exception as err:  # noqa: BLE001 - the tokenizers package raises plain Exceptions
            raise TokenizerError(f"{path} is not a valid tokenizer.json ({str(err).splitlines()[0]})") from None
        self.name = f"hf:{self.path.name}"
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        eos = next((vocab[n] for n in self.EOS_NAMES if n in vocab), None)
        # A vocabulary without an end-of-text token gets one id past its end.
        self.eos_id = eos if eos is not None else self.vocab_size
        if eos is None:
            self.vocab_size += 1

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids + [self.eos_id], dtype=np.int32) for e in encodings]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i != self.eos_id])


def load_tokenizer(spec: str) -> Tokenizer:
    """'bytes' or the path of a Hugging Face tokenizer.json."""
    if spec in ("", "bytes"):
        return ByteTokenizer()
    path = Path(spec)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file not found: {spec}")
    return HFTokenizer(path)
