"""The memory estimator's per-rank parameter counts equal the real placed model's.

A tiny model with uneven shards (vocabulary 257, 6 experts: FSDP over 4 ranks leaves one
rank no expert rows; 3 local experts over edp=2 split 2/1) is placed by the real
``parallelize`` on 4 gloo processes; each rank sums the local numel of its parameters
(``DTensor.to_local()``: FSDP2's unpadded shard) and must match
``memory.local_param_counts`` exactly. All layouts share one multi-process run.
"""

from __future__ import annotations

import pytest
import torch

from moetrain.config import validate
from moetrain.parallel.memory import local_param_counts
from moetrain.testing import run_distributed
from tests.conftest import TINY, compose

WORLD = 4
MODEL = [o for o in TINY if not o.startswith(("model.num_experts", "model.n_layers"))] + [
    "model.n_layers=4", "model.first_dense_layers=1", "model.n_shared_experts=1",
    "model.vocab_size=257",
]
# name -> overrides (6 experts unless ep=4 needs 8)
LAYOUTS = {
    "dp4_fsdp": ["model.num_experts=6"],
    "dp4_replicate": ["model.num_experts=6", "parallel.dp_mode=replicate"],
    "ep2_edp2": ["model.num_experts=6", "parallel.ep=2"],
    "ep4": ["model.num_experts=8", "parallel.ep=4"],
    "pp2_dp2_ep2": ["model.num_experts=6", "parallel.pp=2", "parallel.ep=2",
                    "train.global_batch_size=8"],
    # Sequence-parallel TP: vocabulary 257 splits 129/128 over tp, then 65/64 over dp.
    "tp2_dp2": ["model.num_experts=6", "parallel.tp=2"],
    "tp2_ep2": ["model.num_experts=6", "parallel.tp=2", "parallel.ep=2"],
    "tp2_etp": ["model.num_experts=6", "parallel.tp=2", "parallel.expert_tp=etp"],
}


def _local_counts(rank: int, world: int, configs: dict) -> dict[str, int]:
    from torch.distributed.tensor import DTensor

    from moetrain.models import Transformer
    from moetrain.parallel.parallelize import parallelize

    out = {}
    for name, cfg in configs.items():
        layout = validate(cfg, world)
        torch.manual_seed(0)
        model = Transformer(cfg.model, cfg.moe, 257)
        pm = parallelize(model, layout, cfg.parallel, cfg.moe, torch.device("cpu"),
                         train=cfg.train)
        unique = {id(p): p for p in pm.params}.values()
        out[name] = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel()
                        for p in unique)
    return out


@pytest.fixture(scope="module")
def configs() -> dict:
    return {name: compose(MODEL + extra) for name, extra in LAYOUTS.items()}


@pytest.fixture(scope="module")
def measured(configs) -> list[dict[str, int]]:
    return run_distributed(_local_counts, WORLD, configs, timeout_s=180)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_param_counts_per_rank_match_placed_model(configs, measured, name):
    cfg = configs[name]
    predicted = local_param_counts(cfg, validate(cfg, WORLD), 257)
    assert [m[name] for m in measured] == predicted
    if (cfg.parallel.pp, cfg.parallel.tp, cfg.parallel.dp_mode.value) == (1, 1, "fsdp"):
        # Every parameter is held exactly once over the ranks (TP replicates the norms).
        from moetrain.models import count_params

        assert sum(predicted) == count_params(cfg.model, 257).total
