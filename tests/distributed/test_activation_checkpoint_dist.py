"""Activation checkpointing under expert parallelism and FSDP (4 gloo processes): the
per-step numbers equal the 1-process run without AC. ``full`` re-runs each block's
all-to-all in the backward (twice the forward token bytes); ``selective`` recomputes only
the experts, between the exchanges, and sends no more than without AC."""

from __future__ import annotations

import pytest

from tests.conftest import TINY
from tests.distributed._runs import assert_same_trajectory, step_rows, train

BASE = [o for o in TINY if not o.startswith(("model.num_experts", "train.steps"))] + [
    "model.num_experts=8", "eval.every=0", "train.steps=3",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def _run(tmp_path, cache, extra, world):
    return step_rows(train(BASE + extra + [f"run.dir={tmp_path}", f"data.cache_dir={cache}"],
                           world=world))


def test_ac_under_ep_and_fsdp_matches_single_process(tmp_path, cache):
    ref = _run(tmp_path / "ref", cache, [], 1)
    full = _run(tmp_path / "full", cache, ["parallel.ep=2", "parallel.ac=full"], 4)
    sel = _run(tmp_path / "sel", cache, ["parallel.ep=2", "parallel.ac=selective",
                                         "parallel.ac_attention=true"], 4)
    for got in (full, sel):
        assert len(got) == 3
        assert_same_trajectory(ref, got)
    assert [r["a2a_bytes"] for r in full] == [2 * r["a2a_bytes"] for r in sel]
