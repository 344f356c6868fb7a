"""Chunked all-to-all (``moe.a2a_overlap_chunks``): the same math as one exchange, and
one call of the experts module per layer.

One spawn of 4 gloo ranks runs every case. Under ep=2 and ep=4, for 2 and 4 chunks,
dropless and capacity: the MoE layer's output, input gradient and parameter gradients
equal the unchunked layer's within 1e-6 relative in float32, also when experts receive
no tokens and chunks carry no rows. Under FSDP2 with ep=2 x edp=2 (no activation
checkpointing, ``parallel.ac=selective``'s wrapper, ``moe.recompute_experts``), 2 chunks
give the unchunked results with exactly 1 expert-weight all-gather in the forward and 1
in the backward, as 1 chunk does, and a recompute runs no all-to-all. A 3-step training
run with ep=2 on 4 ranks (edp=2, FSDP, selective AC) and 2 chunks logs the 1-process
losses and gradient norms. The step-time model hides (n-1)/n of the shorter of
all-to-all and expert time.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moetrain.testing import run_distributed
from tests.conftest import TINY
from tests.distributed._runs import assert_same_trajectory, step_rows, train

E, D, F, K = 8, 16, 24, 2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 when both are zero)."""
    diff = float((a - b).norm())
    return diff / float(b.norm()) if diff else 0.0


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _layer_case(rank, mesh, dispatch, chunks):
    """One MoE layer with and without chunks (same weights, same tokens): the largest
    relative difference of output, input gradient and parameter gradients."""
    from moetrain.config.schema import DispatchMode, ExpertBackend, ModelConfig, MoEConfig
    from moetrain.models.moe.layer import MoELayer
    from moetrain.parallel.expert import ChunkedMeta, apply_ep

    model_cfg = ModelConfig(dim=D, n_heads=2, num_experts=E, top_k=K, expert_hidden=F)
    results = {}
    for n in (1, chunks):
        moe_cfg = MoEConfig(dispatch=DispatchMode(dispatch), capacity_factor=1.0,
                            expert_backend=ExpertBackend.loop, a2a_overlap_chunks=n)
        torch.manual_seed(0)
        layer = MoELayer(D, model_cfg, moe_cfg)
        layer.init_weights(0.3, 0.3)
        apply_ep([layer], mesh, moe_cfg)
        g = torch.Generator().manual_seed(10 + rank)
        x = torch.randn(2, 5, D, generator=g, requires_grad=True)  # T = 10 rows per rank
        y = layer(x)
        (y * torch.linspace(-1.0, 1.0, D)).sum().backward()
        grads = {name: _local(p.grad) for name, p in layer.named_parameters()}
        results[n] = (y.detach(), x.grad, grads)
        if n > 1:  # the chunked path really ran, with several non-empty chunks
            with torch.no_grad():
                x_TD = x.reshape(-1, D)
                routed = layer.router(x_TD)
                _, meta = layer.dispatcher.dispatch(x_TD, routed.ids_TK, routed.weights_TK)
            assert isinstance(meta, ChunkedMeta)
            assert len(meta.plan.in_splits) == n
            busy = sum(sum(s) > 0 for s in meta.plan.in_splits)
    (y1, dx1, g1), (yn, dxn, gn) = results[1], results[chunks]
    errs = {"y": _rel(yn, y1), "dx": _rel(dxn, dx1)}
    errs.update({k: _rel(gn[k], g1[k]) for k in g1})
    return {"max_rel": max(errs.values()), "errs": errs, "busy_chunks": busy}


def _dispatcher_case(rank, world, group, capacity, chunks):
    """Hand-made routing that sends every row to experts 0 and 1: the other experts (all
    of ranks > 0) receive nothing. Chunked vs unchunked dispatcher, same experts."""
    from moetrain.config.schema import ExpertBackend
    from moetrain.models.moe.dispatcher import AllToAllDispatcher
    from moetrain.models.moe.experts import GroupedExperts
    from moetrain.parallel.expert import ChunkedAllToAllDispatcher

    T = 6
    e = E // world
    out = {}
    for n in (1, chunks):
        g = torch.Generator().manual_seed(100 + rank)
        x_TD = torch.randn(T, D, generator=g, requires_grad=True)
        ids_TK = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0], [0, 1], [0, 1]]).roll(rank, 0)
        w_TK = torch.rand(T, K, generator=g).requires_grad_(True)
        experts = GroupedExperts(e, D, F, ExpertBackend.loop)
        wg = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in (experts.w1_EFD, experts.w3_EFD, experts.w2_EDF):
                full = 0.3 * torch.randn(E, *p.shape[1:], generator=wg)
                p.copy_(full[rank * e:(rank + 1) * e])
        disp = (AllToAllDispatcher(E, group, capacity) if n == 1 else
                ChunkedAllToAllDispatcher(E, group, n, capacity))
        x_RD, meta = disp.dispatch(x_TD, ids_TK, w_TK)
        y_RD = experts(x_RD, meta.tokens_per_expert, meta.rows_per_expert, run=meta.run)
        y_TD = disp.combine(y_RD, meta)
        (y_TD * torch.arange(1.0, D + 1)).sum().backward()
        dW = [p.grad for p in (experts.w1_EFD, experts.w3_EFD, experts.w2_EDF)]
        out[n] = (y_TD.detach(), x_TD.grad, w_TK.grad, dW, int(meta.num_dropped))
    (y1, dx1, dw1, dW1, drop1), (yn, dxn, dwn, dWn, dropn) = out[1], out[chunks]
    errs = [_rel(yn, y1), _rel(dxn, dx1), _rel(dwn, dw1)] + [_rel(a, b) for a, b in zip(dWn, dW1)]
    return {"max_rel": max(errs), "dropped": (drop1, dropn),
            "idle_grad_abs": sum(float(w.abs().sum()) for w in dWn) if rank > 0 else None}


def _fsdp_case(rank, mesh, chunks, ac):
    """One MoE layer under ep=2 x edp=2 with FSDP2 (experts sharded over edp, the layer
    over all 4 ranks), forward + backward. Returns the output and gradients, and the
    collectives it ran: expert-weight all-gathers (FSDP's ``foreach_all_gather`` on the
    edp group) and all-to-alls, each split into forward and backward.

    ``ac``: "none"; "selective" (the experts module in torch's checkpoint wrapper, as
    ``parallel.ac=selective`` does); "recompute" (``moe.recompute_experts``)."""
    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    from moetrain.config.schema import ExpertBackend, ModelConfig, MoEConfig
    from moetrain.models.moe.layer import MoELayer
    from moetrain.parallel.expert import apply_ep

    model_cfg = ModelConfig(dim=D, n_heads=2, num_experts=E, top_k=K, expert_hidden=F)
    moe_cfg = MoEConfig(expert_backend=ExpertBackend.loop, a2a_overlap_chunks=chunks,
                        recompute_experts=ac == "recompute")
    torch.manual_seed(0)
    layer = MoELayer(D, model_cfg, moe_cfg)
    layer.init_weights(0.3, 0.3)
    apply_ep([layer], mesh["ep"], moe_cfg)
    if ac == "selective":
        layer.experts = checkpoint_wrapper(layer.experts, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    edp_group = mesh["edp"].get_group()
    fully_shard(layer.experts, mesh=mesh["edp"])
    fully_shard(layer, mesh=mesh["dp"])
    for m in (layer.experts, layer):  # gloo has no averaging reduce-scatter
        m.set_force_sum_reduction_for_comms(True)

    count = {"gathers": 0, "a2a": 0}
    real_gather, real_a2a = _fsdp_param_group.foreach_all_gather, dist.all_to_all_single

    def gather(params, group, *args, **kwargs):
        count["gathers"] += group is edp_group
        return real_gather(params, group, *args, **kwargs)

    def a2a(*args, **kwargs):
        count["a2a"] += 1
        return real_a2a(*args, **kwargs)

    _fsdp_param_group.foreach_all_gather, dist.all_to_all_single = gather, a2a
    try:
        g = torch.Generator().manual_seed(10 + rank)
        x = torch.randn(2, 5, D, generator=g, requires_grad=True)
        y = layer(x)
        fwd = dict(count)
        (y * torch.linspace(-1.0, 1.0, D)).sum().backward()
        bwd = {k: count[k] - fwd[k] for k in count}
    finally:
        _fsdp_param_group.foreach_all_gather, dist.all_to_all_single = real_gather, real_a2a
    grads = {name.replace("._checkpoint_wrapped_module", ""): p.grad.full_tensor()
             for name, p in layer.named_parameters()}
    return y.detach(), x.grad, grads, fwd, bwd


def _fsdp_rank(rank, world):
    """Every FSDP case: ac none/selective/recompute, without and with 2 chunks."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("edp", "ep"))
    mesh = {"edp": mesh["edp"], "ep": mesh["ep"], "dp": mesh._flatten("dp")}
    out = {}
    for ac in ("none", "selective", "recompute"):
        runs = {n: _fsdp_case(rank, mesh, n, ac) for n in (1, 2)}
        (y1, dx1, g1, *_), (y2, dx2, g2, *_) = runs[1], runs[2]
        errs = [_rel(y2, y1), _rel(dx2, dx1)] + [_rel(g2[k], g1[k]) for k in g1]
        out[ac] = {"max_rel": max(errs), "counts": {n: runs[n][3:] for n in (1, 2)},
                   "grad_names": sorted(g1)}
    return out


def _equivalence_rank(rank: int, world: int):
    """Every case under ep=2 (two ep groups of 2 ranks) and ep=4."""
    from torch.distributed.device_mesh import init_device_mesh

    res = {}
    for ep in (2, 4):
        mesh = init_device_mesh("cpu", (world // ep, ep), mesh_dim_names=("dp", "ep"))["ep"]
        r = mesh.get_local_rank()
        for chunks in (2, 4):
            for dispatch in ("dropless", "capacity"):
                capacity = None if dispatch == "dropless" else 1.0
                res[(ep, "layer", dispatch, chunks)] = _layer_case(r, mesh, dispatch, chunks)
                res[(ep, "hand", dispatch, chunks)] = _dispatcher_case(
                    r, ep, mesh.get_group(), capacity, chunks)
    return res


def _four_ranks(rank: int, world: int, train_overrides: list[str]):
    """One spawn of 4 gloo ranks for every multi-process case of this file."""
    from tests.distributed._runs import _train_rank

    return {"equivalence": _equivalence_rank(rank, world), "fsdp": _fsdp_rank(rank, world),
            "train": _train_rank(rank, world, train_overrides)}


def _train_base(data_cache: str) -> list[str]:
    return [o for o in TINY if not o.startswith(("model.num_experts", "train.steps"))] + [
        "model.num_experts=4", "train.steps=3", "eval.every=0", f"data.cache_dir={data_cache}",
    ]


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("a2a_overlap") / "ep2_edp2_chunks2"
    overrides = _train_base(data_cache) + [
        "parallel.ep=2", "parallel.dp_mode=fsdp", "parallel.ac=selective",
        "moe.a2a_overlap_chunks=2", f"run.dir={run_dir}"]
    return run_distributed(_four_ranks, 4, overrides, timeout_s=240)


def test_chunked_layer_matches_unchunked_under_ep2_and_ep4(four_ranks):
    got = [r["equivalence"] for r in four_ranks]
    for rank, res in enumerate(got):
        for key, r in res.items():
            ep, kind = key[:2]
            assert r["max_rel"] <= 1e-6, (rank, key, r)
            if kind == "layer":
                assert r["busy_chunks"] >= 2, (rank, key, r)
            else:
                assert r["dropped"][0] == r["dropped"][1], (rank, key, r)
                if rank % ep > 0:  # experts 2.. receive no tokens: exactly zero gradients
                    assert r["idle_grad_abs"] == 0.0, (rank, key, r)
    # Capacity 1.0 with all rows on experts 0 and 1 drops rows (the hand case covers it).
    assert all(got[0][(ep, "hand", "capacity", 2)]["dropped"][0] > 0 for ep in (2, 4))


def test_fsdp_gathers_expert_weights_once_per_layer_whatever_the_chunks(four_ranks):
    """ep=2, edp=2: with 2 chunks the sharded experts are all-gathered once in the forward
    and once in the backward, as without chunks (activation checkpointing included), and
    a recompute of the experts' call runs no all-to-all."""
    for rank, res in enumerate(four_ranks):
        for ac, r in res["fsdp"].items():
            assert r["max_rel"] <= 1e-6, (rank, ac, r)
            assert {"experts.w1_EFD", "experts.w3_EFD", "experts.w2_EDF"} <= set(r["grad_names"])
            (fwd1, bwd1), (fwd2, bwd2) = r["counts"][1], r["counts"][2]
            assert fwd2["gathers"] == fwd1["gathers"] == 1, (rank, ac, r)
            assert bwd2["gathers"] == bwd1["gathers"] == 1, (rank, ac, r)
            # Chunked, dropless: the count exchange and 2 exchanges each way per chunk in
            # the forward, their 4 reverses in the backward; a recompute adds none.
            assert (fwd2["a2a"], bwd2["a2a"]) == (5, 4), (rank, ac, r)


def test_training_with_chunks_under_fsdp_matches_single_process(four_ranks, tmp_path,
                                                                 data_cache):
    """ep=2 on 4 ranks (edp=2, experts FSDP-sharded), 2 chunks, selective activation
    checkpointing: the 1-process losses and gradient norms."""
    ref = train(_train_base(data_cache) + [f"run.dir={tmp_path / 'ref'}"])
    got = four_ranks[0]["train"]
    assert len(step_rows(got)) == 3
    assert all(r["a2a_bytes"] > 0 for r in step_rows(got))
    assert_same_trajectory(ref, got)


def test_bad_chunks_is_a_config_error():
    from moetrain.config import ConfigError
    from moetrain.config.schema import MoEConfig

    for bad in (0, -2):
        with pytest.raises(ConfigError, match=r"moe\.a2a_overlap_chunks=" + str(bad)):
            MoEConfig(a2a_overlap_chunks=bad)


def test_step_time_model_hides_overlapped_all_to_all():
    """Chunks hide (n-1)/n of min(all-to-all, expert compute); the rest is unchanged."""
    from moetrain.parallel import memory
    from tests.conftest import compose

    assert memory.a2a_exposed_s(4.0, 1.0, 1) == 4.0
    assert memory.a2a_exposed_s(4.0, 1.0, 4) == pytest.approx(4.0 - 0.75 * 1.0)
    assert memory.a2a_exposed_s(1.0, 4.0, 2) == pytest.approx(0.5)

    cfg = compose(["model=tiny", "parallel.ep=4"])
    cost = {}
    for n in (1, 4):
        c = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, a2a_overlap_chunks=n))
        est = memory.estimate(c, 8, 32000)
        cost[n] = memory._step_cost(c, est, 32000, peak_tflops=989.0, mfu=0.4,
                                    gpus_per_node=8, intra_gbs=300.0, inter_gbs=25.0)
    # By hand: the all-to-all of this layout and the routed experts' compute.
    m, t, lay = cfg.model, cfg.train, cost[1].estimate.layout
    moe_layers = sum(m.is_moe_layer(i) for i in range(m.n_layers))
    accum = t.global_batch_size // (t.micro_batch_size * lay.dp)
    T = t.micro_batch_size * t.seq_len
    a2a = accum * 4 * moe_layers * 2 * T * m.top_k * m.dim * 3 / 4 / 300e9
    experts = (6 * moe_layers * m.top_k * 3 * m.dim * m.expert_hidden
               * t.global_batch_size * t.seq_len / 8 / (989e12 * 0.4))
    assert cost[1].comm_s - cost[4].comm_s == pytest.approx(0.75 * min(a2a, experts), rel=1e-9)
    assert cost[4].compute_s == cost[1].compute_s
