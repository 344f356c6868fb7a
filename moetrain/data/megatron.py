"""Megatron-LM's indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``), read in place.

``tools/preprocess_data.py`` of Megatron-LM writes them through megatron-core's
``IndexedDatasetBuilder``. The ``.bin`` file is the token ids of every sequence back to back
(no separator is added: ``--append-eod`` puts the tokenizer's EOD at each document's end).
The ``.idx`` file, all little-endian::

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    u64       version (1)
    u8        dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32,
              8 uint16)
    u64       S, the sequence count
    u64       D, the document-index count (documents + 1)
    S int32   sequence lengths, in tokens
    S int64   sequence pointers, byte offsets into .bin
    D int64   document indices: document d is sequences [idx[d], idx[d + 1]) (sequences
              after the last index belong to no document and are not read)
    S int8    sequence modes (multimodal datasets only; ignored)

Both files are memory-mapped; nothing is converted or copied. A document is its sequences'
tokens; the train/val split is by whole documents (:func:`split_documents`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moetrain.config.schema import ConfigError
from moetrain.data.shards import SplitError, num_val_docs

PREFIX = "megatron:"  # data.source=megatron:PATH_PREFIX
MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D: 34 bytes
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
          7: np.float32, 8: np.uint16}
_SCAN_CHUNK = 1 << 24  # tokens per step of the vocabulary scan
_CHUNK = 1 << 22  # sequences per step of the pointer check


def is_megatron(path: str) -> bool:
    return path.startswith(PREFIX)


def prefix_of(path: str) -> Path:
    """``megatron:PREFIX`` -> PREFIX (a trailing .bin/.idx is tolerated)."""
    p = path[len(PREFIX):] if is_megatron(path) else path
    if p.endswith((".bin", ".idx")):
        p = p[:-4]
    return Path(p).expanduser()


@dataclass(frozen=True)
class MegatronIndex:
    """The parsed ``.idx`` of ``prefix`` and the memory-mapped ``.bin``."""

    prefix: Path
    dtype: np.dtype
    sequence_lengths: np.ndarray  # int32 [S]
    sequence_pointers: np.ndarray  # int64 [S], bytes
    document_indices: np.ndarray  # int64 [D]
    tokens: np.ndarray  # the .bin as one token array (memmap)

    @property
    def bin_path(self) -> Path:
        return Path(f"{self.prefix}.bin")

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def document_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(start, end) token offsets of every document in :attr:`tokens`."""
        return self._bounds

    @functools.cached_property
    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        # The sequences lie back to back (read_index checks it): sequence i starts at token
        # pointers[i] / itemsize, and index S (past the last) at the token count. Built
        # once, 16 bytes per document, from the memory-mapped pointers.
        n_seq, n_tok = len(self.sequence_pointers), int(self.tokens.size)

        def at(seq: np.ndarray) -> np.ndarray:
            inside = seq < n_seq
            out = np.full(seq.shape, n_tok, dtype=np.int64)
            out[inside] = self.sequence_pointers[seq[inside]] // self.dtype.itemsize
            return out

        return at(self.document_indices[:-1]), at(self.document_indices[1:])

    def document(self, d: int) -> np.ndarray:
        starts, ends = self.document_bounds()
        return np.asarray(self.tokens[starts[d]:ends[d]])


def _bad(path: Path, what: str) -> ConfigError:
    return ConfigError(f"{path} is not a Megatron indexed dataset that moetrain can read: "
                       f"{what}. Rebuild it with Megatron-LM's tools/preprocess_data.py (or "
                       f"megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder)")


def read_index(prefix: str | os.PathLike) -> MegatronIndex:
    """Parse ``PREFIX.idx`` and map ``PREFIX.bin``; checks the header, the sizes, and that
    the sequences lie back to back in ``.bin`` (as the builder writes them)."""
    prefix = Path(prefix)
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for p in (idx, bin_):
        if not p.is_file():
            raise ConfigError(f"data.source=megatron:{prefix}: {p} does not exist (a Megatron "
                              f"dataset is PREFIX.bin + PREFIX.idx; give PREFIX without the "
                              f"suffix)")
    size = idx.stat().st_size
    with open(idx, "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise _bad(idx, f"{size} bytes is shorter than the {_HEADER.size}-byte header")
    magic, version, code, n_seq, n_doc = _HEADER.unpack(head)
    if magic != MAGIC:
        raise _bad(idx, f"magic {magic!r} != {MAGIC!r}")
    if version != VERSION:
        raise _bad(idx, f"version {version} (moetrain reads version {VERSION})")
    if code not in DTYPES:
        raise _bad(idx, f"unknown dtype code {code}")
    dtype = np.dtype(DTYPES[code])
    if dtype.kind not in "iu":
        raise _bad(idx, f"its tokens are {dtype.name}, not integers")
    body = 12 * n_seq + 8 * n_doc
    if size not in (_HEADER.size + body, _HEADER.size + body + n_seq):  # + modes (multimodal)
        raise _bad(idx, f"{size} bytes, but a header of {n_seq} sequences and {n_doc} "
                        f"document indices needs {_HEADER.size + body}")
    if n_doc < 1:
        raise _bad(idx, "it has no document index")
    mm = np.memmap(idx, dtype=np.uint8, mode="r")
    off = _HEADER.size
    lengths = np.frombuffer(mm, np.int32, n_seq, off)
    pointers = np.frombuffer(mm, np.int64, n_seq, off + 4 * n_seq)
    doc_idx = np.frombuffer(mm, np.int64, n_doc, off + 12 * n_seq)
    if doc_idx[0] != 0 or doc_idx[-1] > n_seq or np.any(np.diff(doc_idx) < 0):
        raise _bad(idx, "its document indices do not ascend from 0 within the sequence count")
    if np.any(lengths < 0):
        raise _bad(idx, "it has negative sequence lengths")
    # Back to back: pointer i = (tokens before sequence i) * itemsize; checked in chunks so
    # that memory stays bounded whatever the sequence count.
    n_tokens = 0
    for lo in range(0, n_seq, _CHUNK):
        part = lengths[lo:lo + _CHUNK].astype(np.int64)
        before = n_tokens + np.cumsum(part) - part
        if not np.array_equal(pointers[lo:lo + _CHUNK], before * dtype.itemsize):
            raise _bad(idx, "its sequences are not stored back to back in the .bin file")
        n_tokens += int(part.sum())
    bin_size = bin_.stat().st_size
    if bin_size != n_tokens * dtype.itemsize:
        raise _bad(bin_, f"{bin_size} bytes, but {idx.name} describes {n_tokens} "
                         f"{dtype.name} tokens = {n_tokens * dtype.itemsize} bytes")
    tokens = (np.memmap(bin_, dtype=dtype, mode="r") if n_tokens
              else np.empty(0, dtype=dtype))
    return MegatronIndex(prefix, dtype, lengths, pointers, doc_idx, tokens)


def split_documents(index: MegatronIndex, val_fraction: float, min_val_tokens: int) -> int:
    """The token offset where val starts (val ends where the last document ends): the last
    ``val_fraction`` of the documents by count (at least one; empty documents count), grown
    by whole documents until val holds ``min_val_tokens`` (one sample), at least one
    document left in train."""
    _, ends = index.document_bounds()
    try:
        n_val = num_val_docs(ends, val_fraction, min_val_tokens)
    except SplitError as e:
        raise ConfigError(f"data.source=megatron:{index.prefix} is too small for a train/val "
                          f"split ({e}): lower train.seq_len, or raise data.val_fraction") from e
    return int(ends[len(ends) - n_val - 1])


def _scan_cache(cache_dir: Path, index: MegatronIndex) -> Path:
    key = hashlib.sha256(str(index.bin_path.resolve()).encode()).hexdigest()[:16]
    return cache_dir / "megatron-scan" / f"{key}.json"


def token_range(index: MegatronIndex, cache_dir: Path | None = None) -> tuple[int, int]:
    """(min, max) token id of the ``.bin`` file: one pass over the memmap, cached under
    ``cache_dir`` keyed by the file's path, size and mtime (so later runs cost a stat)."""
    if index.tokens.size == 0:
        return 0, -1
    st = index.bin_path.stat()
    stamp = [str(index.bin_path.resolve()), st.st_size, st.st_mtime_ns]
    path = _scan_cache(cache_dir, index) if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            rec = json.loads(path.read_text())
            if rec["stamp"] == stamp:
                return int(rec["min"]), int(rec["max"])
        except (OSError, ValueError, KeyError):
            pass
    lo, hi = None, None
    for s in range(0, index.tokens.size, _SCAN_CHUNK):
        chunk = index.tokens[s:s + _SCAN_CHUNK]
        cmin, cmax = int(chunk.min()), int(chunk.max())
        lo = cmin if lo is None else min(lo, cmin)
        hi = cmax if hi is None else max(hi, cmax)
    if path is not None:  # best effort, atomic (ranks may race)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
            tmp.write_text(json.dumps({"stamp": stamp, "min": lo, "max": hi}))
            os.replace(tmp, path)
        except OSError:
            pass
    return lo, hi


def check_vocab(index: MegatronIndex, vocab_size: int, cache_dir: Path | None) -> None:
    """Every token id must be in [0, vocab_size): else a ConfigError naming the file."""
    lo, hi = token_range(index, cache_dir)
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ConfigError(
            f"{index.bin_path} holds token id {bad}, outside the model's vocabulary "
            f"[0, {vocab_size}) (model.vocab_size={vocab_size}): set model.vocab_size to the "
            f"vocabulary the data was tokenized with (at least {hi + 1}), or name that "
            f"tokenizer with data.tokenizer=PATH"
        )


__all__ = ["PREFIX", "MegatronIndex", "check_vocab", "is_megatron", "prefix_of", "read_index",
           "split_documents", "token_range"]
