"""The docs' end-to-end example (docs/training.md "From a Hugging Face model to a Hugging
Face model"), on tiny sizes: a Llama with its own tokenizer (built locally), a JSONL corpus
prepared with that tokenizer, upcycling with ``init.from_dense``, training, export, then
``AutoModelForCausalLM`` + ``AutoTokenizer`` generating from the exported directory.

Held to numbers: the prepared tokens are the tokenizer's own ids; the exported tokenizer
gives the original tokenizer's ids; the exported model's logits equal moetrain's within
1e-4; its greedy generation equals moetrain's own greedy decoding token for token; and
``moetrain.load_tokenizer`` gives the data's ids. A corpus prepared with another tokenizer
is refused before any work, naming both tokenizers and the fix.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from tests._hf_tokenizer import build_tiny_hf_tokenizer
from tests.conftest import compose, oracle

TOOLS = Path(__file__).resolve().parents[3] / "tools"
TEXTS = [f"Document {i}: the {w} fox jumps over {i % 7} lazy dogs and naïve cafés."
         for i, w in enumerate(["quick", "slow", "red", "brown", "tiny", "large"] * 30)]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_e2e_{name}", TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _tiny_llama(path: Path, vocab: int):
    transformers = oracle("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


def test_hf_model_to_hf_model(tmp_path, data_cache):
    transformers = oracle("transformers")
    import moetrain
    from moetrain.config import ConfigError
    from moetrain.train.main import run

    # 1. A tiny Llama and its own tokenizer, in one directory (no download).
    llama = tmp_path / "llama"
    build_tiny_hf_tokenizer(llama, TEXTS)
    hf_tok = transformers.AutoTokenizer.from_pretrained(llama)
    _tiny_llama(llama, len(hf_tok))

    # 2. A JSONL corpus prepared with that tokenizer.
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "id": i}) + "\n"
                              for i, t in enumerate(TEXTS)), encoding="utf-8")
    data = tmp_path / "data"
    assert _tool("prepare_data").main(["--input", str(corpus), "--output", str(data),
                                       "--tokenizer", str(llama), "--no-progress"]) in (0, None)
    meta = json.loads((data / "meta.json").read_text())
    assert meta["tokenizer"]["vocab_size"] == len(hf_tok)
    first = hf_tok(TEXTS[0])["input_ids"] + [hf_tok.eos_token_id]  # <s> ... </s>
    from moetrain.data import build_data

    bundle = build_data(compose([f"data.source={data}"]).data, 8, progress=False)
    assert bundle.train.tokens(0, len(first)).tolist() == first

    # 3 + 4. Upcycle the Llama into a 4-expert MoE and train a few steps.
    run_dir = tmp_path / "run"
    model = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
             "model.ffn_hidden=48", "model.expert_hidden=48", "model.num_experts=4",
             "model.top_k=2", "model.first_dense_layers=0", "model.max_seq_len=64",
             "model.norm_eps=1e-5", "model.tie_embeddings=false",
             f"model.vocab_size={len(hf_tok)}"]
    train = ["train.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2",
             "train.steps=3", "train.progress=false", "optim.warmup_steps=1", "eval.every=0",
             "checkpoint.every=3", "logging.tensorboard=false", "logging.heatmap_every=0",
             f"data.cache_dir={data_cache}"]
    run(compose(model + train + [f"data.source={data}", f"init.from_dense={llama}",
                                 f"run.dir={run_dir}"]))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]

    # The data's tokenizer travels with the checkpoint.
    tok = moetrain.load_tokenizer(run_dir)
    assert tok.encode(TEXTS[5]).tolist() == hf_tok(TEXTS[5], add_special_tokens=False)["input_ids"]
    assert (tok.eos_id, tok.bos_id) == (hf_tok.eos_token_id, hf_tok.bos_token_id)

    # 5. Export, tokenizer included.
    out = tmp_path / "exported"
    from moetrain.checkpoint.hf import export_hf

    export_hf(run_dir, out, progress=False)
    ex_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS[:5] + ["unseen wörds 日本 🙂"]:
        assert ex_tok(text)["input_ids"] == hf_tok(text)["input_ids"]
        assert ex_tok.decode(ex_tok(text)["input_ids"], skip_special_tokens=True) == \
            hf_tok.decode(hf_tok(text)["input_ids"], skip_special_tokens=True)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)

    # 6. AutoModelForCausalLM generates from the exported directory, as moetrain would.
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours, _ = moetrain.load(run_dir)
    prompt = ex_tok("Document 3: the", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(hf(prompt).logits, ours(prompt), rtol=1e-4, atol=1e-4)
        gen = hf.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=ex_tok.eos_token_id)
        ids = prompt
        for _ in range(8):  # moetrain's own greedy decoding
            ids = torch.cat([ids, ours(ids)[:, -1:].argmax(-1)], dim=1)
    assert gen.tolist() == ids.tolist()
    assert isinstance(ex_tok.decode(gen[0]), str)

    # Data tokenized otherwise is refused before any step, naming both and the fix.
    with pytest.raises(ConfigError, match=r"(?s)own tokenizer.*hf tokenizer, vocab "
                                          rf"{len(hf_tok)}.*byte tokenizer, vocab 257"
                                          r".*--tokenizer"):
        run(compose(model + train + [f"init.from_dense={llama}",
                                     f"run.dir={tmp_path / 'wrong'}"]))
    assert not (tmp_path / "wrong" / "metrics.jsonl").exists()
