"""Weighted mixtures of data sources (``data.sources``): one dataset, one global sampler.

The sources' train splits are concatenated into one index space (:class:`MixtureDataset`):
source ``k`` holds indices ``[offset_k, offset_k + n_k)``. :class:`MixtureSampler` decides
the global sample sequence, so every layout trains on the same samples in the same order
(data-parallel ranks take their micro-batches from each global batch as with
:class:`~moetrain.data.sampler.GlobalBatchSampler`).

Which source sample ``p`` (0-based, over the whole run) comes from: the source whose count
lags its share the most, ``argmax_k (w_k * (p + 1) - c_k)`` with ``c_k`` its samples so far
(ties to the lower k) - the error-minimising interleaving of Megatron-LM's BlendedDataset.
Every prefix of the sequence is then as close to the weights as whole samples allow: for
every ``n`` and source, ``|c_k(n) - w_k * n| < 1`` in the cases tested (2 and 3 sources).
Which sample of source ``k``: the next of its own stream, per-epoch seeded permutations of
its ``n_k`` samples (epoch ``e`` of source ``k`` uses seed ``seed + e + (k << 32)``; for one
source that is GlobalBatchSampler's stream). Weights are normalised to sum to 1.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from moetrain.config.schema import ConfigError
from moetrain.data.dataset import TokenDataset, batch_of
from moetrain.data.sampler import GlobalBatchSampler


class MixtureDataset:
    """The sources' datasets as one: index ``offset_k + i`` is sample ``i`` of source ``k``."""

    def __init__(self, parts: Sequence[TokenDataset], names: Sequence[str]):
        if len({p.seq_len for p in parts}) != 1:
            raise ValueError("the sources of a mixture must share one seq_len")
        self.parts, self.names = list(parts), list(names)
        self.seq_len = self.parts[0].seq_len
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])])
        self.num_tokens = sum(p.num_tokens for p in self.parts)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(source, sample index within the source) of a mixture index."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range [0, {len(self)}) of the mixture")
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return k, index - int(self.offsets[k])

    def sample(self, index: int) -> np.ndarray:
        k, i = self.locate(int(index))
        return self.parts[k].sample(i)

    def get_batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_of(self.sample, indices, self.seq_len)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {len(p)}" for n, p in zip(self.names, self.parts))
        return f"MixtureDataset({parts})"


class MixtureSampler:
    """Stateful: the global position, and each source's position in its own stream (what
    a resume continues from); the sources' names, weights and sizes are checked on load."""

    micro_batches = staticmethod(GlobalBatchSampler.micro_batches)

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], global_batch_size: int,
                 seed: int = 0, names: Sequence[str] | None = None):
        names = list(names) if names is not None else [str(k) for k in range(len(sizes))]
        if not len(sizes) == len(weights) == len(names) or not sizes:
            raise ValueError("a mixture needs one size, weight and name per source")
        for name, n in zip(names, sizes):
            if n < 1:
                raise ConfigError(f"data source {name!r} has no train sample: lower "
                                  f"train.seq_len or use a larger source")
        if any(not w > 0 for w in weights):
            raise ConfigError(f"data.sources weights {list(weights)} must all be > 0")
        if global_batch_size < 1:
            raise ConfigError(f"train.global_batch_size={global_batch_size} is invalid: "
                              f"must be >= 1")
        total = float(sum(weights))
        self.names = names
        self.sizes = [int(n) for n in sizes]
        self.weights = [float(w) / total for w in weights]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).tolist()
        self.num_samples = int(sum(self.sizes))
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.consumed = 0  # samples drawn so far, over all sources
        self.taken = [0] * len(sizes)  # samples drawn so far from each source
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, permutation)

    def _permutation(self, k: int, epoch: int) -> np.ndarray:
        cached = self._perms.get(k)
        if cached is None or cached[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch + (k << 32))
            cached = (epoch, torch.randperm(self.sizes[k], generator=g).numpy())
            self._perms[k] = cached
        return cached[1]

    def choose(self) -> int:
        """The source of the next sample: the one furthest behind its weight."""
        p = self.consumed + 1
        lag = [w * p - c for w, c in zip(self.weights, self.taken)]
        return max(range(len(lag)), key=lambda k: (lag[k], -k))

    def next_global_batch(self) -> list[int]:
        out: list[int] = []
        for _ in range(self.global_batch_size):
            k = self.choose()
            epoch, offset = divmod(self.taken[k], self.sizes[k])
            out.append(int(self.offsets[k]) + int(self._permutation(k, epoch)[offset]))
            self.taken[k] += 1
            self.consumed += 1
        return out

    def _record(self) -> dict[str, Any]:
        return {"names": self.names, "weights": self.weights, "num_samples": self.sizes}

    def state_dict(self) -> dict[str, Any]:
        # The per-source part travels as one JSON string (DCP stores it as bytes).
        return {"consumed_samples": self.consumed, "seed": self.seed,
                "num_samples": self.num_samples,
                "mixture": json.dumps({**self._record(), "taken": self.taken})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "mixture" not in state:
            raise ValueError("the checkpoint's sampler read one data source, this run mixes "
                             "data.sources: resume with the checkpoint's data settings, or "
                             "start fresh with checkpoint.resume=none")
        mix = json.loads(state["mixture"])
        saved = {k: mix[k] for k in ("names", "weights", "num_samples")}
        if saved != self._record():
            raise ValueError(
                f"the checkpoint's data mixture was {saved} but this run has "
                f"{self._record()}: resume with the same data.sources (and train.seq_len), or "
                f"start fresh with checkpoint.resume=none"
            )
        seed = int(state["seed"].item() if isinstance(state["seed"], torch.Tensor)
                   else state["seed"])
        if seed != self.seed:
            raise ValueError(f"the checkpoint's sampler used seed={seed} but this run has "
                             f"seed={self.seed}: resume with seed={seed}, or start fresh "
                             f"with checkpoint.resume=none")
        self.taken = [int(c) for c in mix["taken"]]
        self.consumed = sum(self.taken)


__all__ = ["MixtureDataset", "MixtureSampler"]
