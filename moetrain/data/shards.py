"""Token shards on disk: a directory of raw token arrays plus ``meta.json``.

Layout of a data directory::

    meta.json            format/version, tokenizer, dtype, per split the shard files with
                         their token counts and sha256
    train_00000.bin ...  raw little-endian uint16 (uint32 when vocab_size > 65535) tokens
    val_00000.bin ...
    tokenizer.json       (BPE only)
    tokenizer/           (a Hugging Face tokenizer's files, --tokenizer PATH only)
    .verified.json       (reader cache: shards whose sha256 was checked, keyed by size+mtime)

Every document is ``[BOS if the tokenizer adds one] + its tokens + [EOS]``. The writer
streams documents in one pass, so memory stays bounded whatever the corpus size: it appends
each batch's tokens to the shard files and each document's end offset to a file on disk,
then moves the LAST documents (``val_fraction`` of them by count, at least one, and at least
``min_val_tokens`` tokens) into the val shards by truncating the train stream at a document
boundary. No counting pass is needed: the split is decided once the stream has ended. A directory is built under a temporary sibling name and published with
``os.replace``, so concurrent builders (torchrun ranks) never see a half-written directory:
the first to finish wins and the others discard their copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from moetrain.data.encode import encode_documents
from moetrain.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT = "moetrain-token-shards"
FORMAT_VERSION = 1
META_FILE = "meta.json"
VERIFIED_FILE = ".verified.json"
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MiB per shard at uint16
_COPY_CHUNK = 1 << 24  # tokens per copy when moving the tail into val shards
_HASH_CHUNK = 1 << 23  # bytes


class ShardError(RuntimeError):
    """A data directory is missing, incomplete or corrupted. The message names the fix."""


class SplitError(ValueError):
    """The documents are too few or too small for a train/val split."""


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "uint32"


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _progress(progress: bool, **kw: Any) -> tqdm:
    return tqdm(disable=not (progress and sys.stderr.isatty()), **kw)


# ----------------------------------------------------------------------------- writing
class _ShardStream:
    """Appends token arrays to ``<split>_NNNNN.bin`` files of at most ``shard_tokens`` each."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.cap = directory, split, dtype, shard_tokens
        self.counts: list[int] = []
        self._f = None

    def append(self, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        while tokens.size:
            if self._f is None or self.counts[-1] == self.cap:
                self._open_next()
            take = min(self.cap - self.counts[-1], tokens.size)
            self._f.write(tokens[:take].data)  # no copy
            self.counts[-1] += take
            tokens = tokens[take:]

    def _open_next(self) -> None:
        self.close()
        path = self.directory / shard_name(self.split, len(self.counts))
        self._f = open(path, "wb")  # noqa: SIM115 (stays open across append() calls)
        self.counts.append(0)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def num_val_docs(doc_ends: np.ndarray, val_fraction: float, min_val_tokens: int) -> int:
    """The number of trailing documents held out: val_fraction of them by count (at least
    one), grown until they hold min_val_tokens tokens; at least one document stays in train.
    ``doc_ends``: the cumulative token count after each document."""
    n = len(doc_ends)
    if n < 2:
        raise SplitError(f"got {n} non-empty document(s): a train/val split needs at least 2")
    total = int(doc_ends[-1])
    n_val = min(max(1, int(n * val_fraction)), n - 1)
    # the first n_val with total - doc_ends[n - n_val - 1] >= min_val_tokens (ends ascend)
    first = int(np.searchsorted(doc_ends, total - min_val_tokens, side="right")) - 1
    n_val = min(max(n_val, n - 1 - max(first, 0)), n - 1)
    val_tokens = total - int(doc_ends[n - n_val - 1])
    if val_tokens < min_val_tokens:
        raise SplitError(
            f"the val split needs at least {min_val_tokens} tokens (min_val_tokens) but all "
            f"documents except the first hold only {val_tokens} of {total}: use more or larger "
            f"documents, or lower min_val_tokens"
        )
    return n_val


def _build(
    documents: Iterable[str],
    tmp: Path,
    tokenizer: Tokenizer,
    *,
    val_fraction: float,
    shard_tokens: int,
    min_val_tokens: int,
    num_documents: int | None,
    source: dict[str, Any] | None,
    progress: bool,
    workers: int,
) -> dict[str, Any]:
    dtype = np.dtype(dtype_for_vocab(tokenizer.vocab_size))
    stream = _ShardStream(tmp, "all", dtype, shard_tokens)
    ends_path = tmp / ".doc_ends.bin"  # int64: cumulative token count after each document
    total = 0
    with _progress(progress, total=num_documents, unit="doc", desc="tokenizing") as bar, \
            open(ends_path, "wb") as ends:
        for batch in encode_documents(documents, tokenizer, workers=workers):
            stream.append(batch.tokens)
            ends.write((total + np.cumsum(batch.lengths)).tobytes())
            total += int(batch.tokens.size)
            bar.update(batch.num_documents)
            bar.set_postfix(tokens=total, refresh=False)
    stream.close()

    doc_ends = (np.memmap(ends_path, dtype=np.int64, mode="r") if ends_path.stat().st_size
                else np.empty(0, np.int64))
    n_val = num_val_docs(doc_ends, val_fraction, max(min_val_tokens, 2))
    n_docs = len(doc_ends)
    split_at = int(doc_ends[n_docs - n_val - 1])  # first val token in the full stream
    del doc_ends
    ends_path.unlink()

    # Copy the tail [split_at, total) into val shards, then cut the full stream to the train part.
    all_files = [tmp / shard_name("all", i) for i in range(len(stream.counts))]
    val = _ShardStream(tmp, "val", dtype, shard_tokens)
    first = split_at // shard_tokens
    for i in range(first, len(all_files)):
        mm = np.memmap(all_files[i], dtype=dtype, mode="r")
        lo = split_at - i * shard_tokens if i == first else 0
        for s in range(lo, mm.size, _COPY_CHUNK):
            val.append(np.asarray(mm[s:min(s + _COPY_CHUNK, mm.size)]))
        del mm
    val.close()
    train_counts: list[int] = []
    for i, path in enumerate(all_files):
        keep = min(shard_tokens, split_at - i * shard_tokens)
        if keep <= 0:
            path.unlink()
            continue
        if keep < stream.counts[i]:
            os.truncate(path, keep * dtype.itemsize)
        path.rename(tmp / shard_name("train", i))
        train_counts.append(keep)

    splits = {}
    for split, counts in (("train", train_counts), ("val", val.counts)):
        splits[split] = [
            {"file": shard_name(split, i), "tokens": c,
             "sha256": sha256_file(tmp / shard_name(split, i))}
            for i, c in enumerate(counts)
        ]
    tokenizer.save(tmp)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "tokenizer": tokenizer.meta(),
        "dtype": dtype.name,
        "num_documents": {"train": n_docs - n_val, "val": n_val},
        "num_tokens": {"train": split_at, "val": total - split_at},
        "val_fraction": val_fraction,
        "splits": splits,
        "source": source or {},
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def publish_dir(tmp: Path, final: Path) -> bool:
    """Atomically rename a finished ``tmp`` directory to ``final``. If ``final`` already holds a
    data directory (another process won the race), delete ``tmp`` and keep it. Returns True
    when ``tmp`` became ``final``."""
    try:
        os.replace(tmp, final)  # POSIX: atomic; fails if final is a non-empty directory
        return True
    except OSError:
        if not (final / META_FILE).is_file():
            raise ShardError(
                f"cannot publish the data directory to {final}: it exists and is not a complete "
                f"data directory (no {META_FILE}); delete it or choose another output"
            ) from None
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def write_token_dataset(
    documents: Iterable[str],
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    val_fraction: float = 0.01,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    min_val_tokens: int = 2,
    num_documents: int | None = None,
    source: dict[str, Any] | None = None,
    progress: bool = True,
    workers: int = 1,
) -> Path:
    """Tokenize ``documents`` (EOS after each, BOS before each if the tokenizer adds one;
    empty ones skipped) into a data directory, in ``workers`` processes (same output).

    ``documents`` may be any iterable (a generator streams). The last documents go to val
    (see the module docstring). ``num_documents`` only sizes the progress bar. If ``out_dir`` already holds a complete data directory it is returned as is
    (a concurrent builder finished first). Returns ``out_dir``.
    """
    final = Path(out_dir)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens={shard_tokens} must be >= 1")
    if (final / META_FILE).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _build(documents, tmp, tokenizer, val_fraction=val_fraction, shard_tokens=shard_tokens,
               min_val_tokens=min_val_tokens, num_documents=num_documents, source=source,
               progress=progress, workers=workers)
        if not publish_dir(tmp, final):
            log.info("data directory %s was built concurrently by another process; using it",
                     final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- reading
def _fix_hint(data_dir: Path) -> str:
    return (f"delete {data_dir} and rebuild it (re-run tools/prepare_data.py, or just rerun "
            f"training for the default corpus, which rebuilds it)")


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Load and sanity-check ``meta.json``."""
    data_dir = Path(data_dir)
    path = data_dir / META_FILE
    if not path.is_file():
        raise ShardError(f"{path} not found: {data_dir} is not a data directory; create one "
                         f"with python tools/prepare_data.py --input ... --output {data_dir}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path} is not valid JSON ({e}): {_fix_hint(data_dir)}") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ShardError(
            f"{path} has format {meta.get('format')!r} version {meta.get('version')!r}, expected "
            f"{FORMAT!r} version {FORMAT_VERSION}: {_fix_hint(data_dir)}"
        )
    for split in SPLITS:
        if not meta["splits"].get(split):
            raise ShardError(f"{path} lists no shards for split {split!r}: {_fix_hint(data_dir)}")
    return meta


def _load_verified(data_dir: Path) -> dict[str, list]:
    try:
        return json.loads((data_dir / VERIFIED_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _save_verified(data_dir: Path, verified: dict[str, list]) -> None:
    """Best effort (the directory may be read-only); atomic so concurrent readers never see a
    torn file."""
    tmp = data_dir / f"{VERIFIED_FILE}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps(verified))
        os.replace(tmp, data_dir / VERIFIED_FILE)
    except OSError:
        tmp.unlink(missing_ok=True)


def open_split(
    data_dir: str | os.PathLike, split: str, meta: dict[str, Any] | None = None,
    verify: bool = True,
) -> list[np.memmap]:
    """Memory-map a split's shards, in order, after checking each one.

    Always checked: the file exists and its size is tokens * itemsize. With ``verify`` the
    sha256 is checked too, once per file version: a shard whose (size, mtime) matches the
    ``.verified.json`` record is not re-hashed, so later opens cost one stat per shard.
    """
    data_dir = Path(data_dir)
    meta = meta if meta is not None else read_meta(data_dir)
    if split not in meta["splits"]:
        raise ShardError(f"{data_dir / META_FILE} has no split {split!r} (has "
                         f"{sorted(meta['splits'])})")
    dtype = np.dtype(meta["dtype"])
    verified = _load_verified(data_dir) if verify else {}
    changed = False
    maps = []
    for entry in meta["splits"][split]:
        path = data_dir / entry["file"]
        if not path.is_file():
            raise ShardError(f"shard {path} is missing: {_fix_hint(data_dir)}")
        st = path.stat()
        want = entry["tokens"] * dtype.itemsize
        if st.st_size != want:
            raise ShardError(
                f"shard {path} has {st.st_size} bytes but meta.json records {entry['tokens']} "
                f"{dtype.name} tokens = {want} bytes (truncated or overwritten): "
                f"{_fix_hint(data_dir)}"
            )
        if verify:
            stamp = [st.st_size, st.st_mtime_ns, entry["sha256"]]
            if verified.get(entry["file"]) != stamp:
                digest = sha256_file(path)
                if digest != entry["sha256"]:
                    raise ShardError(
                        f"shard {path} fails its checksum (sha256 {digest[:12]}... != "
                        f"{entry['sha256'][:12]}... in meta.json): the file is corrupted; "
                        f"{_fix_hint(data_dir)}"
                    )
                verified[entry["file"]] = stamp
                changed = True
        maps.append(np.memmap(path, dtype=dtype, mode="r"))
    if changed:
        _save_verified(data_dir, verified)
    return maps


__all__ = [
    "DEFAULT_SHARD_TOKENS", "FORMAT_VERSION", "META_FILE", "ShardError", "SplitError",
    "dtype_for_vocab",
    "open_split", "publish_dir", "read_meta", "sha256_file", "write_token_dataset",
]
