"""Megatron-LM indexed datasets, written by megatron-core's own IndexedDatasetBuilder (the
oracle): moetrain reads back exactly its documents and tokens, in place, splits them by
whole documents, and checks the token ids against the vocabulary."""

import numpy as np
import pytest
import torch

from moetrain.config.schema import ConfigError, DataConfig
from moetrain.data import build_data, read_index
from moetrain.data.megatron import split_documents, token_range
from tests._hf_tokenizer import build_tiny_hf_tokenizer
from tests.conftest import oracle

SEQ = 8


def _cat(lists):
    """Concatenate lists of token ids."""
    return [t for x in lists for t in x]


def _documents(rng, vocab):
    """Documents as lists of sequences (a document of two sequences; empty documents)."""
    docs = [[rng.integers(0, vocab, int(n)).tolist()] for n in rng.integers(1, 40, 12)]
    docs[3] = [[]]  # an empty sequence
    docs[5] = []  # no sequence at all (end_document right away)
    docs[8] = [rng.integers(0, vocab, 9).tolist(), rng.integers(0, vocab, 4).tolist()]
    last = rng.integers(0, vocab, 30).tolist()
    last[7] = vocab - 1  # the largest id the vocabulary allows
    docs.append([last])
    return docs


def _build(prefix, docs, dtype):
    idx = oracle("megatron.core.datasets.indexed_dataset")
    b = idx.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for i, doc in enumerate(docs):
        if i % 2 and len(doc) == 1:
            b.add_document(torch.tensor(doc[0], dtype=torch.int64), [len(doc[0])])
        else:
            for seq in doc:
                b.add_item(torch.tensor(seq, dtype=torch.int64))
            b.end_document()
    b.finalize(f"{prefix}.idx")
    return idx


@pytest.mark.parametrize("dtype,vocab", [(np.int32, 100_000), (np.uint16, 300)])
def test_reads_back_megatron_documents(tmp_path, dtype, vocab):
    docs = _documents(np.random.default_rng(0), vocab)
    prefix = tmp_path / "corpus_text_document"
    idx = _build(prefix, docs, dtype)
    flat = [_cat(d) for d in docs]

    index = read_index(prefix)
    assert index.dtype == np.dtype(dtype) and index.num_documents == len(docs)
    assert [index.document(d).tolist() for d in range(len(docs))] == flat
    # megatron-core's own reader agrees, sequence by sequence
    ref = idx.IndexedDataset(str(prefix))
    assert np.array_equal(ref.document_indices, index.document_indices)
    assert [ref[i].tolist() for i in range(len(ref))] == [s for d in docs for s in d]
    assert isinstance(index.tokens, np.memmap)  # in place, not converted

    # Training data: the last val_fraction of the documents (grown to one sample).
    cfg = DataConfig(source=f"megatron:{prefix}", val_fraction=0.1,
                     cache_dir=str(tmp_path / "cache"))
    bundle = build_data(cfg, SEQ, model_vocab_size=vocab)
    n_val = 1  # int(13 * 0.1) = 1, and its 30 tokens hold one sample of 8 + 1
    assert split_documents(index, 0.1, SEQ + 1) == sum(len(f) for f in flat[:-n_val])
    train, val = bundle.train, bundle.val
    assert train.tokens(0, train.num_tokens).tolist() == _cat(flat[:-n_val])
    assert val.tokens(0, val.num_tokens).tolist() == _cat(flat[-n_val:])
    assert len(train) == (train.num_tokens - 1) // SEQ
    assert bundle.tokenizer is None and bundle.vocab_size == vocab
    assert bundle.sampler(4, 0).num_samples == len(train)

    # A token id at the vocabulary's edge: the error names the file.
    with pytest.raises(ConfigError, match=rf"{prefix}.bin holds token id {vocab - 1}, outside "
                                          rf"the model's vocabulary \[0, {vocab - 1}\)"):
        build_data(cfg, SEQ, model_vocab_size=vocab - 1)
    assert token_range(index, tmp_path / "cache") == (min(min(f) for f in flat if f), vocab - 1)
    with pytest.raises(ConfigError, match="carries no tokenizer: set model.vocab_size"):
        build_data(cfg, SEQ)


def test_megatron_tokenizer_and_bad_files(tmp_path):
    prefix = tmp_path / "d"
    _build(prefix, [[list(range(i, i + 20))] for i in range(5)], np.int32)
    tok_dir = build_tiny_hf_tokenizer(tmp_path / "tok", ["some text for a tokenizer"] * 5)
    bundle = build_data(DataConfig(source=f"megatron:{prefix}", tokenizer=str(tok_dir),
                                   cache_dir=str(tmp_path / "c")), SEQ)
    assert bundle.tokenizer.kind == "hf" and bundle.vocab_size == bundle.tokenizer.vocab_size

    with pytest.raises(ConfigError, match=r"d_missing.idx does not exist"):
        build_data(DataConfig(source=f"megatron:{tmp_path / 'd_missing'}"), SEQ,
                   model_vocab_size=50)
    raw = bytearray((tmp_path / "d.idx").read_bytes())
    raw[0:1] = b"X"
    (tmp_path / "bad.idx").write_bytes(bytes(raw))
    (tmp_path / "bad.bin").write_bytes((tmp_path / "d.bin").read_bytes())
    with pytest.raises(ConfigError, match="bad.idx is not a Megatron indexed dataset.*magic"):
        read_index(tmp_path / "bad")
    (tmp_path / "short.idx").write_bytes((tmp_path / "d.idx").read_bytes())
    (tmp_path / "short.bin").write_bytes((tmp_path / "d.bin").read_bytes()[:-4])
    with pytest.raises(ConfigError, match="short.bin .*describes 100 int32 tokens"):
        read_index(tmp_path / "short")
