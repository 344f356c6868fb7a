"""``moe.a2a_overlap_chunks=auto``: training with a chunk count that the tuner changes at
every step logs the 1-process losses and gradient norms.

One spawn of 2 gloo ranks trains two 4-step runs with parallel.ep=2: dropless, and
capacity 1.0 (rows dropped). The tuner's exploration runs 1, 2, 4 and 8 chunks on steps
1-4, which metrics.jsonl's ``moe/a2a_chunks`` shows, and each rank's tuner returns the
same counts, which the training exchanges ran with. Losses, gradient norms, aux losses and validation losses match the
1-process run composed the same way within 1e-5 relative.
"""

from __future__ import annotations

import os

import pytest

from moetrain.testing import run_distributed
from tests.conftest import TINY
from tests.distributed._runs import assert_same_trajectory, step_rows, train

RTOL = 1e-5
STEPS = 4
KEYS = ("loss", "grad_norm", "aux_loss")
CASES = {"dropless": [], "capacity": ["moe.dispatch=capacity", "moe.capacity_factor=1.0"]}


def _base(data_cache: str) -> list[str]:
    return [o for o in TINY if not o.startswith(("train.steps", "eval."))] + [
        f"train.steps={STEPS}", "eval.every=2", "eval.batches=2", f"data.cache_dir={data_cache}"]


def _two_runs(rank: int, world: int, runs: dict[str, list[str]], store_dir: str):
    """Each run in turn; the entry point tears the process group down at its end, so the
    next run gets a fresh one. Each rank also returns the counts its tuner reported and
    the chunks of every training (gradient-enabled) exchange plan."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from moetrain.parallel.expert import ChunkedAllToAllDispatcher
    from moetrain.parallel.overlap_tuner import OverlapTuner
    from tests.distributed._runs import _train_rank

    used: list[int] = []
    planned: list[int] = []
    real_step, real_dispatch = OverlapTuner.step, ChunkedAllToAllDispatcher.dispatch

    def step(self, seconds):
        used.append(real_step(self, seconds))
        return used[-1]

    def dispatch(self, *args, **kwargs):
        x_RD, meta = real_dispatch(self, *args, **kwargs)
        if torch.is_grad_enabled():
            planned.append(len(meta.plan.in_splits))
        return x_RD, meta

    # This rank's process only.
    OverlapTuner.step, ChunkedAllToAllDispatcher.dispatch = step, dispatch
    out = {}
    for i, (name, overrides) in enumerate(runs.items()):
        if not dist.is_initialized():
            store = dist.FileStore(os.path.join(store_dir, f"store{i}"), world)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                    timeout=timedelta(seconds=120))
        used.clear()
        planned.clear()
        out[name] = {"metrics": _train_rank(rank, world, overrides), "used": list(used),
                     "planned": list(planned)}
    return out


@pytest.fixture(scope="module")
def adaptive(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("adaptive_overlap")
    runs = {name: _base(data_cache) + extra + [
        "parallel.ep=2", "moe.a2a_overlap_chunks=auto", f"run.dir={root / name}"]
        for name, extra in CASES.items()}
    got = run_distributed(_two_runs, 2, runs, str(root), timeout_s=240)
    refs = {name: train(_base(data_cache) + extra + [f"run.dir={root / ('ref_' + name)}"])
            for name, extra in CASES.items()}
    return got, refs


@pytest.mark.parametrize("case", list(CASES))
def test_auto_chunks_change_every_step_and_match_single_process(adaptive, case):
    got, refs = adaptive
    ref, rows = refs[case], got[0][case]["metrics"]
    steps = step_rows(rows)
    assert [r["moe/a2a_chunks"] for r in steps] == [1, 2, 4, 8]
    # Each step: 2 MoE layers x 2 micro-batches per rank, all with the step's count.
    for rank in (0, 1):
        assert got[rank][case]["used"] == [1, 2, 4, 8]
        assert got[rank][case]["planned"] == [n for n in (1, 2, 4, 8) for _ in range(4)]
    assert all(r["a2a_bytes"] > 0 for r in steps)
    if case == "capacity":  # capacity 1.0 drops rows: the dropping path is exercised
        assert any(r["dropped_frac"] > 0 for r in steps), steps
    diffs = {k: max(abs(a[k] - b[k]) / abs(a[k]) for a, b in zip(step_rows(ref), steps))
             for k in KEYS}
    val = [(a["val_loss"], b["val_loss"]) for a, b in zip(
        [r for r in ref if "val_loss" in r], [r for r in rows if "val_loss" in r])]
    assert len(val) == 3  # steps 0, 2, 4
    diffs["val_loss"] = max(abs(a - b) / abs(a) for a, b in val)
    print(f"{case}: max |rel diff| to the 1-process run: {diffs}")
    assert_same_trajectory(ref, rows, rtol=RTOL, keys=KEYS)
    assert diffs["val_loss"] <= RTOL
