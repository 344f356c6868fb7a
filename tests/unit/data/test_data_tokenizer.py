"""Tokenizers: byte round trip against hand-computed ids; BPE round trip when installed."""

import numpy as np
import pytest

from moetrain.data import ByteTokenizer, load_tokenizer
from moetrain.data.tokenizer import EOS_TEXT
from tests.conftest import oracle


def test_byte_tokenizer_ids_and_round_trip():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    ids = tok.encode("Aé🙂")
    assert ids.dtype == np.uint16
    # 'A' = 0x41; 'é' = C3 A9; '🙂' = F0 9F 99 82 in UTF-8
    assert ids.tolist() == [0x41, 0xC3, 0xA9, 0xF0, 0x9F, 0x99, 0x82]
    text = "def f(x):\n    return x ** 2  # ünïcödé ✓ 🙂\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("")) == ""


def test_byte_tokenizer_decode_eos_and_invalid_bytes():
    tok = ByteTokenizer()
    ids = np.concatenate([tok.encode("ab"), [256], tok.encode("c"), [256]])
    assert tok.decode(ids) == f"ab{EOS_TEXT}c{EOS_TEXT}"
    assert tok.decode([0xC3]) == "\ufffd"  # a cut multi-byte char is replaced, not an error
    with pytest.raises(ValueError, match="must be in"):
        tok.decode([257])


def test_load_tokenizer_checks_meta():
    meta = {"tokenizer": {"kind": "byte", "vocab_size": 257, "eos_id": 256}}
    assert isinstance(load_tokenizer(meta, "."), ByteTokenizer)
    with pytest.raises(ValueError, match="vocab_size=300"):
        load_tokenizer({"kind": "byte", "vocab_size": 300, "eos_id": 256}, ".")
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        load_tokenizer({"kind": "wordpiece", "vocab_size": 1, "eos_id": 0}, ".")


def test_bpe_round_trip(tmp_path):
    oracle("tokenizers")
    from moetrain.data import BPETokenizer, train_bpe

    texts = ["the cat sat on the mat. " * 20, "a dög and a 🙂 cat " * 20]
    tok = train_bpe(texts, vocab_size=300, progress=False)
    assert tok.vocab_size <= 300 and tok.decode([tok.eos_id]) == EOS_TEXT
    ids = tok.encode("the cat sat")
    assert len(ids) < len("the cat sat")  # merges were learned
    for t in texts + ["unseen wörds ✓"]:
        assert tok.decode(tok.encode(t)) == t
    tok.save(tmp_path)
    back = load_tokenizer(tok.meta(), tmp_path)
    assert isinstance(back, BPETokenizer)
    assert back.encode(texts[1]).tolist() == tok.encode(texts[1]).tolist()


def test_bpe_missing_package_names_the_extra(monkeypatch):
    import sys

    from moetrain.data import train_bpe

    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match=r"pip install 'moetrain\[bpe\]'"):
        train_bpe(["x"], vocab_size=300)
