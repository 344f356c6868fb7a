"""The rule for an explicit resume from an older step into the same checkpoint directory:
the newest checkpoint is the one committed (or explicitly resumed from) last, so a later
``resume=auto`` continues the new branch, never the abandoned run's higher steps."""

from __future__ import annotations

import json
import logging

import torch
from torch import nn

from moetrain.checkpoint import MARKER, CheckpointManager, ModelOptimizerState
from moetrain.checkpoint.manager import commit_seq
from moetrain.config import CheckpointConfig
from tests.conftest import compose


def _state() -> dict:
    torch.manual_seed(0)
    m = nn.Linear(3, 2)
    return {"model": ModelOptimizerState(m, torch.optim.SGD(m.parameters(), lr=0.1))}


def test_promote_makes_the_resumed_checkpoint_newest(pg, tmp_path, caplog):
    mgr = CheckpointManager(CheckpointConfig(dir=str(tmp_path), keep=0))
    for s in (2, 4, 6):
        mgr.save(s, _state())
    assert [commit_seq(p) for p in mgr.committed()] == [1, 2, 3]
    old = tmp_path / "step_0000002"
    files = {p.name: p.read_bytes() for p in old.iterdir() if p.name != MARKER}
    with caplog.at_level(logging.WARNING):
        mgr.promote(old)
    assert "step_0000004, step_0000006" in caplog.text  # the abandoned steps are named
    assert mgr.latest() == old
    assert json.loads((old / MARKER).read_text())["step"] == 2
    assert {p.name: p.read_bytes() for p in old.iterdir() if p.name != MARKER} == files
    mgr.verify(old)  # the manifest still holds: only the marker changed
    mgr.save(3, _state())  # the new branch
    assert [p.name for p in mgr.committed()] == ["step_0000004", "step_0000006",
                                                 "step_0000002", "step_0000003"]
    mgr.promote(tmp_path / "step_0000003")  # already the newest: nothing changes
    assert commit_seq(tmp_path / "step_0000003") == 5
    # Retention removes the abandoned steps first, never the new branch's.
    keep2 = CheckpointManager(CheckpointConfig(dir=str(tmp_path), keep=2))
    keep2.save(4, _state())  # re-saves step 4 in the new branch
    assert [p.name for p in keep2.committed()] == ["step_0000003", "step_0000004"]


def test_auto_restart_after_an_explicit_older_resume_continues_the_new_branch(
        tiny_overrides, tmp_path, caplog):
    from moetrain.train.main import run

    ck = tmp_path / "ckpt"
    base = tiny_overrides + ["eval.every=0", f"checkpoint.dir={ck}", "checkpoint.keep=0",
                             "checkpoint.every=2"]
    run(compose(base))  # steps 2, 4, 6
    # Branch: resume from step 2 with another learning rate, stop after step 3 (saved).
    branch = base + ["optim.lr=0.0005"]
    run(compose(branch + [f"checkpoint.resume={ck / 'step_0000002'}", "train.stop_at=3"]))
    with caplog.at_level(logging.INFO, logger="moetrain"):
        run(compose(branch + ["checkpoint.resume=auto"]))
    resumed = [r.getMessage() for r in caplog.records if "resumed from" in r.getMessage()]
    assert len(resumed) == 1 and "step_0000003 at step 3" in resumed[0], resumed
    # The restart's steps 4-6 equal one uninterrupted branch run's.
    ref_ck = tmp_path / "ref"
    ref = base + [f"checkpoint.dir={ref_ck}", f"run.dir={tmp_path / 'ref_run'}"]
    run(compose(ref + ["train.stop_at=2"]))
    run(compose(ref + ["optim.lr=0.0005", "checkpoint.resume=auto"]))
    from moetrain.metrics import read_metrics

    def losses(d):
        return {r["step"]: r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r}

    got, want = losses(tmp_path / "run"), losses(tmp_path / "ref_run")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    for s in (3, 4, 5, 6):
        assert abs(got[s] - want[s]) <= 1e-6 * abs(want[s]), (s, got[s], want[s])
