"""Corpus formats: every reader yields exactly the documents written, and the prepared token
stream equals a direct tokenization of them; the pipeline streams (bounded memory) and
--workers 2 writes byte-identical output."""

import gzip
import json
import tracemalloc

import numpy as np
import pytest

from moetrain.data import ByteTokenizer, read_meta, write_token_dataset
from moetrain.data import readers as R
from moetrain.data.encode import encode_documents
from moetrain.data.shards import open_split
from tests.conftest import load_tool, oracle

DOCS = [f"doc {i}: le chat dört 🙂 " * (1 + i % 5) + ("\nline two" if i % 3 else "")
        for i in range(40)]
DOCS[7] = ""  # an empty document: read as "", skipped by the writer


def _cat(lists):
    """Concatenate lists of token ids."""
    return [t for x in lists for t in x]


def _stream(out, split):
    return np.concatenate([np.asarray(m) for m in open_split(out, split)]).astype(np.int64)


def _byte_ref(docs):
    tok = ByteTokenizer()
    return [list(tok.encode(d)) + [256] for d in docs if d]


def _jsonl(docs, key="text"):
    return "".join(json.dumps({"id": i, key: d}) + "\n" for i, d in enumerate(docs))


def _write_arrow(path, docs, stream=True):
    pa = oracle("pyarrow")
    import pyarrow.ipc

    table = pa.table({"id": list(range(len(docs))), "text": docs})
    sink = pa.OSFile(str(path), "wb")
    writer = (pyarrow.ipc.new_stream if stream else pyarrow.ipc.new_file)(sink, table.schema)
    for batch in table.to_batches(max_chunksize=7):
        writer.write_batch(batch)
    writer.close()
    sink.close()


def _save_to_disk(directory, docs, shards=3):
    """The layout of datasets' Dataset.save_to_disk (checked against datasets 5.2): Arrow
    IPC stream files data-0000k-of-0000n.arrow, listed in order by state.json."""
    directory.mkdir(parents=True)
    cut = np.array_split(np.arange(len(docs)), shards)
    names = [f"data-{k:05d}-of-{shards:05d}.arrow" for k in range(shards)]
    for name, idx in zip(names, cut):
        _write_arrow(directory / name, [docs[i] for i in idx])
    (directory / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": n} for n in names], "_fingerprint": "0",
         "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
         "_output_all_columns": False, "_split": None}))
    (directory / "dataset_info.json").write_text(json.dumps(
        {"features": {"id": {"dtype": "int64", "_type": "Value"},
                      "text": {"dtype": "string", "_type": "Value"}}}))


def test_every_format_reads_the_documents(tmp_path):
    pa = oracle("pyarrow")
    zstd = oracle("zstandard")
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text(_jsonl(DOCS), encoding="utf-8")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(_jsonl(DOCS))
    (tmp_path / "a.jsonl.zst").write_bytes(
        zstd.ZstdCompressor().compress(_jsonl(DOCS).encode()))
    (tmp_path / "nested.jsonl").write_text(
        "".join(json.dumps({"meta": {"body": d}}) + "\n" for d in DOCS), encoding="utf-8")
    pq.write_table(pa.table({"text": DOCS, "n": list(range(len(DOCS)))}),
                   tmp_path / "a.parquet", row_group_size=6)
    _write_arrow(tmp_path / "s.arrow", DOCS, stream=True)
    _write_arrow(tmp_path / "f.arrow", DOCS, stream=False)
    _save_to_disk(tmp_path / "saved", DOCS)
    dd = tmp_path / "dict"
    _save_to_disk(dd / "train", DOCS)
    _save_to_disk(dd / "test", DOCS[:3], shards=1)
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with gzip.open(tmp_path / "t.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n\n".join(d for d in DOCS if d))

    def read(name, **kw):
        return list(R.iter_documents(R.find_inputs([str(tmp_path / name)]), **kw))

    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.parquet", "s.arrow", "f.arrow",
                 "saved", "dict"):
        assert read(name) == DOCS, name
    assert read("nested.jsonl", text_field="meta.body") == DOCS
    assert read("dict", hf_split="test") == DOCS[:3]
    paragraphs = [d for d in DOCS if d]
    assert read("t.txt.gz", docs="paragraph") == [p + "\n" for p in paragraphs[:-1]] + \
        paragraphs[-1:]  # a paragraph keeps its lines' ends
    assert R.count_rows(R.find_inputs([str(tmp_path / "a.parquet")])) == len(DOCS)

    # A directory: known formats only, sorted, datasets directories as units, no .json
    # config files, hidden files skipped.
    (tmp_path / ".hidden.jsonl").write_text(_jsonl(["x"]))
    (tmp_path / "config.json").write_text("{}")
    found = [(i.path.name, i.format) for i in R.find_inputs([str(tmp_path)])]
    assert found == [("a.jsonl", "jsonl"), ("a.jsonl.gz", "jsonl"), ("a.jsonl.zst", "jsonl"),
                     ("a.parquet", "parquet"), ("dict", "hf"), ("f.arrow", "arrow"),
                     ("nested.jsonl", "jsonl"), ("s.arrow", "arrow"), ("saved", "hf"),
                     ("t.txt.gz", "text")]

    with pytest.raises(R.CorpusError, match=r"a.jsonl:1: no field 'body'.*--text-field"):
        read("a.jsonl", text_field="body")
    with pytest.raises(R.CorpusError, match=r"no column 'body'.*--text-column"):
        read("a.parquet", text_column="body")
    with pytest.raises(R.CorpusError, match="--hf-split"):
        read("dict", hf_split="validation")
    (tmp_path / "notes.dat").write_text("?")
    with pytest.raises(R.CorpusError, match="--format"):
        R.find_inputs([str(tmp_path / "notes.dat")])
    assert R.find_inputs([str(tmp_path / "notes.dat")], fmt="text")[0].format == "text"


def test_prepare_jsonl_zst_token_exact(tmp_path):
    zstd = oracle("zstandard")
    half = len(DOCS) // 2
    src = tmp_path / "src"
    src.mkdir()
    (src / "part0.jsonl.zst").write_bytes(
        zstd.ZstdCompressor().compress(_jsonl(DOCS[:half], "content").encode()))
    (src / "part1.jsonl").write_text(_jsonl(DOCS[half:], "content"), encoding="utf-8")
    out = tmp_path / "out"
    tool = load_tool("prepare_data")
    assert tool.main(["--input", str(src), "--output", str(out), "--text-field", "content",
                      "--val-fraction", "0.1", "--min-val-tokens", "10", "--shard-tokens",
                      "500", "--no-progress"]) == 0
    ref = _byte_ref(DOCS)
    meta = read_meta(out)
    n_val = meta["num_documents"]["val"]
    assert n_val == int(len(ref) * 0.1) == 3
    assert _stream(out, "train").tolist() == _cat(ref[:-n_val])
    assert _stream(out, "val").tolist() == _cat(ref[-n_val:])
    assert meta["source"]["formats"] == ["jsonl"]


def test_reader_and_writer_stream(tmp_path):
    """Bounded memory: the reader is lazy (a broken line far ahead is not read until it is
    reached), the writer puts each batch on disk before asking for far more documents, and
    the traced peak while streaming a corpus is a small part of it."""
    lines = _jsonl(DOCS) + "{broken\n"
    (tmp_path / "c.jsonl").write_text(lines, encoding="utf-8")
    docs = R.iter_documents(R.find_inputs([str(tmp_path / "c.jsonl")]))
    assert [next(docs) for _ in range(len(DOCS))] == DOCS  # not an error yet
    with pytest.raises(R.CorpusError, match="c.jsonl:41"):
        next(docs)

    # Documents of 1-2 KB pulled one at a time: how many the writer asks for beyond those
    # whose tokens are already in the shard files, and the traced peak while streaming
    # 1,500 and 6,000 of them (it must not grow with the corpus).
    def run(n):
        out = tmp_path / f"w{n}"
        ends = np.cumsum([len(f"{i} ") + 1000 + i % 1000 + 1 for i in range(n)])  # tokens
        ahead, peak = [0], []

        def gen():
            tracemalloc.reset_peak()
            for i in range(n):
                on_disk = sum(p.stat().st_size for p in tmp_path.glob(f".{out.name}.tmp-*/all_*"))
                done = int(np.searchsorted(ends, on_disk // 2, side="right"))
                ahead[0] = max(ahead[0], i - done)
                yield f"{i} " + "x" * (1000 + i % 1000)
            peak.append(tracemalloc.get_traced_memory()[1])  # over the streaming phase

        tracemalloc.start()
        try:
            write_token_dataset(gen(), out, ByteTokenizer(), val_fraction=0.01,
                                shard_tokens=1 << 20, progress=False)
        finally:
            tracemalloc.stop()
        return ahead[0], peak[0], int(ends[-1]) * 2

    (a1, p1, b1), (a2, p2, b2) = run(1500), run(6000)
    print(f"\nwriter: at most {max(a1, a2)} documents read ahead of the shard files; traced "
          f"peak {p1 / 2**20:.2f} MiB for a {b1 / 2**20:.1f} MiB token stream, "
          f"{p2 / 2**20:.2f} MiB for {b2 / 2**20:.1f} MiB")
    assert max(a1, a2) <= 256  # one encode batch
    assert p2 < 1.1 * p1 and p2 < b2 / 4


def test_encode_documents_workers_bounded_and_ordered():
    """--workers 2: the same batches in the same order, and the reader is held back to
    2 * workers batches in flight (plus the one being cut)."""
    pulled = []

    def gen():
        for i in range(3000):
            pulled.append(i)
            yield f"d{i} ✓"

    tok = ByteTokenizer()
    one = list(encode_documents([f"d{i} ✓" for i in range(3000)], tok, workers=1))
    got, lead = [], 0
    for b in encode_documents(gen(), tok, workers=2):
        got.append(b)
        done = sum(x.num_documents for x in got)
        lead = max(lead, len(pulled) - done)
    assert lead <= (2 * 2 + 1) * 256
    assert [b.num_documents for b in got] == [b.num_documents for b in one]
    for a, b in zip(one, got):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.lengths, b.lengths)


def test_prepare_workers_byte_identical(tmp_path):
    """--workers 1 and 2: the same shard bytes and the same meta.json."""
    src = tmp_path / "c.jsonl"
    src.write_text(_jsonl(DOCS * 20), encoding="utf-8")
    tool = load_tool("prepare_data")
    for w in (1, 2):
        assert tool.main(["--input", str(src), "--output", str(tmp_path / f"w{w}"), "--workers",
                          str(w), "--shard-tokens", "3000", "--min-val-tokens", "10",
                          "--no-progress"]) == 0
    files = sorted(p.name for p in (tmp_path / "w1").iterdir() if not p.name.startswith("."))
    assert files == sorted(p.name for p in (tmp_path / "w2").iterdir()
                           if not p.name.startswith("."))
    assert len([f for f in files if f.startswith("train_")]) > 3
    for name in files:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
    assert _stream(tmp_path / "w2", "train").tolist() + _stream(tmp_path / "w2", "val").tolist() \
        == _cat(_byte_ref(DOCS * 20))


def test_truncated_or_damaged_compressed_files_are_named(tmp_path):
    """zstd's streaming reader ends a cut-off frame quietly: the corpus would be short with
    no error. A truncated .zst or .gz, or a .gz that is not gzip, stops with the file; a
    file of several zstd frames reads whole."""
    zstandard = oracle("zstandard")
    from moetrain.data.readers import CorpusError, open_text

    text = "".join(f"line {i} " + "x" * 40 + "\n" for i in range(20000))
    c = zstandard.ZstdCompressor()
    whole = c.compress(text.encode())
    files = {"multi.txt.zst": c.compress(text[:999].encode()) + c.compress(text[999:].encode()),
             "cut.txt.zst": whole[:len(whole) // 2],
             "cut.txt.gz": gzip.compress(text.encode())[:2000],
             "bad.txt.gz": b"not gzip at all"}
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
    with open_text(tmp_path / "multi.txt.zst") as f:
        assert f.read() == text
    for name in ("cut.txt.zst", "cut.txt.gz", "bad.txt.gz"):
        with (pytest.raises(CorpusError, match=rf"{name}: the compressed file is truncated"),
              open_text(tmp_path / name) as f):
            f.read()
