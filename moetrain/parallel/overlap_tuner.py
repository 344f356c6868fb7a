"""``moe.a2a_overlap_chunks=auto``: choose the all-to-all overlap degree per step from
measured step times.

Tutel (Hwang et al., 2023, arXiv 2206.03382, "adaptive pipelining") splits the
expert-parallel exchange into o chunks pipelined against the experts' compute, and the
best o depends on the load and the machine: more chunks hide more of the exchange but
send smaller messages and launch smaller GEMMs. Tutel's released code sets o per call and
has no tuner of its own (its example cycles o every step to measure it); how the paper
picks o at run time is not public. This tuner is moetrain's own rule:

- a table of step times per (load bucket, chunk count), the bucket being floor(log2) of
  the rows the busiest rank's experts received in the step (:func:`load_bucket`);
- exploration: in a bucket, every candidate count is run once, in a cyclic order that
  starts after the count just used (so the count changes every step while exploring);
- then the fastest count of that bucket (lowest median of its last few times), with a
  rare deterministic re-probe of one other count, in turn.

A step is timed with the count set before it, and the next step's count is chosen from
the bucket of the step just run (loads drift slowly between steps). The first timed step
of a run is not recorded: it carries one-time costs (allocations, compilation, kernel
self-tests). Every rank must run the same count, since the exchanges are collectives:
the step time and the rows are all-reduced with MAX over all ranks (one collective of
two numbers per step) and every rank applies the same deterministic rule to the same
numbers. The count changes only how rows are grouped into exchanges, never the math, so
the table is not checkpointed: a resumed run explores again.

Legend: c a chunk count, b a load bucket.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from moetrain.config.schema import AUTO, MoEConfig
from moetrain.parallel.expert import ChunkedAllToAllDispatcher

__all__ = ["CANDIDATES", "ChunkTable", "OverlapTuner", "load_bucket"]

# Powers of two up to 8: beyond that, chunks of a small model's rows are a few rows each
# (Tutel allows up to 32, AllToAllStatus.max_num_split).
CANDIDATES = (1, 2, 4, 8)


def load_bucket(rows: int) -> int:
    """floor(log2(rows)), 0 for 0 or 1 rows: loads within a factor of 2 share a bucket."""
    return max(int(rows), 1).bit_length() - 1


class ChunkTable:
    """The tuner's decision rule, free of collectives (unit-tested with made-up times).

    ``record(b, c, seconds)`` keeps the last ``window`` step times of count c in bucket b.
    ``next_chunks(b, current)`` returns, for bucket b:

    1. exploration: the first count in ``candidates`` with no time in b, looking in
       cyclic order from the one after ``current``;
    2. then, every ``reprobe_every``-th choice in b, one count other than the best, in
       turn (a count measured once during a noisy step gets a second chance);
    3. else the best: the lowest median of the last ``window`` times, ties to fewer chunks.
    """

    def __init__(self, candidates: Sequence[int] = CANDIDATES, reprobe_every: int = 100,
                 window: int = 3) -> None:
        if not candidates or len(set(candidates)) != len(candidates) or any(
                not isinstance(c, int) or c < 1 for c in candidates):
            raise ValueError(f"candidates={candidates!r}: need distinct integers >= 1")
        if reprobe_every < 2 or window < 1:
            raise ValueError(f"reprobe_every={reprobe_every!r} must be >= 2 and "
                             f"window={window!r} >= 1")
        self.candidates = tuple(candidates)
        self.reprobe_every, self.window = reprobe_every, window
        self.times: dict[int, dict[int, list[float]]] = {}  # b -> c -> last times
        self._choices: dict[int, int] = {}  # b -> choices made after exploration
        self._probes: dict[int, int] = {}  # b -> re-probes made

    def record(self, bucket: int, chunks: int, seconds: float) -> None:
        last = self.times.setdefault(bucket, {}).setdefault(chunks, [])
        last.append(float(seconds))
        del last[:-self.window]

    def score(self, bucket: int, chunks: int) -> float:
        """Median of the count's last times in the bucket (inf if never run there)."""
        last = self.times.get(bucket, {}).get(chunks)
        return statistics.median(last) if last else float("inf")

    def best(self, bucket: int) -> int:
        return min(self.candidates, key=lambda c: (self.score(bucket, c), c))

    def next_chunks(self, bucket: int, current: int) -> int:
        cand = self.candidates
        start = cand.index(current) + 1 if current in cand else 0
        timed = self.times.get(bucket, {})
        for c in cand[start:] + cand[:start]:
            if c not in timed:
                return c
        n = self._choices[bucket] = self._choices.get(bucket, 0) + 1
        best = self.best(bucket)
        if n % self.reprobe_every == 0 and len(cand) > 1:
            others = [c for c in cand if c != best]
            k = self._probes[bucket] = self._probes.get(bucket, 0) + 1
            return others[(k - 1) % len(others)]
        return best


def _all_reduce_max(device: torch.device) -> Callable[[list[float]], list[float]]:
    def reduce(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # every rank, whatever its stage
        return t.tolist()

    return reduce


class OverlapTuner:
    """Sets ``chunks`` on this rank's chunked dispatchers before every training step.

    ``dispatchers``: objects with ``chunks`` and ``rows_received`` (this rank's MoE
    layers' :class:`ChunkedAllToAllDispatcher`; none on a pipeline stage without MoE
    layers, which still joins the collective). ``reduce_max`` maps this rank's
    ``[seconds, rows]`` to their maxima over all ranks (default: one all-reduce on
    ``device``); tests inject it.
    """

    def __init__(self, dispatchers: Iterable, table: ChunkTable | None = None,
                 reduce_max: Callable[[list[float]], list[float]] | None = None,
                 device: torch.device | None = None) -> None:
        self.dispatchers = list(dispatchers)
        self.table = table or ChunkTable()
        self.reduce_max = reduce_max or _all_reduce_max(device or torch.device("cpu"))
        self.first = True
        self.chunks = self.table.candidates[0]
        self._set(self.chunks)

    @classmethod
    def for_layers(cls, moe_cfg: MoEConfig, ep: int, moe_layers: list[nn.Module],
                   device: torch.device) -> OverlapTuner | None:
        """The tuner of ``moe.a2a_overlap_chunks=auto`` under ``ep > 1``, else None. Every
        rank gets one (the choice is a collective)."""
        if moe_cfg.a2a_overlap_chunks != AUTO or ep == 1:
            return None
        disp = [layer.dispatcher for layer in moe_layers
                if isinstance(layer.dispatcher, ChunkedAllToAllDispatcher)]
        return cls(disp, device=device)

    def _set(self, chunks: int) -> None:
        for d in self.dispatchers:
            d.chunks = chunks

    def step(self, seconds: float) -> int:
        """After a training step that took ``seconds`` on this rank: record it and set the
        next step's count. Returns the count the step ran with."""
        rows = sum(d.rows_received for d in self.dispatchers)
        for d in self.dispatchers:
            d.rows_received = 0
        seconds, rows = self.reduce_max([float(seconds), float(rows)])
        used, bucket = self.chunks, load_bucket(int(rows))
        if self.first:  # one-time costs: not a time of this count
            self.first = False
        else:
            self.table.record(bucket, used, seconds)
        self.chunks = self.table.next_chunks(bucket, used)
        self._set(self.chunks)
        return used
