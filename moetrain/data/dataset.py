"""Fixed-length language-modelling samples over a split's memory-mapped token shards.

The split's shards form one logical token stream. Sample ``i`` is the window
``tokens[i*S : i*S + S + 1]`` (S = seq_len): inputs are its first S tokens, targets the last
S (the inputs shifted by one). Consecutive samples share one boundary token, so every token
is a target exactly once. Windows may straddle shard files and document boundaries (EOS).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moetrain.config.schema import ConfigError
from moetrain.data.shards import open_split, read_meta


def batch_of(sample, indices: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs_BS, targets_BS)`` int64 tensors of the samples ``sample(i)`` (each of
    seq_len + 1 tokens): inputs are the first seq_len tokens, targets the last."""
    rows_BS1 = np.empty((len(indices), seq_len + 1), dtype=np.int64)
    for b, i in enumerate(indices):
        rows_BS1[b] = sample(int(i))
    rows = torch.from_numpy(rows_BS1)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class TokenDataset:
    """``len(ds) = (num_tokens - 1) // seq_len`` samples of ``seq_len + 1`` tokens."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        seq_len: int,
        *,
        meta: dict[str, Any] | None = None,
        verify: bool = True,
    ):
        self.meta = meta if meta is not None else read_meta(Path(data_dir))
        shards = open_split(Path(data_dir), split, self.meta, verify=verify)
        self._init_stream(Path(data_dir), split, seq_len, shards)

    @classmethod
    def from_arrays(cls, arrays: list[np.ndarray], seq_len: int, *, where: str | os.PathLike,
                    split: str) -> TokenDataset:
        """A dataset over token arrays (memmaps are not copied) taken as one stream;
        ``where`` names the data in messages (e.g. a Megatron dataset's prefix)."""
        self = cls.__new__(cls)
        self.meta = {}
        self._init_stream(Path(where), split, seq_len, arrays)
        return self

    def _init_stream(self, where: Path, split: str, seq_len: int,
                     shards: list[np.ndarray]) -> None:
        self.data_dir = where
        self.split = split
        self.seq_len = int(seq_len)
        if self.seq_len < 1:
            raise ConfigError(f"train.seq_len={seq_len} is invalid: must be >= 1")
        self._shards = [s for s in shards if s.size]
        sizes = np.array([s.size for s in self._shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])  # shard k covers [starts[k], starts[k+1])
        self.num_tokens = int(self._starts[-1])
        self._len = max(self.num_tokens - 1, 0) // self.seq_len
        if self._len < 1:
            raise ConfigError(
                f"train.seq_len={self.seq_len} is too long for the {split!r} split of "
                f"{self.data_dir}: it holds {self.num_tokens} tokens and one sample needs "
                f"seq_len + 1 = {self.seq_len + 1}. Lower train.seq_len, or use a larger "
                f"corpus (data.default_corpus_mb / data.source); for the val split: raise "
                f"data.val_fraction (the default corpus, Megatron data) or, for a directory "
                f"of tools/prepare_data.py (its split is fixed), re-run it with "
                f"--min-val-tokens {self.seq_len + 1}"
            )

    def __len__(self) -> int:
        return self._len

    def tokens(self, start: int, count: int) -> np.ndarray:
        """``count`` tokens of the logical stream from ``start`` (read across shards)."""
        if start < 0 or start + count > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + count}) out of range [0, "
                             f"{self.num_tokens}) in split {self.split!r}")
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts, pos, end = [], start, start + count
        while pos < end:
            shard = self._shards[k]
            lo = pos - int(self._starts[k])
            hi = min(end - int(self._starts[k]), shard.size)
            parts.append(shard[lo:hi])
            pos += hi - lo
            k += 1
        return np.concatenate(parts) if len(parts) != 1 else np.asarray(parts[0])

    def sample(self, index: int) -> np.ndarray:
        """The ``seq_len + 1`` tokens of sample ``index``."""
        if not 0 <= index < self._len:
            raise IndexError(f"sample {index} out of range [0, {self._len}) in split "
                             f"{self.split!r}")
        return self.tokens(index * self.seq_len, self.seq_len + 1)

    def get_batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs_BS, targets_BS)`` int64 tensors for the given sample indices."""
        return batch_of(self.sample, indices, self.seq_len)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.get_batch([index])
        return inputs[0], targets[0]

    def __repr__(self) -> str:
        return (f"TokenDataset({str(self.data_dir)!r}, split={self.split!r}, "
                f"seq_len={self.seq_len}, samples={self._len}, tokens={self.num_tokens})")
