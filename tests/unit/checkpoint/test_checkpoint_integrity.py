"""Checkpoint integrity: MANIFEST.json written before the marker, size / full verification,
resume=auto skipping a corrupt checkpoint, clear errors for an explicit corrupt resume and
for DCP read failures, older manifest-less checkpoints still loading, and a verdict shared
by every rank when only one rank's share of the files is bad."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from moetrain.checkpoint import (
    MANIFEST,
    MARKER,
    CheckpointCorruptError,
    CheckpointLoadError,
    CheckpointManager,
    ModelOptimizerState,
)
from moetrain.config import CheckpointConfig, ConfigError
from moetrain.metrics import read_metrics
from moetrain.testing import run_distributed
from moetrain.train.main import run
from tests.conftest import compose

LOGGER = "moetrain.checkpoint.manager"


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))


def _state(m: nn.Module) -> dict:
    return {"model_optim": ModelOptimizerState([m], [])}


def _mgr(tmp_path: Path, **kw) -> CheckpointManager:
    return CheckpointManager(CheckpointConfig(dir=str(tmp_path / "ckpt"), keep=0, **kw))


def _data_file(ckpt: Path) -> Path:
    """The largest DCP data file of a checkpoint."""
    return max(ckpt.glob("*.distcp"), key=lambda f: f.stat().st_size)


def _truncate(f: Path) -> None:
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)


def _flip_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m}


# ----------------------------------------------------------------------------- manager level
def test_manifest_lists_every_file_and_precedes_the_marker(pg, tmp_path):
    mgr = _mgr(tmp_path)
    mgr.files = {"config.yaml": "a: 1\n"}
    mgr.save(1, _state(_model(0)))
    ck = mgr.latest()
    manifest = json.loads((ck / MANIFEST).read_text())
    names = sorted(f.name for f in ck.iterdir() if f.name not in (MANIFEST, MARKER))
    assert sorted(manifest["files"]) == names
    assert "config.yaml" in names and ".metadata" in names
    for name, entry in manifest["files"].items():
        assert entry["size"] == (ck / name).stat().st_size
        assert len(entry["crc32"]) == 8
    mgr.verify(ck)
    CheckpointManager(CheckpointConfig(dir=mgr.cfg.dir, verify="full")).verify(ck)


def test_async_save_writes_a_manifest(pg, tmp_path):
    mgr = _mgr(tmp_path, async_save=True)
    mgr.save(2, _state(_model(0)))
    mgr.close()
    ck = mgr.latest()
    assert (ck / MANIFEST).is_file()
    CheckpointManager(CheckpointConfig(dir=mgr.cfg.dir, verify="full")).verify(ck)


def test_flipped_byte_passes_size_but_fails_full(pg, tmp_path):
    _mgr(tmp_path).save(1, _state(_model(0)))
    ck = tmp_path / "ckpt" / "step_0000001"
    bad = _data_file(ck)
    size = bad.stat().st_size
    _flip_byte(bad)
    assert bad.stat().st_size == size
    _mgr(tmp_path, verify="size").verify(ck)  # sizes match
    full = _mgr(tmp_path, verify="full")
    with pytest.raises(CheckpointCorruptError, match=rf"{bad.name} has CRC32 .*\(same size"):
        full.verify(ck)
    with pytest.raises(CheckpointCorruptError, match=bad.name):
        full.load(ck, _state(_model(1)))


def test_manifestless_checkpoint_loads_with_one_warning(pg, tmp_path, caplog):
    src = _model(0)
    mgr = _mgr(tmp_path)
    mgr.save(1, _state(src))
    mgr.save(2, _state(src))
    for ck in mgr.committed():
        (ck / MANIFEST).unlink()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    dst = _model(1)
    fresh = _mgr(tmp_path, verify="full")
    assert fresh.resolve_resume() == tmp_path / "ckpt" / "step_0000002"
    fresh.load(tmp_path / "ckpt" / "step_0000001", _state(dst))
    for a, b in zip(src.state_dict().values(), dst.state_dict().values()):
        assert torch.equal(a, b)
    assert caplog.text.count(f"has no {MANIFEST}") == 1


def test_manifestless_truncated_checkpoint_is_caught_by_dcp_metadata(pg, tmp_path):
    mgr = _mgr(tmp_path)
    mgr.save(1, _state(_model(0)))
    ck = mgr.latest()
    (ck / MANIFEST).unlink()
    bad = _data_file(ck)
    _truncate(bad)
    with pytest.raises(CheckpointCorruptError, match=rf"{bad.name} has \d+ bytes.*metadata"):
        mgr.load(ck, _state(_model(1)))


def test_dcp_read_failure_becomes_a_clear_error(pg, tmp_path):
    """With verification off, DCP's CheckpointException (a BaseException) is converted."""
    _mgr(tmp_path).save(1, _state(_model(0)))
    ck = tmp_path / "ckpt" / "step_0000001"
    _truncate(_data_file(ck))
    with pytest.raises(CheckpointLoadError, match=r"step_0000001 could not be loaded") as ei:
        _mgr(tmp_path, verify="none").load(ck, _state(_model(1)))
    assert isinstance(ei.value, ValueError)


def test_all_corrupt_with_auto_raises(pg, tmp_path):
    mgr = _mgr(tmp_path)
    mgr.save(1, _state(_model(0)))
    _truncate(_data_file(mgr.latest()))
    with pytest.raises(CheckpointCorruptError, match="every checkpoint .* is corrupt"):
        _mgr(tmp_path).resolve_resume()


def test_verify_value_is_checked():
    with pytest.raises(ConfigError, match="checkpoint.verify"):
        CheckpointConfig(verify="crc")


def _rank_verifies(rank: int, world: int, root: str, bad_name: str | None) -> str:
    """Every rank saves its shard; rank 0 corrupts a file only rank 1 checks; all must
    raise the same error (no hang)."""
    mgr = CheckpointManager(CheckpointConfig(dir=root, keep=0, verify="full"))
    torch.manual_seed(rank)
    mgr.save(1, {"model_optim": ModelOptimizerState([nn.Linear(8, 8)], [])})
    ck = mgr.latest()
    names = sorted(json.loads((ck / MANIFEST).read_text())["files"])
    victim = names[1::world][0]  # in rank 1's share
    if rank == 0:
        _flip_byte(ck / victim)
    dist.barrier()
    try:
        mgr.load(ck, {"model_optim": ModelOptimizerState([nn.Linear(8, 8)], [])})
    except CheckpointCorruptError as e:
        return f"{victim}|{e}"
    return "loaded"


def test_one_rank_failing_verification_fails_every_rank(tmp_path):
    out = run_distributed(_rank_verifies, 2, str(tmp_path / "ckpt"), None, timeout_s=60)
    assert all(o != "loaded" for o in out)
    victims = {o.split("|")[0] for o in out}
    assert len(victims) == 1
    victim = victims.pop()
    assert all(f"{victim} has CRC32" in o.split("|", 1)[1] for o in out)


# ----------------------------------------------------------------------------- real runs
def test_auto_resume_skips_a_truncated_checkpoint(tiny_overrides, tmp_path, caplog):
    base = [o for o in tiny_overrides if not o.startswith("run.dir")]
    opts = base + ["checkpoint.every=3", "checkpoint.keep=0", "train.steps=6"]
    ref_dir = tmp_path / "ref"
    run(compose(opts + [f"run.dir={ref_dir}"]))
    ck3, ck6 = (ref_dir / "checkpoints" / f"step_000000{s}" for s in (3, 6))
    assert (ck3 / MANIFEST).is_file() and (ck6 / MANIFEST).is_file()

    # A run resumed explicitly from step 3, in its own directory.
    exp_dir = tmp_path / "explicit"
    run(compose(opts + [f"run.dir={exp_dir}", f"checkpoint.resume={ck3}"]))
    explicit = _losses(exp_dir)
    assert sorted(explicit) == [4, 5, 6]

    # Step 6's largest data file truncated, as by a full disk or a killed copy.
    bad_dir = tmp_path / "bad"
    shutil.copytree(ref_dir, bad_dir)
    bad_ck6 = bad_dir / "checkpoints" / "step_0000006"
    bad_file = _data_file(bad_ck6)
    _truncate(bad_file)

    # An explicit resume of it fails with an error naming the file.
    with pytest.raises(CheckpointCorruptError, match=rf"{re.escape(str(bad_file))}.*truncated"):
        run(compose(opts + [f"run.dir={tmp_path / 'other'}", f"checkpoint.resume={bad_ck6}"]))

    # resume=auto falls back to step 3 with a warning naming step 6, and trains on.
    caplog.set_level(logging.WARNING, logger=LOGGER)
    run(compose(opts + [f"run.dir={bad_dir}"]))
    assert f"skipping corrupt checkpoint {bad_ck6}" in caplog.text
    assert f"resuming from {bad_dir / 'checkpoints' / 'step_0000003'}" in caplog.text
    resumed = _losses(bad_dir)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [explicit[s] for s in (4, 5, 6)]
    # Step 6 was saved again, intact.
    _mgr_cfg = CheckpointConfig(dir=str(bad_dir / "checkpoints"), verify="full")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        CheckpointManager(_mgr_cfg).verify(bad_ck6)
    finally:
        dist.destroy_process_group()
