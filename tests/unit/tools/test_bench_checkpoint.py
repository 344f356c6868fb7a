"""tools/bench_checkpoint.py: its report describes the checkpoints it wrote, and its
throughputs and ratios are computed from its own sizes and timings (no timing thresholds)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from moetrain.checkpoint import is_committed
from tests.conftest import TINY, load_tool


def _tool():
    return load_tool("bench_checkpoint")


def test_report_matches_the_checkpoints_written(tmp_path, data_cache, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    tool = _tool()
    out = tmp_path / "bench.json"
    # The tiny preset shrunk further (the test suite's TINY shape); the flags set the batch.
    shape = [o for o in TINY if o.startswith(("model.", "data."))]
    tool.main(["--models", "tiny", "--device", "cpu", "--warmup", "1", "--steps-before", "2",
               "--steps-after", "3", "--seq-len", "16", "--micro-batch", "2",
               "--global-batch", "4", "--run-dir", str(tmp_path), "--out", str(out), "--",
               *shape, f"data.cache_dir={data_cache}"])
    report = json.loads(out.read_text())
    rows = {r["mode"]: r for r in report["results"]}
    assert set(rows) == {"nosave", "sync", "async"}
    table = capsys.readouterr().out
    for mode, r in rows.items():
        assert r["model"] == "tiny" and r["tokens_per_step"] == 4 * 16
        assert len(r["step_times_before_s"]) == 2 and len(r["step_times_after_s"]) == 3
        assert r["step_s_before"] == pytest.approx(statistics.mean(r["step_times_before_s"]))
        assert r["step_s_after"] == pytest.approx(statistics.mean(r["step_times_after_s"]))
        assert r["tokens_per_s_before"] == pytest.approx(64 / r["step_s_before"])
        # after an async save: the steps once the write finished, when there are any
        assert r["tokens_per_s_after"] == pytest.approx(
            64 / r.get("step_s_after_write", r["step_s_after"]))
        assert r["ratio_after_before"] == pytest.approx(
            r["tokens_per_s_after"] / r["tokens_per_s_before"])
        assert f"{r['ratio_after_before']:.2f}x" in table
        if mode == "nosave":
            assert r["save_call_s"] is None and "ckpt_bytes" not in r
            assert r["save_step_s"] == r["save_step_train_s"]
            continue
        assert r["save_step_s"] == pytest.approx(r["save_step_train_s"] + r["save_call_s"])
        # The size is the committed checkpoint's bytes on disk: every file of its directory,
        # which is what its manifest lists plus the manifest and the marker themselves.
        ckpt = Path(r["checkpoint"])
        assert is_committed(ckpt) and ckpt.name == "step_0000004"  # warmup 1 + 2 + the save
        files = [p for p in ckpt.rglob("*") if p.is_file()]
        assert r["ckpt_files"] == len(files)
        assert r["ckpt_bytes"] == sum(p.stat().st_size for p in files)
        manifest = json.loads((ckpt / "MANIFEST.json").read_text())["files"]
        assert r["ckpt_bytes"] == (sum(e["size"] for e in manifest.values())
                                   + (ckpt / "MANIFEST.json").stat().st_size
                                   + (ckpt / "COMMITTED").stat().st_size)
        assert r["write_mb_s"] == pytest.approx(r["ckpt_bytes"] / r["write_s"] / 1e6, rel=1e-9)
        if mode == "sync":  # the whole write and commit happen in the call
            assert r["write_s"] == r["save_call_s"] and r["commit_s"] is None
        else:  # the call returns after staging; the write ends later, the commit in wait()
            assert r["write_s"] >= r["save_call_s"] and r["commit_s"] is not None
            assert 0 <= r["steps_during_write"] <= 3
    # Both saves wrote the same state (same seed, same steps) into the same set of files.
    assert rows["sync"]["ckpt_files"] == rows["async"]["ckpt_files"]
