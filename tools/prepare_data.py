"""Tokenize a corpus into a moetrain data directory (memory-mapped token shards).

    python tools/prepare_data.py --input corpus/ --output data/mycorpus
    python tools/prepare_data.py --input shards/*.jsonl.zst --output data/llama \\
        --tokenizer path/to/Llama-3.2-1B --workers 8
    python tools/prepare_data.py --input a.txt b.txt --output data/bpe --tokenizer bpe \\
        --vocab-size 8192
    moetrain-train data.source=data/mycorpus

Inputs (``--input``, files and directories, in the order given): text files, JSON Lines
(the ``--text-field`` of each object), Parquet and Arrow files (``--text-column``), any of
them as ``.gz``/``.zst`` when line-oriented (text, JSONL), and directories written by
Hugging Face ``datasets``' ``save_to_disk``. The format comes from the file name unless
``--format`` says. Other directories are searched recursively (``--glob``, default every
file of a known format) in sorted order. A text file is one document unless ``--docs line``
/ ``--docs paragraph`` split it. Documents stream: memory does not grow with the corpus.

``--tokenizer``: ``byte`` (UTF-8 bytes, no training), ``bpe`` (trains a byte-level BPE on
the same documents first), or a PATH to a model's own Hugging Face tokenizer (a
``tokenizer.json`` or a model directory), copied into ``OUTPUT/tokenizer/``, or to another
data directory (its tokenizer as it is: sources to mix must share one). Each document
is written as ``[BOS] + tokens + [EOS]``: EOS always (``--eos-token``, default the
tokenizer's eos_token), BOS when the tokenizer adds one itself (``--bos``). The last
``--val-fraction`` of the documents is held out for validation. ``--workers N`` tokenizes in
N processes; the output is byte-identical to one worker's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import moetrain.data as mdata
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import moetrain.data as mdata
from moetrain.data import readers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True,
                    help="files and/or directories (text, JSONL, Parquet, Arrow, .gz/.zst, "
                         "datasets.save_to_disk directories)")
    ap.add_argument("--output", required=True, help="data directory to create")
    ap.add_argument("--tokenizer", default="byte",
                    help="byte, bpe, or PATH: a Hugging Face tokenizer.json or model "
                         "directory, or a data directory (its tokenizer)")
    ap.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary (with EOS)")
    ap.add_argument("--eos-token", default=None,
                    help="PATH tokenizers: the token that ends each document (default: the "
                         "tokenizer's eos_token)")
    ap.add_argument("--bos", choices=["auto", "always", "never"], default="auto",
                    help="PATH tokenizers: start each document with BOS (auto: iff the "
                         "tokenizer adds it itself)")
    ap.add_argument("--format", choices=["auto", *readers.FORMATS], default="auto",
                    help="input format (auto: from the file names)")
    ap.add_argument("--text-field", default="text",
                    help="JSONL: the field holding the text (a.b reaches into objects)")
    ap.add_argument("--text-column", default="text", help="Parquet/Arrow/datasets: the column")
    ap.add_argument("--hf-split", default="train",
                    help="the split of a saved datasets.DatasetDict")
    ap.add_argument("--val-fraction", type=float, default=0.01,
                    help="share of the documents (the last ones) held out for validation")
    ap.add_argument("--min-val-tokens", type=int, default=4097,
                    help="grow the val split to at least this many tokens (one sample at "
                         "train.seq_len needs seq_len + 1)")
    ap.add_argument("--glob", default=None,
                    help="file pattern inside input directories (default: every file of a "
                         "known format)")
    ap.add_argument("--docs", choices=["file", "line", "paragraph"], default="file",
                    help="text files: what one document is")
    ap.add_argument("--workers", type=int, default=1,
                    help="tokenizing processes (same output for any count)")
    ap.add_argument("--shard-tokens", type=int, default=mdata.DEFAULT_SHARD_TOKENS,
                    help="max tokens per shard file")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def make_tokenizer(args: argparse.Namespace, docs) -> mdata.Tokenizer:
    if args.tokenizer == "byte":
        return mdata.ByteTokenizer()
    if args.tokenizer == "bpe":
        print(f"training a byte-level BPE (vocab {args.vocab_size})")
        return mdata.train_bpe(docs(), args.vocab_size, progress=not args.no_progress)
    path = Path(args.tokenizer).expanduser()
    if (path / "meta.json").is_file():  # another data directory's tokenizer, as it is
        return mdata.open_tokenizer(path)
    if not path.exists():
        raise SystemExit(f"error: --tokenizer {args.tokenizer}: not byte, bpe, or an existing "
                         f"tokenizer.json / Hugging Face model directory")
    add_bos = {"auto": None, "always": True, "never": False}[args.bos]
    try:
        return mdata.HFTokenizer(path, eos_token=args.eos_token, add_bos=add_bos)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --tokenizer {args.tokenizer}: {e}") from None


class _Counter:
    """Counts the UTF-8 bytes of the documents that pass through (throughput report)."""

    def __init__(self, docs: Iterator[str]):
        self.docs, self.bytes, self.count = docs, 0, 0

    def __iter__(self) -> Iterator[str]:
        for d in self.docs:
            self.bytes += len(d.encode("utf-8", errors="replace"))
            self.count += 1
            yield d


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0 < args.val_fraction < 0.5:
        raise SystemExit(f"error: --val-fraction={args.val_fraction} must be in (0, 0.5)")
    if args.workers < 1:
        raise SystemExit(f"error: --workers={args.workers} must be >= 1")
    out = Path(args.output).expanduser()
    if out.exists() and not args.overwrite:
        raise SystemExit(f"error: --output {out} exists: pass --overwrite to replace it or "
                         f"choose another directory")
    # --overwrite builds beside the old directory and swaps at the end, so a failed or
    # interrupted build leaves the old data in place.
    build_to = out.with_name(f".{out.name}.overwrite-{os.getpid()}") if out.exists() else out
    try:
        inputs = readers.find_inputs(args.input, args.glob, args.format)
    except readers.CorpusError as e:
        raise SystemExit(f"error: {e}") from None
    progress = not args.no_progress

    def docs() -> Iterator[str]:
        return readers.iter_documents(inputs, docs=args.docs, text_field=args.text_field,
                                      text_column=args.text_column, hf_split=args.hf_split)

    try:
        tokenizer = make_tokenizer(args, docs)
        if all(i.format == "text" for i in inputs) and args.docs == "file":
            num_docs = len(inputs)
        else:
            num_docs = readers.count_rows(inputs)
        source = {"kind": "prepare_data", "inputs": [str(p) for p in args.input],
                  "files": len(inputs), "formats": sorted({i.format for i in inputs}),
                  "glob": args.glob, "docs": args.docs, "text_field": args.text_field,
                  "text_column": args.text_column}
        counted = _Counter(docs())
        t0 = time.perf_counter()
        mdata.write_token_dataset(
            counted, build_to, tokenizer,
            val_fraction=args.val_fraction,
            shard_tokens=args.shard_tokens,
            min_val_tokens=args.min_val_tokens,
            num_documents=num_docs,
            source=source,
            progress=progress,
            workers=args.workers,
        )
        seconds = time.perf_counter() - t0
    except mdata.SplitError as e:
        raise SystemExit(f"error: {e} (see --val-fraction, --min-val-tokens, --docs)") from None
    except readers.CorpusError as e:
        raise SystemExit(f"error: {e}") from None
    if build_to != out:
        shutil.rmtree(out)
        os.replace(build_to, out)
    meta = mdata.read_meta(out)
    shards = {s: len(v) for s, v in meta["splits"].items()}
    tok = meta["tokenizer"]
    tokens = meta["num_tokens"]["train"] + meta["num_tokens"]["val"]
    mb = counted.bytes / 1e6
    special = f", eos {tok['eos_id']}" + (f", bos {tok['bos_id']}" if tok.get("add_bos") else "")
    print(
        f"wrote {out}\n"
        f"  tokenizer  {tok['kind']} (vocab {tok['vocab_size']}{special}, {meta['dtype']})\n"
        f"  documents  train {meta['num_documents']['train']}, val {meta['num_documents']['val']}"
        f" (of {counted.count} read)\n"
        f"  tokens     train {meta['num_tokens']['train']}, val {meta['num_tokens']['val']}\n"
        f"  shards     train {shards['train']}, val {shards['val']}\n"
        f"  speed      {mb:.1f} MB of text in {seconds:.1f} s: {mb / max(seconds, 1e-9):.2f} MB/s, "
        f"{tokens / max(seconds, 1e-9):,.0f} tokens/s ({args.workers} worker"
        f"{'s' if args.workers > 1 else ''})\n"
        f"train on it with:\n  moetrain-train data.source={out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
