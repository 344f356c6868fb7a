"""Pipeline parallelism changes speed, not math: 2- and 4-process CPU runs (gloo) with
pp=2 log the 1-process per-step losses, aux losses, gradient norms and validation losses
within 1e-5 relative, and checkpoints move between pp=2 (also with tp=2) and 1 process."""

from __future__ import annotations

import pytest

from tests.conftest import TINY
from tests.distributed._runs import assert_same_trajectory, step_rows, train

# 4 layers (one dense, three MoE; a shared expert), GQA with 4 heads for tp=2; 6 steps of
# 4 micro-batches of 2 sequences (2 per step and rank with dp=2); validation at 0, 3, 6.
BASE = [o for o in TINY if not o.startswith(("model.n_heads", "model.n_layers"))] + [
    "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.first_dense_layers=1",
    "model.n_shared_experts=1", "checkpoint.keep=0",
]


def _overrides(root, cache, name, extra=()):
    return BASE + list(extra) + [f"run.dir={root / name}", f"data.cache_dir={cache}"]


def _vals(rows):
    """[step, ..., val_loss, ...]: flat, so pytest.approx applies its tolerance to each."""
    vals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    return [s for s, _ in vals] + [v for _, v in vals]


def _assert_same(ref, got, first_step=1):
    assert [r["step"] for r in step_rows(got)] == list(range(first_step, 7))
    assert_same_trajectory(step_rows(ref)[first_step - 1:], got)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    """The 1-process run; its step-3 checkpoint seeds the 1 process -> pp=2 test."""
    root = tmp_path_factory.mktemp("ref")
    rows = train(_overrides(root, data_cache, "ref", ["checkpoint.every=3"]))
    return rows, root / "ref" / "checkpoints" / "step_0000003"


@pytest.mark.parametrize("name,extra,world", [
    # each rank holds stages r and r+2 of four (one layer each)
    ("interleaved", ["parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2"],
     2),
    # pp=2 x dp=2 (FSDP), experts sharded over ep=2: 2 micro-batches per pipeline
    ("pp2_dp2_ep2", ["parallel.ep=2"], 4),
    ("zero_bubble_dp2_ep2", ["parallel.pp_schedule=zero_bubble", "parallel.pp_virtual_stages=2",
                             "parallel.ep=2"], 4),
])
def test_pp_layout_matches_single_process(reference, tmp_path, data_cache, name, extra, world):
    ref, _ = reference
    got = train(_overrides(tmp_path, data_cache, name, ["parallel.pp=2", *extra]), world=world)
    _assert_same(ref, got)
    assert _vals(got) == pytest.approx(_vals(ref), rel=1e-5)
    if "parallel.ep=2" in extra:  # summed over both stages: 3 MoE layers, dispatch and
        # combine of 256 tokens x top-2 x 32 fp32 values each (no validation traffic)
        assert {r["a2a_bytes"] for r in step_rows(got)} == {2 * 3 * 256 * 2 * 32 * 4}


@pytest.mark.parametrize("name,extra,world", [
    ("pp2_1f1b", [], 2),
    # tp=2 inside each stage: sequence-sharded DTensors cross the stage boundary
    ("pp2_tp2", ["parallel.tp=2", "parallel.ep=2"], 4),
])
def test_pp_checkpoint_resumes_in_one_process(reference, tmp_path, data_cache, name, extra, world):
    """The pp run matches the 1-process run; its step-3 checkpoint (stage modules saved
    under their global FQNs) continues in one process on the same losses."""
    ref, _ = reference
    got = train(_overrides(tmp_path, data_cache, name, ["parallel.pp=2", "checkpoint.every=3",
                                                   *extra]), world=world)
    _assert_same(ref, got)
    assert _vals(got) == pytest.approx(_vals(ref), rel=1e-5)
    ckpt = tmp_path / name / "checkpoints" / "step_0000003"
    resumed = train(_overrides(tmp_path, data_cache, "resumed", [f"checkpoint.resume={ckpt}"]))
    _assert_same(ref, resumed, first_step=4)


def test_one_process_checkpoint_resumes_under_pp(reference, tmp_path, data_cache):
    """The 1-process step-3 checkpoint continues under pp=2 x tp=2 (GPipe) on the same
    losses."""
    ref, ckpt = reference
    got = train(_overrides(tmp_path, data_cache, "pp2_tp2_gpipe", [
        "parallel.pp=2", "parallel.tp=2", "parallel.pp_schedule=gpipe",
        f"checkpoint.resume={ckpt}"]), world=4)
    _assert_same(ref, got, first_step=4)


def test_eight_process_pp_dp_tp_ep(reference, tmp_path, data_cache):
    """All four axes at once: pp=2 x dp=2 x tp=2 on 8 processes, experts over ep=2."""
    ref, _ = reference
    got = train(_overrides(tmp_path, data_cache, "pp2_dp2_tp2_ep2", [
        "parallel.pp=2", "parallel.tp=2", "parallel.ep=2"]), world=8)
    _assert_same(ref, got)
