"""A model's own Hugging Face tokenizer: its EOS/BOS conventions, the prepared stream against
transformers' own encoding, the saved copy, and the model/data vocabulary check."""

import json
import shutil

import numpy as np
import pytest

from moetrain.config.schema import ConfigError, DataConfig
from moetrain.data import HFTokenizer, ShardError, build_data, load_tokenizer, read_meta
from moetrain.data.shards import open_split
from tests._hf_tokenizer import build_tiny_hf_tokenizer
from tests.conftest import load_tool, oracle

TEXTS = ["the cat sat on the mat. " * 20, "a dög and a 🙂 cat " * 20, "tokens, tokens.\n" * 9]
DOCS = [f"{i}: " + TEXTS[i % 3][: 40 + 7 * i] for i in range(30)]


def _cat(lists):
    """Concatenate lists of token ids."""
    return [t for x in lists for t in x]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny_hf_tokenizer(tmp_path_factory.mktemp("tok") / "llama", TEXTS)


def _stream(out, split):
    return np.concatenate([np.asarray(m) for m in open_split(out, split)]).astype(np.int64)


def _prepare(tmp_path, name, *extra):
    src = tmp_path / "c.jsonl"
    if not src.exists():
        src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    out = tmp_path / name
    assert load_tool("prepare_data").main(
        ["--input", str(src), "--output", str(out), "--min-val-tokens", "10",
         "--val-fraction", "0.1", "--no-progress", *extra]) == 0
    return out


def test_llama_style_tokenizer_prepared_like_transformers(tmp_path, llama_dir):
    transformers = oracle("transformers")
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(llama_dir))
    tok = HFTokenizer(llama_dir)
    # The conventions, read from the files: <s> in front (the post-processor adds it),
    # </s> at the end (tokenizer_config.json), the vocabulary with the added tokens.
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (ref_tok.bos_token_id,
                                                      ref_tok.eos_token_id, True) == (1, 2, True)
    assert tok.vocab_size == len(ref_tok)

    out = _prepare(tmp_path, "llama", "--tokenizer", str(llama_dir), "--workers", "2")
    # The reference: transformers' own ids for each document, framed <s> ... </s>.
    ref = [[1] + ref_tok(d, add_special_tokens=False).input_ids + [2] for d in DOCS]
    assert ref[0][:-1] == ref_tok(DOCS[0]).input_ids  # its BOS convention is the same
    meta = read_meta(out)
    n_val = meta["num_documents"]["val"]
    assert _stream(out, "train").tolist() == _cat(ref[:-n_val])
    assert _stream(out, "val").tolist() == _cat(ref[-n_val:])
    info = meta["tokenizer"]
    assert {k: info[k] for k in ("kind", "vocab_size", "eos_id", "bos_id", "add_bos", "dir",
                                 "source")} == {
        "kind": "hf", "vocab_size": len(ref_tok), "eos_id": 2, "bos_id": 1, "add_bos": True,
        "dir": "tokenizer", "source": str(llama_dir)}
    # The copy beside the shards is a working Hugging Face tokenizer, and moetrain's too.
    saved = transformers.AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert saved(DOCS[3]).input_ids == ref_tok(DOCS[3]).input_ids
    back = load_tokenizer(meta, out)
    assert back.fingerprint() == tok.fingerprint()
    assert back.decode(ref[4][1:-1]) == DOCS[4]

    # One worker writes the same bytes as two.
    one = _prepare(tmp_path, "llama1", "--tokenizer", str(llama_dir))
    for f in sorted(p.name for p in out.glob("*.bin")) + ["meta.json"]:
        assert (one / f).read_bytes() == (out / f).read_bytes(), f


def test_conventions_bare_json_overrides_and_slow_files(tmp_path, llama_dir):
    transformers = oracle("transformers")
    # A bare tokenizer.json (no config): EOS found among its special tokens, BOS from
    # what its post-processor puts in front.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(llama_dir / "tokenizer.json", bare / "tokenizer.json")
    tok = HFTokenizer(bare / "tokenizer.json")
    assert (tok.eos_token, tok.bos_token, tok.add_bos) == ("</s>", "<s>", True)
    saved = tmp_path / "saved"
    tok.save(saved)  # writes a tokenizer_config.json naming them
    cfg = json.loads((saved / "tokenizer" / "tokenizer_config.json").read_text())
    assert (cfg["eos_token"], cfg["bos_token"]) == ("</s>", "<s>")

    # Qwen2-style: no BOS, and EOS named by the config.
    tk = oracle("tokenizers")
    qwen = tk.Tokenizer.from_file(str(llama_dir / "tokenizer.json"))
    qwen.post_processor = None
    qdir = tmp_path / "qwen"
    transformers.PreTrainedTokenizerFast(tokenizer_object=qwen, eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(str(qdir))
    q = HFTokenizer(qdir)
    assert (q.eos_id, q.bos_id, q.add_bos) == (2, None, False)
    out = _prepare(tmp_path, "qwen_data", "--tokenizer", str(qdir))
    ref = [q.encode(d).tolist() + [2] for d in DOCS]
    assert _stream(out, "train").tolist() + _stream(out, "val").tolist() == _cat(ref)

    # Overrides: --eos-token and --bos never.
    out = _prepare(tmp_path, "over", "--tokenizer", str(llama_dir), "--eos-token", "<unk>",
                   "--bos", "never")
    ref = [q.encode(d).tolist() + [0] for d in DOCS]
    assert _stream(out, "train").tolist() + _stream(out, "val").tolist() == _cat(ref)
    assert read_meta(out)["tokenizer"]["add_bos"] is False
    with pytest.raises(ValueError, match="--eos-token"):
        HFTokenizer(llama_dir, eos_token="<nope>")

    # Only slow files (vocab.json + merges.txt): transformers reads them, same ids.
    slow = tmp_path / "slow"
    slow.mkdir()
    tk.Tokenizer.from_file(str(llama_dir / "tokenizer.json")).model.save(str(slow))
    (slow / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "add_bos_token": True}))
    s = HFTokenizer(slow)
    assert s.backend == "transformers"
    assert (s.vocab_size, s.eos_id, s.bos_id, s.add_bos) == (tok.vocab_size, 2, 1, True)
    assert [x.tolist() for x in s.encode_batch(DOCS)] == [x.tolist() for x in
                                                          tok.encode_batch(DOCS)]


def test_vocab_mismatch_is_an_error_before_any_work(tmp_path, llama_dir):
    out = _prepare(tmp_path, "llama", "--tokenizer", str(llama_dir))
    vocab = read_meta(out)["tokenizer"]["vocab_size"]
    cfg = DataConfig(source=str(out))
    assert build_data(cfg, 8, model_vocab_size=vocab + 30).vocab_size == vocab + 30  # padding
    assert build_data(cfg, 8).vocab_size == vocab
    # Break a shard: the vocabulary error still comes first (no shard was hashed).
    (out / ".verified.json").unlink()
    (out / "train_00000.bin").write_bytes(b"\0\0" * read_meta(out)["num_tokens"]["train"])
    with pytest.raises(ConfigError, match=rf"model.vocab_size=100 is smaller than the data's "
                                          rf"vocabulary \(hf tokenizer, vocab_size={vocab}\).*"
                                          rf"Set model.vocab_size={vocab}"):
        build_data(cfg, 8, model_vocab_size=100)
    with pytest.raises(ShardError, match="checksum"):
        build_data(cfg, 8, model_vocab_size=vocab)
