"""Shard writer/reader and TokenDataset, checked token-exactly against an in-memory stream."""

import json
import os

import numpy as np
import pytest
import torch

from moetrain.config.schema import ConfigError
from moetrain.data import ByteTokenizer, ShardError, SplitError, TokenDataset, write_token_dataset
from moetrain.data.shards import open_split, publish_dir, read_meta


def _docs(n=20):
    rng = np.random.default_rng(0)
    return [f"doc {i} " + "xyz✓" * int(rng.integers(1, 30)) for i in range(n)]


def _reference(docs):
    tok = ByteTokenizer()
    return [np.concatenate([tok.encode(d), [tok.eos_id]]).astype(np.int64) for d in docs]


def _write(tmp_path, docs, **kw):
    kw = {"val_fraction": 0.1, "shard_tokens": 37, "progress": False} | kw
    return write_token_dataset(docs, tmp_path / "ds", ByteTokenizer(), **kw)


def _split_tokens(data_dir, split):
    return np.concatenate([np.asarray(m) for m in open_split(data_dir, split)]).astype(np.int64)


def test_writer_reader_token_exact_and_val_is_tail(tmp_path):
    docs = _docs(20)
    ref = _reference(docs)
    out = _write(tmp_path, docs)
    meta = read_meta(out)
    # val = last 10% of 20 documents = the last 2; the train/val cut is a document boundary
    assert meta["num_documents"] == {"train": 18, "val": 2}
    train, val = _split_tokens(out, "train"), _split_tokens(out, "val")
    np.testing.assert_array_equal(train, np.concatenate(ref[:18]))
    np.testing.assert_array_equal(val, np.concatenate(ref[18:]))
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["eos_id"] == 256
    for split, toks in (("train", train), ("val", val)):
        counts = [e["tokens"] for e in meta["splits"][split]]
        assert len(counts) == -(-toks.size // 37) and all(c == 37 for c in counts[:-1])
        assert meta["num_tokens"][split] == toks.size
    assert not any(p.name.startswith(".ds") for p in tmp_path.iterdir())  # temp dir is gone


def test_val_grows_to_min_tokens_and_empty_docs_skipped(tmp_path):
    docs = ["a" * 10] * 8 + [""] * 300 + ["b" * 10, "c" * 10]  # a batch of only empty docs
    out = _write(tmp_path, docs, min_val_tokens=30)
    meta = read_meta(out)
    # 10 non-empty documents of 11 tokens: 1 by count, grown to 3 (33 >= 30 tokens)
    assert meta["num_documents"] == {"train": 7, "val": 3}
    assert _split_tokens(out, "val").tolist() == ([97] * 10 + [256]) + \
        ([98] * 10 + [256]) + ([99] * 10 + [256])
    with pytest.raises(SplitError, match="at least 2"):
        _write(tmp_path / "one", ["only one"])
    with pytest.raises(SplitError, match="min_val_tokens"):
        _write(tmp_path / "small", ["x", "y", "z"], min_val_tokens=100)


def test_dataset_samples_span_shards(tmp_path):
    docs = _docs(20)
    stream = np.concatenate(_reference(docs)[:18])
    out = _write(tmp_path, docs)
    S = 16
    ds = TokenDataset(out, "train", S)
    assert len(ds) == (stream.size - 1) // S
    idx = list(range(len(ds)))[::-1]  # every sample; with 37-token shards many cross a file
    x, y = ds.get_batch(idx)
    assert x.dtype == torch.int64 and x.shape == (len(ds), S) and y.shape == (len(ds), S)
    for b, i in enumerate(idx):
        np.testing.assert_array_equal(x[b].numpy(), stream[i * S:i * S + S])
        np.testing.assert_array_equal(y[b].numpy(), stream[i * S + 1:i * S + S + 1])
    with pytest.raises(IndexError):
        ds.get_batch([len(ds)])


def test_dataset_too_short_names_fields(tmp_path):
    out = _write(tmp_path, _docs(20))
    n_val = read_meta(out)["num_tokens"]["val"]
    TokenDataset(out, "val", n_val - 1)  # exactly one sample fits
    with pytest.raises(ConfigError, match=r"train\.seq_len=.*data\.val_fraction"):
        TokenDataset(out, "val", n_val)


def test_corruption_is_detected(tmp_path):
    out = _write(tmp_path, _docs(20))
    first = out / "train_00001.bin"
    # flipped byte (before the first open): checksum
    data = bytearray(first.read_bytes())
    data[3] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train_00001\.bin fails its checksum.*delete"):
        TokenDataset(out, "train", 8)
    data[3] ^= 0xFF
    first.write_bytes(bytes(data))
    TokenDataset(out, "train", 8)  # repaired: opens (and records the verification)
    assert json.loads((out / ".verified.json").read_text())["train_00001.bin"][0] == 74
    # flipped byte after verification: the file's new mtime forces a re-hash
    data[5] ^= 0x01
    first.write_bytes(bytes(data))
    st = first.stat()
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ShardError, match="fails its checksum"):
        TokenDataset(out, "train", 8)
    # truncated: size check, always on
    with open(out / "val_00000.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ShardError, match=r"val_00000\.bin has 10 bytes.*prepare_data"):
        TokenDataset(out, "val", 4)
    (out / "val_00000.bin").unlink()
    with pytest.raises(ShardError, match=r"val_00000\.bin is missing"):
        TokenDataset(out, "val", 4)


def test_publish_loser_keeps_existing(tmp_path):
    out = _write(tmp_path, _docs(20))
    before = _split_tokens(out, "train")
    tmp = tmp_path / ".ds.tmp-other"
    tmp.mkdir()
    (tmp / "meta.json").write_text("{}")
    assert publish_dir(tmp, out) is False and not tmp.exists()
    np.testing.assert_array_equal(_split_tokens(out, "train"), before)
    # an existing non-data directory is never silently replaced
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x").write_text("x")
    tmp.mkdir()
    with pytest.raises(ShardError, match="not a complete data directory"):
        publish_dir(tmp, junk)


def test_read_meta_errors(tmp_path):
    with pytest.raises(ShardError, match="prepare_data"):
        read_meta(tmp_path)
    out = _write(tmp_path, _docs(20))
    meta = json.loads((out / "meta.json").read_text())
    meta["version"] = 99
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ShardError, match="version 99"):
        read_meta(out)


class _WideTokenizer(ByteTokenizer):
    """Byte ids shifted past 65535, to force the uint32 shard dtype."""

    vocab_size, eos_id = 70_000, 69_999

    def encode(self, text):
        return super().encode(text).astype(np.uint32) + 65_536

    def meta(self):
        return {"kind": "wide", "vocab_size": self.vocab_size, "eos_id": self.eos_id}


def test_uint32_shards_for_large_vocab(tmp_path):
    out = write_token_dataset(["ab", "c"], tmp_path / "w", _WideTokenizer(), val_fraction=0.1,
                              shard_tokens=2, progress=False)
    assert read_meta(out)["dtype"] == "uint32"
    assert (out / "train_00000.bin").stat().st_size == 2 * 4
    assert _split_tokens(out, "train").tolist() == [65_536 + 97, 65_536 + 98, 69_999]
    assert _split_tokens(out, "val").tolist() == [65_536 + 99, 69_999]
