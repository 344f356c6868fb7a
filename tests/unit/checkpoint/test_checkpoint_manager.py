"""CheckpointManager: exact round trip, RNG restore, retention, atomic commit, resume, async."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from moetrain.checkpoint import (
    MARKER,
    CheckpointManager,
    ModelOptimizerState,
    ObjectState,
    RNGState,
    is_committed,
)
from moetrain.config import CheckpointConfig, ConfigError


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3, bias=False))
    m.register_buffer("counter", torch.tensor([float(seed)]))
    return m


def _trained(seed: int = 0, steps: int = 2) -> tuple[nn.Module, torch.optim.Optimizer]:
    m = _model(seed)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed + 100)
    for _ in range(steps):
        m(torch.randn(4, 6, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return m, opt


def _fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
    m = _model(seed=7)  # different init: a load must overwrite everything
    return m, torch.optim.AdamW(m.parameters(), lr=5e-1, weight_decay=0.0)


def _assert_same(m1, o1, m2, o2) -> None:
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert s1["state"].keys() == s2["state"].keys() and len(s1["state"]) == 5
    for i in s1["state"]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s1["state"][i][name], s2["state"][i][name]), (i, name)
    for key in ("lr", "weight_decay", "betas"):
        assert s2["param_groups"][0][key] == s1["param_groups"][0][key], key
    assert s2["param_groups"][0]["weight_decay"] == 0.1


def test_save_load_roundtrip_is_exact(pg, tmp_path):
    mgr = CheckpointManager(CheckpointConfig(dir=str(tmp_path / "ckpt"), keep=0))
    m, opt = _trained()
    trainer_state = {"step": 3, "tokens": 1234}
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(3):
        opt.step()  # no gradients: parameters and state unchanged
        sched.step()
    state = {
        "model": ModelOptimizerState(m, opt),
        "sched": sched,  # LR schedulers are Stateful by protocol
        "rng": RNGState(),
        "trainer": ObjectState(lambda: dict(trainer_state), trainer_state.update),
    }
    torch.manual_seed(42)
    random.seed(42)
    np.random.seed(42)
    mgr.save(3, state)
    expect = (torch.rand(4), random.random(), np.random.rand(3))

    path = mgr.latest()
    assert path == tmp_path / "ckpt" / "step_0000003" and is_committed(path)
    assert CheckpointManager.step_of(path) == 3
    marker = json.loads((path / MARKER).read_text())
    assert marker["step"] == 3 and marker["world_size"] == 1

    m2, opt2 = _fresh()  # optimizer with no state yet
    loaded_trainer: dict = {}
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=99)
    step = mgr.load(path, {
        "model": ModelOptimizerState(m2, opt2),
        "sched": sched2,
        "rng": RNGState(),
        "trainer": ObjectState(lambda: {"step": 0, "tokens": 0}, loaded_trainer.update),
    })
    assert step == 3
    assert loaded_trainer == {"step": 3, "tokens": 1234}
    assert sched2.state_dict() == sched.state_dict() and sched2.last_epoch == 3
    _assert_same(m, opt, m2, opt2)
    got = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(got[0], expect[0]) and got[1] == expect[1]
    np.testing.assert_array_equal(got[2], expect[2])

    # One more identical step from both: the restored run continues bit-for-bit.
    x = torch.randn(4, 6)
    for mm, oo in ((m, opt), (m2, opt2)):
        mm(x).pow(2).mean().backward()
        oo.step()
    for p1, p2 in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)


def test_retention_keeps_newest(pg, tmp_path):
    m, opt = _trained(steps=1)
    state = {"model": ModelOptimizerState(m, opt)}
    mgr = CheckpointManager(CheckpointConfig(dir=str(tmp_path / "k2"), keep=2))
    for s in (1, 2, 3, 10, 11):
        mgr.save(s, state)
    assert [CheckpointManager.step_of(p) for p in mgr.committed()] == [10, 11]
    assert sorted(p.name for p in (tmp_path / "k2").iterdir()) == ["step_0000010", "step_0000011"]

    keep_all = CheckpointManager(CheckpointConfig(dir=str(tmp_path / "k0"), keep=0))
    for s in (1, 2, 3):
        keep_all.save(s, state)
    assert [CheckpointManager.step_of(p) for p in keep_all.committed()] == [1, 2, 3]


def test_uncommitted_dirs_are_ignored_and_stale_tmp_cleaned(pg, tmp_path):
    d = tmp_path / "ckpt"
    m, opt = _trained(steps=1)
    state = {"model": ModelOptimizerState(m, opt)}
    CheckpointManager(CheckpointConfig(dir=str(d), keep=0)).save(2, state)
    # A crash mid-write (tmp suffix, no marker) and a final-named dir without the marker.
    crashed = d / "step_0000005.tmp-deadbeef"
    crashed.mkdir()
    (crashed / "__0_0.distcp").write_bytes(b"partial")
    unmarked = d / "step_0000007"
    unmarked.mkdir()
    (unmarked / ".metadata").write_bytes(b"x")

    mgr = CheckpointManager(CheckpointConfig(dir=str(d), resume="auto", keep=0))
    assert not crashed.exists()  # cleaned at start by rank 0
    assert unmarked.exists()  # not ours to delete, but never loaded
    assert mgr.latest() == d / "step_0000002"
    assert mgr.resolve_resume() == d / "step_0000002"
    with pytest.raises(ValueError, match="not a committed checkpoint"):
        mgr.load(unmarked, state)


def test_resolve_resume(pg, tmp_path):
    d = tmp_path / "run" / "checkpoints"
    assert CheckpointManager(CheckpointConfig(dir=str(d), resume="auto")).resolve_resume() is None
    m, opt = _trained(steps=1)
    mgr = CheckpointManager(CheckpointConfig(dir=str(d), keep=0))
    for s in (4, 8):
        mgr.save(s, {"model": ModelOptimizerState(m, opt)})

    def resolve(value: str):
        return CheckpointManager(CheckpointConfig(dir=str(d), resume=value)).resolve_resume()

    assert resolve("auto") == d / "step_0000008"
    assert resolve("none") is None
    assert resolve(str(d / "step_0000004")) == d / "step_0000004"
    assert resolve(str(d)) == d / "step_0000008"  # a checkpoints dir: its latest
    (d / "step_0000009").mkdir()
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "nope", d / "step_0000009", tmp_path / "empty"):
        with pytest.raises(ConfigError, match="checkpoint.resume") as info:
            resolve(str(bad))
        assert str(bad) in str(info.value)


def test_async_save_matches_blocking(pg, tmp_path):
    m, opt = _trained()
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    blocking = CheckpointManager(CheckpointConfig(dir=str(tmp_path / "b"), keep=0))
    blocking.save(5, {"model": ModelOptimizerState(m, opt)})

    mgr = CheckpointManager(CheckpointConfig(dir=str(tmp_path / "a"), keep=0, async_save=True))
    mgr.save(5, {"model": ModelOptimizerState(m, opt)})
    assert mgr.latest() is None  # not committed until the write is waited on
    with torch.no_grad():  # training goes on while the write is in flight
        for p in m.parameters():
            p.add_(1.0)
    mgr.save(6, {"model": ModelOptimizerState(m, opt)})  # commits step 5 first
    assert [p.name for p in mgr.committed()] == ["step_0000005"]
    mgr.close()
    assert [p.name for p in mgr.committed()] == ["step_0000005", "step_0000006"]

    loaded = []
    for path in (tmp_path / "b" / "step_0000005", tmp_path / "a" / "step_0000005"):
        m2, opt2 = _fresh()
        mgr.load(path, {"model": ModelOptimizerState(m2, opt2)})
        loaded.append((m2, opt2))
    for k, v in ref.items():  # the staged copy, not the later in-place update
        assert torch.equal(loaded[1][0].state_dict()[k], v), k
    _assert_same(loaded[0][0], loaded[0][1], loaded[1][0], loaded[1][1])
    m6, opt6 = _fresh()
    mgr.load(tmp_path / "a" / "step_0000006", {"model": ModelOptimizerState(m6, opt6)})
    for k, v in ref.items():
        if k != "counter":
            assert torch.equal(m6.state_dict()[k], v + 1.0), k


def test_resave_same_step_replaces(pg, tmp_path):
    mgr = CheckpointManager(CheckpointConfig(dir=str(tmp_path), keep=0))
    m, opt = _trained(steps=1)
    mgr.save(1, {"model": ModelOptimizerState(m, opt)})
    with torch.no_grad():
        m[0].weight.fill_(3.0)
    mgr.save(1, {"model": ModelOptimizerState(m, opt)})
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000001"]
    m2, opt2 = _fresh()
    mgr.load(tmp_path / "step_0000001", {"model": ModelOptimizerState(m2, opt2)})
    assert torch.equal(m2[0].weight, torch.full((5, 6), 3.0))


def test_retention_never_deletes_the_checkpoint_just_written(pg, tmp_path):
    """A run resumed from an older step saves below a later step already on disk: with
    keep=1 a rule by step number would delete the new checkpoint right after writing.
    Retention goes by commit order: the abandoned run's later step 5 goes instead."""
    m, opt = _trained(steps=1)
    state = {"model": ModelOptimizerState(m, opt)}
    mgr = CheckpointManager(CheckpointConfig(dir=str(tmp_path), keep=1))
    mgr.save(5, state)
    mgr.save(3, state)
    assert [p.name for p in mgr.committed()] == ["step_0000003"]
    assert mgr.latest() == tmp_path / "step_0000003"
    mgr.save(7, state)  # the normal case still keeps exactly the newest
    assert [p.name for p in mgr.committed()] == ["step_0000007"]


def test_commit_interrupted_between_renames_is_finished_on_restart(pg, tmp_path):
    """Re-saving step 1 moves the old copy aside, then renames the new one in. A crash between
    the two renames leaves both under temporary names; the restart promotes the new one."""
    m, opt = _trained(steps=1)
    mgr = CheckpointManager(CheckpointConfig(dir=str(tmp_path), keep=0))
    mgr.save(1, {"model": ModelOptimizerState(m, opt)})
    (tmp_path / "step_0000001").rename(tmp_path / "step_0000001.tmp-old-0000aaaa")
    with torch.no_grad():
        m[0].weight.fill_(2.0)
    mgr.save(1, {"model": ModelOptimizerState(m, opt)})
    (tmp_path / "step_0000001").rename(tmp_path / "step_0000001.tmp-0000bbbb")

    restarted = CheckpointManager(CheckpointConfig(dir=str(tmp_path), keep=0))
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000001"]
    m2, opt2 = _fresh()
    restarted.load(restarted.latest(), {"model": ModelOptimizerState(m2, opt2)})
    assert torch.equal(m2[0].weight, torch.full((5, 6), 2.0))


def test_a_failed_write_raises_a_plain_error_and_is_never_loaded(pg, tmp_path, monkeypatch):
    """DCP reports a failed write as CheckpointException, a BaseException that ``except
    Exception`` misses: the manager turns it into a RuntimeError naming the failure, the
    unfinished directory is not committed, and the next manager removes it."""
    from torch.distributed.checkpoint import FileSystemWriter

    m, opt = _trained(steps=1)
    mgr = CheckpointManager(CheckpointConfig(dir=str(tmp_path), keep=0))
    mgr.save(1, {"model": ModelOptimizerState(m, opt)})

    def broken(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", broken)
    with pytest.raises(RuntimeError, match="checkpoint save of step 2 failed.*No space left"):
        mgr.save(2, {"model": ModelOptimizerState(m, opt)})
    monkeypatch.undo()
    assert [p.name for p in mgr.committed()] == ["step_0000001"]
    assert any(".tmp-" in p.name for p in tmp_path.iterdir())
    CheckpointManager(CheckpointConfig(dir=str(tmp_path), keep=0))  # cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000001"]


def test_dcp_groups_per_call_on_gloo_and_one_long_lived_group_on_accelerators(
        pg, tmp_path, monkeypatch):
    """CPU training (gloo): every DCP save and load gets a new group, destroyed after it.
    An accelerator backend: one long-lived group, created with the manager, never destroyed
    by a save or load."""
    import torch.distributed as dist

    m, opt = _trained(steps=1)
    state = {"model": ModelOptimizerState(m, opt)}
    made, destroyed = [], []
    new_group, destroy = dist.new_group, dist.destroy_process_group
    monkeypatch.setattr(dist, "new_group", lambda *a, **k: made.append(new_group(*a, **k))
                        or made[-1])
    monkeypatch.setattr(dist, "destroy_process_group",
                        lambda g=None: destroyed.append(g) or destroy(g))
    gloo = CheckpointManager(CheckpointConfig(dir=str(tmp_path / "gloo"), keep=0))
    n = len(made)
    gloo.save(1, state)
    gloo.load(gloo.latest(), state)
    assert len(made) == n + 2 and destroyed == made[-2:]

    made.clear()
    destroyed.clear()
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cuda:nccl,cpu:gloo")
    acc = CheckpointManager(CheckpointConfig(dir=str(tmp_path / "acc"), keep=0,
                                             async_save=True))
    assert acc._dcp_pg is not None and acc._dcp_pg in made
    n = len(made)
    acc.save(1, state)
    acc.save(2, state)  # commits 1 first
    acc.close()
    acc.load(acc.latest(), state)
    assert len(made) == n and destroyed == []
