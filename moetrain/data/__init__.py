"""Data: tokenizers, memory-mapped token shards, the default corpus and the global sampler.

Entry point: :func:`build_data` turns ``DataConfig`` into train/val datasets and the
tokenizer. The sample order lives in :class:`GlobalBatchSampler` (Stateful).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moetrain.config.schema import ConfigError, DataConfig
from moetrain.data.corpus import default_corpus_dir, ensure_default_corpus
from moetrain.data.dataset import TokenDataset
from moetrain.data.sampler import GlobalBatchSampler
from moetrain.data.shards import (
    DEFAULT_SHARD_TOKENS,
    META_FILE,
    ShardError,
    SplitError,
    open_split,
    read_meta,
    write_token_dataset,
)
from moetrain.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    load_tokenizer,
    train_bpe,
)


@dataclass
class DataBundle:
    train: TokenDataset
    val: TokenDataset
    tokenizer: ByteTokenizer | BPETokenizer
    data_dir: Path


def build_data(cfg: DataConfig, seq_len: int, *, progress: bool = True) -> DataBundle:
    """Open (building the default corpus on first use) the data that ``cfg`` names."""
    if cfg.source == "default":
        data_dir = ensure_default_corpus(cfg, progress=progress)
    else:
        data_dir = Path(cfg.source).expanduser()
        if not (data_dir / META_FILE).is_file():
            what = "does not exist" if not data_dir.exists() else f"has no {META_FILE}"
            raise ConfigError(
                f"data.source={cfg.source!r} is invalid: {data_dir.resolve()} {what}. Write a "
                f"data directory with: python tools/prepare_data.py --input TEXT_FILES_OR_DIR "
                f"--output {cfg.source}  (or use data.source=default)"
            )
    meta = read_meta(data_dir)
    return DataBundle(
        train=TokenDataset(data_dir, "train", seq_len, meta=meta),
        val=TokenDataset(data_dir, "val", seq_len, meta=meta),
        tokenizer=load_tokenizer(meta, data_dir),
        data_dir=data_dir,
    )


__all__ = [
    "DEFAULT_SHARD_TOKENS", "BPETokenizer", "ByteTokenizer", "DataBundle", "GlobalBatchSampler",
    "ShardError", "SplitError", "TokenDataset", "Tokenizer", "build_data", "default_corpus_dir",
    "ensure_default_corpus", "load_tokenizer", "open_split", "read_meta", "train_bpe",
    "write_token_dataset",
]
