"""Tutel's sharded experts (parallel.ep > model.num_experts; moetrain/parallel/adaptive.py):
every mode r computes the same function from the same stored shards.

Layer level, one spawn of 4 gloo ranks: E=2 (sharded count 2, r in {0, 1, 2}) and E=1
(sharded count 4, r in {0, 1, 2, 4}, with the intermediate r=2), dropless and capacity,
routing skewed onto expert 0 (and, top-1, all of it: expert 1's ranks receive no
rows), and capacity_factor=0 (the largest load over the ranks, so the dropless result):
the layer's output and input gradient equal the unsharded
experts' on the same rows, and each shard's gradient equals the slice of the sum of the
ranks' unsharded gradients. The bytes follow the modes: r=0 sends no rows, r=s gathers
no weights, and in capacity mode r sends exactly r times the rows of r=1.

Training: a 4-rank run with E=2 whose mode cycles 0, 1, 2 (one per step), resumed at
step 3 on 2 ranks with whole experts (ep=2), then at step 5 on 4 ranks with the cost
model's choice (adaptive), logs the 1-process losses and gradient norms; so does one
expert split over ep=2 under pp=2 with the experts recomputed (selective AC); and
with E = ep there is nothing to switch: the mode is fixed at r=1 and says so.
"""

from __future__ import annotations

import torch

from moetrain.testing import run_distributed
from tests.conftest import TINY
from tests.distributed._runs import assert_same_trajectory, step_rows, train

D, F, K, T = 16, 24, 2, 12


def _layer_case(rank, world, E, dispatch, empty=False):
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from moetrain.config.schema import DispatchMode, ExpertBackend, ExpertMode, MoEConfig
    from moetrain.models.moe.dispatcher import LocalDispatcher
    from moetrain.models.moe.experts import GroupedExperts
    from moetrain.parallel.adaptive import (
        ShardedExpertDispatcher,
        sharded_expert_mesh,
        valid_rs,
    )

    torch.manual_seed(0)
    ref = GroupedExperts(E, D, F, ExpertBackend.loop)
    ref.init_weights(0.1, 0.1)
    mesh, views = sharded_expert_mesh(torch.arange(world).view(1, 1, world), E, "cpu")
    em = mesh["ep_e", "ep_f"]
    groups = {r: v.get_group("ep_b") for r, v in views.items()}
    ep_group = DeviceMesh("cpu", torch.arange(world), mesh_dim_names=("ep",)).get_group()
    # "adaptive": Tutel's capacity_factor=0, C = the largest load over the ranks: dropless
    cf = 0.0 if dispatch == "adaptive" else 1.0
    cfg = MoEConfig(dispatch=DispatchMode.capacity if cf == 0 else DispatchMode(dispatch),
                    capacity_factor=cf, drop_policy="position")
    g = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(T, D, generator=g)
    k = min(K, E)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[: T // 2 + rank, 0] = 0  # skewed, differently on every rank
    if k > 1:
        ids[: T // 2 + rank, 1] = 1
    if empty:  # top-1, every row to expert 0: expert 1's ranks receive nothing
        ids = torch.zeros(T, 1, dtype=torch.int64)
    w = torch.rand(ids.shape, generator=g)
    weight_out = torch.arange(T * D).view(T, D).float().sin()

    def loss(o):
        return (o * weight_out).sum()

    # The reference: whole experts on this rank's rows; gradients summed over the ranks.
    local = LocalDispatcher(E, 1.0 if dispatch == "capacity" else None,
                            drop_policy="position")
    x_ref = x.clone().requires_grad_(True)
    xr, meta = local.dispatch(x_ref, ids, w)
    o_ref = local.combine(ref(xr, meta.tokens_per_expert, meta.rows_per_expert), meta)
    loss(o_ref).backward()
    g_ref = {n: p.grad.clone() for n, p in ref.named_parameters()}
    for v in g_ref.values():
        dist.all_reduce(v)
    out = {}
    for r in valid_rs(world // E):
        sh = GroupedExperts(E, D, F, ExpertBackend.loop)
        for name, p in ref.named_parameters():
            fdim = 2 if name == "w2_EDF" else 1
            dt = distribute_tensor(p.detach().clone(), em, [Shard(0), Shard(fdim)])
            sh.register_parameter(name, nn.Parameter(dt))
        disp = ShardedExpertDispatcher(sh, E, ep_group, em, groups, cfg, r, ExpertMode.fixed)
        x_r = x.clone().requires_grad_(True)
        xr, meta = disp.dispatch(x_r, ids, w)
        o = disp.combine(sh(xr, meta.tokens_per_expert, meta.rows_per_expert, run=meta.run),
                         meta)
        loss(o).backward()
        out[r] = {
            "out": float((o - o_ref).abs().max()),
            "x_grad": float((x_r.grad - x_ref.grad).abs().max()),
            "w_grad": max(float((p.grad.full_tensor() - g_ref[n]).abs().max())
                          for n, p in sh.named_parameters()),
            "scale": float(o_ref.abs().max()),
            "sent": disp.bytes_sent, "gathered": disp.bytes_gathered,
        }
    return out


def _all_layer_cases(rank, world):
    cases = {(E, d): _layer_case(rank, world, E, d)
             for E in (2, 1) for d in ("dropless", "capacity")}
    cases[2, "empty"] = _layer_case(rank, world, 2, "dropless", empty=True)
    cases[2, "adaptive"] = _layer_case(rank, world, 2, "adaptive")
    return cases


def test_every_mode_equals_unsharded_experts():
    results = run_distributed(_all_layer_cases, 4, timeout_s=180)
    for rank, cases in enumerate(results):
        for (E, dispatch), modes in cases.items():
            s = 4 // E
            assert sorted(modes) == [0] + [r for r in range(1, s + 1) if s % r == 0]
            for r, m in modes.items():
                where = f"rank {rank}, E={E}, {dispatch}, r={r}"
                assert m["out"] <= 1e-6 * m["scale"], where
                assert m["x_grad"] <= 1e-6, where
                assert m["w_grad"] <= 2e-6, where
                assert (m["sent"] == 0) == (r == 0), where
                assert (m["gathered"] == 0) == (r == s), where
            if dispatch == "capacity":  # E blocks of C rows: r copies of r=1's rows
                for r in modes:
                    if r:
                        assert modes[r]["sent"] == r * modes[1]["sent"], (rank, E, r)


# E=2 experts on 4 ranks: each split over 2 (sharded count 2).
BASE = [o for o in TINY if not o.startswith(("model.num_experts", "train.steps"))] + [
    "model.num_experts=2", "eval.every=0", "train.steps=6",
    # balance terms large enough that the router's gradients are not float noise
    "moe.aux_loss_coef=0.01", "moe.z_loss_coef=0.001",
]


def _modes(rows):
    return [(r["step"], r["moe/layer0/r"], r["moe/layer1/r"]) for r in step_rows(rows)]


def test_switching_modes_and_resharding_match_one_process(tmp_path, data_cache):
    common = BASE + [f"data.cache_dir={data_cache}"]
    ref = train(common + [f"run.dir={tmp_path / 'ref'}"])

    run = common + [f"run.dir={tmp_path / 'sharded'}", "checkpoint.every=0"]
    train(run + ["parallel.ep=4", "parallel.expert_mode=cycle", "train.stop_at=3"], world=4)
    train(run + ["parallel.ep=2", "train.stop_at=5"], world=2)  # whole experts
    got = train(run + ["parallel.ep=4", "parallel.expert_mode=adaptive"], world=4)
    assert [r["step"] for r in step_rows(got)] == list(range(1, 7))
    assert_same_trajectory(ref, got)
    rows = step_rows(got)
    # the cycle: one mode per step, every layer; then the cost model's after the resume
    assert _modes(rows[:3]) == [(1, 0.0, 0.0), (2, 1.0, 1.0), (3, 2.0, 2.0)]
    assert "moe/layer0/r" not in rows[3]  # ep=2 holds whole experts: no modes
    # these experts are tiny next to the step's rows: gathering them is cheapest
    assert _modes(rows[5:]) == [(6, 0.0, 0.0)]
    # r=0 moves weights, not rows; r=2 rows, not weights
    assert rows[0]["a2a_bytes"] == 0 and rows[0]["weight_gather_bytes"] > 0
    assert rows[2]["a2a_bytes"] > 0 and rows[2]["weight_gather_bytes"] == 0


def test_whole_experts_have_nothing_to_switch(tmp_path, data_cache):
    common = [o for o in BASE if not o.startswith(("model.num_experts", "train.steps"))] + [
        "model.num_experts=4", "train.steps=2", f"data.cache_dir={data_cache}"]
    ref = train(common + [f"run.dir={tmp_path / 'ref'}"])
    got = train(common + [f"run.dir={tmp_path / 'ep4'}", "parallel.ep=4",
                          "parallel.expert_mode=adaptive"], world=4)
    assert_same_trajectory(ref, got)
    assert _modes(got) == [(s, 1.0, 1.0) for s in (1, 2)]
    assert all("weight_gather_bytes" not in r for r in step_rows(got))


def test_sharded_experts_under_pipeline_stages_and_recompute(tmp_path, data_cache):
    """One expert split over ep=2 under pp=2 (FSDP over dp=2, nothing over edp=1), with
    the experts' call recomputed in the backward (selective AC reruns its exchanges):
    the modes cycle and every step equals the 1-process run."""
    common = [o for o in BASE if not o.startswith(("model.num_experts", "train.steps"))] + [
        "model.num_experts=1", "model.top_k=1", "train.steps=3", f"data.cache_dir={data_cache}"]
    ref = train(common + [f"run.dir={tmp_path / 'ref'}"])
    got = train(common + [f"run.dir={tmp_path / 'pp2'}", "parallel.pp=2", "parallel.ep=2",
                          "parallel.expert_mode=cycle", "parallel.ac=selective"], world=4)
    assert_same_trajectory(ref, got)
    assert _modes(got) == [(1, 0.0, 0.0), (2, 1.0, 1.0), (3, 2.0, 2.0)]
