"""The pure rank layout of parallel/mesh.py: coordinates and group members, no processes."""

from __future__ import annotations

import pytest
import torch

from moetrain.config import ConfigError, ParallelConfig, resolve_layout
from moetrain.parallel import mesh as mesh_mod
from moetrain.parallel.mesh import MeshAxis, ParallelDims

# (world, pp, dp, tp, ep)
LAYOUTS = [
    (1, 1, 1, 1, 1),
    (4, 1, 4, 1, 1),
    (4, 1, 4, 1, 2),
    (4, 1, 4, 1, 4),
    (4, 1, 2, 2, 2),
    (4, 2, 2, 1, 1),
    (8, 2, 2, 2, 2),
    (8, 1, 2, 4, 8),
    (8, 2, 1, 4, 2),
    (16, 2, 4, 2, 4),
    (16, 1, 8, 2, 16),
    (16, 4, 2, 2, 1),
]
IDS = [f"w{w}-pp{pp}-dp{dp}-tp{tp}-ep{ep}" for w, pp, dp, tp, ep in LAYOUTS]


def _dims(w: int, pp: int, dp: int, tp: int, ep: int) -> ParallelDims:
    return ParallelDims(w, pp=pp, dp=dp, tp=tp, ep=ep)


def _rows(t: torch.Tensor, axis: int) -> list[list[int]]:
    """Reference groups: the 1-D fibres of a rank tensor along ``axis``."""
    return sorted(t.movedim(axis, -1).reshape(-1, t.shape[axis]).tolist())


# ------------------------------------------------------------------- hand-computed tables
def test_groups_world8_pp2_dp2_tp2_ep2():
    d = _dims(8, 2, 2, 2, 2)
    assert d.group_ranks("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert d.group_ranks("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert d.group_ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # ep == tp: the EP group is the TP group, expert replicas run along dp.
    assert d.group_ranks("ep") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert d.group_ranks("edp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert d.group_ranks("dp_tp") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert d.group_ranks("world") == [list(range(8))]
    assert d.coords(6) == {"pp": 1, "dp": 1, "tp": 0, "dp_tp": 2, "edp": 1, "ep": 0,
                           "world": 6}
    assert d.coords(3) == {"pp": 0, "dp": 1, "tp": 1, "dp_tp": 3, "edp": 1, "ep": 1,
                           "world": 3}


def test_groups_world4_dp4_ep2():
    d = _dims(4, 1, 4, 1, 2)
    assert d.edp == 2
    assert d.group_ranks(MeshAxis.ep) == [[0, 1], [2, 3]]
    assert d.group_ranks(MeshAxis.edp) == [[0, 2], [1, 3]]
    assert d.group_ranks(MeshAxis.dp) == [[0, 1, 2, 3]]
    assert d.group_ranks(MeshAxis.tp) == [[0], [1], [2], [3]]
    assert d.group_ranks(MeshAxis.pp) == [[0], [1], [2], [3]]
    assert [d.coords(r)["ep"] for r in range(4)] == [0, 1, 0, 1]
    assert [d.coords(r)["edp"] for r in range(4)] == [0, 0, 1, 1]


def test_groups_world4_ep4():
    d = _dims(4, 1, 4, 1, 4)
    assert d.edp == 1
    assert d.group_ranks("ep") == [[0, 1, 2, 3]]
    assert d.group_ranks("edp") == [[0], [1], [2], [3]]


def test_groups_world16_pp2_dp4_tp2_ep4():
    d = _dims(16, 2, 4, 2, 4)
    assert d.edp == 2
    assert d.group_ranks("ep") == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert d.group_ranks("edp") == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13],
                                    [10, 14], [11, 15]]
    assert d.group_ranks("dp") == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14],
                                   [9, 11, 13, 15]]
    assert d.group_ranks("pp") == [[r, r + 8] for r in range(8)]
    assert d.coords(13) == {"pp": 1, "dp": 2, "tp": 1, "dp_tp": 5, "edp": 1, "ep": 1,
                            "world": 13}


# ------------------------------------------------------------------- properties, all layouts
@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_every_axis_partitions_the_world(layout):
    d = _dims(*layout)
    for axis in MeshAxis:
        groups = d.group_ranks(axis)
        size = d.size(axis)
        assert all(len(g) == size for g in groups), axis
        assert len(groups) == d.world_size // size, axis
        assert sorted(r for g in groups for r in g) == list(range(d.world_size)), axis
        for g in groups:  # members are ordered by their coordinate on the axis
            assert [d.coords(r)[axis.value] for r in g] == list(range(size)), axis


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_groups_match_the_mesh_tensors(layout):
    """Groups equal the fibres of the (pp, dp, tp) and (pp, edp, ep) rank tensors that
    build_mesh hands to DeviceMesh."""
    d = _dims(*layout)
    dense, expert = d.dense_ranks(), d.expert_ranks()
    assert dense.shape == (d.pp, d.dp, d.tp) and expert.shape == (d.pp, d.edp, d.ep)
    for axis, t, i in [("pp", dense, 0), ("dp", dense, 1), ("tp", dense, 2),
                       ("edp", expert, 1), ("ep", expert, 2)]:
        assert d.group_ranks(axis) == _rows(t, i), axis
    for r in range(d.world_size):
        c = d.coords(r)
        assert dense[c["pp"], c["dp"], c["tp"]].item() == r
        assert expert[c["pp"], c["edp"], c["ep"]].item() == r
        assert d.rank(c["pp"], c["dp"], c["tp"]) == r
        assert r == (c["pp"] * d.dp + c["dp"]) * d.tp + c["tp"]


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_expert_groups(layout):
    d = _dims(*layout)
    for g in d.group_ranks("ep"):  # consecutive ranks: inside one node
        assert g == list(range(g[0], g[0] + d.ep))
        assert len({d.coords(r)["pp"] for r in g}) == 1
    for g in d.group_ranks("edp"):  # replicas of one expert shard: same ep_i, same stage
        assert len({d.coords(r)["ep"] for r in g}) == 1
        assert len({d.coords(r)["pp"] for r in g}) == 1
    if d.tp > 1 and d.ep == d.tp:
        assert d.group_ranks("ep") == d.group_ranks("tp")


# ------------------------------------------------------------------- degrees and errors
def test_from_layout_and_degrees():
    layout = resolve_layout(ParallelConfig(dp=-1, tp=2, pp=2, ep=4), world_size=16,
                            num_experts=8)
    d = ParallelDims.from_layout(layout)
    assert (d.world_size, d.pp, d.dp, d.tp, d.ep, d.edp, d.dp_tp) == (16, 2, 4, 2, 4, 2, 8)
    assert [d.size(a) for a in MeshAxis] == [2, 4, 2, 4, 2, 8, 16]
    one = ParallelDims(1)
    assert [one.size(a) for a in MeshAxis] == [1] * len(MeshAxis)
    assert one.group_ranks("ep") == [[0]]


def test_bad_factorisation_names_the_fields():
    with pytest.raises(ConfigError, match=r"parallel\.pp\*parallel\.dp\*parallel\.tp=2\*2\*1=4 "
                                          r"but the world size is 8"):
        ParallelDims(8, pp=2, dp=2)
    with pytest.raises(ConfigError, match=r"parallel\.ep=3 must divide parallel\.dp\*"
                                          r"parallel\.tp=4\*1=4"):
        ParallelDims(4, dp=4, ep=3)


def test_coords_rejects_out_of_range_rank():
    with pytest.raises(ValueError, match="rank 4 is outside"):
        _dims(4, 1, 4, 1, 1).coords(4)


# ------------------------------------------------------------------- process-group setup
def test_timeout_from_env(monkeypatch):
    monkeypatch.delenv(mesh_mod.TIMEOUT_ENV, raising=False)
    assert mesh_mod._timeout().total_seconds() == mesh_mod.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(mesh_mod.TIMEOUT_ENV, "42.5")
    assert mesh_mod._timeout().total_seconds() == 42.5
    monkeypatch.setenv(mesh_mod.TIMEOUT_ENV, "ten")
    with pytest.raises(ConfigError, match="MOETRAIN_DIST_TIMEOUT_S='ten' is not a number"):
        mesh_mod._timeout()


def test_partial_torchrun_env_is_an_error(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert mesh_mod._launched_by_torchrun() is False
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"not \['MASTER_ADDR', 'MASTER_PORT'\]"):
        mesh_mod._launched_by_torchrun()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert mesh_mod._launched_by_torchrun() is True
