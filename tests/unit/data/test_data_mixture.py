"""Weighted mixtures: the realised shares track the weights within one sample at every
prefix, each source follows its own seeded stream, a resume continues the exact sequence,
and a resumed training run logs the uninterrupted run's losses and per-source val losses."""

import json
import shutil

import numpy as np
import pytest
import torch

from moetrain.config.schema import ConfigError, DataConfig, DataSourceConfig
from moetrain.data import (
    ByteTokenizer,
    GlobalBatchSampler,
    MixtureSampler,
    build_data,
    open_tokenizer,
    train_bpe,
    write_token_dataset,
)
from moetrain.data.shards import open_split
from moetrain.metrics import read_metrics
from moetrain.train.main import run
from tests.conftest import compose, oracle


def _source_streams(sampler, batch):
    """Split a global batch into (source, local index) pairs."""
    out = []
    for i in batch:
        k = int(np.searchsorted(sampler.offsets, i, side="right")) - 1
        out.append((k, i - sampler.offsets[k]))
    return out


@pytest.mark.parametrize("weights", [(0.3, 0.7), (0.2, 0.3, 0.5), (1, 1, 6)])
def test_realised_mixture_tracks_the_weights(weights):
    sizes = [7, 50, 13][:len(weights)]
    s = MixtureSampler(sizes, weights, global_batch_size=8, seed=3)
    picks = [k for _ in range(125) for k, _ in _source_streams(s, s.next_global_batch())]
    assert len(picks) == 1000
    w = np.array(weights, dtype=float) / sum(weights)
    counts = np.cumsum(np.eye(len(w))[picks], axis=0)  # per prefix n = 1..1000
    dev = np.abs(counts - np.outer(np.arange(1, 1001), w)).max()
    realised = counts[-1] / 1000
    print(f"\nweights {np.round(w, 4).tolist()}: realised over 1000 samples "
          f"{realised.tolist()}, max |count - w * n| over all prefixes {dev:.3f} samples")
    assert dev < 1  # so every share over 1000 samples is within 1/1000 of its weight
    assert np.abs(realised - w).max() < 1e-3


def test_each_source_follows_its_seeded_stream_and_resume_continues():
    sizes, seed = [5, 9], 11
    s = MixtureSampler(sizes, [0.4, 0.6], global_batch_size=6, seed=seed)
    pairs = [p for _ in range(10) for p in _source_streams(s, s.next_global_batch())]
    for k, n in enumerate(sizes):  # epochs e of source k: randperm(seed + e + (k << 32))
        ref = [i for e in range(8) for i in torch.randperm(
            n, generator=torch.Generator().manual_seed(seed + e + (k << 32))).tolist()]
        mine = [i for kk, i in pairs if kk == k]
        assert mine == ref[:len(mine)] and len(mine) > 2 * n  # several epochs

    # Resume mid-epoch: a fresh sampler loaded from the state continues the sequence.
    a = MixtureSampler(sizes, [0.4, 0.6], 6, seed)
    for _ in range(3):
        a.next_global_batch()
    state = json.loads(json.dumps(a.state_dict()))  # as the checkpoint stores it
    b = MixtureSampler(sizes, [0.4, 0.6], 6, seed)
    b.load_state_dict(state)
    assert [b.next_global_batch() for _ in range(5)] == [a.next_global_batch() for _ in range(5)]
    with pytest.raises(ValueError, match="data mixture was"):
        MixtureSampler(sizes, [0.5, 0.5], 6, seed).load_state_dict(state)
    with pytest.raises(ValueError, match="one data source"):
        b.load_state_dict(GlobalBatchSampler(14, 6, seed).state_dict())

    # One source: the same stream as GlobalBatchSampler.
    one, ref = MixtureSampler([9], [1.0], 4, seed), GlobalBatchSampler(9, 4, seed)
    assert [one.next_global_batch() for _ in range(7)] == [ref.next_global_batch()
                                                           for _ in range(7)]


def _dirs(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "moe", "router", "expert", "token"]
    out = {}
    for name, n, sep in (("web", 40, " "), ("code", 60, "_")):
        docs = [sep.join(rng.choice(words, int(rng.integers(10, 40)))) for _ in range(n)]
        out[name] = write_token_dataset(docs, tmp_path / name, ByteTokenizer(), val_fraction=0.1,
                                        min_val_tokens=200, progress=False)
    return out


def test_mixture_bundle_and_tokenizer_check(tmp_path):
    dirs = _dirs(tmp_path)
    cfg = DataConfig(sources=[DataSourceConfig(str(dirs["web"]), 0.3),
                              DataSourceConfig(str(dirs["code"]), 0.7, "py")])
    b = build_data(cfg, 16)
    assert [s.name for s in b.sources] == ["web", "py"] and b.mixture
    assert len(b.train) == sum(len(s.train) for s in b.sources)
    sampler = b.sampler(8, 0)
    batch = sampler.next_global_batch()
    inputs, targets = b.train.get_batch(batch)
    for row, (k, i) in zip(range(8), _source_streams(sampler, batch)):
        ref = b.sources[k].train.sample(i)
        assert inputs[row].tolist() == ref[:-1].tolist() and targets[row].tolist() == \
            ref[1:].tolist()
    assert b.val_weights == {"web": 0.3, "py": 0.7}

    with pytest.raises(ConfigError, match="repeat"):
        build_data(DataConfig(sources=[DataSourceConfig(str(dirs["web"])),
                                       DataSourceConfig(str(dirs["web"]))]), 16)
    oracle("tokenizers")
    docs = ["some words here and there"] * 20
    bpe = write_token_dataset(docs, tmp_path / "bpe", train_bpe(docs, 270, progress=False),
                              progress=False)
    with pytest.raises(ConfigError, match="different tokenizers.*byte, vocab 257 vs bpe"):
        build_data(DataConfig(sources=[DataSourceConfig(str(dirs["web"])),
                                       DataSourceConfig(str(bpe))]), 4)
    # A second source prepared with the first one's tokenizer (--tokenizer DATA_DIR) mixes.
    other = write_token_dataset(["other words"] * 20, tmp_path / "bpe2", open_tokenizer(bpe),
                                progress=False)
    mixed = build_data(DataConfig(sources=[DataSourceConfig(str(bpe)),
                                           DataSourceConfig(str(other))]), 4)
    assert mixed.tokenizer.kind == "bpe" and mixed.vocab_size == mixed.tokenizer.vocab_size


def test_mixture_training_resumes_exactly(tiny_overrides, tmp_path):
    """A prepared directory mixed with a Megatron dataset (the byte-level tokens of the
    other directory's documents, each with EOS, as preprocess_data.py --append-eod writes)."""
    idx = oracle("megatron.core.datasets.indexed_dataset")
    dirs = _dirs(tmp_path)
    tokens = np.concatenate([np.asarray(m) for split in ("train", "val")
                             for m in open_split(dirs["code"], split)])
    docs = np.split(tokens, np.flatnonzero(tokens == 256) + 1)[:-1]
    builder = idx.IndexedDatasetBuilder(str(tmp_path / "code.bin"), dtype=np.uint16)
    for d in docs:
        builder.add_document(torch.from_numpy(d.astype(np.int64)), [d.size])
    builder.finalize(str(tmp_path / "code.idx"))
    run_dir = tmp_path / "mix"
    overrides = [o for o in tiny_overrides if not o.startswith("run.dir")] + [
        f"run.dir={run_dir}", "checkpoint.every=3", "checkpoint.keep=0",
        (f"data.sources=[{{path: {dirs['web']}, weight: 0.3}}, "
         f"{{path: 'megatron:{tmp_path / 'code'}', weight: 0.7, name: py}}]")]
    run(compose(overrides))
    ref = read_metrics(run_dir / "metrics.jsonl")
    # A run killed after its step-3 checkpoint, resumed.
    shutil.rmtree(run_dir / "checkpoints" / "step_0000006")
    run(compose(overrides))
    got = read_metrics(run_dir / "metrics.jsonl")

    def rows(rs, key):
        return [(r["step"], r[key]) for r in rs if key in r]

    assert [s for s, _ in rows(got, "loss")] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "grad_norm", "val_loss", "val_loss/web", "val_loss/py"):
        assert rows(got, key) == rows(ref, key), key
    assert [s for s, _ in rows(got, "val_loss/web")] == [0, 3, 6]
    for r in (r for r in got if "val_loss/web" in r):
        val = next(v["val_loss"] for v in got if "val_loss" in v and v["step"] == r["step"])
        assert val == pytest.approx(0.3 * r["val_loss/web"] + 0.7 * r["val_loss/py"], rel=1e-6)
