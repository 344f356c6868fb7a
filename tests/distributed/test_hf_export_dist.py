"""Export and moetrain.load from a checkpoint written by 4 processes (parallel.ep=2: experts
sharded over 2 ranks, replicated over 2; FSDP over 4): the one-process model reproduces
the validation loss the sharded model logged, and the Hugging Face export its logits."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

import moetrain
from moetrain.checkpoint.hf import Target, export_hf
from moetrain.data import build_data
from tests.conftest import TINY, oracle
from tests.distributed._runs import train

T = oracle("transformers", module_level=True)


def _val_loss(model, cfg) -> float:
    """Trainer.validate's loss, in one process: micro-batch j holds samples j*m .. j*m+m-1."""
    val = build_data(cfg.data, cfg.train.seq_len).val
    m, n = cfg.train.micro_batch_size, cfg.eval.batches
    losses = []
    with torch.no_grad():
        for j in range(n):
            inputs, targets = val.get_batch([(j * m + i) % len(val) for i in range(m)])
            logits = model(inputs)
            losses.append(F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()))
    return torch.stack(losses).mean().item()


def test_export_from_ep2_fsdp4_checkpoint(tmp_path, data_cache):
    run = tmp_path / "run"
    rows = train(TINY + [f"run.dir={run}", f"data.cache_dir={data_cache}", "parallel.ep=2",
                         "moe/router=deepseek_v3", "moe.router.bias_update_rate=0.01",
                         "model.n_shared_experts=1", "checkpoint.every=6"], world=4)
    logged = next(r for r in rows if "val_loss" in r and r["step"] == 6)["val_loss"]
    meta = json.loads((run / "checkpoints" / "step_0000006" / "COMMITTED").read_text())
    assert meta["world_size"] == 4

    model, cfg = moetrain.load(run)
    assert cfg.parallel.ep == 2
    assert model.layers["0"].moe.router.expert_bias.abs().max() > 0
    assert abs(_val_loss(model, cfg) - logged) <= 1e-5 * abs(logged)

    out = tmp_path / "hf"
    assert export_hf(run, out, progress=False) == Target.glm4_moe
    tokens = torch.randint(0, model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    hf = T.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max() < 1e-4
