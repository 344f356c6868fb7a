"""The memory estimator's per-rank parameter counts equal the real placed model's.

A tiny model with uneven shards (vocabulary 257, 6 experts: FSDP over 4 ranks leaves one
rank no expert rows; 3 local experts over edp=2 do not split evenly, so FSDP shards the
experts on dim 1; with 2 experts and ep=2 one local expert is split on dim 1 over edp=2)
is placed by the real ``parallelize`` on 4 gloo processes; each rank sums the local numel
of its parameters (``DTensor.to_local()``: FSDP2's unpadded shard) and must match
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
    # 1 local expert over edp=2: w1/w3 (1, 32, 32) and w2 (1, 32, 32) sharded on dim 1.
    "ep2_local1": ["model.num_experts=2", "model.top_k=1", "parallel.ep=2"],
    # 3 local experts over edp=2 with F=33: w1/w3 cannot split F evenly (FSDP2 shards a
    # nonzero dim only evenly) and keep dim 0 (rows 2/1); w2 splits D=32 on dim 1.
    "ep2_odd_hidden": ["model.num_experts=6", "parallel.ep=2", "model.expert_hidden=33"],
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
        count = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel()
                    for p in unique)
        experts = pm.moe_layers[0].experts  # (placements, local shape) of each weight
        out[name] = count, {n: (tuple(p.placements), tuple(p.to_local().shape))
                            for n, p in experts.named_parameters() if isinstance(p, DTensor)}
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
    assert [m[name][0] for m in measured] == predicted
    if (cfg.parallel.pp, cfg.parallel.tp, cfg.parallel.dp_mode.value) == (1, 1, "fsdp"):
        # Every parameter is held exactly once over the ranks (TP replicates the norms).
        from moetrain.models import count_params

        assert sum(predicted) == count_params(cfg.model, 257).total


def test_experts_sharded_on_dim1_when_local_experts_do_not_split(measured):
    """FSDP's placement (edp axis first, then ep) of the experts, as placed on each rank."""
    from torch.distributed.tensor import Shard

    for m in measured:
        experts = m["ep2_local1"][1]
        assert {n: pl for n, (pl, _) in experts.items()} == {
            n: (Shard(1), Shard(0)) for n in ("w1_EFD", "w3_EFD", "w2_EDF")}
        assert {n: shape for n, (_, shape) in experts.items()} == {
            "w1_EFD": (1, 16, 32), "w3_EFD": (1, 16, 32), "w2_EDF": (1, 16, 32)}
        # The dim FSDP shards (dim 0 after EP's dim 0 is a _StridedShard(0) there).
        odd = {n: pl[0].dim for n, (pl, _) in m["ep2_odd_hidden"][1].items()}
        assert odd == {"w1_EFD": 0, "w3_EFD": 0, "w2_EDF": 1}
        assert m["ep4"][1]["w1_EFD"][0][0].dim == 0  # 2 local experts over edp=1
