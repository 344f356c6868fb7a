"""Corpus readers: documents streamed from text, JSONL, Parquet and Arrow files (gzip- or
zstd-compressed text and JSONL too) and from directories saved by Hugging Face ``datasets``.

Every reader is a generator: it holds one line, one Parquet/Arrow record batch or one text
file at a time, so memory does not grow with the corpus (``--docs file`` holds one whole
file). Documents come in a fixed order: the inputs as given, a directory's files in sorted
relative-path order, each file's records in order.

Formats, by suffix (after a ``.gz``/``.zst`` one) unless ``fmt`` says otherwise:
``.txt``/``.text`` text, ``.jsonl``/``.ndjson``/``.json`` JSON Lines (one object per line, C4's
``.json.gz`` included; a plain ``.json`` only when named as an input, not found in a
directory), ``.parquet`` and ``.arrow``. A directory holding ``state.json`` or
``dataset_dict.json`` is a ``datasets.save_to_disk`` directory (also inside a searched
directory): its Arrow files are read with pyarrow directly (``datasets`` is not needed),
in ``state.json``'s order.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

FORMATS = ("text", "jsonl", "parquet", "arrow", "hf")
_SUFFIX_FORMAT = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl",
                  ".json": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
_COMPRESSED = (".gz", ".zst", ".zstd")
_BATCH_ROWS = 1024  # Parquet/Arrow rows per record batch read
_INSTALL = "pip install 'moetrain[data]' (or pip install pyarrow zstandard)"


class CorpusError(ValueError):
    """An input cannot be read as the documents it should hold. The message names the fix."""


@dataclass(frozen=True)
class Input:
    path: Path
    format: str  # one of FORMATS

    def __str__(self) -> str:
        return f"{self.path} ({self.format})"


def _strip_compression(name: str) -> tuple[str, str | None]:
    low = name.lower()
    for ext in _COMPRESSED:
        if low.endswith(ext):
            return name[: -len(ext)], ext
    return name, None


def detect_format(path: Path, in_dir: bool = False) -> str | None:
    """The format a file's (or directory's) name says, or None. Inside a searched
    directory a plain ``.json`` is not taken (config files); ``.json.gz``/``.json.zst``
    are (C4's JSONL dumps)."""
    if path.is_dir():
        return "hf" if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file() \
            else None
    stem, comp = _strip_compression(path.name)
    suffix = Path(stem).suffix.lower()
    if in_dir and suffix == ".json" and comp is None:
        return None
    return _SUFFIX_FORMAT.get(suffix)


def _walk(root: Path, glob: str | None) -> list[tuple[str, Path]]:
    """(relative path, path) of the files under ``root`` matching ``glob`` and of the
    ``datasets`` directories (not descended into); hidden entries skipped."""
    out = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop, or two links to one directory: read it once
            dirnames[:] = []
            continue
        seen.add(real)
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            if detect_format(here / d) == "hf":
                out.append(((here / d).relative_to(root).as_posix(), here / d))
            else:
                keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            p = here / f
            if not f.startswith(".") and (glob is None or p.match(glob)):
                out.append((p.relative_to(root).as_posix(), p))
    return sorted(out)


def find_inputs(inputs: list[str], glob: str | None = None, fmt: str = "auto") -> list[Input]:
    """The files (and ``datasets`` directories) of ``inputs``, in order. A directory is a
    ``datasets`` directory itself, or searched recursively for files matching ``glob``
    (default: every file of a known format), taken in sorted order."""
    if fmt != "auto" and fmt not in FORMATS:
        raise CorpusError(f"--format {fmt!r} is not one of auto, {', '.join(FORMATS)}")
    found: list[Input] = []

    def add(p: Path, from_dir: bool) -> None:
        f = fmt if fmt != "auto" else detect_format(p, from_dir)
        if f in ("parquet", "arrow") and _strip_compression(p.name)[1]:
            raise CorpusError(f"--input {p}: a compressed {f} file: decompress it first "
                              f"({f} files compress their columns themselves)")
        if f is None:
            if from_dir:
                return  # an unknown file inside a directory: not part of the corpus
            raise CorpusError(f"--input {p}: cannot tell its format from the name: pass "
                              f"--format {{{', '.join(FORMATS[:-1])}}}")
        found.append(Input(p, f))

    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir() and (fmt == "hf" or (fmt == "auto" and detect_format(p) == "hf")):
            add(p, False)
        elif p.is_dir():
            for _, f in _walk(p, glob):
                add(f, True)
        elif p.is_file():
            add(p, False)
        else:
            raise CorpusError(f"--input {item}: no such file or directory")
    if not found:
        raise CorpusError(f"no input files (--input {' '.join(inputs)}"
                          f"{f' --glob {glob!r}' if glob else ''}): known formats are "
                          f"{', '.join(sorted(_SUFFIX_FORMAT))} (also .gz/.zst), or pass "
                          f"--format")
    return found


class _Decompressed(io.RawIOBase):
    """The decompressed bytes of a ``.gz`` or ``.zst`` file, read in 1 MiB chunks. A
    truncated or damaged file is a CorpusError naming it, never a silently short corpus:
    zstd's streaming reader reports a cut-off frame as a plain end of file, so frames are
    decoded one ``decompressobj`` each (any number of concatenated frames) and the last
    one must be complete."""

    def __init__(self, path: Path, comp: str) -> None:
        super().__init__()
        self.path, self._buf, self._done = path, b"", False
        if comp == ".gz":
            self._gz = gzip.open(path, "rb")  # noqa: SIM115 - closed in close()
            return
        try:
            import zstandard
        except ImportError as e:
            raise ImportError(f"{path} is zstd-compressed: reading it needs the zstandard "
                              f"package: {_INSTALL}") from e
        self._gz, self._raw = None, open(path, "rb")  # noqa: SIM115 - closed in close()
        self._zstd, self._zstd_error = zstandard.ZstdDecompressor(), zstandard.ZstdError
        self._frame, self._fed = self._zstd.decompressobj(), False

    def readable(self) -> bool:
        return True

    def _fail(self, why: object) -> CorpusError:
        return CorpusError(f"{self.path}: the compressed file is truncated or damaged "
                           f"({why}); re-download or re-compress it")

    def _zstd_chunk(self) -> bytes:
        chunk = self._raw.read(1 << 20)
        if not chunk:
            if self._fed and not self._frame.eof:
                raise self._fail("its last zstd frame ends early")
            self._done = True
            return b""
        out = []
        try:
            while chunk:
                if self._frame.eof:  # the next frame of a multi-frame file
                    self._frame, self._fed = self._zstd.decompressobj(), False
                out.append(self._frame.decompress(chunk))
                self._fed = True
                chunk = self._frame.unused_data if self._frame.eof else b""
        except self._zstd_error as e:
            raise self._fail(e) from None
        return b"".join(out)

    def readinto(self, b) -> int:
        while not self._buf and not self._done:
            if self._gz is None:
                self._buf = self._zstd_chunk()
                continue
            try:
                self._buf = self._gz.read(1 << 20)
            except (EOFError, OSError) as e:  # truncated, or not gzip at all
                raise self._fail(e) from None
            self._done = not self._buf
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        (self._gz if self._gz is not None else self._raw).close()
        super().close()


def open_text(path: Path) -> TextIO:
    """A text stream over ``path``, decompressing ``.gz``/``.zst`` (a truncated or damaged
    file is a CorpusError naming it); bytes that are not UTF-8 become U+FFFD."""
    _, comp = _strip_compression(path.name)
    if comp in (".gz", ".zst", ".zstd"):
        return io.TextIOWrapper(io.BufferedReader(_Decompressed(path, comp)),
                                encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def iter_text(path: Path, docs: str = "file") -> Iterator[str]:
    """A text file's documents: the whole file, each line, or blank-line paragraphs."""
    with open_text(path) as f:
        if docs == "file":
            yield f.read()
        elif docs == "line":
            yield from (line.rstrip("\n") for line in f)
        elif docs == "paragraph":
            para: list[str] = []
            for line in f:
                if line.strip():
                    para.append(line)
                elif para:
                    yield "".join(para)
                    para = []
            if para:
                yield "".join(para)
        else:
            raise CorpusError(f"--docs {docs!r} is not one of file, line, paragraph")


def _text_of(value: Any, where: str, key: str, flag: str) -> str:
    if value is None:
        return ""  # an empty document: skipped by the writer
    if not isinstance(value, str):
        raise CorpusError(f"{where}: {flag} {key!r} holds a {type(value).__name__}, not text: "
                          f"name the text field with {flag}")
    return value


def _get_field(record: dict[str, Any], key: str) -> tuple[bool, Any]:
    """``record[key]``; a dotted key (``meta.text``) reaches into nested objects."""
    if key in record:
        return True, record[key]
    node: Any = record
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def iter_jsonl(path: Path, field: str = "text") -> Iterator[str]:
    """The ``field`` of every JSON object, one per line; blank lines are skipped."""
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{n}: not a JSON object per line ({e.msg}): JSONL "
                                  f"input needs one JSON object on each line") from None
            if not isinstance(record, dict):
                raise CorpusError(f"{path}:{n}: a {type(record).__name__}, not a JSON object")
            ok, value = _get_field(record, field)
            if not ok:
                raise CorpusError(f"{path}:{n}: no field {field!r} (the record has "
                                  f"{sorted(record)[:10]}): name the text field with "
                                  f"--text-field")
            yield _text_of(value, f"{path}:{n}", field, "--text-field")


def _import_pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError as e:
        raise ImportError(f"reading Parquet/Arrow needs the pyarrow package: {_INSTALL}") from e
    return pyarrow


def _column_values(batches, path: Path, column: str, names: list[str]) -> Iterator[str]:
    if column not in names:
        raise CorpusError(f"{path}: no column {column!r} (it has {names}): name the text "
                          f"column with --text-column")
    for batch in batches:
        for value in batch.column(column).to_pylist():
            yield _text_of(value, str(path), column, "--text-column")


def iter_parquet(path: Path, column: str = "text") -> Iterator[str]:
    """The ``column`` of every row, one record batch (of its row group) at a time."""
    pa = _import_pyarrow()
    pf = pa.parquet.ParquetFile(path)
    names = pf.schema_arrow.names
    if column not in names:
        raise CorpusError(f"{path}: no column {column!r} (it has {names}): name the text "
                          f"column with --text-column")
    yield from _column_values(pf.iter_batches(batch_size=_BATCH_ROWS, columns=[column]),
                              path, column, names)


def iter_arrow(path: Path, column: str = "text") -> Iterator[str]:
    """The ``column`` of every row of an Arrow IPC file (stream format, as ``datasets``
    writes, or file format), memory-mapped."""
    pa = _import_pyarrow()
    with pa.memory_map(str(path), "r") as source:
        try:
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        yield from _column_values(batches, path, column, reader.schema.names)


def hf_dataset_files(directory: Path, split: str = "train") -> list[Path]:
    """The Arrow files of a ``datasets.save_to_disk`` directory, in order; a DatasetDict's
    ``split``."""
    if (directory / "dataset_dict.json").is_file():
        splits = json.loads((directory / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise CorpusError(f"{directory} is a DatasetDict with splits {splits}: pick one "
                              f"with --hf-split")
        directory = directory / split
    state_path = directory / "state.json"
    if not state_path.is_file():
        raise CorpusError(f"{directory} has no state.json: not a datasets.save_to_disk "
                          f"directory")
    state = json.loads(state_path.read_text())
    files = [directory / f["filename"] for f in state.get("_data_files", [])]
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise CorpusError(f"{directory}: state.json lists {len(files)} data files"
                          f"{f', missing {missing}' if missing else ''}: save the dataset "
                          f"again with save_to_disk")
    return files


def iter_documents(inputs: list[Input], *, docs: str = "file", text_field: str = "text",
                   text_column: str = "text", hf_split: str = "train") -> Iterator[str]:
    """Every input's documents, in order."""
    for item in inputs:
        if item.format == "text":
            yield from iter_text(item.path, docs)
        elif item.format == "jsonl":
            yield from iter_jsonl(item.path, text_field)
        elif item.format == "parquet":
            yield from iter_parquet(item.path, text_column)
        elif item.format == "arrow":
            yield from iter_arrow(item.path, text_column)
        elif item.format == "hf":
            for f in hf_dataset_files(item.path, hf_split):
                yield from iter_arrow(f, text_column)
        else:
            raise CorpusError(f"{item.path}: unknown format {item.format!r}")


def count_rows(inputs: list[Input]) -> int | None:
    """The number of documents when the inputs' metadata says it cheaply (Parquet footers),
    else None (the progress bar then counts up)."""
    if not all(i.format == "parquet" for i in inputs):
        return None
    pa = _import_pyarrow()
    return sum(pa.parquet.ParquetFile(i.path).metadata.num_rows for i in inputs)


__all__ = ["FORMATS", "CorpusError", "Input", "count_rows", "detect_format", "find_inputs",
           "hf_dataset_files", "iter_arrow", "iter_documents", "iter_jsonl", "iter_parquet",
           "iter_text", "open_text"]
