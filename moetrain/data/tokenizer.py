"""Tokenizers: raw bytes (no dependency) and byte-level BPE (the optional ``tokenizers`` package).

Both expose ``vocab_size``, ``eos_id``, ``encode(text) -> np.ndarray`` and ``decode(ids)``.
Documents are separated by ``eos_id`` in the token stream. A tokenizer describes itself in
``meta.json`` (:meth:`meta`) and writes any file it needs beside the shards (:meth:`save`),
so :func:`load_tokenizer` can rebuild it from a data directory alone.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

EOS_TEXT = "<|endoftext|>"  # how decode() renders the document separator; BPE's EOS token
BPE_FILE = "tokenizer.json"
_BPE_INSTALL_HINT = "install it with: pip install 'moetrain[bpe]' (or pip install tokenizers)"


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Iterable[int] | np.ndarray) -> str: ...

    def meta(self) -> dict[str, Any]: ...

    def save(self, directory: str | os.PathLike) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus EOS = 256 (vocab 257). Needs no training."""

    kind = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Bytes back to text (invalid UTF-8 becomes U+FFFD); EOS is rendered as EOS_TEXT."""
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > self.eos_id):
            raise ValueError(f"byte tokenizer ids must be in [0, {self.eos_id}], got "
                             f"min={arr.min()} max={arr.max()}")
        pieces = np.split(arr, np.flatnonzero(arr == self.eos_id))
        # np.split keeps the separator at the start of every piece after the first.
        texts = [p[1:] if i else p for i, p in enumerate(pieces)]
        return EOS_TEXT.join(
            t.astype(np.uint8).tobytes().decode("utf-8", errors="replace") for t in texts
        )

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    def save(self, directory: str | os.PathLike) -> None:
        """Nothing to write: the byte tokenizer is fully described by its meta."""


def _import_tokenizers():
    try:
        import tokenizers  # optional dependency, imported lazily
    except ImportError as e:
        raise ImportError(f"the BPE tokenizer needs the 'tokenizers' package: "
                          f"{_BPE_INSTALL_HINT}") from e
    return tokenizers


class BPETokenizer:
    """A ``tokenizers.Tokenizer`` (byte-level BPE) with a special EOS token."""

    kind = "bpe"

    def __init__(self, tok: Any, eos_token: str = EOS_TEXT):
        self._tok = tok
        self.eos_token = eos_token
        eos_id = tok.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"the BPE tokenizer has no EOS token {eos_token!r}: train it with "
                             f"tools/prepare_data.py --tokenizer bpe (it adds {EOS_TEXT!r})")
        self.eos_id = int(eos_id)
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        self._dtype = np.uint16 if self.vocab_size <= 65535 else np.uint32

    @classmethod
    def from_file(cls, path: str | os.PathLike, eos_token: str = EOS_TEXT) -> BPETokenizer:
        tokenizers = _import_tokenizers()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"BPE tokenizer file {path} is missing: re-run "
                                    f"tools/prepare_data.py --tokenizer bpe to recreate it")
        return cls(tokenizers.Tokenizer.from_file(str(path)), eos_token)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=self._dtype)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=self._dtype) for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, np.ndarray) else ids)]
        return self._tok.decode(ids, skip_special_tokens=False)

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "file": BPE_FILE, "eos_token": self.eos_token}

    def save(self, directory: str | os.PathLike) -> None:
        self._tok.save(str(Path(directory) / BPE_FILE))


def train_bpe(texts: Iterable[str], vocab_size: int, *, progress: bool = True) -> BPETokenizer:
    """Train a byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer and decoder, the 256-byte
    initial alphabet so any text encodes) with EOS_TEXT as its one special token."""
    tk = _import_tokenizers()
    if vocab_size < 257:
        raise ValueError(f"--vocab-size={vocab_size} is too small: byte-level BPE needs >= 257 "
                         f"(256 bytes + EOS); use e.g. 8192")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TEXT],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress and sys.stderr.isatty(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok)


def load_tokenizer(meta: dict[str, Any], data_dir: str | os.PathLike) -> ByteTokenizer | BPETokenizer:
    """Rebuild the tokenizer described by a data directory's ``meta.json`` (the whole meta or
    its ``"tokenizer"`` entry) and check that it matches the recorded vocab and EOS."""
    info = meta.get("tokenizer", meta)
    kind = info["kind"]
    if kind == "byte":
        tok: ByteTokenizer | BPETokenizer = ByteTokenizer()
    elif kind == "bpe":
        tok = BPETokenizer.from_file(Path(data_dir) / info["file"], info.get("eos_token", EOS_TEXT))
    else:
        raise ValueError(f"{Path(data_dir) / 'meta.json'}: unknown tokenizer kind {kind!r} "
                         f"(expected 'byte' or 'bpe'); re-run tools/prepare_data.py")
    if (tok.vocab_size, tok.eos_id) != (info["vocab_size"], info["eos_id"]):
        raise ValueError(
            f"{Path(data_dir)}: tokenizer has vocab_size={tok.vocab_size}, eos_id={tok.eos_id} but "
            f"meta.json records vocab_size={info['vocab_size']}, eos_id={info['eos_id']}: the "
            f"directory is inconsistent; delete it and re-run tools/prepare_data.py"
        )
    return tok
