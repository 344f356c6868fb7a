"""Tokenize text files into a moetrain data directory (memory-mapped token shards).

    python tools/prepare_data.py --input corpus/ --output data/mycorpus
    python tools/prepare_data.py --input a.txt b.txt --output data/bpe --tokenizer bpe \\
        --vocab-size 8192
    moetrain-train data.source=data/mycorpus

Directories are searched recursively for files matching ``--glob``; files are taken in
sorted order. By default each file is one document (``--docs line`` / ``--docs paragraph``
split files at newlines / blank lines). The last ``--val-fraction`` of the documents is held
out for validation. ``--tokenizer bpe`` first trains a byte-level BPE (``tokenizers``
package) on the same documents and saves ``tokenizer.json`` beside the shards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

try:
    import moetrain.data as mdata
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import moetrain.data as mdata


def find_files(inputs: list[str], pattern: str) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            files += sorted(f for f in p.rglob(pattern) if f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise SystemExit(f"error: --input {item}: no such file or directory")
    if not files:
        raise SystemExit(f"error: no input files (--input {' '.join(inputs)} --glob {pattern!r})")
    return files


def iter_documents(files: list[Path], mode: str) -> Iterator[str]:
    """Documents from the files in order: whole files, lines, or blank-line paragraphs.
    Bytes that are not UTF-8 become U+FFFD."""
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            if mode == "file":
                yield f.read()
            elif mode == "line":
                yield from (line.rstrip("\n") for line in f)
            else:
                para: list[str] = []
                for line in f:
                    if line.strip():
                        para.append(line)
                    elif para:
                        yield "".join(para)
                        para = []
                if para:
                    yield "".join(para)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="text files and/or directories")
    ap.add_argument("--output", required=True, help="data directory to create")
    ap.add_argument("--tokenizer", choices=["byte", "bpe"], default="byte")
    ap.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary (with EOS)")
    ap.add_argument("--val-fraction", type=float, default=0.01,
                    help="share of the documents (the last ones) held out for validation")
    ap.add_argument("--min-val-tokens", type=int, default=4097,
                    help="grow the val split to at least this many tokens (one sample at "
                         "train.seq_len needs seq_len + 1)")
    ap.add_argument("--glob", default="*.txt", help="file pattern inside input directories")
    ap.add_argument("--docs", choices=["file", "line", "paragraph"], default="file",
                    help="what one document is")
    ap.add_argument("--shard-tokens", type=int, default=mdata.DEFAULT_SHARD_TOKENS,
                    help="max tokens per shard file")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0 < args.val_fraction < 0.5:
        raise SystemExit(f"error: --val-fraction={args.val_fraction} must be in (0, 0.5)")
    out = Path(args.output).expanduser()
    if out.exists() and not args.overwrite:
        raise SystemExit(f"error: --output {out} exists: pass --overwrite to replace it or "
                         f"choose another directory")
    # --overwrite builds beside the old directory and swaps at the end, so a failed or
    # interrupted build leaves the old data in place.
    build_to = out.with_name(f".{out.name}.overwrite-{os.getpid()}") if out.exists() else out
    files = find_files(args.input, args.glob)
    progress = not args.no_progress

    def docs() -> Iterator[str]:
        return iter_documents(files, args.docs)

    if args.tokenizer == "bpe":
        print(f"training a byte-level BPE (vocab {args.vocab_size}) on {len(files)} file(s)")
        tokenizer = mdata.train_bpe(docs(), args.vocab_size, progress=progress)
    else:
        tokenizer = mdata.ByteTokenizer()
    num_docs = len(files) if args.docs == "file" else None
    try:
        mdata.write_token_dataset(
            docs(), build_to, tokenizer,
            val_fraction=args.val_fraction,
            shard_tokens=args.shard_tokens,
            min_val_tokens=args.min_val_tokens,
            num_documents=num_docs,
            source={"kind": "prepare_data", "inputs": [str(p) for p in args.input],
                    "glob": args.glob, "docs": args.docs},
            progress=progress,
        )
    except mdata.SplitError as e:
        raise SystemExit(f"error: {e} (see --val-fraction, --min-val-tokens, --docs)") from None
    if build_to != out:
        shutil.rmtree(out)
        os.replace(build_to, out)
    meta = mdata.read_meta(out)
    shards = {s: len(v) for s, v in meta["splits"].items()}
    print(
        f"wrote {out}\n"
        f"  tokenizer  {meta['tokenizer']['kind']} (vocab {meta['tokenizer']['vocab_size']}, "
        f"{meta['dtype']})\n"
        f"  documents  train {meta['num_documents']['train']}, val {meta['num_documents']['val']}\n"
        f"  tokens     train {meta['num_tokens']['train']}, val {meta['num_tokens']['val']}\n"
        f"  shards     train {shards['train']}, val {shards['val']}\n"
        f"train on it with:\n  moetrain-train data.source={out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
