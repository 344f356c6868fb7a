"""Tutel's adaptive capacity (``moe.capacity_factor`` <= 0) under expert parallelism.

One spawn of 2 gloo ranks (ep=2) runs every case. Rank 0's tokens are pushed toward
expert 0, so the ranks' largest expert loads differ; each rank must use the same C,
the largest of the two (one MAX all-reduce), or the fixed-size all-to-all would not
line up:
- cf=0, plain and chunked (``moe.a2a_overlap_chunks=2``) all-to-all: the layer's output
  and input gradient on each rank are the 1-process dropless layer's on the
  concatenated tokens, each rank's expert gradients its experts' rows of it, and the
  router gradients summed over the ranks the 1-process router gradient (1e-6 relative);
- cf=-c with the cap between the ranks' loads: C = min(largest load, nominal), rank 0
  drops rows, and the layer equals the fixed-capacity layer with that C run on each
  rank's tokens (drops are per source rank, as in fixed capacity mode);
- a 3-step training run (moe.dispatch=capacity, cf=0, ep=2 on 2 ranks) logs the
  1-process dropless run's losses and gradient norms within 1e-5, with nothing dropped.
"""

from __future__ import annotations

import math

import pytest
import torch

from moetrain.testing import run_distributed
from tests.conftest import TINY
from tests.distributed._runs import assert_same_trajectory, step_rows, train

D, F, E, K, T = 16, 32, 4, 2, 16  # T tokens per rank
WORLD = 2
CAP = 1.75  # cf = -1.75: nominal C = ceil(1.75 * 16 * 2 / 4) = 14, between the loads


def _layer(cf: float, dispatch: str = "capacity", chunks: int = 1):
    """A MoE layer with the same weights on every rank (no aux losses: the 1-process
    reference on the concatenated tokens would weigh them differently)."""
    from moetrain.config.schema import DispatchMode, ExpertBackend, ModelConfig, MoEConfig
    from moetrain.models.moe.layer import MoELayer

    torch.manual_seed(0)
    mcfg = ModelConfig(dim=D, n_heads=2, num_experts=E, top_k=K, expert_hidden=F)
    moe_cfg = MoEConfig(dispatch=DispatchMode(dispatch), capacity_factor=cf,
                        expert_backend=ExpertBackend.loop, aux_loss_coef=0.0,
                        z_loss_coef=0.0, a2a_overlap_chunks=chunks)
    layer = MoELayer(D, mcfg, moe_cfg)
    layer.init_weights(0.5, 0.5)
    return layer, moe_cfg


def _x(rank: int) -> torch.Tensor:
    """(2, T/2, D): rank 0's tokens pushed toward expert 0 (its largest load is T),
    rank 1's token t toward expert t mod E (a balanced load)."""
    x = torch.randn(2, T // 2, D, generator=torch.Generator().manual_seed(10 + rank))
    w_ED = _layer(1.0, "dropless")[0].router.gate.weight.detach()
    g_T = torch.zeros(T, dtype=torch.long) if rank == 0 else torch.arange(T) % E
    x.view(T, D).add_(4.0 * w_ED[g_T] / w_ED[g_T].norm(dim=-1, keepdim=True))
    return x


def _run(layer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output, input gradient and (local shards of the) parameter gradients, for the
    output gradient cos(i) over each 2-sequence rank batch's elements."""
    x = x.clone().requires_grad_()
    out = layer(x)
    per_rank = torch.cos(torch.arange(2 * (T // 2) * D, dtype=out.dtype))
    out.backward(per_rank.repeat(x.shape[0] // 2).view(out.shape))
    grads = {"out": out.detach(), "x": x.grad}
    for name, p in layer.named_parameters():
        grads[name] = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
    return grads


def _max_load(layer, x: torch.Tensor) -> int:
    with torch.no_grad():
        ids = layer.router(x.reshape(-1, D)).ids_TK
    return int(torch.bincount(ids.reshape(-1), minlength=E).max())


def _layer_cases(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from moetrain.parallel.expert import apply_ep

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    e = E // world
    out = {}
    for name, cf, chunks in (("cf0", 0.0, 1), ("cf0_chunks2", 0.0, 2), ("cf-c", -CAP, 1)):
        layer, moe_cfg = _layer(cf, chunks=chunks)
        apply_ep([layer], mesh, moe_cfg)
        seen, inner = [], layer.dispatcher.local.adaptive_capacity

        def record(*args, seen=seen, inner=inner, **kwargs):
            seen.append(inner(*args, **kwargs))
            return seen[-1]

        layer.dispatcher.local.adaptive_capacity = record
        got = _run(layer, _x(rank))
        loads = [_max_load(layer, _x(j)) for j in range(world)]
        if cf == 0:  # 1 process, dropless, every rank's tokens in one batch
            ref = _run(_layer(1.0, "dropless")[0], torch.cat([_x(j) for j in range(world)]))
            want = {}
            for k, g in ref.items():
                if k in ("out", "x"):
                    g = g[rank * 2:(rank + 1) * 2]  # this rank's two sequences
                elif k.startswith("experts."):
                    g = g[rank * e:(rank + 1) * e]
                want[k] = g
            got_router = {k: v for k, v in got.items() if k.startswith("router.")}
        else:  # the fixed capacity C on each rank's own tokens, experts over both ranks
            C = min(max(loads), math.ceil(CAP * T * K / E))
            refs = [_run(_layer(C * E / (T * K))[0], _x(j)) for j in range(world)]
            want = {k: (sum(r[k] for r in refs)[rank * e:(rank + 1) * e]
                        if k.startswith("experts.") else g) for k, g in refs[rank].items()}
            got_router = {}
        out[name] = {"seen": seen, "loads": loads, "got": got, "want": want,
                     "router": got_router, "dropped": int(layer.last_stats.num_dropped)}
    return out


def _two_ranks(rank: int, world: int, train_overrides: list[str]) -> dict:
    """One spawn for every multi-process case of this file."""
    from tests.distributed._runs import _train_rank

    return {"layer": _layer_cases(rank, world),
            "train": _train_rank(rank, world, train_overrides)}


def _train_base(data_cache: str) -> list[str]:
    return [o for o in TINY if not o.startswith("train.steps")] + [
        "train.steps=3", "eval.every=0", f"data.cache_dir={data_cache}"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("adaptive_capacity") / "ep2_cf0"
    overrides = _train_base(data_cache) + [
        "parallel.ep=2", "moe.dispatch=capacity", "moe.capacity_factor=0", f"run.dir={run_dir}"]
    return run_distributed(_two_ranks, WORLD, overrides, timeout_s=240)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    diff = float((a - b).norm())
    return diff / float(b.norm()) if diff else 0.0


def test_ranks_agree_on_the_largest_load_and_match_one_process(two_ranks):
    res = [r["layer"] for r in two_ranks]
    worst = 0.0
    for name in ("cf0", "cf0_chunks2", "cf-c"):
        loads = res[0][name]["loads"]
        assert loads == res[1][name]["loads"] and loads[0] > loads[1], loads  # skewed
        C = max(loads) if name.startswith("cf0") else min(max(loads),
                                                         math.ceil(CAP * T * K / E))
        for rank in range(WORLD):
            r = res[rank][name]
            assert r["seen"] == [C], (name, rank, r["seen"], loads)  # one agreed C
            assert r["got"].keys() >= r["want"].keys()
            for k, want in r["want"].items():
                if k.startswith("router."):
                    continue  # compared summed over the ranks below
                err = _rel(r["got"][k], want)
                worst = max(worst, err)
                assert err <= 1e-6, (name, rank, k, err)
        if name.startswith("cf0"):
            assert res[0][name]["dropped"] == res[1][name]["dropped"] == 0
            for k, want in res[0][name]["want"].items():
                if k.startswith("router."):
                    err = _rel(sum(res[j][name]["router"][k] for j in range(WORLD)), want)
                    worst = max(worst, err)
                    assert err <= 1e-6, (name, k, err)
        else:  # the cap sits between the ranks' loads: only rank 0 drops
            assert loads[1] <= C < loads[0], (C, loads)
            assert res[0][name]["dropped"] > 0 and res[1][name]["dropped"] == 0
    print(f"adaptive capacity under ep=2: max rel diff {worst:.1e}")


def test_training_with_adaptive_capacity_matches_single_process_dropless(two_ranks, tmp_path,
                                                                         data_cache):
    ref = train(_train_base(data_cache) + [f"run.dir={tmp_path / 'ref'}"])
    got = two_ranks[0]["train"]
    assert len(step_rows(got)) == 3
    assert all(r["dropped_frac"] == 0 and r["a2a_bytes"] > 0 for r in step_rows(got))
    assert_same_trajectory(ref, got)
    worst = max(abs(a[k] - b[k]) / abs(a[k]) for a, b in zip(step_rows(ref), step_rows(got))
                for k in ("loss", "grad_norm", "aux_loss"))
    print(f"ep=2 cf=0 vs 1-process dropless: max rel diff {worst:.1e}")
