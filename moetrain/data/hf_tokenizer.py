"""The tokenizer a model was trained with, written as a Hugging Face tokenizer directory, so
that an exported model is usable as it is: ``AutoTokenizer.from_pretrained(out)``.

- ``byte`` (moetrain's byte tokenizer: UTF-8 bytes as ids 0..255, EOS 256) becomes a
  ``tokenizers`` byte-level BPE with no merges: its 256 base tokens are the bytes, in
  byte order, so every text encodes to exactly the ids moetrain trained on.
- ``bpe`` (``tools/prepare_data.py --tokenizer bpe``) is saved as it is.
- a Hugging Face tokenizer (``--tokenizer PATH``) is copied with its own files.

Only ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` are
written, so the export needs no ``transformers``; ``PreTrainedTokenizerFast`` reads them.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from moetrain.data.tokenizer import EOS_TEXT, HF_FILES

log = logging.getLogger(__name__)

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what ``tokenizers``'
    ByteLevel pre-tokenizer emits and its decoder reads back)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def byte_tokenizer_json() -> dict[str, Any]:
    """A ``tokenizers`` BPE with the 256 byte tokens as ids 0..255 (no merges) and the EOS
    token as id 256: the exact vocabulary of moetrain's ``ByteTokenizer``."""
    chars = _bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    vocab[EOS_TEXT] = 256
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": 256, "content": EOS_TEXT, "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False,
                          "special": True}],
        "normalizer": None,
        # no regex split: the whole text is one piece, which the model splits into bytes
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": False},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                    "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }


def _write_config(out: Path, eos_token: str, model_max_length: int,
                  bos_token: str | None = None) -> None:
    special = {"eos_token": eos_token}
    if bos_token is not None:
        special["bos_token"] = bos_token
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def save_hf_tokenizer(tok: Any, out: str | Path, model_max_length: int,
                      source_dir: str | Path | None = None) -> dict[str, int | None]:
    """Write ``tok`` (a moetrain tokenizer: ``kind`` byte, bpe or hf) into ``out`` as a
    Hugging Face tokenizer. ``source_dir``: where an ``hf`` tokenizer's files are.
    Returns the special token ids for ``config.json`` (``bos_token_id``, ``eos_token_id``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kind = getattr(tok, "kind", None)
    if kind == "byte":
        (out / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json())
                                            + "\n", encoding="utf-8")
        _write_config(out, EOS_TEXT, model_max_length)
        return {"bos_token_id": None, "eos_token_id": int(tok.eos_id)}
    if kind == "bpe":
        tok.save(out)  # tokenizer.json
        _write_config(out, tok.eos_token, model_max_length)
        return {"bos_token_id": None, "eos_token_id": int(tok.eos_id)}
    if kind == "hf":
        import tempfile

        with tempfile.TemporaryDirectory(prefix="moetrain-hf-tokenizer-") as tmp:
            tok.save(tmp)  # its files (its own tokenizer.json whatever its name) in tmp/tokenizer
            src = Path(tmp) / "tokenizer"
            if not (src / "tokenizer.json").is_file():
                # slow-only files (vocab.json + merges.txt, tokenizer.model): the fast
                # conversion writes the tokenizer.json every reader needs
                from transformers import AutoTokenizer

                fast = AutoTokenizer.from_pretrained(str(tok.files_dir), use_fast=True)
                fast.save_pretrained(str(src))
            if not (src / "tokenizer.json").is_file():
                raise ValueError(f"the tokenizer of {tok.files_dir} has no tokenizer.json "
                                 f"and none could be converted from its slow files")
            for name in HF_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, out / name)
        # the conventions the data was written with (--bos, --eos-token) travel too
        config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8")) \
            if (out / "tokenizer_config.json").is_file() else {}
        config.update(eos_token=tok.eos_token, add_bos_token=bool(tok.add_bos))
        if tok.bos_token is not None:
            config["bos_token"] = tok.bos_token
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n",
                                                   encoding="utf-8")
        return {"bos_token_id": tok.bos_id if tok.add_bos else None,
                "eos_token_id": tok.eos_id}
    raise ValueError(f"cannot write a tokenizer of kind {kind!r} as a Hugging Face tokenizer")


def hf_tokenizer_files(tok: Any, model_max_length: int,
                       source_dir: str | Path | None = None) -> dict[str, str]:
    """The text files of ``tok`` as a Hugging Face tokenizer (name -> text), for a
    checkpoint to carry beside its config: the export and ``moetrain.load_tokenizer`` then
    need no data directory."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="moetrain-tokenizer-") as tmp:
        save_hf_tokenizer(tok, tmp, model_max_length, source_dir)
        return {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(tmp).iterdir())
                if p.suffix in (".json", ".jinja")}


def checkpoint_tokenizer_files(tok: Any, model_max_length: int) -> dict[str, str]:
    """:func:`hf_tokenizer_files` of the run's tokenizer, for every checkpoint; {} (with a
    warning) when there is none (a Megatron dataset without ``data.tokenizer``) or it
    cannot be written, which must not stop training."""
    if tok is None:
        return {}
    try:
        return hf_tokenizer_files(tok, model_max_length, getattr(tok, "files_dir", None))
    except Exception as e:  # noqa: BLE001 - the checkpoint is still complete without it
        log.warning("the tokenizer (%s) is not saved with the checkpoints: %s",
                    getattr(tok, "kind", type(tok).__name__), e)
        return {}


# Text that tells tokenizers apart: words, accents, CJK, an emoji, digits, whitespace runs.
PROBE = ("The quick brown fox jumps over the lazy dog. Naïve café, Übergröße, 日本語の文章, "
         "emoji 🙂, digits 1234567890, tabs\tand\n\nnewlines,   spaces.")


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two tokenizers (of any kind) give text the same ids: the same vocabulary
    size and the same ids for :data:`PROBE` (the EOS/BOS framing is :func:`same_framing`)."""
    return a.vocab_size == b.vocab_size and a.encode(PROBE).tolist() == b.encode(PROBE).tolist()


def same_framing(a: Any, b: Any) -> bool:
    """Whether two tokenizers frame documents alike: the same EOS id, and BOS (if any)."""
    bos = (lambda t: getattr(t, "bos_id", None) if getattr(t, "add_bos", False) else None)
    return a.eos_id == b.eos_id and bos(a) == bos(b)


def describe(tok: Any) -> str:
    """A tokenizer in a few words, for errors: kind, vocabulary, EOS id."""
    return f"{getattr(tok, 'kind', type(tok).__name__)} tokenizer, vocab {tok.vocab_size}, " \
           f"EOS id {tok.eos_id}"
