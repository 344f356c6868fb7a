"""Checkpoints are layout-free: a run that goes ep=4 (4 processes) -> ep=2 (2 processes)
-> 1 process, resuming each time, logs the losses of the uninterrupted 1-process run."""

from __future__ import annotations

from tests.conftest import TINY
from tests.distributed._runs import assert_same_trajectory, step_rows, train

BASE = [o for o in TINY if not o.startswith(("model.num_experts", "train.steps"))] + [
    "model.num_experts=8", "eval.every=0", "train.steps=9",
]


def test_resume_across_ep_degrees(tmp_path, data_cache):
    common = BASE + [f"data.cache_dir={data_cache}"]
    ref = train(common + [f"run.dir={tmp_path / 'ref'}"])

    run = common + [f"run.dir={tmp_path / 'resharded'}", "checkpoint.every=0"]
    train(run + ["parallel.ep=4", "train.stop_at=3"], world=4)
    train(run + ["parallel.ep=2", "train.stop_at=6"], world=2)
    got = train(run, world=1)  # resume=auto from the step-6 checkpoint written with ep=2

    assert [r["step"] for r in step_rows(got)] == list(range(1, 10))
    assert_same_trajectory(ref, got)
    assert (tmp_path / "resharded" / "checkpoints" / "step_0000003").is_dir()
