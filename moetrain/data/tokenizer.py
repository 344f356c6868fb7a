"""Tokenizers: raw bytes (no dependency), byte-level BPE (the optional ``tokenizers``
package) and a model's own Hugging Face tokenizer.

All expose ``vocab_size``, ``eos_id``, ``bos_id``/``add_bos``, ``encode(text) -> np.ndarray``
(the text's ids, no special tokens) and ``decode(ids)``. In the token stream every document
is ``[BOS if add_bos] + encode(text) + [EOS]`` (:mod:`moetrain.data.encode`). A tokenizer describes itself
in ``meta.json`` (:meth:`meta`) and writes any file it needs beside the shards
(:meth:`save`), so :func:`load_tokenizer` can rebuild it from a data directory alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
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
    kind: str
    vocab_size: int
    eos_id: int
    bos_id: int | None
    add_bos: bool  # every document starts with bos_id

    def encode(self, text: str) -> np.ndarray: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Iterable[int] | np.ndarray) -> str: ...

    def meta(self) -> dict[str, Any]: ...

    def save(self, directory: str | os.PathLike) -> None: ...

    def fingerprint(self) -> str: ...  # equal iff two tokenizers give text the same ids


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus EOS = 256 (vocab 257). Needs no training."""

    kind = "byte"
    vocab_size = 257
    eos_id = 256
    bos_id = None
    add_bos = False

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

    def fingerprint(self) -> str:
        """Equal for tokenizers that map text to the same ids (data from both can be mixed)."""
        return self.kind


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
    bos_id = None
    add_bos = False

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

    def fingerprint(self) -> str:
        return f"{self.kind}:{hashlib.sha256(self._tok.to_str().encode()).hexdigest()}"


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


# ----------------------------------------------------------------------------- Hugging Face
HF_DIR = "tokenizer"  # a data directory's copy of a Hugging Face tokenizer's files
# The files of a Hugging Face tokenizer directory (copied as they are when present).
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json",
            "chat_template.jinja")
HF_CONFIG = "tokenizer_config.json"
# EOS spellings tried, in order, for a bare tokenizer.json that names no eos_token.
_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")


def _special(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the tokenizer directory is "
                         f"damaged") from None


class HFTokenizer:
    """A model's own Hugging Face tokenizer (``tools/prepare_data.py --tokenizer PATH``).

    ``PATH`` is a ``tokenizer.json`` or a model/tokenizer directory. With a
    ``tokenizer.json`` the fast ``tokenizers`` library runs it; a directory with only slow
    files (``tokenizer.model``, ``vocab.json`` + ``merges.txt``) goes through
    ``transformers.AutoTokenizer``. ``vocab_size`` counts the added tokens (``len(tok)``, or
    the largest id + 1 if that is larger).

    Conventions (the way the model saw documents in pretraining): every document ends with
    ``eos_token`` (``--eos-token``, else tokenizer_config.json's or special_tokens_map.json's
    ``eos_token``, else the first of ``_EOS_CANDIDATES`` in the vocabulary), and starts with
    BOS iff the tokenizer adds one itself: tokenizer_config.json's ``add_bos_token`` where it
    says, else whether encoding with special tokens puts a token in front (the
    post-processor of Llama 3's tokenizer.json, for instance). Qwen2 (no BOS) gets none.
    """

    kind = "hf"

    def __init__(self, path: str | os.PathLike, *, eos_token: str | None = None,
                 add_bos: bool | None = None):
        path = Path(path).expanduser()
        if path.is_file():
            self.files_dir, fast_file = path.parent, path
        elif path.is_dir():
            self.files_dir, fast_file = path, path / "tokenizer.json"
        else:
            raise FileNotFoundError(f"tokenizer {path} does not exist: pass a tokenizer.json "
                                    f"or a Hugging Face model/tokenizer directory")
        self.source = str(path)
        self._own_file = fast_file if fast_file.is_file() else None  # copied by save()
        config = {**_read_json(self.files_dir / "special_tokens_map.json"),
                  **_read_json(self.files_dir / HF_CONFIG)}
        if fast_file.is_file():
            tk = _import_tokenizers()
            self.backend = "tokenizers"
            self._tok = tk.Tokenizer.from_file(str(fast_file))
            self._tok.no_truncation()  # documents are not cut to a model length here
            self._tok.no_padding()
            vocab = self._tok.get_vocab(with_added_tokens=True)
            n = self._tok.get_vocab_size(with_added_tokens=True)
        else:
            if not any((self.files_dir / f).is_file() for f in HF_FILES):
                raise FileNotFoundError(f"{path} holds no tokenizer files (one of "
                                        f"{', '.join(HF_FILES)})")
            try:
                from transformers import AutoTokenizer
            except ImportError as e:
                raise ImportError(f"{path} has no tokenizer.json: reading its slow tokenizer "
                                  f"files needs transformers (pip install transformers)") from e
            self.backend = "transformers"
            self._tok = AutoTokenizer.from_pretrained(str(self.files_dir))
            vocab = self._tok.get_vocab()
            n = len(self._tok)
        self.vocab_size = max(n, max(vocab.values()) + 1)
        self._dtype = np.uint16 if self.vocab_size <= 65535 else np.uint32

        self.eos_token = eos_token or _special(config.get("eos_token")) or next(
            (t for t in _EOS_CANDIDATES if t in vocab), None)
        if self.eos_token is None or self.eos_token not in vocab:
            what = (f"has no token {self.eos_token!r}" if self.eos_token
                    else "names no eos_token (tokenizer_config.json)")
            raise ValueError(f"the tokenizer {path} {what}: pass --eos-token TOKEN, the token "
                             f"that ends a document for this model")
        self.eos_id = int(vocab[self.eos_token])

        # BOS: what the tokenizer does itself with its special tokens.
        with_special, plain = self._ids("a", True), self._ids("a", False)
        at = next((i for i in range(len(with_special) - len(plain) + 1)
                   if with_special[i:i + len(plain)] == plain), 0)
        prefix = with_special[:at]  # what the tokenizer puts before the text
        self.bos_token = _special(config.get("bos_token"))
        if self.bos_token is None and prefix:
            self.bos_token = self._id_to_token(prefix[0])
        self.bos_id = int(vocab[self.bos_token]) if self.bos_token in vocab else None
        if add_bos is None:
            add_bos = config["add_bos_token"] if (isinstance(config.get("add_bos_token"), bool)
                                                  and self.backend == "tokenizers") \
                else bool(prefix) and prefix[0] == self.bos_id
        if add_bos and self.bos_id is None:
            raise ValueError(f"the tokenizer {path} adds a BOS token but names none "
                             f"(bos_token in tokenizer_config.json)")
        self.add_bos = bool(add_bos)

    def _ids(self, text: str, special: bool) -> list[int]:
        if self.backend == "tokenizers":
            return list(self._tok.encode(text, add_special_tokens=special).ids)
        return list(self._tok(text, add_special_tokens=special, verbose=False)["input_ids"])

    def _id_to_token(self, i: int) -> str | None:
        return (self._tok.id_to_token(i) if self.backend == "tokenizers"
                else self._tok.convert_ids_to_tokens(i))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._ids(text, False), dtype=self._dtype)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        if self.backend == "tokenizers":
            out = self._tok.encode_batch(list(texts), add_special_tokens=False)
            return [np.asarray(e.ids, dtype=self._dtype) for e in out]
        ids = self._tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        return [np.asarray(x, dtype=self._dtype) for x in ids]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, np.ndarray) else ids)]
        if self.backend == "tokenizers":
            return self._tok.decode(ids, skip_special_tokens=False)
        return self._tok.decode(ids, skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "eos_token": self.eos_token, "bos_id": self.bos_id, "bos_token": self.bos_token,
                "add_bos": self.add_bos, "dir": HF_DIR, "backend": self.backend,
                "source": self.source}

    def save(self, directory: str | os.PathLike) -> None:
        """Copy the tokenizer's files into ``directory/tokenizer/`` (``AutoTokenizer`` reads
        it back); its tokenizer_config.json gets the EOS/BOS used here if it lacks them."""
        out = Path(directory) / HF_DIR
        out.mkdir(parents=True, exist_ok=True)
        for name in HF_FILES:
            src = self.files_dir / name
            if name == "tokenizer.json" and self._own_file is not None:
                src = self._own_file
            if src.is_file() and src.resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)
        config = _read_json(out / HF_CONFIG)
        want = {"eos_token": self.eos_token, "bos_token": self.bos_token}
        if not config:
            config = {"tokenizer_class": "PreTrainedTokenizerFast",
                      "clean_up_tokenization_spaces": False}
        changed = False
        for key, value in want.items():
            if value is not None and _special(config.get(key)) != value:
                config[key] = value
                changed = True
        if changed or not (out / HF_CONFIG).is_file():
            (out / HF_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                         encoding="utf-8")

    def fingerprint(self) -> str:
        if self.backend == "tokenizers":
            text = self._tok.to_str()
        else:
            text = json.dumps(sorted(self._tok.get_vocab().items()), ensure_ascii=False)
        return f"{self.kind}:{hashlib.sha256(text.encode()).hexdigest()}"


def load_tokenizer(meta: dict[str, Any], data_dir: str | os.PathLike) -> Tokenizer:
    """Rebuild the tokenizer described by a data directory's ``meta.json`` (the whole meta or
    its ``"tokenizer"`` entry) and check that it matches the recorded vocab and EOS."""
    info = meta.get("tokenizer", meta)
    kind = info["kind"]
    if kind == "byte":
        tok: Tokenizer = ByteTokenizer()
    elif kind == "bpe":
        tok = BPETokenizer.from_file(Path(data_dir) / info["file"], info.get("eos_token", EOS_TEXT))
    elif kind == "hf":
        path = Path(data_dir) / info.get("dir", HF_DIR)
        if not path.is_dir():
            raise FileNotFoundError(f"the Hugging Face tokenizer's files {path} are missing: "
                                    f"re-run tools/prepare_data.py --tokenizer PATH")
        tok = HFTokenizer(path, eos_token=info["eos_token"], add_bos=info["add_bos"])
    else:
        raise ValueError(f"{Path(data_dir) / 'meta.json'}: unknown tokenizer kind {kind!r} "
                         f"(expected 'byte', 'bpe' or 'hf'); re-run tools/prepare_data.py")
    got = (tok.vocab_size, tok.eos_id, tok.bos_id if tok.add_bos else None)
    want = (info["vocab_size"], info["eos_id"], info.get("bos_id") if info.get("add_bos") else None)
    if got != want:
        raise ValueError(
            f"{Path(data_dir)}: tokenizer has vocab_size={tok.vocab_size}, eos_id={tok.eos_id} but "
            f"meta.json records vocab_size={info['vocab_size']}, eos_id={info['eos_id']}"
            f"{'' if got[2] == want[2] else f' (BOS {got[2]} vs {want[2]})'}: the "
            f"directory is inconsistent; delete it and re-run tools/prepare_data.py"
        )
    return tok


def open_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer named by a path (``data.tokenizer``): a moetrain data directory (its own
    tokenizer), or a Hugging Face ``tokenizer.json`` / tokenizer directory."""
    path = Path(path).expanduser()
    if (path / "meta.json").is_file():
        meta = json.loads((path / "meta.json").read_text())
        return load_tokenizer(meta, path)
    return HFTokenizer(path)
