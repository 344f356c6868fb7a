"""Checkpoint retention (``checkpoint.keep=2``) across kills and restarts: real launches.

Each scenario chains single-process launches of the real entry point with
``checkpoint.resume=auto``. Every launch but the last is SIGKILLed at one point of a
checkpoint's life ($MOETRAIN_FAULTS, moetrain/faults.py): the files written but not
committed (``sync_save``), the asynchronous write in flight (``async_save``), the marker
written but the directory not renamed (``commit``), renamed before retention ran
(``committed``), an old checkpoint withdrawn by retention but not yet deleted
(``retention``). After each kill the test reads the directory as the crash left it. The next
launch must resume from the newest committed checkpoint (an interrupted commit whose marker
was written counts: the restart finishes it), and the chained run's per-step losses and
gradient norms must equal an uninterrupted run's.

Retention invariants at every kill: at least one committed checkpoint once the first was
committed, and at most ``keep`` plus the one whose commit or retention was interrupted.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moetrain.checkpoint.manager import MARKER, commit_seq, is_committed
from tests.distributed import _torchrun as tr
from tests.distributed._runs import train

STEPS, EVERY, KEEP = 16, 2, 2


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache) -> dict:
    """The uninterrupted run's {step: (loss, grad_norm)}, steps 1..STEPS (checkpointing
    changes no math)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(tr.FT + [f"data.cache_dir={data_cache}", f"train.steps={STEPS}",
                   f"run.dir={run_dir}", "checkpoint.every=0"])
    return tr.step_losses(run_dir)


def _launch(overrides: list[str], log: Path, faults: str) -> int:
    """One single-process launch of ``python -m moetrain.train``; its return code."""
    proc = tr.start([sys.executable, "-m", "moetrain.train", *overrides], log, tr.env(faults))
    try:
        return proc.wait(120)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the launch did not finish in 120 s; log:\n{tr.tail(log)}") from None
    finally:
        tr.stop(proc)


def _directory(ckpt_dir: Path) -> tuple[list[int], list[str]]:
    """(committed steps in commit order, everything else with its random token masked and a
    ``+`` where it holds the marker)."""
    committed = sorted((p for p in ckpt_dir.iterdir() if is_committed(p)), key=commit_seq)
    steps = [json.loads((p / MARKER).read_text())["step"] for p in committed]
    rest = sorted(re.sub(r"\.tmp-(del-)?[0-9a-f]{8}$", r".tmp-\1*", p.name)
                  + ("+" if (p / MARKER).is_file() else "")
                  for p in ckpt_dir.iterdir() if not is_committed(p))
    return steps, rest


def _resumed_from(log: Path) -> list[str]:
    return [Path(line.split("resumed from ", 1)[1].split(" at step")[0]).name
            for line in log.read_text(errors="replace").splitlines() if "resumed from " in line]


def _run_chain(tmp_path: Path, base: list[str], chain: list[tuple]) -> Path:
    """Run the launches of ``chain``: (fault, step resumed from or None, committed steps and
    other entries of the directory afterwards). Returns the run directory."""
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    overrides = base + [f"train.steps={STEPS}", f"run.dir={run_dir}",
                        f"checkpoint.dir={ckpt_dir}", f"checkpoint.every={EVERY}",
                        f"checkpoint.keep={KEEP}"]
    for i, (fault, resumed, committed, rest) in enumerate(chain):
        log = tmp_path / f"launch{i}.log"
        rc = _launch(overrides, log, fault)
        what = f"launch {i} ({fault or 'no fault'})"
        if fault:
            point, step = fault.split(":")[0], fault.split("step=")[1]
            assert rc == -9, f"{what}: exit {rc}, expected SIGKILL\n{tr.tail(log)}"
            assert f"kill at {point}, step {step} " in log.read_text(errors="replace"), what
        else:
            assert rc == 0, f"{what}: exit {rc}\n{tr.tail(log)}"
        want = [] if resumed is None else [f"step_{resumed:07d}"]
        assert _resumed_from(log) == want, f"{what}\n{tr.tail(log)}"
        got = _directory(ckpt_dir)
        assert got == (committed, rest), f"{what}: directory {got}"
        assert 1 <= len(got[0]) <= KEEP + 1, f"{what}: {got[0]} committed with keep={KEEP}"
    return run_dir


def test_sync_saves_killed_across_the_commit_and_retention(tmp_path, data_cache, reference):
    """Synchronous saves every 2 steps, keep=2; each launch resumes from the newest
    committed checkpoint left by the one before it.

    1. killed with step 6 written, not committed: {2, 4} and the unfinished step 6;
    2. resumes from 4, commits 6 (deleting 2), killed with step 8's marker written before
       its rename: {4, 6} and the complete step 8 under its temporary name;
    3. the restart finishes step 8's commit and resumes from it; 10 deletes 4 and 6; killed
       right after step 12's rename, before retention: {8, 10, 12};
    4. resumes from 12; step 14's retention is killed with step 8 withdrawn, not deleted:
       {10, 12, 14} and the withdrawn 8 (never resumed from, never re-committed);
    5. removes the withdrawn 8, resumes from 14, finishes with {14, 16}.
    """
    run_dir = _run_chain(tmp_path, tr.FT + [f"data.cache_dir={data_cache}"], [
        ("sync_save:step=6", None, [2, 4], ["step_0000006.tmp-*"]),
        ("commit:step=8", 4, [4, 6], ["step_0000008.tmp-*+"]),
        ("committed:step=12", 8, [8, 10, 12], []),
        ("retention:step=14", 12, [10, 12, 14], ["step_0000008.tmp-del-*+"]),
        ("", 14, [14, 16], []),
    ])
    tr.assert_same_losses(reference, tr.step_losses(run_dir))


def test_async_saves_killed_across_the_commit_and_retention(tmp_path, data_cache, reference):
    """Asynchronous saves (committed at a later step's poll, the next save or the exit),
    keep=2.

    1. killed with step 6's write in flight: {2, 4} and the unfinished step 6;
    2. resumes from 4; killed with step 8's marker written before its rename: {4, 6} and the
       complete step 8 under its temporary name;
    3. the restart finishes step 8's commit and resumes from it; step 10's retention is
       killed with step 4 withdrawn, not deleted: {6, 8, 10} and the withdrawn 4;
    4. resumes from 10 and finishes with {14, 16}.
    """
    run_dir = _run_chain(tmp_path, tr.FT + [f"data.cache_dir={data_cache}",
                                            "checkpoint.async_save=true"], [
        ("async_save:step=6", None, [2, 4], ["step_0000006.tmp-*"]),
        ("commit:step=8", 4, [4, 6], ["step_0000008.tmp-*+"]),
        ("retention:step=10", 8, [6, 8, 10], ["step_0000004.tmp-del-*+"]),
        ("", 10, [14, 16], []),
    ])
    tr.assert_same_losses(reference, tr.step_losses(run_dir))


def test_two_ranks_restarted_by_torchrun_after_commit_and_retention_kills(
        tmp_path, data_cache, reference):
    """Two processes (ep=2) under torchrun, asynchronous saves, keep=2. Rank 0, which owns
    the commit, is killed with step 6's marker written before its rename, then, restarted,
    during step 10's retention with step 6 withdrawn; rank 1 fails in its next collective
    and torchrun restarts both. The first restart finishes step 6's commit and both ranks
    resume from it; the second resumes from 10 and removes the withdrawn 6. The run ends
    with {14, 16}, both saved by 2 ranks, nothing else left, and the uninterrupted losses."""
    run_dir = tmp_path / "run"
    overrides = tr.FT + [f"data.cache_dir={data_cache}", f"train.steps={STEPS}",
                         f"run.dir={run_dir}", f"checkpoint.dir={run_dir}/checkpoints",
                         f"checkpoint.every={EVERY}", f"checkpoint.keep={KEEP}",
                         "checkpoint.async_save=true", "parallel.ep=2"]
    log = tmp_path / "torchrun.log"
    faults = "commit:step=6:rank=0:attempt=0;retention:step=10:rank=0:attempt=1"
    rc = tr.run(["--standalone", "--nproc-per-node=2", "--max-restarts=2"], overrides, log,
                tr.env(faults), timeout_s=240)
    assert rc == 0, tr.tail(log)
    text = log.read_text(errors="replace")
    assert "kill at commit, step 6 " in text and "kill at retention, step 10 " in text
    assert _resumed_from(log) == ["step_0000006"] * 2 + ["step_0000010"] * 2, tr.tail(log)
    ckpt_dir = run_dir / "checkpoints"
    assert _directory(ckpt_dir) == ([14, 16], [])
    assert {json.loads((p / MARKER).read_text())["world_size"] for p in ckpt_dir.iterdir()} == {2}
    tr.assert_same_losses(reference, tr.step_losses(run_dir))
