"""The tokenizer a checkpoint carries (moetrain/data/hf_tokenizer.py): rebuilt from those
files alone, it gives the data's ids and framing for every tokenizer kind, and
``transformers.AutoTokenizer`` reads the same files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._hf_tokenizer import build_tiny_hf_tokenizer
from tests.conftest import oracle

TEXTS = [f"document {i}: naïve cafés and {i % 5} foxes" for i in range(60)]
PROBES = ["hello wörld", "日本語 🙂", "tabs\tand\nnewlines", TEXTS[3]]


def _write(files: dict[str, str], where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (where / name).write_text(text, encoding="utf-8")
    return where


@pytest.mark.parametrize("bos", [None, False])
def test_hf_tokenizer_round_trips_with_its_framing(tmp_path, bos):
    """A Hugging Face tokenizer with BOS (Llama style), as found and with --bos never; one
    saved under another name than tokenizer.json."""
    from moetrain.data.hf_tokenizer import hf_tokenizer_files
    from moetrain.data.tokenizer import HFTokenizer

    src = build_tiny_hf_tokenizer(tmp_path / "tok", TEXTS)
    renamed = tmp_path / "elsewhere" / "llama_like.json"
    renamed.parent.mkdir()
    renamed.write_bytes((src / "tokenizer.json").read_bytes())
    for path in (src, renamed):
        data_tok = HFTokenizer(path, add_bos=bos)
        back = HFTokenizer(_write(hf_tokenizer_files(data_tok, 64), tmp_path / f"ck{bos}{path.name}"))
        assert back.add_bos == data_tok.add_bos == (bos is None)
        assert (back.eos_id, back.bos_id, back.vocab_size) == (
            data_tok.eos_id, data_tok.bos_id, data_tok.vocab_size)
        for text in PROBES:
            assert back.encode(text).tolist() == data_tok.encode(text).tolist()


def test_byte_and_bpe_tokenizers_round_trip(tmp_path):
    transformers = oracle("transformers")
    from moetrain.data.hf_tokenizer import hf_tokenizer_files
    from moetrain.data.tokenizer import ByteTokenizer, HFTokenizer, train_bpe

    for name, tok in (("byte", ByteTokenizer()), ("bpe", train_bpe(TEXTS * 3, 300, progress=False))):
        where = _write(hf_tokenizer_files(tok, 64), tmp_path / name)
        back, auto = HFTokenizer(where), transformers.AutoTokenizer.from_pretrained(where)
        assert (back.eos_id, back.add_bos) == (tok.eos_id, False)
        for text in PROBES:
            assert back.encode(text).tolist() == tok.encode(text).tolist()
            assert auto(text, add_special_tokens=False)["input_ids"] == tok.encode(text).tolist()
            assert auto.decode(tok.encode(text).tolist()) == text
