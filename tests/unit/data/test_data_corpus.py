"""Default corpus (Python stdlib text) and build_data: content, determinism, caching, races."""

import threading
from pathlib import Path

import numpy as np
import pytest

from moetrain.config.schema import ConfigError, DataConfig
from moetrain.data import (
    ByteTokenizer,
    build_data,
    corpus,
    default_corpus_dir,
    ensure_default_corpus,
    shards,
)
from moetrain.data.shards import open_split, read_meta

MIB = 0.05  # 52428 bytes of text


def _stream(data_dir):
    return np.concatenate([np.asarray(m) for s in ("train", "val") for m in open_split(data_dir, s)])


def _cfg(cache, **kw):
    return DataConfig(cache_dir=str(cache), default_corpus_mb=MIB, **kw)


def test_stdlib_selection():
    files = corpus.stdlib_files()
    root = corpus._stdlib_dir()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and len(rel) > 100
    assert all(r.endswith(".py") for r in rel)
    parts = {p for r in rel for p in Path(r).parts[:-1]}
    assert not parts & {"site-packages", "test", "tests", "__pycache__"}


def test_default_corpus_content(tmp_path):
    out = ensure_default_corpus(_cfg(tmp_path), progress=False)
    meta = read_meta(out)
    stream = _stream(out)
    n_docs = meta["num_documents"]["train"] + meta["num_documents"]["val"]
    eos = ByteTokenizer.eos_id
    # exactly 0.05 MiB of text plus one EOS per document, documents in sorted file order
    assert stream.size == int(MIB * 2**20) + n_docs
    assert int((stream == eos).sum()) == n_docs and stream[-1] == eos
    first = corpus.stdlib_files()[0].read_bytes()
    assert stream[: len(first)].tobytes() == np.frombuffer(first, np.uint8).astype(np.uint16).tobytes()
    assert stream[len(first)] == eos
    # val holds whole trailing documents and at least MIN_VAL_TOKENS tokens
    assert meta["num_tokens"]["val"] >= corpus.MIN_VAL_TOKENS
    assert open_split(out, "train")[-1][-1] == eos


def test_default_corpus_deterministic_and_cached(tmp_path, monkeypatch):
    a = ensure_default_corpus(_cfg(tmp_path / "a"), progress=False)
    b = ensure_default_corpus(_cfg(tmp_path / "b"), progress=False)
    assert a.name == b.name
    np.testing.assert_array_equal(_stream(a), _stream(b))
    # the second use in the same cache opens the existing shards, it does not rebuild
    monkeypatch.setattr(corpus, "write_token_dataset", lambda *a, **k: pytest.fail("rebuilt"))
    assert ensure_default_corpus(_cfg(tmp_path / "a"), progress=False) == a


def test_default_corpus_concurrent_builds(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    published = []
    real_publish = shards.publish_dir
    monkeypatch.setattr(shards, "publish_dir",
                        lambda tmp, final: published.append(real_publish(tmp, final)) or
                        published[-1])
    barrier = threading.Barrier(3)
    results, errors = [], []

    def build():
        barrier.wait()
        try:
            results.append(ensure_default_corpus(cfg, progress=False))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert published.count(True) == 1  # one builder won; any other discarded its copy
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]  # no temp dirs left
    ref = ensure_default_corpus(_cfg(tmp_path / "ref"), progress=False)
    np.testing.assert_array_equal(_stream(results[0]), _stream(ref))


def test_cache_dir_name_encodes_settings(tmp_path, monkeypatch):
    base = default_corpus_dir(_cfg(tmp_path))
    assert base.parent == tmp_path
    assert default_corpus_dir(_cfg(tmp_path, val_fraction=0.02)) != base
    assert default_corpus_dir(DataConfig(cache_dir=str(tmp_path), default_corpus_mb=1)) != base
    monkeypatch.setenv("MOETRAIN_CACHE", str(tmp_path / "env"))
    assert default_corpus_dir(DataConfig(default_corpus_mb=MIB)).parent == tmp_path / "env"


def test_build_data_default_and_errors(tmp_path):
    bundle = build_data(_cfg(tmp_path), seq_len=32, progress=False)
    assert isinstance(bundle.tokenizer, ByteTokenizer)
    assert bundle.data_dir == default_corpus_dir(_cfg(tmp_path))
    n_train = read_meta(bundle.data_dir)["num_tokens"]["train"]
    assert len(bundle.train) == (n_train - 1) // 32
    x, y = bundle.train.get_batch([0])
    assert x[0, 1:].tolist() == y[0, :-1].tolist()
    with pytest.raises(ConfigError, match=r"data\.source=.*does not exist.*prepare_data"):
        build_data(DataConfig(source=str(tmp_path / "nope")), seq_len=32)
    with pytest.raises(ConfigError, match=r"data\.source=.*has no meta\.json"):
        build_data(DataConfig(source=str(tmp_path)), seq_len=32)
    with pytest.raises(ConfigError, match=r"data\.default_corpus_mb=0\.001"):
        ensure_default_corpus(DataConfig(cache_dir=str(tmp_path), default_corpus_mb=0.001),
                              progress=False)
