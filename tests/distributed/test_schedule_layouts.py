"""Schedules under expert parallelism: EvoMoE (diversify, spawn across the ep ranks, soft
DTS gate with Gumbel-softmax combine weights, hard top-1) and top-k annealing on ep=2 x dp=2 (4 processes, FSDP) log the
1-process per-step losses, gradient norms and routing statistics within 1e-5 relative,
with the same schedule values each step.

EvoMoE's spawn copies expert 0, held by the first ep rank and split by FSDP over its edp
ranks, into every expert on every rank, together with its AdamW moments. The mask is keyed
by the global position of each weight entry. So after the spawn, every layout holds the
same experts, and the trajectories agree only if that is so.
"""

from __future__ import annotations

import pytest

from tests.conftest import TINY
from tests.distributed._runs import assert_same_trajectory, step_rows, train

# 8 experts so ep=2 leaves 4 per rank; 6 steps of 4 micro-batches of 2 sequences.
BASE = [o for o in TINY if not o.startswith("model.num_experts")] + [
    "model.num_experts=8", "eval.every=0"]
SCHEDULES = {
    # diversify steps 1-2, spawn, soft DTS gate steps 3-4 (tau 2.0 -> 1.25), hard top-1
    # (evomoe.yaml's hard_k) from 5; the keyed Gumbel noise also weights the experts
    "evomoe": ["moe/router=dts", "schedule=evomoe", "schedule.diversify_steps=2",
               "schedule.steps=2", "schedule.mask_ratio=0.3", "schedule.gumbel_gates=true"],
    # k = 8, 7, 6, 5, 4, 3 over the 6 steps (linear 8 -> 2 over 6, rounded up)
    "topk": ["schedule=topk", "schedule.steps=6"],
}
KEYS = ("loss", "grad_norm", "aux_loss", "z_loss", "load_imbalance", "active_k")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_schedule_ep2_dp2_matches_single_process(schedule, tmp_path, cache):
    common = BASE + SCHEDULES[schedule] + [f"data.cache_dir={cache}"]
    ref = train(common + [f"run.dir={tmp_path / 'ref'}"])
    got = train(common + ["parallel.ep=2", f"run.dir={tmp_path / 'ep2'}"], world=4)
    assert_same_trajectory(ref, got, keys=KEYS)
    sched = sorted(k for k in step_rows(ref)[0] if k.startswith("schedule/"))
    assert sched, "no schedule/ metrics logged"
    for a, b in zip(step_rows(ref), step_rows(got)):
        assert {k: a.get(k) for k in sched} == {k: b.get(k) for k in sched}
    active = [r["active_k"] for r in step_rows(ref)]
    if schedule == "topk":
        assert active == [8.0, 7.0, 6.0, 5.0, 4.0, 3.0]
    else:  # one expert, then a variable number (soft), then exactly hard_k = 1
        assert active[:2] == [1.0, 1.0] and active[4:] == [1.0, 1.0]
        assert all(1.0 < k <= 8.0 for k in active[2:4])
