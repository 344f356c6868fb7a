"""``moetrain.load`` gives back the trained model of each MoE design that changes the
layer (Chain-of-Experts, RMoE's recurrent router, CompeteSMoE): the loaded model's loss
on the run's validation micro-batches equals the validation loss the trainer logged at
the checkpoint's step, and the Hugging Face export refuses the designs no transformers
class computes (and takes CompeteSMoE, which routes by plain top-k outside training)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moetrain.checkpoint.hf import HFConversionError, choose_target
from moetrain.checkpoint.load import load
from moetrain.data import build_data
from tests.conftest import TINY
from tests.distributed._runs import train

STEPS = 4
DESIGNS = {
    "coe": ["moe.chain_iterations=2", "model.n_shared_experts=1"],
    "recurrent": ["moe/router=recurrent", "moe.router.rnn_hidden=8"],
    # competition on half the (step, layer) draws from step 0: the loaded weights have
    # been through dense steps
    "compete": ["moe/router=compete", "moe.router.compete_rate=0.5",
                "moe.router.compete_warmup=0"],
}
REFUSED = {"coe": "moe.chain_iterations=2", "recurrent": "GRU state"}


def _val_loss(model: torch.nn.Module, cfg) -> float:
    """The trainer's validation loss (Trainer.validate, one process) of ``model``."""
    data = build_data(cfg.data, cfg.train.seq_len)
    m, n = cfg.train.micro_batch_size, cfg.eval.batches
    losses = []
    with torch.no_grad():
        for j in range(n):
            inputs, targets = data.val.get_batch([(j * m + i) % len(data.val) for i in range(m)])
            logits = model(inputs)
            losses.append(F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()))
    return torch.stack(losses).mean().item()


@pytest.mark.parametrize("design", sorted(DESIGNS))
def test_load_gives_the_trained_model(tmp_path, design):
    run_dir = tmp_path / design
    overrides = [o for o in TINY if not o.startswith(("train.steps", "eval.every",
                                                      "checkpoint.every"))]
    overrides += [f"train.steps={STEPS}", f"eval.every={STEPS}", f"checkpoint.every={STEPS}",
                  f"run.dir={run_dir}", *DESIGNS[design]]
    rows = train(overrides)
    logged = next(r["val_loss"] for r in rows if r.get("step") == STEPS and "val_loss" in r)
    model, cfg = load(run_dir)
    assert not model.training
    assert _val_loss(model, cfg) == pytest.approx(logged, rel=1e-5)
    if design in REFUSED:
        with pytest.raises(HFConversionError, match=REFUSED[design]):
            choose_target(model, cfg, "mixtral")
    else:  # competition happens only in training: at inference a softmax top-k router
        assert choose_target(model, cfg, "auto").value == "mixtral"
