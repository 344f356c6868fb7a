"""Tutel's modes for sharded experts (moetrain/parallel/adaptive.py): the cost model on
hand-worked cases, the valid modes, and the layouts the config accepts or refuses."""

from __future__ import annotations

import pytest

from moetrain.config import ConfigError
from moetrain.config.validate import validate
from moetrain.parallel.adaptive import _parts, choose_r, mode_costs, sharded_count, valid_rs
from tests.conftest import TINY, compose


def test_valid_modes_are_zero_and_the_divisors():
    assert valid_rs(1) == [0, 1]
    assert valid_rs(2) == [0, 1, 2]
    assert valid_rs(4) == [0, 1, 2, 4]
    assert valid_rs(6) == [0, 1, 2, 3, 6]
    assert [sharded_count(E, 4) for E in (1, 2, 4, 8)] == [4, 2, 1, 1]


def test_parts_split_rows_evenly_in_order():
    assert _parts(7, 2) == [3, 4]
    assert _parts(8, 4) == [2, 2, 2, 2]
    assert _parts(1, 4) == [0, 0, 0, 1]
    assert sum(_parts(13, 3)) == 13


def test_costs_by_hand():
    # W=4 ranks, E=2 experts, s=2; R=100 rows per rank, balanced: N_e = 200; D=8;
    # one expert holds P=3*F*D = 3*16*8 = 384 weights.
    costs = {c.r: c for c in mode_costs(rows=100, max_expert_rows=200, dim=8,
                                        expert_params=384, num_experts=2, s=2)}
    # r=0: gather both experts (2*384 - 384/2 = 576 received), reduce-scatter as much.
    assert costs[0].weight_elems == 2 * 576 and costs[0].token_elems == 0
    # r=1: gather within the pair (384 - 192); rows: max(1*100, 1*200/2) = 100, x4 x D.
    assert costs[1].weight_elems == 2 * 192 and costs[1].token_elems == 4 * 100 * 8
    # r=2: no weights; every row twice: max(200, 2*200/2) = 200.
    assert costs[2].weight_elems == 0 and costs[2].token_elems == 4 * 200 * 8
    # 1152 < 3584 < 6400: gathering wins for this small expert
    assert choose_r(100, 200, 8, 384, 2, 2) == 0


def test_choice_moves_with_tokens_and_weights():
    D, E, s = 8, 2, 2
    # Large experts, few rows: expert-tensor-parallel moves no weights.
    P = 3 * 4096 * D
    assert choose_r(rows=10, max_expert_rows=20, dim=D, expert_params=P, num_experts=E, s=s) == 2
    # Between: r=1 costs 2*(P/2) + 4*R*D, r=2 costs 8*R*D, r=0 costs 2*(2P - P/2).
    # With P = 3*64*8 = 1536: r=1 = 1536 + 32R, r=2 = 64R, r=0 = 4608; R=60: 3456 < 3840.
    assert choose_r(60, 120, D, 1536, E, s) == 1
    assert choose_r(40, 80, D, 1536, E, s) == 2  # 2816 vs 2560: r=2
    # Skew: every row to one expert makes its ranks the bottleneck of r >= 1.
    balanced = choose_r(60, 120, D, 1536, E, s)
    skewed = choose_r(60, 240, D, 1536, E, s)  # r=1: 1536 + 32*120 = 5376 > 4608
    assert (balanced, skewed) == (1, 0)


def test_ties_prefer_expert_parallel():
    # D=8, balanced: r=1 costs 2*(P - P/2) + 4*R*8 = P + 32R, r=2 costs 4*2R*8 = 64R:
    # equal at P = 32R (R=10, P=320), and r=0 (3P = 960) is dearer.
    costs = {c.r: c.total for c in mode_costs(10, 20, 8, 320, 2, 2)}
    assert costs[1] == costs[2] < costs[0]
    assert choose_r(10, 20, 8, 320, 2, 2) == 1


BASE = [o for o in TINY if not o.startswith("model.num_experts")]


def _validate(extra, world=4):
    return validate(compose(BASE + extra), world)


def test_layouts_the_config_accepts_and_refuses():
    assert _validate(["model.num_experts=2", "parallel.ep=4"]).ep == 4
    assert _validate(["model.num_experts=1", "model.top_k=1", "parallel.ep=4",
                      "parallel.expert_r=2"]).ep == 4
    with pytest.raises(ConfigError, match=r"parallel.ep=4.*ep must divide the experts"):
        _validate(["model.num_experts=3", "model.top_k=2", "parallel.ep=4"])
    with pytest.raises(ConfigError, match=r"parallel.expert_r=3 .*valid modes are r in \[0, 1, 2\]"):
        _validate(["model.num_experts=2", "parallel.ep=4", "parallel.expert_r=3"])
    with pytest.raises(ConfigError, match=r"parallel.expert_r=0 .*only mode is r=1"):
        _validate(["model.num_experts=4", "parallel.ep=4", "parallel.expert_r=0"])
    with pytest.raises(ConfigError, match=r"model.expert_hidden=30 .*multiple of 4"):
        _validate(["model.num_experts=1", "model.top_k=1", "parallel.ep=4",
                   "model.expert_hidden=30"])
    with pytest.raises(ConfigError, match=r"parallel.dp_mode=replicate"):
        _validate(["model.num_experts=1", "model.top_k=1", "parallel.ep=2"])  # edp=2, FSDP
    assert _validate(["model.num_experts=1", "model.top_k=1", "parallel.ep=2",
                      "parallel.dp_mode=replicate"]).ep == 2
    with pytest.raises(ConfigError, match=r"moe.a2a_overlap_chunks=2 .*sharded experts"):
        _validate(["model.num_experts=2", "parallel.ep=4", "moe.a2a_overlap_chunks=2"])
