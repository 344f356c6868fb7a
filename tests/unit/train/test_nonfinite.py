"""Non-finite steps: a step whose loss or gradient norm is NaN/inf is skipped (weights and
optimizer state bit-identical), counted in metrics.jsonl, and the run continues as one
that consumed the step's data without updating; ``train.max_skipped_steps`` consecutive
skips stop the run before the bad step's checkpoint; the counters survive a resume.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moetrain.metrics import read_metrics
from moetrain.train.main import run
from moetrain.train.trainer import NonFiniteLossError, Progress, Trainer
from tests.conftest import compose

BAD = 2  # progress.step before the injected step: logged as step 3


def _steps(run_dir: Path) -> list[dict]:
    return [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]


def _snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    assert trainer.optimizers[0].state or trainer.progress.step == 0
    out = {f"param.{i}.{k}": v.detach().clone()
           for i, part in enumerate(trainer.pm.parts) for k, v in part.state_dict().items()}
    for i, opt in enumerate(trainer.optimizers):
        for j, state in enumerate(opt.state.values()):
            for k, v in state.items():
                out[f"optim.{i}.{j}.{k}"] = torch.as_tensor(v).detach().clone()
    return out


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def _inject_inf(monkeypatch, bad_steps) -> None:
    """Multiply the training loss of the steps whose progress.step is in ``bad_steps`` by
    inf: an inf loss and non-finite gradients."""
    loss_fn = Trainer._loss

    def loss(self, inputs, targets):
        out = loss_fn(self, inputs, targets)
        if self.model.training and self.progress.step in bad_steps:
            out = out * float("inf")
        return out

    monkeypatch.setattr(Trainer, "_loss", loss)


def _record(monkeypatch, around: int) -> tuple[list[Trainer], dict]:
    """Capture the trainer, and its state before and after the step at ``around``."""
    trainers, snaps = [], {}
    step_fn = Trainer.train_step

    def train_step(self):
        if not trainers:
            trainers.append(self)
        at = self.progress.step
        if at == around:
            snaps["before"] = _snapshot(self)
        out = step_fn(self)
        if at == around:
            snaps["after"] = _snapshot(self)
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)
    return trainers, snaps


def test_nonfinite_step_is_skipped(tiny_overrides, tmp_path, monkeypatch, caplog):
    base = [o for o in tiny_overrides if not o.startswith("run.dir")] + ["eval.every=0"]

    # Reference: step 3's data is consumed but its update is a no-op (no optimizer.step).
    with monkeypatch.context() as m:
        trainers, _ = _record(m, BAD)
        step_fn = Trainer.train_step

        def no_update_step(self):
            if self.progress.step != BAD:
                return step_fn(self)
            self.optimizer.step = lambda *a, **k: None  # instance attribute, this step only
            try:
                return step_fn(self)
            finally:
                del self.optimizer.step

        m.setattr(Trainer, "train_step", no_update_step)
        run(compose(base + [f"run.dir={tmp_path / 'ref'}"]))
        ref_final = _snapshot(trainers[0])

    with monkeypatch.context() as m:
        _inject_inf(m, {BAD})
        trainers, snaps = _record(m, BAD)
        with caplog.at_level("WARNING", logger="moetrain.train.trainer"):
            run(compose(base + [f"run.dir={tmp_path / 'inf'}"]))
        final = _snapshot(trainers[0])

    _assert_identical(snaps["before"], snaps["after"])  # nothing moved on the bad step
    assert any("step 3 skipped" in r.getMessage() for r in caplog.records)
    ref, got = _steps(tmp_path / "ref"), _steps(tmp_path / "inf")
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5, 6]  # the step counts
    assert [m["skipped_steps"] for m in got] == [0, 0, 1, 1, 1, 1]
    assert [m["skipped"] for m in got] == [0, 0, 1, 0, 0, 0]
    assert got[2]["loss"] == float("inf")
    for a, b in zip(ref, got):
        assert a["lr"] == b["lr"]  # the schedule advances over the skipped step
        if a["step"] != BAD + 1:
            assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), a["step"]
    _assert_identical(ref_final, final)


def test_consecutive_skips_stop_before_checkpointing(tiny_overrides, tmp_path, monkeypatch):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run_dir = tmp_path / "run"
    opts = [o for o in tiny_overrides if not o.startswith("run.dir")] + [
        f"run.dir={run_dir}", "eval.every=0", "checkpoint.every=2", "checkpoint.keep=0",
        "train.max_skipped_steps=2"]
    _inject_inf(monkeypatch, {2, 3, 4, 5})  # steps 3, 4, ... are bad
    _, snaps = _record(monkeypatch, BAD)
    with pytest.raises(NonFiniteLossError, match=r"steps 3\.\.4.*optim\.lr"):
        run(compose(opts))

    got = _steps(run_dir)
    assert [m["skipped_steps"] for m in got] == [0, 0, 1, 2]
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step_0000002"]  # not the step-4 state
    out = tmp_path / "ckpt.pt"
    dcp_to_torch_save(str(run_dir / "checkpoints" / "step_0000002"), str(out))
    model = torch.load(out, weights_only=False)["model_optim"]["model"]
    good = snaps["before"]  # the state after step 2, which steps 3 and 4 left untouched
    for k, v in model.items():
        assert torch.equal(v, good[f"param.0.{k}"]), k


@pytest.mark.parametrize("never", [["train.max_skipped_steps=0"],
                                   ["train.max_skipped_steps=1", "train.fail_on_nonfinite=false"]])
def test_skipping_without_stopping(tiny_overrides, monkeypatch, never):
    _inject_inf(monkeypatch, set(range(1, 6)))  # every step but the first
    summary = run(compose(tiny_overrides + ["eval.every=0"] + never))
    assert summary.steps == 6


def test_skip_counters_round_trip_and_default():
    from moetrain.train.trainer import SkipState

    p = Progress(step=7, tokens=70, skipped_steps=3, consecutive_skips=1)
    q = Progress(step=7, tokens=70)
    SkipState(q).load_state_dict(SkipState(p).state_dict())
    assert q == p
    old = Progress(skipped_steps=5, consecutive_skips=2)
    SkipState(old).load_state_dict({})
    assert old == Progress()


def test_resume_keeps_skip_counters_and_loads_older_checkpoints(tiny_overrides, tmp_path,
                                                                 monkeypatch):
    base = [o for o in tiny_overrides if not o.startswith("run.dir")] + [
        "eval.every=0", "checkpoint.every=3", "checkpoint.keep=0"]
    # A run skipping step 2 and checkpointing at 3, resumed: the count goes on.
    with monkeypatch.context() as m:
        _inject_inf(m, {1})
        run(compose(base + [f"run.dir={tmp_path / 'a'}", "train.stop_at=3"]))
    run(compose(base + [f"run.dir={tmp_path / 'a'}"]))
    assert [s["skipped_steps"] for s in _steps(tmp_path / "a")] == [0, 1, 1, 1, 1, 1]

    # A checkpoint written before the counters existed (progress = step and tokens).
    with monkeypatch.context() as m:
        m.setattr(Trainer, "_state", lambda self: {
            k: v for k, v in _STATE(self).items() if k != "skips"})
        run(compose(base + [f"run.dir={tmp_path / 'b'}", "train.stop_at=3"]))
    summary = run(compose(base + [f"run.dir={tmp_path / 'b'}"]))
    assert summary.steps == 6
    assert [s["skipped_steps"] for s in _steps(tmp_path / "b")] == [0] * 6


_STATE = Trainer._state
