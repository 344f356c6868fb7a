"""The default corpus: source text of the running Python's standard library. No network.

Documents are the stdlib ``*.py`` files (site-packages and test directories skipped, files
that are not UTF-8 skipped), one per file, in sorted path order, cut at
``data.default_corpus_mb`` MiB of UTF-8 text (the last file is cut mid-way). It is tokenized
byte-level and cached as token shards under ``data.cache_dir`` in a directory whose name
encodes everything that determines its content, so settings never collide. The first run
builds it (every torchrun rank may race to; the atomic publish in
:mod:`moetrain.data.shards` keeps that safe); later runs just memory-map it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import sysconfig
from pathlib import Path

from moetrain.config.schema import ConfigError, DataConfig
from moetrain.data.shards import FORMAT_VERSION, META_FILE, SplitError, write_token_dataset
from moetrain.data.tokenizer import ByteTokenizer

log = logging.getLogger(__name__)

CORPUS_VERSION = 1  # bump when the document selection rules below change
# The val split is grown (by whole trailing documents) to at least this many tokens, enough
# for one sample at train.seq_len <= 8192 even with a tiny corpus.
MIN_VAL_TOKENS = 8193
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def cache_root(cache_dir: str) -> Path:
    """``data.cache_dir``, else ``$MOETRAIN_CACHE``, else ``~/.cache/moetrain``."""
    root = cache_dir or os.environ.get("MOETRAIN_CACHE") or "~/.cache/moetrain"
    return Path(root).expanduser()


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The stdlib ``*.py`` files in sorted relative-path order, without site-packages and
    test directories."""
    root = root or _stdlib_dir()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames
                       if d not in _SKIP_DIRS and not d.endswith(("_test", "_tests"))]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def corpus_documents(max_mib: float, root: Path | None = None) -> list[str]:
    """The documents of the default corpus: whole files until ``max_mib`` MiB of UTF-8 text,
    the last one cut at the limit (at a character boundary)."""
    budget = int(max_mib * (1 << 20))
    docs: list[str] = []
    for path in stdlib_files(root):
        if budget <= 0:
            break
        try:
            raw = path.read_bytes()
            raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(raw) > budget:
            raw = raw[:budget]
        text = raw.decode("utf-8", errors="ignore")  # drops a character split by the cut
        if text:
            docs.append(text)
            budget -= len(raw)
    return docs


def default_corpus_dir(cfg: DataConfig) -> Path:
    """Where the default corpus for ``cfg`` lives; the name encodes its content's inputs."""
    stdlib = str(_stdlib_dir())
    tag = hashlib.sha256(stdlib.encode()).hexdigest()[:8]  # which installation
    impl = sys.implementation.name
    ver = ".".join(map(str, sys.version_info[:3]))
    name = (f"pystdlib-{impl}{ver}-{tag}-{cfg.default_corpus_mb:g}mib-"
            f"val{cfg.val_fraction:g}-byte-c{CORPUS_VERSION}f{FORMAT_VERSION}")
    return cache_root(cfg.cache_dir) / name


def ensure_default_corpus(cfg: DataConfig, *, progress: bool = True) -> Path:
    """The default corpus directory for ``cfg``, built on first use."""
    out = default_corpus_dir(cfg)
    if (out / META_FILE).is_file():
        return out
    log.info("building the default corpus (%g MiB of Python stdlib text) at %s",
             cfg.default_corpus_mb, out)
    docs = corpus_documents(cfg.default_corpus_mb)
    try:
        return write_token_dataset(
            docs, out, ByteTokenizer(),
            val_fraction=cfg.val_fraction,
            min_val_tokens=MIN_VAL_TOKENS,
            num_documents=len(docs),
            source={"kind": "python-stdlib", "stdlib": str(_stdlib_dir()),
                    "python": sys.version.split()[0], "max_mib": cfg.default_corpus_mb},
            progress=progress,
        )
    except SplitError as e:
        raise ConfigError(
            f"data.default_corpus_mb={cfg.default_corpus_mb} gives {len(docs)} documents, too "
            f"few for a train/val split ({e}): raise data.default_corpus_mb (e.g. 1.0), or "
            f"use data.source=DIR from tools/prepare_data.py"
        ) from e
