"""Parallel layouts change speed, not math: a 4-process CPU run (gloo) logs the
1-process per-step losses, aux losses and gradient norms within 1e-5 relative."""

from __future__ import annotations

import contextlib

import pytest

from moetrain.config.schema import DropPolicy
from tests.conftest import TINY
from tests.distributed._runs import assert_same_trajectory, step_rows, train

# 8 experts so ep=4 leaves 2 per rank; 6 steps, each of 4 micro-batches of 2 sequences.
BASE = [o for o in TINY if not o.startswith("model.num_experts")] + [
    "model.num_experts=8", "eval.every=0",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def _overrides(tmp_path, cache, name, extra):
    return BASE + extra + [f"run.dir={tmp_path / name}", f"data.cache_dir={cache}"]


# Capacity mode keeps the first tokens per expert (``position``), not the highest router
# weights (``probs``, the default): TINY's top-2 weights tie bit for bit at an expert's
# capacity boundary 12 times in the 48 dispatches of 6 steps (mostly repeated tokens with
# identical score rows), so a reduction-order ulp flips which token is kept. ``position``
# decides on the chosen experts alone, as dropless does. tests/distributed/test_alltoall.py
# holds every drop policy under EP to the single-device dispatcher.
CAPACITY = ["moe.capacity_factor=1.0", "moe.drop_policy=position"]

# The 4-process layouts move the router's selection scores by at most 4.5e-8 over the 6
# steps (reduction order; measured on each layout below). A routing choice of the
# 1-process run within 10x that of a tie could go the other way on another processor.
TIE_MARGIN = 5e-7


@contextlib.contextmanager
def _routing_margins():
    """Record how far each discrete routing choice of an in-process run is from a tie.

    ``topk``: per router call, the smallest gap between a token's K-th and (K+1)-th
    selection score (TINY routes without expert groups). ``capacity``: per ``probs``
    capacity drop, the smallest gap between an expert's lowest kept and highest dropped
    weight (``position`` and ``slot`` decide on the chosen experts, with no float gap).
    """
    from moetrain.models.moe import dispatcher, routing

    gaps = {"topk": [], "capacity": []}
    topk_select, capacity_keep = routing.topk_select, dispatcher.capacity_keep

    def select(raw_TE, top_k, bias_E=None, *args, **kwargs):
        sel_TE = raw_TE.detach().float()
        if bias_E is not None:
            sel_TE = sel_TE + bias_E.float()
        top_TK1 = sel_TE.topk(top_k + 1, dim=-1).values
        gaps["topk"].append(float((top_TK1[:, -2] - top_TK1[:, -1]).min()))
        return topk_select(raw_TE, top_k, bias_E, *args, **kwargs)

    def keep(ids_TK, num_experts, capacity, policy, weights_TK=None, active_TK=None):
        keep_TK = capacity_keep(ids_TK, num_experts, capacity, policy, weights_TK, active_TK)
        if DropPolicy(policy) == DropPolicy.probs:
            w_TK = weights_TK.detach()
            for g in range(num_experts):
                mine_TK = ids_TK == g
                if (mine_TK & ~keep_TK).any():
                    gaps["capacity"].append(
                        float(w_TK[mine_TK & keep_TK].min() - w_TK[mine_TK & ~keep_TK].max()))
        return keep_TK

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(routing, "topk_select", select)
        mp.setattr(dispatcher, "capacity_keep", keep)
        yield gaps


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """The 1-process runs, each with its routing choices' distance from a tie."""
    out = {}
    tmp = tmp_path_factory.mktemp("ref")
    for mode in ("dropless", "capacity"):
        with _routing_margins() as gaps:
            rows = train(_overrides(tmp, cache, mode, [f"moe.dispatch={mode}"] + CAPACITY))
        out[mode] = {"rows": rows, "gaps": gaps}
    return out


@pytest.mark.parametrize("name,extra,mode", [
    ("dp4", ["parallel.ep=1"], "dropless"),
    ("ep2_edp2", ["parallel.ep=2"], "dropless"),
    ("ep4", ["parallel.ep=4"], "dropless"),
    ("ep2_capacity", ["parallel.ep=2"], "capacity"),
    ("ep2_replicate", ["parallel.ep=2", "parallel.dp_mode=replicate"], "dropless"),
])
def test_layout_matches_single_process(reference, tmp_path, cache, name, extra, mode):
    ref, gaps = reference[mode]["rows"], reference[mode]["gaps"]
    # Every router call was seen (6 steps x 4 micro-batches x 2 layers), and none of its
    # choices is a near-tie that float noise could flip: the setup, not the layout, would
    # fail the comparison below.
    assert len(gaps["topk"]) == 48
    margin = min(gaps["topk"] + gaps["capacity"])
    assert margin > TIE_MARGIN, (
        f"the 1-process {mode} run routes {margin:.1e} from a tie (under {TIE_MARGIN:.0e}): "
        f"change the seed or data so the layouts compare the same routing")
    extra = extra + [f"moe.dispatch={mode}"] + CAPACITY
    got = train(_overrides(tmp_path, cache, name, extra), world=4)
    assert len(step_rows(got)) == 6
    assert_same_trajectory(ref, got)
    if mode == "capacity":  # capacity 1.0 on a random router drops some rows
        assert all(r["dropped_frac"] > 0 for r in step_rows(got))
        assert [r["dropped_frac"] for r in step_rows(got)] == pytest.approx(
            [r["dropped_frac"] for r in step_rows(ref)], rel=1e-6)
    if "parallel.ep=1" not in extra:
        assert all(r["a2a_bytes"] > 0 for r in step_rows(got))


def test_global_batch_aux_statistics(tmp_path, cache):
    """moe.aux_loss_scope=global_batch gathers expert counts over data parallelism in
    global micro-batch order: 2 ranks with one micro-batch of 4 sequences each give the
    1-process run with two micro-batches of 4 (the second uses the counts of both)."""
    extra = ["moe.aux_loss_scope=global_batch", "parallel.ep=2", "train.micro_batch_size=4"]
    ref = train(_overrides(tmp_path, cache, "ref", extra[:1] + extra[2:]))
    got = train(_overrides(tmp_path, cache, "dp2", extra), world=2)
    assert_same_trajectory(ref, got)
    # And it differs from micro-batch statistics, so the test can fail.
    local = train(_overrides(tmp_path, cache, "local", extra[2:]))
    assert abs(step_rows(local)[0]["aux_loss"] - step_rows(got)[0]["aux_loss"]) > 1e-6


def test_one_local_expert_sharded_on_dim1_matches_and_resumes(tmp_path, cache):
    """2 experts with ep=2 on 4 ranks: one local expert per rank over edp=2, which FSDP
    shards on dim 1 (``fsdp.expert_fsdp_shard_dim``; ``test_memory_estimate_dist`` checks
    the placement). The run matches the 1-process run, and its step-3 checkpoint resumes
    in 1 process on the same losses."""
    two = ["model.num_experts=2", "model.top_k=1"]
    ref = train(_overrides(tmp_path, cache, "ref2", two))
    got = train(_overrides(tmp_path, cache, "ep2_local1",
                           two + ["parallel.ep=2", "checkpoint.every=3"]), world=4)
    assert_same_trajectory(ref, got)
    assert all(r["a2a_bytes"] > 0 for r in step_rows(got))
    ckpt = tmp_path / "ep2_local1" / "checkpoints" / "step_0000003"
    resumed = train(_overrides(tmp_path, cache, "resumed", two + [f"checkpoint.resume={ckpt}"]))
    assert [r["step"] for r in step_rows(resumed)] == [4, 5, 6]
    assert_same_trajectory(step_rows(ref)[3:], resumed)


def test_validation_with_uneven_batches_per_rank(tmp_path, cache):
    """eval.batches=3 over dp=2 gives one rank 2 micro-batches and the other 1; with EP
    every forward is a collective, so the short rank runs an uncounted padding batch. The
    validation loss equals the 1-process one (no hang, no double count)."""
    extra = ["eval.every=3", "eval.batches=3", "train.steps=3"]
    ref = train(_overrides(tmp_path, cache, "ref", extra))
    got = train(_overrides(tmp_path, cache, "ep2", extra + ["parallel.ep=2"]), world=2)
    ref_val = [r["val_loss"] for r in ref if "val_loss" in r]
    got_val = [r["val_loss"] for r in got if "val_loss" in r]
    assert len(ref_val) == 2 and got_val == pytest.approx(ref_val, rel=1e-5)
    # a2a_bytes counts the training step only (not the validation before step 1): dispatch
    # and combine of 256 tokens x top-2 x 32 fp32 values in each of the 2 MoE layers.
    assert [r["a2a_bytes"] for r in step_rows(got)] == [2 * 2 * 256 * 2 * 32 * 4] * 3
