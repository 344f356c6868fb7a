"""tools/prepare_data.py end to end on a tiny text directory."""

import importlib.util
from itertools import chain
from pathlib import Path

import numpy as np
import pytest

from moetrain.config.schema import DataConfig
from moetrain.data import build_data, read_meta
from moetrain.data.shards import open_split
from moetrain.data.tokenizer import EOS_TEXT
from tests.conftest import oracle

_TOOL = Path(__file__).resolve().parents[3] / "tools" / "prepare_data.py"


def _tool():
    spec = importlib.util.spec_from_file_location("prepare_data_tool", _TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _corpus(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    texts = {f"sub/{i:02d}.txt": f"document {i}: " + "le chat dört 🙂 " * (5 + i) for i in range(12)}
    texts["skip.md"] = "not matched by --glob"
    for name, t in texts.items():
        (src / name).write_text(t, encoding="utf-8")
    docs = [texts[k] for k in sorted(texts) if k.endswith(".txt")]
    return src, docs


def _stream(out, split):
    return np.concatenate([np.asarray(m) for m in open_split(out, split)]).astype(np.int64)


def test_prepare_data_byte(tmp_path, capsys):
    src, docs = _corpus(tmp_path)
    out = tmp_path / "out"
    args = ["--input", str(src), "--output", str(out), "--shard-tokens", "100",
            "--val-fraction", "0.2", "--min-val-tokens", "50", "--no-progress"]
    assert _tool().main(args) == 0
    printed = capsys.readouterr().out
    assert f"moetrain-train data.source={out}" in printed and "train 10, val 2" in printed
    meta = read_meta(out)
    assert meta["num_documents"] == {"train": 10, "val": 2}  # int(12 * 0.2) = 2 trailing docs
    ref = [list(d.encode()) + [256] for d in docs]
    train_ref, val_ref = list(chain(*ref[:10])), list(chain(*ref[10:]))
    assert _stream(out, "train").tolist() == train_ref
    assert _stream(out, "val").tolist() == val_ref
    assert len(meta["splits"]["train"]) > 1
    bundle = build_data(DataConfig(source=str(out)), seq_len=16)
    assert len(bundle.val) == (len(val_ref) - 1) // 16
    with pytest.raises(SystemExit, match="--overwrite"):
        _tool().main(args)
    # A failed --overwrite build leaves the old data untouched.
    with pytest.raises(SystemExit, match="min-val-tokens"):
        _tool().main(args[:-3] + ["--min-val-tokens", "100000", "--no-progress", "--overwrite"])
    assert _stream(out, "train").tolist() == train_ref
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    assert _tool().main(args + ["--overwrite", "--docs", "paragraph"]) == 0
    assert read_meta(out)["source"]["docs"] == "paragraph"


def test_prepare_data_bpe(tmp_path):
    oracle("tokenizers")
    src, docs = _corpus(tmp_path)
    out = tmp_path / "bpe"
    assert _tool().main(["--input", str(src), "--output", str(out), "--tokenizer", "bpe",
                         "--vocab-size", "300", "--min-val-tokens", "10", "--no-progress"]) == 0
    meta = read_meta(out)
    assert (out / "tokenizer.json").is_file() and meta["tokenizer"]["kind"] == "bpe"
    bundle = build_data(DataConfig(source=str(out)), seq_len=8)
    tok = bundle.tokenizer
    assert tok.vocab_size == meta["tokenizer"]["vocab_size"] <= 300
    stream = np.concatenate([_stream(out, "train"), _stream(out, "val")])
    assert stream.size < sum(len(d.encode()) for d in docs)  # BPE compresses
    assert tok.decode(stream) == "".join(d + EOS_TEXT for d in docs)
