"""The global sample order and its split into micro-batches, independent of the layout.

The sample stream is a seeded permutation of ``range(num_samples)`` per epoch (epoch ``e``
uses seed ``seed + e``), concatenated over epochs. Global batch ``s`` is the next
``global_batch_size`` entries of that stream, so a global batch may straddle an epoch. Every
rank draws the same global batch and takes its own micro-batches from it; the micro-batches
are the same set in the same order for every (dp, micro_batch_size) layout, which keeps the
loss trajectory comparable line by line with a 1-process run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from moetrain.config.schema import ConfigError


def _as_int(value: Any) -> int:
    return int(value.item()) if isinstance(value, torch.Tensor) else int(value)


class GlobalBatchSampler:
    """Stateful: ``state_dict()`` holds the number of samples consumed (plus seed and
    num_samples, checked on load), so a resumed run continues the exact stream."""

    def __init__(self, num_samples: int, global_batch_size: int, seed: int = 0):
        if num_samples < 1:
            raise ConfigError(f"the dataset has num_samples={num_samples}: lower train.seq_len or "
                              f"use a larger corpus")
        if global_batch_size < 1:
            raise ConfigError(f"train.global_batch_size={global_batch_size} is invalid: "
                              f"must be >= 1")
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.consumed = 0  # samples taken from the stream so far
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    @property
    def epoch(self) -> int:
        """The epoch the next sample comes from."""
        return self.consumed // self.num_samples

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(self.num_samples, generator=g).numpy()
            self._perm_epoch = epoch
        return self._perm

    def next_global_batch(self) -> list[int]:
        """The next ``global_batch_size`` sample indices; advances the position."""
        out: list[int] = []
        while len(out) < self.global_batch_size:
            epoch, offset = divmod(self.consumed, self.num_samples)
            take = min(self.global_batch_size - len(out), self.num_samples - offset)
            out.extend(self._permutation(epoch)[offset:offset + take].tolist())
            self.consumed += take
        return out

    @staticmethod
    def micro_batches(
        global_batch: list[int], dp_rank: int, dp_size: int, micro_batch_size: int
    ) -> list[list[int]]:
        """Rank ``dp_rank``'s micro-batches, in accumulation order.

        With ``a = G / (micro_batch_size * dp_size)`` accumulation steps, micro-batch ``j`` of
        rank ``r`` is ``global_batch[(j*dp + r)*m : (j*dp + r + 1)*m]``: the ranks' micro-batches
        are disjoint and their union is the global batch, for every layout.
        """
        G, m = len(global_batch), micro_batch_size
        if m < 1 or dp_size < 1:
            raise ConfigError(f"train.micro_batch_size={m} and dp size {dp_size} must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, {dp_size})")
        if G % (m * dp_size):
            raise ConfigError(
                f"train.global_batch_size={G} is not divisible by train.micro_batch_size * "
                f"data-parallel size = {m} * {dp_size} = {m * dp_size}: set "
                f"train.global_batch_size to a multiple of {m * dp_size} or change "
                f"train.micro_batch_size"
            )
        steps = G // (m * dp_size)
        return [
            list(global_batch[(j * dp_size + dp_rank) * m:(j * dp_size + dp_rank + 1) * m])
            for j in range(steps)
        ]

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed, "seed": self.seed,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"consumed_samples", "seed", "num_samples"} - set(state)
        if missing:
            raise ValueError(f"sampler state lacks {sorted(missing)}: the checkpoint was not "
                             f"written by GlobalBatchSampler")
        seed, num_samples = _as_int(state["seed"]), _as_int(state["num_samples"])
        if num_samples != self.num_samples:
            raise ValueError(
                f"the checkpoint's sampler was built on {num_samples} train samples but the "
                f"dataset now has {self.num_samples}: the data changed (data.source, "
                f"data.default_corpus_mb, data.val_fraction or train.seq_len differ from the "
                f"checkpointed run). Resume with the same data settings, or start fresh with "
                f"checkpoint.resume=none"
            )
        if seed != self.seed:
            raise ValueError(
                f"the checkpoint's sampler used seed={seed} but this run has seed={self.seed}: "
                f"resume with seed={seed} to continue the same sample order, or start fresh "
                f"with checkpoint.resume=none"
            )
        self.consumed = _as_int(state["consumed_samples"])
