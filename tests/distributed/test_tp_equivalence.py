"""Tensor parallelism changes speed, not math: 4-process CPU runs (gloo) with tp=2 log the
1-process per-step losses, aux losses and gradient norms within 1e-5 relative, and a
checkpoint written under tp=2 resumes in one process on the uninterrupted trajectory."""

from __future__ import annotations

import pytest

from tests.conftest import TINY
from tests.distributed._runs import assert_same_trajectory, step_rows, train

# One dense and one MoE layer (dense MLP and MoE under TP), GQA (2 query heads per kv
# head), a shared expert, and the 257-token byte vocabulary: uneven over tp=2.
BASE = [o for o in TINY if not o.startswith(("model.n_heads", "model.num_experts"))] + [
    "model.n_heads=4", "model.n_kv_heads=2", "model.num_experts=4", "model.first_dense_layers=1",
    "model.n_shared_experts=1", "eval.every=0",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def _overrides(tmp_path, cache, name, extra=()):
    return BASE + list(extra) + [f"run.dir={tmp_path / name}", f"data.cache_dir={cache}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    return train(_overrides(tmp_path_factory.mktemp("ref"), cache, "ref"))


@pytest.mark.parametrize("name,extra", [
    ("tp2_ep2", ["parallel.tp=2", "parallel.ep=2"]),
    ("tp2_etp", ["parallel.tp=2", "parallel.expert_tp=etp"]),
])
def test_tp_layout_matches_single_process(reference, tmp_path, cache, name, extra):
    got = train(_overrides(tmp_path, cache, name, extra), world=4)
    assert len(step_rows(got)) == 6
    assert_same_trajectory(reference, got)


def test_tp_checkpoint_resumes_in_one_process(reference, tmp_path, cache):
    """tp=2, dp=2 (experts replicated over tp, routers over dp x tp) matches the 1-process
    run; its step-3 checkpoint, loaded by one process, continues on the same losses."""
    tp_run = _overrides(tmp_path, cache, "tp2", ["parallel.tp=2", "checkpoint.every=3",
                                                 "checkpoint.keep=0"])
    got = train(tp_run, world=4)
    assert_same_trajectory(reference, got)
    ckpt = tmp_path / "tp2" / "checkpoints" / "step_0000003"
    assert ckpt.is_dir()
    resumed = train(_overrides(tmp_path, cache, "resumed", [f"checkpoint.resume={ckpt}"]))
    assert [r["step"] for r in step_rows(resumed)] == [4, 5, 6]
    assert_same_trajectory(step_rows(reference)[3:], resumed)
