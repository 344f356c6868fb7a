"""The routing callbacks: the expert-bias state through a real checkpoint and resume, one
bias step of exactly +-rate per optimizer step under gradient accumulation, the collapse
monitor's events, and the registry's error for an unknown name.

Legend: L MoE layers, E experts.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from moetrain.config.schema import BiasUpdate, ConfigError
from moetrain.metrics import read_metrics
from moetrain.models.moe.routing import bias_delta
from moetrain.train.callbacks import (
    BalanceMonitorCallback,
    ExpertBiasCallback,
    RoutingContextCallback,
    default_callbacks,
)
from moetrain.train.main import run
from moetrain.train.trainer import Trainer
from tests.conftest import compose

AUX_FREE = ["moe/router=aux_free", "moe.aux_loss_coef=0"]
RATE = 1e-3  # conf/moe/router/aux_free.yaml


def _steps(run_dir: Path) -> list[dict]:
    return [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]


def _capture_trainers(monkeypatch) -> list[Trainer]:
    trainers: list[Trainer] = []
    fit = Trainer.fit

    def recording_fit(self):
        trainers.append(self)
        return fit(self)

    monkeypatch.setattr(Trainer, "fit", recording_fit)
    return trainers


def _biases(trainer: Trainer) -> torch.Tensor:
    return torch.stack([m.router.expert_bias.detach().clone() for m in trainer.pm.moe_layers])


def _callback(trainer: Trainer, kind: type):
    return next(cb for cb in trainer.callbacks if isinstance(cb, kind))


def _checkpoint(path: Path, tmp_path: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{path.parent.parent.name}_{path.name}.pt"
    dcp_to_torch_save(str(path), str(out))
    return torch.load(out, weights_only=False)


def _ckpt_biases(sd: dict) -> torch.Tensor:
    model = sd["model_optim"]["model"]
    keys = sorted(k for k in model if k.endswith("router.expert_bias"))
    assert keys, "the checkpoint holds no expert_bias"
    return torch.stack([model[k] for k in keys])


def test_expert_bias_state_round_trips_through_checkpoint(tiny_overrides, tmp_path, monkeypatch):
    trainers = _capture_trainers(monkeypatch)
    base = [o for o in tiny_overrides if not o.startswith("run.dir")]
    # collapse_fraction=0.9: most steps have an expert below 0.9/E of the rows, so the
    # balance monitor's run lengths are non-zero at the checkpoints (no event: 50 steps).
    opts = base + AUX_FREE + ["checkpoint.every=3", "checkpoint.keep=0", "train.steps=6",
                              "logging.collapse_fraction=0.9"]
    ref_dir, res_dir = tmp_path / "ref", tmp_path / "resumed"
    run(compose(opts + [f"run.dir={ref_dir}"]))
    ref = trainers[-1]
    ref_bias = _biases(ref)
    assert _callback(ref, ExpertBiasCallback).updates == 6
    assert ref_bias.abs().max() > 0  # the bias did move
    # The run killed after its step-3 checkpoint: the same directory without step 6.
    shutil.copytree(ref_dir, res_dir)
    shutil.rmtree(res_dir / "checkpoints" / "step_0000006")

    at_start = {}

    def on_train_start(self, trainer):
        at_start.update(updates=self.updates, bias=_biases(trainer))

    monkeypatch.setattr(ExpertBiasCallback, "on_train_start", on_train_start)
    run(compose(opts + [f"run.dir={res_dir}"]))
    res = trainers[-1]

    # Restored at step 3: the callback's count and the model's float32 bias.
    ck3 = _checkpoint(ref_dir / "checkpoints" / "step_0000003", tmp_path)
    assert ck3["callback.expert_bias"]["updates"] == 3
    assert at_start["updates"] == 3
    assert at_start["bias"].dtype == torch.float32
    assert torch.equal(at_start["bias"], _ckpt_biases(ck3))
    assert not torch.equal(_ckpt_biases(ck3), ref_bias)  # steps 4-6 moved it further
    # The resumed run ends where the uninterrupted one did.
    assert _callback(res, ExpertBiasCallback).updates == 6
    assert torch.equal(_biases(res), ref_bias)
    ref_steps, res_steps = _steps(ref_dir), _steps(res_dir)
    assert [m["step"] for m in res_steps] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(ref_steps, res_steps):
        for key in ("loss", "grad_norm", "aux_loss", "expert_bias_spread"):
            assert a[key] == b[key], (a["step"], key)
    ck6_ref = _checkpoint(ref_dir / "checkpoints" / "step_0000006", tmp_path)
    ck6_res = _checkpoint(res_dir / "checkpoints" / "step_0000006", tmp_path)
    assert torch.equal(_ckpt_biases(ck6_res), ref_bias)
    assert torch.equal(_ckpt_biases(ck6_ref), ref_bias)
    assert ck6_res["callback.expert_bias"]["updates"] == 6
    run_LE = ck6_ref["callback.balance_monitor"]["run_LE"]
    assert run_LE.sum() > 0
    assert torch.equal(ck6_res["callback.balance_monitor"]["run_LE"], run_LE)


def test_bias_moves_once_per_step_by_rate_with_accumulation(tiny_overrides, monkeypatch):
    N = 4
    trainers = _capture_trainers(monkeypatch)
    calls: list[dict] = []
    on_step_end = ExpertBiasCallback.on_step_end

    def recording_step_end(self, trainer, step, metrics):
        before = _biases(trainer)
        on_step_end(self, trainer, step, metrics)
        calls.append({"step": step, "before": before, "after": _biases(trainer),
                      "counts": trainer.moe_stats.last_counts_LE.clone()})

    vals: list[tuple[torch.Tensor, torch.Tensor]] = []
    validate = Trainer.validate

    def recording_validate(self):
        before = _biases(self)
        out = validate(self)
        vals.append((before, _biases(self)))
        return out

    monkeypatch.setattr(ExpertBiasCallback, "on_step_end", recording_step_end)
    monkeypatch.setattr(Trainer, "validate", recording_validate)
    # TINY: global batch 8, micro-batch 2, one rank -> 4 micro-batches per step.
    cfg = compose(tiny_overrides + AUX_FREE + [f"train.steps={N}", "eval.every=1"])
    assert cfg.train.global_batch_size // cfg.train.micro_batch_size == 4
    run(cfg)
    trainer = trainers[-1]

    assert [c["step"] for c in calls] == list(range(1, N + 1))  # once per optimizer step
    assert _callback(trainer, ExpertBiasCallback).updates == N
    rows = cfg.train.global_batch_size * cfg.train.seq_len * cfg.model.top_k
    prev = torch.zeros_like(calls[0]["before"])
    for c in calls:
        # The step's counts hold all 4 micro-batches (and no validation forward).
        assert c["counts"].sum(dim=1).tolist() == [float(rows)] * c["counts"].shape[0]
        assert torch.equal(c["before"], prev)  # nothing else moved it since the last step
        delta = c["after"] - c["before"]
        torch.testing.assert_close(delta, bias_delta(c["counts"], RATE, BiasUpdate.sign),
                                   rtol=0, atol=1e-7)
        steps_of_rate = delta / RATE
        assert ((steps_of_rate.abs() - 1).abs() < 1e-3).logical_or(delta == 0).all()
        prev = c["after"]
    final = _biases(trainer)
    assert torch.equal(final, calls[-1]["after"])
    multiples = final / RATE
    assert (multiples - multiples.round()).abs().max() < 1e-3
    assert multiples.abs().max() <= N + 1e-3 and multiples.abs().max() >= 1 - 1e-3
    assert len(vals) == N + 1  # step 0 and after every step
    for before, after in vals:
        assert torch.equal(before, after)


class _Metrics:
    def __init__(self) -> None:
        self.events: list[tuple[int, dict]] = []

    def log_event(self, step: int, record: dict) -> None:
        self.events.append((step, dict(record)))


def _fake_trainer() -> SimpleNamespace:
    return SimpleNamespace(moe_stats=SimpleNamespace(last_counts_LE=None), metrics=_Metrics())


def _feed(cb: BalanceMonitorCallback, trainer, step: int, expert2_rows: float) -> None:
    """Layer 0 balanced; layer 1 with expert 2 at ``expert2_rows`` of 100 routed rows."""
    rest = (100.0 - expert2_rows) / 3
    trainer.moe_stats.last_counts_LE = torch.tensor(
        [[25.0, 25.0, 25.0, 25.0], [rest, rest, expert2_rows, rest]])
    cb.on_step_end(trainer, step, {})


def test_balance_monitor_reports_one_collapse_per_episode(caplog):
    E, steps = 4, 3
    cb = BalanceMonitorCallback(0.1, steps, num_layers=2, num_experts=E)
    tr = _fake_trainer()
    # Fair share 1/4; "low" is a share below 0.1/4 = 0.025 of the rows (strictly).
    _feed(cb, tr, 1, 2.5)  # exactly 0.025: not low
    assert cb.run_LE.tolist() == [[0] * 4, [0] * 4]
    for step in (2, 3, 4, 5, 6):  # low from step 2: the 3rd low step is step 4
        _feed(cb, tr, step, 1.0)
    assert tr.metrics.events == [(4, {"event": "expert_collapse", "layer": 1, "expert": 2,
                                      "steps": steps, "share": pytest.approx(0.01)})]
    assert int(cb.run_LE[1, 2]) == 5 and int(cb.run_LE.sum()) == 5
    assert "layer 1 expert 2" in caplog.text
    _feed(cb, tr, 7, 30.0)  # recovery resets the run
    assert int(cb.run_LE.sum()) == 0
    for step in (8, 9):
        _feed(cb, tr, step, 0.0)
    assert len(tr.metrics.events) == 1
    # The run length is checkpointed: a resumed monitor finishes the episode.
    resumed = BalanceMonitorCallback(0.1, steps, num_layers=2, num_experts=E)
    resumed.load_state_dict(cb.state_dict())
    _feed(resumed, tr, 10, 0.0)
    assert [(s, e["expert"], e["share"]) for s, e in tr.metrics.events[1:]] == [(10, 2, 0.0)]
    # Disabled with collapse_steps=0.
    off = BalanceMonitorCallback(0.1, 0, num_layers=2, num_experts=E)
    tr_off = _fake_trainer()
    for step in range(1, 5):
        _feed(off, tr_off, step, 0.0)
    assert tr_off.metrics.events == []


def test_default_callbacks_follow_the_config(tiny_overrides):
    names = [cb.name for cb in default_callbacks(compose(tiny_overrides))]
    assert names == ["routing_context", "balance_monitor"]
    cbs = default_callbacks(compose(tiny_overrides + AUX_FREE + ["logging.collapse_steps=7"]))
    assert [cb.name for cb in cbs] == ["routing_context", "expert_bias", "balance_monitor"]
    assert isinstance(cbs[0], RoutingContextCallback)
    bias = _callback(SimpleNamespace(callbacks=cbs), ExpertBiasCallback)
    assert (bias.rate, bias.rule) == (RATE, BiasUpdate.sign)
    monitor = _callback(SimpleNamespace(callbacks=cbs), BalanceMonitorCallback)
    assert monitor.steps == 7 and tuple(monitor.run_LE.shape) == (2, 4)
    # Naming a callback the config already adds does not add it twice.
    cbs = default_callbacks(compose(tiny_overrides + ["callbacks=[expert_bias]"]))
    assert [cb.name for cb in cbs] == ["routing_context", "balance_monitor", "expert_bias"]


def test_default_callbacks_unknown_name_raises_config_error(tiny_overrides):
    cfg = compose(tiny_overrides + ["callbacks=[balance_monitor,no_such_callback]"])
    with pytest.raises(ConfigError, match=r"callbacks=.*'no_such_callback'.*registered"):
        default_callbacks(cfg)


def test_bias_enabled_on_resume_starts_from_the_saved_model(tiny_overrides, tmp_path,
                                                             monkeypatch, caplog):
    """A checkpoint saved without the expert-bias callback (rate 0) resumes with the
    update switched on: the callback starts at 0 updates, the bias at the saved (zero)
    bias, and the run continues on the saved model (step 4's loss equals a run that never
    stopped, since the bias only moves after step 4's forward)."""
    trainers = _capture_trainers(monkeypatch)
    at_start: dict[int, dict] = {}  # id(trainer) -> callback states after the resume
    after: dict[tuple[int, int], dict] = {}  # (id(trainer), step) -> states after the step

    def on_train_start(self, trainer):
        at_start[id(trainer)] = {"bias": _biases(trainer), "run_LE": self.run_LE.clone(),
                                 "cbs": {cb.name: cb.state_dict() for cb in trainer.callbacks}}

    monitor_step_end = BalanceMonitorCallback.on_step_end

    def recording_step_end(self, trainer, step, metrics):  # the last callback of a step
        monitor_step_end(self, trainer, step, metrics)
        after[id(trainer), step] = {"bias": _biases(trainer), "run_LE": self.run_LE.clone(),
                                    "counts": trainer.moe_stats.last_counts_LE.clone()}

    monkeypatch.setattr(BalanceMonitorCallback, "on_train_start", on_train_start)
    monkeypatch.setattr(BalanceMonitorCallback, "on_step_end", recording_step_end)
    base = [o for o in tiny_overrides if not o.startswith("run.dir")]
    # collapse_fraction=0.9: the monitor's run lengths are non-zero at step 3 (no event).
    # No z-loss either way: with bias_update_rate=0 the recipe is plain top-k's (z-loss
    # 1e-3), with the bias on it is aux_free's (none); both runs train the same losses.
    plain = base + ["moe/router=aux_free", "moe.aux_loss_coef=0", "moe.z_loss_coef=0",
                    "moe.router.bias_update_rate=0", "checkpoint.every=3", "train.steps=6",
                    "logging.collapse_fraction=0.9"]
    ref_dir, res_dir = tmp_path / "ref", tmp_path / "resumed"
    run(compose(plain + [f"run.dir={ref_dir}"]))  # the run that never stopped
    ref = id(trainers[-1])
    assert "callback.expert_bias" not in trainers[-1]._state()
    # The same run stopped after its step-3 checkpoint: its directory without step 6.
    shutil.copytree(ref_dir, res_dir)
    shutil.rmtree(res_dir / "checkpoints" / "step_0000006")
    caplog.set_level("WARNING")
    on = [o for o in plain if "bias_update_rate" not in o]
    run(compose(on + [f"run.dir={res_dir}"]))
    res = trainers[-1]
    assert "has no state for callback.expert_bias" in caplog.text

    # After the resume: a fresh expert-bias callback, the saved zero bias, and the balance
    # monitor's run lengths of step 3 (non-zero, so a missed restore would show).
    start = at_start[id(res)]
    assert start["cbs"]["expert_bias"] == {"updates": 0}
    assert torch.equal(start["bias"], torch.zeros_like(start["bias"]))
    assert after[ref, 3]["run_LE"].sum() > 0
    assert torch.equal(start["run_LE"], after[ref, 3]["run_LE"])
    # Step 4 is the uninterrupted run's step 4: same loss, gradient norm and routing.
    steps, ref_steps = _steps(res_dir), _steps(ref_dir)
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "grad_norm", "aux_loss"):
        assert steps[3][key] == ref_steps[3][key], key
    assert torch.equal(after[id(res), 4]["counts"], after[ref, 4]["counts"])
    assert torch.equal(after[id(res), 4]["run_LE"], after[ref, 4]["run_LE"])
    # Then the bias moves once per step from there, by the step-4 counts first.
    assert torch.equal(after[ref, 4]["bias"], torch.zeros_like(start["bias"]))
    torch.testing.assert_close(after[id(res), 4]["bias"],
                               bias_delta(after[ref, 4]["counts"], RATE, BiasUpdate.sign),
                               rtol=0, atol=0)
    assert _callback(res, ExpertBiasCallback).updates == 3  # steps 4, 5, 6
    assert _biases(res).abs().max() > 0


def test_bias_freezes_after_the_token_budget(tiny_overrides, monkeypatch):
    """bias_update_tokens=512 with 256 tokens per step (TINY: 8 x 32): steps 1 and 2
    move the bias, later steps leave it exactly where step 2 put it."""
    trainers = _capture_trainers(monkeypatch)
    snapshots: list[torch.Tensor] = []
    on_step_end = ExpertBiasCallback.on_step_end

    def recording(self, trainer, step, metrics):
        on_step_end(self, trainer, step, metrics)
        snapshots.append(_biases(trainer))

    monkeypatch.setattr(ExpertBiasCallback, "on_step_end", recording)
    run(compose(tiny_overrides + AUX_FREE + ["moe.router.bias_update_tokens=512",
                                             "train.steps=5", "eval.every=0"]))
    assert _callback(trainers[-1], ExpertBiasCallback).updates == 2
    assert not torch.equal(snapshots[0], snapshots[1])
    for later in snapshots[2:]:
        assert torch.equal(later, snapshots[1])
