"""End-to-end in one process: training reduces the loss, and a run resumed from a
mid-run checkpoint logs exactly the losses of the uninterrupted run."""

import shutil
from pathlib import Path

import pytest

from moetrain.metrics import read_metrics
from moetrain.train.main import run
from tests.conftest import compose


def _steps(run_dir: Path) -> list[dict]:
    return [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]


def _vals(run_dir: Path) -> list[dict]:
    return [m for m in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in m]


def test_metrics_contract_and_learning(tiny_overrides, tmp_path):
    summary = run(compose(tiny_overrides + ["train.steps=12", "eval.every=6"]))
    steps = _steps(tmp_path / "run")
    assert [m["step"] for m in steps] == list(range(1, 13))
    for key in ("loss", "aux_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "z_loss",
                "dropped_frac", "router_entropy", "load_imbalance"):
        assert key in steps[0], key
    assert steps[-1]["tokens"] == 12 * 8 * 32  # steps * global batch * seq_len
    assert steps[0]["loss"] == pytest.approx(5.55, abs=0.3)  # ~ln(257) at init
    vals = _vals(tmp_path / "run")
    assert [v["step"] for v in vals] == [0, 6, 12]
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] - 0.5
    assert summary.final_loss == steps[-1]["loss"]


def test_resume_matches_uninterrupted_run(tiny_overrides, tmp_path):
    ref_dir, res_dir = tmp_path / "ref", tmp_path / "resumed"
    base = [o for o in tiny_overrides if not o.startswith("run.dir")]
    run(compose(base + [f"run.dir={ref_dir}"]))
    ckpt = base + [f"run.dir={res_dir}", "checkpoint.every=3", "checkpoint.keep=0"]
    run(compose(ckpt))
    # Simulate a run killed after its step-3 checkpoint: drop the later checkpoint.
    shutil.rmtree(res_dir / "checkpoints" / "step_0000006")
    run(compose(ckpt))  # checkpoint.resume=auto picks step 3

    ref, res = _steps(ref_dir), _steps(res_dir)
    assert [m["step"] for m in res] == [1, 2, 3, 4, 5, 6]  # no duplicated steps
    for a, b in zip(ref, res):
        assert (a["loss"], a["grad_norm"], a["aux_loss"], a["lr"]) == \
               (b["loss"], b["grad_norm"], b["aux_loss"], b["lr"])
    assert [v["val_loss"] for v in _vals(ref_dir)] == [v["val_loss"] for v in _vals(res_dir)]


def test_nonfinite_loss_stops_with_advice(tiny_overrides):
    from moetrain.train.trainer import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="optim.lr"):
        run(compose(tiny_overrides + ["optim.lr=1e30", "optim.grad_clip=0",
                                      "optim.warmup_steps=0", "train.steps=20"]))


def test_sigterm_checkpoints_and_resume_continues(tiny_overrides, tmp_path, monkeypatch):
    """A preempted run (SIGTERM after step 2) checkpoints at that step and exits; the
    re-launched run resumes there and logs the uninterrupted losses."""
    import signal

    from moetrain.train.trainer import Trainer

    base = [o for o in tiny_overrides if not o.startswith("run.dir")]
    run(compose(base + [f"run.dir={tmp_path / 'ref'}"]))

    original = Trainer.train_step

    def preempted_step(self):
        out = original(self)
        if self.progress.step == 2:
            signal.raise_signal(signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "train_step", preempted_step)
    summary = run(compose(base + [f"run.dir={tmp_path / 'job'}"]))
    assert summary.steps == 2
    assert (tmp_path / "job" / "checkpoints" / "step_0000002").is_dir()
    monkeypatch.setattr(Trainer, "train_step", original)
    run(compose(base + [f"run.dir={tmp_path / 'job'}"]))
    ref, got = _steps(tmp_path / "ref"), _steps(tmp_path / "job")
    assert [(r["step"], r["loss"]) for r in ref] == [(r["step"], r["loss"]) for r in got]
