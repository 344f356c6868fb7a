"""init.from_dense under expert parallelism: ep=2 x dp (4 processes, FSDP) builds the
upcycled model and the reused optimizer state on every rank and keeps its shards; it
trains the 1-process trajectory. Drop-Upcycling makes the experts differ, so a rank that
kept the wrong experts' weights or moments would show in the losses."""

from __future__ import annotations

from tests.conftest import TINY
from tests.distributed._runs import assert_same_trajectory, step_rows, train

RUN = TINY + ["eval.every=0", "train.steps=4"]


def test_init_from_dense_under_ep_matches_one_process(tmp_path, data_cache):
    common = [f"data.cache_dir={data_cache}"]
    train(RUN + common + ["model.first_dense_layers=2", "checkpoint.every=2", "train.steps=2",
                          f"run.dir={tmp_path / 'dense'}"])
    dense = tmp_path / "dense" / "checkpoints" / "step_0000002"
    moe = RUN + common + ["model.expert_hidden=64", f"init.from_dense={dense}",
                          "init.drop_ratio=0.5", "init.reuse_optimizer=true"]
    ref = train(moe + [f"run.dir={tmp_path / 'ref'}"])
    got = train(moe + ["parallel.ep=2", f"run.dir={tmp_path / 'ep2'}"], world=4)
    assert [r["step"] for r in step_rows(got)] == [1, 2, 3, 4]
    assert_same_trajectory(ref, got)
