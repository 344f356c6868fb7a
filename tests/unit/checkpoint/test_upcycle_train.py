"""Upcycling end to end: a dense model trained by moetrain, upcycled by ``init.from_dense``
and by tools/upcycle.py, and a tiny Hugging Face Llama. The upcycled MoE reproduces the
dense logits and its first training loss is the dense model's loss on the same batch."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moetrain.checkpoint.upcycle import UpcycleError, build_upcycled, inspect_dense
from moetrain.models import Transformer
from tests.conftest import TINY, compose, oracle
from tests.distributed._runs import step_rows, train

ROOT = Path(__file__).resolve().parents[3]
RUN = TINY + ["eval.every=0", "train.steps=3"]
MOE = RUN + ["model.expert_hidden=64"]  # = the dense ffn_hidden (TINY: 64)
# The tool's target: TINY's architecture (also read from the checkpoint's config.yaml).
TOOL_TARGET = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
               "train.seq_len=32"]


def _tool():
    spec = importlib.util.spec_from_file_location("upcycle_tool", ROOT / "tools" / "upcycle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory, data_cache) -> Path:
    """A tiny dense moetrain model trained 3 steps (weights + AdamW state)."""
    run_dir = tmp_path_factory.mktemp("dense")
    train(RUN + ["model.first_dense_layers=2", "checkpoint.every=3", f"run.dir={run_dir}",
                 f"data.cache_dir={data_cache}"])
    return run_dir / "checkpoints" / "step_0000003"


def _dense_model(ckpt: Path, cfg) -> Transformer:
    dense_cfg = dataclasses.replace(cfg.model, first_dense_layers=cfg.model.n_layers)
    src = inspect_dense(ckpt)
    model = Transformer(dense_cfg, cfg.moe, src.vocab_size)
    weights, _ = src.load(model.state_dict())
    model.load_state_dict(weights)
    return model.eval()


def test_trained_dense_checkpoint_upcycles_exactly(dense_ckpt, data_cache):
    cfg = compose(MOE + [f"data.cache_dir={data_cache}", f"init.from_dense={dense_ckpt}"])
    dense = _dense_model(dense_ckpt, cfg)
    up = build_upcycled(cfg.init, cfg.model, cfg.moe, dense.vocab_size)
    moe = Transformer(cfg.model, cfg.moe, dense.vocab_size)
    moe.load_state_dict(up.model)
    x = torch.randint(0, dense.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe.eval()(x), dense(x), rtol=1e-5, atol=2e-6)


def test_init_from_dense_and_tool_train_from_the_dense_loss(dense_ckpt, data_cache, tmp_path):
    """Step 1's loss is the dense model's loss on the first global batch (exactness carried
    into training); the tool's step-0 checkpoint, resumed, trains the same trajectory as
    init.from_dense, also with Drop-Upcycling and the dense optimizer state reused."""
    from moetrain.data import GlobalBatchSampler, build_data

    base = MOE + [f"data.cache_dir={data_cache}"]
    cfg = compose(base)
    data = build_data(cfg.data, cfg.train.seq_len)
    batch = GlobalBatchSampler(len(data.train), cfg.train.global_batch_size,
                               cfg.seed).next_global_batch()
    x, y = data.train.get_batch(batch)
    with torch.no_grad():
        dense_loss = F.cross_entropy(_dense_model(dense_ckpt, cfg)(x).flatten(0, 1),
                                     y.flatten()).item()

    tool = _tool()
    for extra, flags in (([], []),
                         (["init.drop_ratio=0.5", "init.reuse_optimizer=true"],
                          ["--drop-ratio", "0.5", "--reuse-optimizer"])):
        name = "drop" if extra else "plain"
        hook = step_rows(train(base + [f"init.from_dense={dense_ckpt}", *extra,
                                       f"run.dir={tmp_path / name / 'hook'}"]))
        if not extra:
            assert hook[0]["loss"] == pytest.approx(dense_loss, rel=1e-5, abs=0)
        else:
            assert abs(hook[0]["loss"] - dense_loss) > 1e-4  # dropped channels change it
        out = tmp_path / name / "upcycled"
        assert tool.main(["--dense", str(dense_ckpt.parent), "--out", str(out), "--no-progress",
                          "--experts", "4", "--top-k", "2", *TOOL_TARGET, *flags]) == 0
        assert (out / "step_0000000" / "COMMITTED").is_file()
        resumed = step_rows(train(base + [f"checkpoint.resume={out}",
                                          f"run.dir={tmp_path / name / 'resumed'}"]))
        assert [r["step"] for r in resumed] == [1, 2, 3]
        for a, b in zip(hook, resumed):
            assert (a["loss"], a["grad_norm"], a["aux_loss"]) == \
                   (b["loss"], b["grad_norm"], b["aux_loss"]), name


def test_bad_input_fails_before_any_work(dense_ckpt, data_cache, tmp_path, capsys):
    tool = _tool()
    out = tmp_path / "out"
    assert tool.main(["--dense", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "--dense=" in capsys.readouterr().err and not out.exists()
    assert tool.main(["--dense", str(dense_ckpt), "--out", str(out), *TOOL_TARGET,
                      "model.dim=64"]) == 2
    err = capsys.readouterr().err
    assert "model.dim=64" in err and "dim=32" in err and not out.exists()

    from moetrain.train.main import run

    run_dir = tmp_path / "run"
    with pytest.raises(UpcycleError, match="init.from_dense=.*does not exist"):
        run(compose(MOE + [f"data.cache_dir={data_cache}", f"run.dir={run_dir}",
                           f"init.from_dense={tmp_path / 'missing'}"]))
    assert not (run_dir / "metrics.jsonl").exists()  # no step was taken
    with pytest.raises(UpcycleError, match="model.expert_hidden=32.*set model.expert_hidden=64"):
        run(compose(RUN + [f"data.cache_dir={data_cache}", f"run.dir={run_dir}",
                           f"init.from_dense={dense_ckpt}"]))
    assert not (run_dir / "metrics.jsonl").exists()


def test_hugging_face_llama_upcycles_exactly(tmp_path):
    """A tiny Llama (transformers, saved with save_pretrained, no download) -> MoE: the
    upcycled moetrain model reproduces the Hugging Face logits."""
    transformers = oracle("transformers")
    vocab = 96
    hf_cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "llama")

    src = inspect_dense(tmp_path / "llama")
    assert src.kind == "hf" and not src.has_optimizer
    cfg = compose(["model.first_dense_layers=0", "model.num_experts=4", "model.top_k=2",
                   "model.expert_hidden=48", f"init.from_dense={tmp_path / 'llama'}"])
    target = dataclasses.replace(src.config, first_dense_layers=0, num_experts=4, top_k=2,
                                 expert_hidden=48)
    up = build_upcycled(cfg.init, target, cfg.moe, vocab, source=src)
    moe = Transformer(target, cfg.moe, vocab).eval()
    moe.load_state_dict(up.model)
    x = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), hf(x).logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(UpcycleError, match="no optimizer state"):
        build_upcycled(dataclasses.replace(cfg.init, reuse_optimizer=True), target, cfg.moe,
                       vocab, source=src)

    # The tool takes the architecture from config.json; its checkpoint describes itself.
    from moetrain.checkpoint.load import load

    out = tmp_path / "moe"
    assert _tool().main(["--dense", str(tmp_path / "llama"), "--out", str(out), "--experts",
                         "4", "--top-k", "2", "--no-progress", "model.first_dense_layers=0",
                         "train.seq_len=32"]) == 0
    loaded, loaded_cfg = load(out)
    assert loaded_cfg.model.n_kv_heads == 2 and loaded_cfg.model.num_experts == 4
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), hf(x).logits, rtol=1e-4, atol=1e-5)

    weights = tmp_path / "llama" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UpcycleError, match="truncated model.safetensors"):
        inspect_dense(tmp_path / "llama")
