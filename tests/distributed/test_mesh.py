"""build_mesh and init_distributed on 4 gloo processes, checked against the pure layout.

All layouts share one multi-process run (a module fixture) so process start is paid once.
The last tests check the harness itself: results, exceptions and dead ranks come back.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from moetrain.config import ConfigError, ParallelConfig, resolve_layout
from moetrain.parallel.mesh import (
    MeshAxis,
    ParallelDims,
    build_mesh,
    destroy_distributed,
    init_distributed,
)
from moetrain.testing import run_distributed

WORLD = 4
# (dp, tp, pp, ep); dp=-1 infers.
LAYOUTS = [
    (4, 1, 1, 1),
    (-1, 1, 1, 2),
    (-1, 1, 1, 4),
    (2, 2, 1, 2),
    (2, 1, 2, 1),
    (2, 1, 2, 2),
    (2, 2, 1, 4),
    (1, 4, 1, 2),
]
IDS = [f"dp{dp}-tp{tp}-pp{pp}-ep{ep}" for dp, tp, pp, ep in LAYOUTS]


def _layout(dp: int, tp: int, pp: int, ep: int, world: int = WORLD):
    return resolve_layout(ParallelConfig(dp=dp, tp=tp, pp=pp, ep=ep), world, num_experts=8)


def _probe(rank: int, world_size: int, layouts: list[tuple[int, int, int, int]]) -> dict:
    """On every rank: build each mesh, record coordinates and who each group reduces over."""
    out: dict = {"layouts": []}
    for spec in layouts:
        mesh = build_mesh(_layout(*spec, world=world_size), "cpu")
        rec = {
            "dense": list(mesh.dense.get_coordinate()),
            "expert": list(mesh.expert.get_coordinate()),
            "names": (mesh.dense.mesh_dim_names, mesh.expert.mesh_dim_names),
            "members": {},
            "rank_sum": {},
            "local": {},
        }
        for axis in MeshAxis:
            # A one-hot of this rank, summed over the group, marks exactly its members.
            onehot = torch.zeros(world_size, dtype=torch.int64)
            onehot[rank] = 1
            dist.all_reduce(onehot, group=mesh.group(axis))
            total = torch.tensor(rank)
            dist.all_reduce(total, group=mesh.group(axis))
            rec["members"][axis.value] = onehot.nonzero().flatten().tolist()
            rec["rank_sum"][axis.value] = total.item()
            rec["local"][axis.value] = mesh.local_rank(axis)
            assert mesh.submesh(axis).get_local_rank() == mesh.local_rank(axis)
        out["layouts"].append(rec)

    # A layout resolved for another world size fails on every rank before any group exists.
    n_groups = len(dist.distributed_c10d._world.pg_map)
    try:
        build_mesh(_layout(2, 1, 1, 1, world=2), "cpu")
    except ConfigError as exc:
        out["mismatch"] = str(exc)
    out["groups_created_by_mismatch"] = len(dist.distributed_c10d._world.pg_map) - n_groups
    return out


@pytest.fixture(scope="module")
def probed() -> list[dict]:
    return run_distributed(_probe, WORLD, LAYOUTS, timeout_s=120)


@pytest.mark.parametrize("index", range(len(LAYOUTS)), ids=IDS)
def test_mesh_matches_pure_layout(probed, index):
    dims = ParallelDims.from_layout(_layout(*LAYOUTS[index]))
    for rank, result in enumerate(probed):
        rec = result["layouts"][index]
        c = dims.coords(rank)
        assert rec["names"] == (("pp", "dp", "tp"), ("pp", "edp", "ep"))
        assert rec["dense"] == [c["pp"], c["dp"], c["tp"]]
        assert rec["expert"] == [c["pp"], c["edp"], c["ep"]]
        for axis in MeshAxis:
            (group,) = [g for g in dims.group_ranks(axis) if rank in g]
            assert rec["members"][axis.value] == group, (rank, axis)
            assert rec["rank_sum"][axis.value] == sum(group), (rank, axis)
            assert rec["local"][axis.value] == group.index(rank), (rank, axis)


def test_world_size_mismatch_fails_before_any_group(probed):
    for result in probed:
        msg = result["mismatch"]
        assert "parallel.pp*parallel.dp*parallel.tp=1*2*1=2" in msg
        assert "but 4 were launched" in msg
        assert result["groups_created_by_mismatch"] == 0


# ------------------------------------------------------------------- init_distributed
def _from_torchrun_env(rank: int, world_size: int) -> tuple:
    got = init_distributed()
    mesh = build_mesh(_layout(-1, 1, 1, 2, world=world_size), "cpu")
    x = torch.tensor([float(rank + 1)])
    dist.all_reduce(x, group=mesh.group("ep"))
    again = init_distributed()  # idempotent
    destroy_distributed()
    return got, again, x.item(), dist.is_initialized()


def _without_torchrun(rank: int, world_size: int) -> tuple:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name)
    got = init_distributed()
    mesh = build_mesh(_layout(-1, 1, 1, 1, world=1), "cpu")
    x = torch.tensor([3.0])
    dist.all_reduce(x, group=mesh.group("world"))
    backend = dist.get_backend()
    destroy_distributed()
    return got, x.item(), backend


def test_init_distributed_from_torchrun_env():
    results = run_distributed(_from_torchrun_env, 2, init=False, timeout_s=60)
    cpu = torch.device("cpu")
    assert results == [((0, 2, cpu), (0, 2, cpu), 3.0, False),
                       ((1, 2, cpu), (1, 2, cpu), 3.0, False)]


def test_init_distributed_single_process_fallback():
    (result,) = run_distributed(_without_torchrun, 1, init=False, timeout_s=60)
    assert result == ((0, 1, torch.device("cpu")), 3.0, "gloo")


# ------------------------------------------------------------------- the harness itself
def _raise_on_rank1(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ConfigError("parallel.ep=3 is invalid")
    return rank


def _die_on_rank1(rank: int, world_size: int) -> None:
    if rank == 1:
        os._exit(7)
    dist.barrier()  # rank 0 would wait here until the group timeout


def test_harness_reraises_a_rank_exception_with_its_traceback():
    with pytest.raises(ConfigError, match=r"parallel\.ep=3 is invalid") as info:
        run_distributed(_raise_on_rank1, 2, timeout_s=60)
    assert "raised on rank 1 of 2" in "".join(getattr(info.value, "__notes__", []))
    assert "_raise_on_rank1" in str(info.value.__cause__)


def test_harness_fails_fast_when_a_rank_dies():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 of 2 exited with code 7"):
        run_distributed(_die_on_rank1, 2, timeout_s=60)
    assert time.monotonic() - start < 30


def _hang(rank: int, world_size: int) -> None:
    time.sleep(600)


def test_harness_times_out_a_hang_and_shows_where():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] of 2 still running after 2") as info:
        run_distributed(_hang, 2, timeout_s=2)
    assert time.monotonic() - start < 15
    assert str(info.value).count("in _hang") == 2  # each rank's stack points at the hang
