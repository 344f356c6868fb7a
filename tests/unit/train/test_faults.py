"""MOETRAIN_FAULTS parsing and matching (the fault-tolerance tests rely on it)."""

from __future__ import annotations

import os
import signal

import pytest

from moetrain import faults


def test_parse_and_match():
    got = faults.parse("mid_step:step=7:rank=1:attempt=0; step_end:step=10:world=1:"
                       "action=hold:seconds=2.5")
    assert got == [faults.Fault("mid_step", step=7, rank=1, attempt=0),
                   faults.Fault("step_end", action="hold", step=10, world=1, seconds=2.5)]
    kill = got[0]
    assert kill.matches("mid_step", step=7, rank=1, world=2, attempt=0)
    assert not kill.matches("mid_step", step=7, rank=1, world=2, attempt=1)  # restarted
    assert not kill.matches("mid_step", step=7, rank=0, world=2, attempt=0)
    assert not kill.matches("sync_save", step=7, rank=1, world=2, attempt=0)
    assert got[1].matches("step_end", step=10, rank=5, world=1, attempt=3)  # unset: any
    assert faults.parse("") == [] and faults.parse(" ; ") == []


@pytest.mark.parametrize("spec,match", [
    ("mid_stp:step=1", "unknown point 'mid_stp'"),
    ("mid_step:step", "bad field 'step'"),
    ("mid_step:when=3", "bad field 'when=3'"),
    ("mid_step:step=x", "step='x' .* is not a number"),
    ("mid_step:action=explode", "unknown action 'explode'"),
    ("step_end:action=nan_grad", "action=nan_grad .* needs gradients: use the point mid_step"),
    ("mid_step:action=kill:param=*", "param= .* applies to action=nan_grad or inf_grad only"),
])
def test_bad_specs_name_the_part(spec, match):
    with pytest.raises(ValueError, match=match):
        faults.parse(spec)


def test_hit_fires_only_the_matching_fault(monkeypatch):
    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    monkeypatch.setenv(faults.ENV, "step_end:step=3:action=sigterm;mid_step:step=3")
    faults.hit("step_end", 2)
    assert sent == []
    faults.hit("step_end", 3)
    assert sent == [(os.getpid(), signal.SIGTERM)]
    faults.hit("mid_step", 3)
    assert sent[-1] == (os.getpid(), signal.SIGKILL)
    monkeypatch.setenv(faults.ENV, "step_end:action=hold:seconds=30")
    faults.hit("step_end", 1, stopped=lambda: True)  # returns at once when stopped
    monkeypatch.delenv(faults.ENV)
    faults.hit("mid_step", 3)
    assert len(sent) == 2


@pytest.mark.parametrize("async_save", [False, True])
def test_commit_points_fire_in_their_state(tmp_path, monkeypatch, async_save):
    """``commit``, ``committed`` and ``retention`` of checkpoint 2 (keep=1) each fire once,
    on the directory states their names promise: marker written under the temporary name;
    renamed, step 1 still there; step 1 withdrawn (``.tmp-del-``), not yet deleted."""
    import re

    import torch
    import torch.distributed as dist

    from moetrain.checkpoint import CheckpointManager
    from moetrain.config import CheckpointConfig

    def listing() -> list[str]:
        """The directory, tokens masked, a ``+`` on directories holding the marker."""
        return sorted(re.sub(r"\.tmp-(del-)?[0-9a-f]{8}$", r".tmp-\1*", p.name)
                      + ("+" if (p / "COMMITTED").is_file() else "")
                      for p in tmp_path.iterdir())

    seen: list[list[str]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: seen.append(listing()))
    monkeypatch.setenv(faults.ENV, "commit:step=2;committed:step=2;retention:step=2")
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mgr = CheckpointManager(CheckpointConfig(dir=str(tmp_path), keep=1,
                                                 async_save=async_save))
        for step in (1, 2):
            mgr.save(step, {"w": {"x": torch.full((4,), float(step))}})
        mgr.close()
    finally:
        if owned:
            dist.destroy_process_group()
    assert seen == [["step_0000001+", "step_0000002.tmp-*+"],
                    ["step_0000001+", "step_0000002+"],
                    ["step_0000001.tmp-del-*+", "step_0000002+"]]
    assert listing() == ["step_0000002+"]


def test_parse_rank_scoped_nonfinite_gradients():
    got = faults.parse("mid_step:step=3:rank=1:action=nan_grad:param=*.experts.*;"
                       "mid_step:step=4:action=inf_grad")
    assert got == [faults.Fault("mid_step", action="nan_grad", step=3, rank=1,
                                param="*.experts.*"),
                   faults.Fault("mid_step", action="inf_grad", step=4)]
    assert got[0].matches("mid_step", step=3, rank=1, world=2, attempt=0)
    assert not got[0].matches("mid_step", step=3, rank=0, world=2, attempt=0)


def test_nonfinite_gradients_fill_only_the_matching_rank_step_and_params(monkeypatch):
    """nan_grad fills the named parameters' gradients of the matching step and rank (0
    without a process group) and leaves the others; inf_grad without param= fills all."""
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model(torch.ones(4, 3)).sum().backward()
    clean = {n: p.grad.clone() for n, p in model.named_parameters()}
    monkeypatch.setenv(faults.ENV, "mid_step:step=2:rank=1:action=nan_grad;"
                                   "mid_step:step=3:rank=0:action=nan_grad:param=0.*")
    faults.hit("mid_step", 3, modules=[model])
    for n, p in model.named_parameters():
        if n.startswith("0."):
            assert p.grad.isnan().all(), n
        else:
            assert torch.equal(p.grad, clean[n]), n
    faults.hit("mid_step", 2, modules=[model])  # rank 1's fault: not this process
    assert torch.equal(model[1].weight.grad, clean["1.weight"])
    monkeypatch.setenv(faults.ENV, "mid_step:action=inf_grad")
    faults.hit("mid_step", 1, modules=[model])
    assert all((p.grad == float("inf")).all() for p in model.parameters())
