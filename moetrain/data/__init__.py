"""Data: tokenizers, memory-mapped token shards, Megatron indexed datasets, weighted
mixtures, the default corpus and the global sampler.

Entry point: :func:`build_data` turns ``DataConfig`` into train/val datasets, the tokenizer
and the model's vocabulary size. The sample order lives in :class:`GlobalBatchSampler`
(one source) or :class:`MixtureSampler` (``data.sources``), both Stateful.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moetrain.config.schema import ConfigError, DataConfig
from moetrain.data.corpus import cache_root, default_corpus_dir, ensure_default_corpus
from moetrain.data.dataset import TokenDataset
from moetrain.data.megatron import (
    MegatronIndex,
    check_vocab,
    is_megatron,
    prefix_of,
    read_index,
    split_documents,
)
from moetrain.data.mixture import MixtureDataset, MixtureSampler
from moetrain.data.sampler import GlobalBatchSampler
from moetrain.data.shards import (
    DEFAULT_SHARD_TOKENS,
    META_FILE,
    ShardError,
    SplitError,
    open_split,
    read_meta,
    write_token_dataset,
)
from moetrain.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    open_tokenizer,
    train_bpe,
)


@dataclass
class Source:
    """One data source: where it is, its share, and (once opened) its splits."""

    name: str
    path: str  # "default", a prepared directory, or megatron:PREFIX
    weight: float
    tokenizer: Tokenizer | None = None  # None: a Megatron dataset (it carries none)
    data_dir: Path | None = None  # a prepared (or the default corpus) directory
    index: MegatronIndex | None = None
    train: TokenDataset | None = None
    val: TokenDataset | None = None


@dataclass
class DataBundle:
    train: TokenDataset | MixtureDataset
    val: TokenDataset | MixtureDataset
    tokenizer: Tokenizer | None  # None: Megatron data without data.tokenizer
    data_dir: Path | None  # the directory of a single prepared/default source, else None
    vocab_size: int = 0  # the model's: model.vocab_size, else the tokenizer's
    sources: list[Source] = field(default_factory=list)
    mixture: bool = False  # data.sources: one sampler over the sources, val per source

    def sampler(self, global_batch_size: int, seed: int) -> GlobalBatchSampler | MixtureSampler:
        """The global sample order for this data (Stateful; checkpointed)."""
        if not self.mixture:
            return GlobalBatchSampler(len(self.train), global_batch_size, seed)
        return MixtureSampler([len(s.train) for s in self.sources],
                              [s.weight for s in self.sources], global_batch_size, seed,
                              names=[s.name for s in self.sources])

    @property
    def val_sets(self) -> dict[str, TokenDataset]:
        """Per-source validation sets of a mixture (empty for one source)."""
        return {s.name: s.val for s in self.sources} if self.mixture else {}

    @property
    def val_weights(self) -> dict[str, float]:
        total = sum(s.weight for s in self.sources)
        return {s.name: s.weight / total for s in self.sources}


def _source_name(path: str) -> str:
    if path == "default":
        return "default"
    return prefix_of(path).name if is_megatron(path) else Path(path).expanduser().name


def _specs(cfg: DataConfig) -> list[Source]:
    if not cfg.sources:
        return [Source(_source_name(cfg.source), cfg.source, 1.0)]
    out = [Source(s.name or _source_name(s.path), s.path, float(s.weight)) for s in cfg.sources]
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.sources names {names} repeat: give each source a distinct "
                          f"name (data.sources=[{{path: ..., weight: ..., name: a}}, ...])")
    return out


def _peek(src: Source, field_name: str) -> None:
    """Read what a source says about itself cheaply: its tokenizer (meta.json) or its
    Megatron index header. Opens no shard."""
    if src.path == "default":
        src.tokenizer = ByteTokenizer()
    elif is_megatron(src.path):
        src.index = read_index(prefix_of(src.path))
    else:
        data_dir = Path(src.path).expanduser()
        if not (data_dir / META_FILE).is_file():
            what = "does not exist" if not data_dir.exists() else f"has no {META_FILE}"
            raise ConfigError(
                f"{field_name}={src.path!r} is invalid: {data_dir.resolve()} {what}. Write a "
                f"data directory with: python tools/prepare_data.py --input FILES_OR_DIRS "
                f"--output {src.path}  (or use data.source=default, or megatron:PREFIX for a "
                f"Megatron-LM dataset)"
            )
        src.data_dir = data_dir
        src.tokenizer = load_tokenizer(read_meta(data_dir), data_dir)


def _field(cfg: DataConfig) -> str:
    return "data.sources[].path" if cfg.sources else "data.source"


def resolve_tokenizer(cfg: DataConfig, sources: list[Source] | None = None) -> Tokenizer | None:
    """The tokenizer of the data: the sources' own (they must agree), else ``data.tokenizer``.
    None for Megatron data without ``data.tokenizer``."""
    sources = sources if sources is not None else _specs(cfg)
    for s in sources:
        if s.tokenizer is None and s.index is None:
            _peek(s, _field(cfg))
    own = [s for s in sources if s.tokenizer is not None]
    for s in own[1:]:
        if s.tokenizer.fingerprint() != own[0].tokenizer.fingerprint():
            raise ConfigError(
                f"data.sources {own[0].name!r} and {s.name!r} were tokenized with different "
                f"tokenizers ({own[0].tokenizer.kind}, vocab {own[0].tokenizer.vocab_size} vs "
                f"{s.tokenizer.kind}, vocab {s.tokenizer.vocab_size}): prepare every source with "
                f"the same tokenizer (tools/prepare_data.py --tokenizer PATH)"
            )
    named = open_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    if own and named is not None and named.fingerprint() != own[0].tokenizer.fingerprint():
        raise ConfigError(
            f"data.tokenizer={cfg.tokenizer!r} is not the tokenizer {own[0].name!r} was "
            f"prepared with: leave data.tokenizer empty (prepared data carries its own)"
        )
    return own[0].tokenizer if own else named


def resolve_vocab_size(cfg: DataConfig, model_vocab_size: int | None,
                       tokenizer: Tokenizer | None) -> int:
    """The model's vocabulary: ``model.vocab_size`` (it may pad the tokenizer's), else the
    tokenizer's. A model vocabulary smaller than the data's is an error."""
    if tokenizer is None:
        if not model_vocab_size:
            where = ([s.path for s in cfg.sources] if cfg.sources else cfg.source)
            raise ConfigError(
                f"model.vocab_size=None but the data ({where}) carries no tokenizer: set "
                f"model.vocab_size to the vocabulary the Megatron dataset was tokenized with, "
                f"or data.tokenizer=PATH (its tokenizer.json or directory)"
            )
        return int(model_vocab_size)
    if model_vocab_size and model_vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_vocab_size} is smaller than the data's vocabulary "
            f"({tokenizer.kind} tokenizer, vocab_size={tokenizer.vocab_size}): token ids up to "
            f"{tokenizer.vocab_size - 1} would index past the embedding. Set "
            f"model.vocab_size={tokenizer.vocab_size} (or larger, to pad), or "
            f"model.vocab_size=null to use the tokenizer's"
        )
    return int(model_vocab_size or tokenizer.vocab_size)


def data_vocab_size(cfg: DataConfig) -> int | None:
    """The data's vocabulary size from its tokenizer, without opening any shard; None for
    Megatron data without ``data.tokenizer``."""
    tok = resolve_tokenizer(cfg)
    return tok.vocab_size if tok is not None else None


def _open(src: Source, cfg: DataConfig, seq_len: int, vocab_size: int, progress: bool) -> None:
    if src.index is not None:
        check_vocab(src.index, vocab_size, cache_root(cfg.cache_dir))
        cut = split_documents(src.index, cfg.val_fraction, seq_len + 1)
        end = int(src.index.document_bounds()[1][-1])
        tokens = src.index.tokens
        src.train = TokenDataset.from_arrays([tokens[:cut]], seq_len, where=src.index.prefix,
                                             split="train")
        src.val = TokenDataset.from_arrays([tokens[cut:end]], seq_len, where=src.index.prefix,
                                           split="val")
        return
    if src.path == "default":
        src.data_dir = ensure_default_corpus(cfg, progress=progress)
    meta = read_meta(src.data_dir)
    src.train = TokenDataset(src.data_dir, "train", seq_len, meta=meta)
    src.val = TokenDataset(src.data_dir, "val", seq_len, meta=meta)


def build_data(cfg: DataConfig, seq_len: int, *, model_vocab_size: int | None = None,
               progress: bool = True) -> DataBundle:
    """Open (building the default corpus on first use) the data that ``cfg`` names.

    Order: each source's tokenizer and header are read first and the vocabularies checked
    (``model_vocab_size`` = ``model.vocab_size``; None = the tokenizer's), so a mismatch
    fails before any shard is hashed or corpus built; then the splits are opened.
    """
    sources = _specs(cfg)
    tokenizer = resolve_tokenizer(cfg, sources)
    vocab = resolve_vocab_size(cfg, model_vocab_size, tokenizer)
    for s in sources:
        _open(s, cfg, seq_len, vocab, progress)
    if cfg.sources:
        train = MixtureDataset([s.train for s in sources], [s.name for s in sources])
        val = MixtureDataset([s.val for s in sources], [s.name for s in sources])
        data_dir = None
    else:
        train, val, data_dir = sources[0].train, sources[0].val, sources[0].data_dir
    return DataBundle(train=train, val=val, tokenizer=tokenizer, data_dir=data_dir,
                      vocab_size=vocab, sources=sources, mixture=bool(cfg.sources))


__all__ = [
    "DEFAULT_SHARD_TOKENS", "BPETokenizer", "ByteTokenizer", "DataBundle", "GlobalBatchSampler",
    "HFTokenizer", "MegatronIndex", "MixtureDataset", "MixtureSampler", "ShardError", "Source",
    "SplitError", "TokenDataset", "Tokenizer", "build_data", "data_vocab_size",
    "default_corpus_dir", "ensure_default_corpus", "load_tokenizer", "open_split",
    "open_tokenizer", "read_index", "read_meta", "resolve_tokenizer", "resolve_vocab_size",
    "train_bpe", "write_token_dataset",
]
