"""Tokenizing a document stream, in this process or in ``workers`` processes, in order.

Documents are cut into batches (at most ``_BATCH_DOCS`` documents or ``_BATCH_CHARS``
characters). Each batch becomes one token array, every non-empty document framed as
``[BOS if add_bos] + ids + [EOS]``, plus the framed
lengths; empty documents are dropped. With ``workers > 1`` the batches go to a process
pool and come back in submission order, so the output is identical to one worker's. At
most ``2 * workers`` batches are in flight (the reader waits for the oldest), so memory
stays bounded whatever the corpus size.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from moetrain.data.tokenizer import Tokenizer

_BATCH_DOCS = 256  # documents per tokenizer call (BPE encodes a batch on several threads)
_BATCH_CHARS = 1 << 22  # characters per batch: a batch of huge documents stays small


@dataclass
class EncodedBatch:
    num_documents: int  # documents read, empty ones included
    tokens: np.ndarray  # the framed documents, concatenated
    lengths: np.ndarray  # int64: the framed length of each non-empty document


def batches(documents: Iterable[str], max_docs: int = _BATCH_DOCS,
            max_chars: int = _BATCH_CHARS) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encode_batch(tokenizer: Tokenizer, docs: list[str]) -> EncodedBatch:
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32)
    texts = [d for d in docs if d]
    ids = tokenizer.encode_batch(texts) if texts else []
    head = [np.array([tokenizer.bos_id], dtype)] if tokenizer.add_bos else []
    eos = np.array([tokenizer.eos_id], dtype)
    pieces = [p for x in ids for p in (*head, x, eos)]
    tokens = np.concatenate(pieces).astype(dtype, copy=False) if pieces else np.empty(0, dtype)
    lengths = np.fromiter((x.size + 1 + len(head) for x in ids), np.int64, len(ids))
    return EncodedBatch(len(docs), tokens, lengths)


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer
    # One thread per worker: the processes are the parallelism (the tokenizers library
    # would otherwise start a thread pool in each).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _encode_in_worker(docs: list[str]) -> EncodedBatch:
    return encode_batch(_worker_tokenizer, docs)


def _context() -> mp.context.BaseContext:
    # fork: the workers inherit the tokenizer and start at once; spawn where there is none.
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else "spawn")


def encode_documents(documents: Iterable[str], tokenizer: Tokenizer, *,
                     workers: int = 1) -> Iterator[EncodedBatch]:
    """The documents' framed tokens, batch by batch, in document order."""
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    if workers == 1:
        for docs in batches(documents):
            yield encode_batch(tokenizer, docs)
        return
    # Forked children of a process that has used the tokenizers library's threads warn and
    # turn them off; saying so in the environment at the fork keeps them quiet.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = _context().Pool(workers, initializer=_init_worker, initargs=(tokenizer,))
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    with pool:
        pending: deque = deque()
        for docs in batches(documents):
            pending.append(pool.apply_async(_encode_in_worker, (docs,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


__all__ = ["EncodedBatch", "batches", "encode_batch", "encode_documents"]
