"""Retention: checkpoint.keep newest plus every multiple of checkpoint.keep_every, never the
checkpoint just written (no training, no process group)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moetrain.checkpoint import manager
from moetrain.checkpoint.manager import (
    MARKER,
    CheckpointManager,
    retention_victims,
    step_dir_name,
)
from moetrain.config import CheckpointConfig, ConfigError


def test_retention_victims():
    steps = [100, 200, 300, 400, 500, 600, 700]
    assert retention_victims(steps, keep=2) == [100, 200, 300, 400, 500]
    assert retention_victims(steps, keep=2, keep_every=300) == [100, 200, 400, 500]
    assert retention_victims(steps, keep=2, keep_every=250) == [100, 200, 300, 400]
    assert retention_victims(steps, keep=0, keep_every=300) == []  # keep=0 keeps all
    assert retention_victims(steps, keep=10) == []
    # a resumed run re-saved step 200 below later steps: it survives
    assert retention_victims(steps, keep=2, just_committed=200) == [100, 300, 400, 500]
    # commit order, not step order: an abandoned run's later steps (5) go first
    assert retention_victims([5, 1, 3, 3], keep=1) == [5, 1]


def test_keep_every_validated():
    assert CheckpointConfig().keep_every == 0
    with pytest.raises(ConfigError, match="checkpoint.keep_every=-1"):
        CheckpointConfig(keep_every=-1)


def _fake_manager(tmp_path, **kw) -> CheckpointManager:
    m = object.__new__(CheckpointManager)  # no process group: only retention is exercised
    m.cfg = CheckpointConfig(dir=str(tmp_path), **kw)
    m.dir = tmp_path
    for s in (10, 20, 30, 40, 50, 60):
        d = tmp_path / step_dir_name(s)
        d.mkdir()
        (d / MARKER).write_text(json.dumps({"step": s, "world_size": 1}))
    (tmp_path / step_dir_name(5)).mkdir()  # uncommitted: not retention's business
    return m


def test_apply_retention_on_directory_tree(tmp_path):
    m = _fake_manager(tmp_path, keep=2, keep_every=20)
    m._apply_retention(tmp_path / step_dir_name(60))
    assert [m.step_of(p) for p in m.committed()] == [20, 40, 50, 60]
    assert (tmp_path / step_dir_name(5)).is_dir()


def test_apply_retention_never_deletes_just_committed(tmp_path):
    m = _fake_manager(tmp_path, keep=1, keep_every=0)
    m._apply_retention(tmp_path / step_dir_name(30))
    assert [m.step_of(p) for p in m.committed()] == [30, 60]


class _Killed(BaseException):
    """The process dying mid-deletion (not an Exception: nothing may catch it)."""


def _whole_checkpoints(tmp_path, steps) -> None:
    """Committed ``step_N`` directories as a save leaves them: data, metadata, marker."""
    for seq, s in enumerate(steps, 1):
        d = tmp_path / step_dir_name(s)
        d.mkdir()
        (d / "__0_0.distcp").write_bytes(b"shard")
        (d / ".metadata").write_bytes(b"meta")
        (d / MARKER).write_text(json.dumps({"step": s, "world_size": 1, "seq": seq}))


@pytest.mark.parametrize("first", [MARKER, "__0_0.distcp"])
def test_retention_killed_mid_delete_leaves_only_whole_checkpoints(tmp_path, monkeypatch,
                                                                  first):
    """A crash while retention deletes an old checkpoint (after ``first`` of its files is
    gone) leaves no half-deleted checkpoint: every directory still counted as committed has
    all its files, and the next start removes the remains, never turning them back into a
    checkpoint (a data file gone but the marker there) nor leaving them forever (marker
    gone first: a final-named directory without a marker is never cleaned)."""
    m = object.__new__(CheckpointManager)
    m.cfg = CheckpointConfig(dir=str(tmp_path), keep=2)
    m.dir = tmp_path
    _whole_checkpoints(tmp_path, (10, 20, 30))

    def killed_after_one_file(path, ignore_errors=False):
        (Path(path) / first).unlink()
        raise _Killed

    monkeypatch.setattr(manager.shutil, "rmtree", killed_after_one_file)
    with pytest.raises(_Killed):
        m._apply_retention(tmp_path / step_dir_name(30))
    monkeypatch.undo()
    for p in m.committed():
        assert sorted(q.name for q in p.iterdir()) == [".metadata", MARKER, "__0_0.distcp"], p
    assert [m.step_of(p) for p in m.committed()] == [20, 30]  # 10 is no longer a checkpoint
    m._clean_stale()  # the restart
    assert sorted(p.name for p in tmp_path.iterdir()) == [step_dir_name(20), step_dir_name(30)]
    assert [m.step_of(p) for p in m.committed()] == [20, 30]
