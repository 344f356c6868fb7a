"""Resharding: a checkpoint of an FSDP2 model on 2 ranks loads into 1 unsharded process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from moetrain.checkpoint import CheckpointManager, ModelOptimizerState, RNGState
from moetrain.config import CheckpointConfig

WORLD = 2


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4, bias=False))


def _save_sharded(rank: int, tmp: str) -> None:
    """Rank body: FSDP2-shard, take one AdamW step, save, and dump full tensors as reference."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    store = dist.FileStore(f"{tmp}/store", WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    try:
        m = _model(seed=0)
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in m:
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1 + rank))
        m(x).pow(2).sum().backward()
        opt.step()
        assert m[0].weight.to_local().shape == (3, 8)  # really sharded: 6 rows over 2 ranks

        mgr = CheckpointManager(CheckpointConfig(dir=f"{tmp}/ckpt", keep=0))
        torch.manual_seed(100 + rank)
        mgr.save(1, {"model": ModelOptimizerState(m, opt), "rng": RNGState()})
        next_rand = torch.rand(3)

        full = {n: p.full_tensor() for n, p in m.named_parameters()}
        exp_avg = {n: opt.state[p]["exp_avg"].full_tensor() for n, p in m.named_parameters()}
        if rank == 0:
            torch.save({"params": full, "exp_avg": exp_avg, "rand": next_rand}, f"{tmp}/ref.pt")
        mgr.close()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_two_rank_checkpoint_loads_unsharded(tmp_path):
    mp.spawn(_save_sharded, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ref = torch.load(tmp_path / "ref.pt")

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        m = _model(seed=5)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        mgr = CheckpointManager(CheckpointConfig(dir=str(tmp_path / "ckpt")))
        path = mgr.resolve_resume()
        assert path is not None and mgr.step_of(path) == 1
        torch.manual_seed(0)
        mgr.load(path, {"model": ModelOptimizerState(m, opt), "rng": RNGState()})
        for name, p in m.named_parameters():
            assert torch.equal(p.detach(), ref["params"][name]), name
            assert torch.equal(opt.state[p]["exp_avg"], ref["exp_avg"][name]), name
        # Rank 0 of the new world restored rank 0's generator of the old one.
        assert torch.equal(torch.rand(3), ref["rand"])
    finally:
        if owned:
            dist.destroy_process_group()
