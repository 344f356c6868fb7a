"""Killed workers, lost and added nodes, one-rank preemption: real torchrun launches.

Each scenario injects its faults with ``$MOETRAIN_FAULTS`` (moetrain/faults.py) at fixed
steps, lets torchrun restart the workers, and compares the per-step losses and gradient
norms of the finished run (metrics.jsonl, truncated at every resume) with an uninterrupted
1-process run: layouts change no math, so they must agree to 1e-5.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from moetrain.checkpoint import MARKER, is_committed
from moetrain.testing import find_free_port
from tests.distributed import _torchrun as tr
from tests.distributed._runs import train


def _resumes(log: Path) -> list[str]:
    return [line.split("resumed from ", 1)[1].split(" at step")[0]
            for line in log.read_text(errors="replace").splitlines() if "resumed from " in line]


def _committed(ckpt_dir: Path) -> dict[int, int]:
    """{step: world size that saved it} of the committed checkpoints; no leftovers allowed."""
    left = [p.name for p in ckpt_dir.iterdir() if not is_committed(p)]
    assert not left, f"unfinished checkpoint directories left behind: {left}"
    return {json.loads((p / MARKER).read_text())["step"]:
            json.loads((p / MARKER).read_text())["world_size"] for p in ckpt_dir.iterdir()}


STEPS = 12


@pytest.fixture
def base(data_cache) -> list[str]:
    return tr.FT + [f"data.cache_dir={data_cache}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache) -> dict:
    """The uninterrupted 1-process run's {step: (loss, grad_norm)}, steps 1..STEPS (the
    layouts and checkpoint settings of the scenarios change no math)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(tr.FT + [f"data.cache_dir={data_cache}", f"train.steps={STEPS}",
                   f"run.dir={run_dir}", "checkpoint.every=0"])
    return tr.step_losses(run_dir)


def _run_overrides(base: list[str], run_dir: Path, steps: int, *extra: str) -> list[str]:
    return base + [f"train.steps={steps}", f"run.dir={run_dir}",
                   f"checkpoint.dir={run_dir}/checkpoints", *extra]


def test_killed_mid_step_and_during_a_sync_save(tmp_path, base, reference):
    """Rank 1 is SIGKILLed in the middle of step 6 (resume from step 4), then rank 0 while
    the step-8 checkpoint is written but not committed (resume from step 4 again: the
    unfinished save is removed, never loaded). ep=2 over the 2 processes."""
    run_dir = tmp_path / "run"
    overrides = _run_overrides(base, run_dir, STEPS, "parallel.ep=2", "checkpoint.every=4",
                               "checkpoint.keep=0")
    log = tmp_path / "torchrun.log"
    faults = "mid_step:step=6:rank=1:attempt=0;sync_save:step=8:rank=0:attempt=1"
    rc = tr.run(["--standalone", "--nproc-per-node=2", "--max-restarts=3"], overrides, log,
                tr.env(faults), timeout_s=240)
    assert rc == 0, tr.tail(log)
    assert log.read_text(errors="replace").count("MOETRAIN_FAULTS: kill at") == 2, tr.tail(log)
    resumes = _resumes(log)  # both ranks of both restarts, from the same checkpoint
    assert [Path(r).name for r in resumes] == ["step_0000004"] * 4, resumes
    assert _committed(run_dir / "checkpoints") == {4: 2, 8: 2, 12: 2}
    tr.assert_same_losses(reference, tr.step_losses(run_dir))


def test_killed_during_an_async_save_then_one_rank_preempted(tmp_path, base, reference):
    """Rank 1 is SIGKILLed while the step-8 asynchronous write is in flight: the restart
    resumes from step 4. In the restarted run only rank 1 receives SIGTERM (end of step
    10): both ranks stop after step 10 with one checkpoint and exit 0. A new launch
    finishes the run. Losses: the uninterrupted run's."""
    run_dir = tmp_path / "run"
    overrides = _run_overrides(base, run_dir, STEPS, "parallel.ep=2", "checkpoint.every=4",
                               "checkpoint.keep=0", "checkpoint.async_save=true")
    log = tmp_path / "torchrun.log"
    faults = "async_save:step=8:rank=1:attempt=0;step_end:step=10:rank=1:attempt=1:action=sigterm"
    rc = tr.run(["--standalone", "--nproc-per-node=2", "--max-restarts=3"], overrides, log,
                tr.env(faults), timeout_s=240)
    assert rc == 0, tr.tail(log)
    text = log.read_text(errors="replace")
    assert text.count("MOETRAIN_FAULTS: kill at async_save") == 1, tr.tail(log)
    assert text.count("stop signal received") == 2, tr.tail(log)  # both ranks agree
    assert [Path(r).name for r in _resumes(log)] == ["step_0000004"] * 2
    assert _committed(run_dir / "checkpoints") == {4: 2, 8: 2, 10: 2}
    assert max(tr.step_losses(run_dir)) == 10
    rc = tr.run(["--standalone", "--nproc-per-node=2"], overrides, log, tr.env(),
                timeout_s=120)
    assert rc == 0, tr.tail(log)
    assert _committed(run_dir / "checkpoints") == {4: 2, 8: 2, 10: 2, 12: 2}
    tr.assert_same_losses(reference, tr.step_losses(run_dir))


def test_elastic_run_loses_a_node_and_gains_it_back(tmp_path, base, reference):
    """Two torchrun agents ("nodes", one process each) on a c10d rendezvous, --nnodes=1:2.

    Step 6: node B dies with its worker (SIGKILL to agent and worker). Node A's worker
    fails in its next collective; A restarts it, the rendezvous closes with A alone, and
    the run resumes from step 4 on one process (dp 2 -> 1, same global batch). At step 10
    the single-node run holds until node C joins: the agent stops its worker (SIGTERM:
    checkpoint at step 10), and both nodes resume from it (dp 1 -> 2) to step 12.
    """
    run_dir = tmp_path / "run"
    overrides = _run_overrides(base, run_dir, STEPS, "checkpoint.every=4", "checkpoint.keep=0")
    port = find_free_port()

    script = Path(__file__).resolve().parents[2] / "launch" / "elastic.sh"

    def node(host: bool, log: Path, faults: str = ""):
        """One node: launch/elastic.sh, as on a cluster (A hosts the rendezvous store)."""
        return tr.start(["bash", str(script), *overrides], log, tr.env(
            faults, TORCHRUN=f"{sys.executable} -m torch.distributed.run", NPROC="1",
            MIN_NODES="1", MAX_NODES="2", MAX_RESTARTS="3", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port), RDZV_ID="moetrain-elastic-test",
            RDZV_CONF=f"is_host={int(host)},last_call_timeout=3,keep_alive_interval=1,"
                      "keep_alive_max_attempt=3"))

    logs = [tmp_path / f"node{n}.log" for n in "ABC"]
    procs = [node(True, logs[0], "step_end:step=10:world=1:action=hold"),
             node(False, logs[1], "step_end:step=6:world=2:action=kill_node")]
    try:
        procs[1].wait(150)  # node B's agent is SIGKILLed at step 6
        assert procs[1].returncode == -9, tr.tail(logs[1])
        metrics = run_dir / "metrics.jsonl"
        tr.wait_for(lambda: tr.logged_step(metrics, 10), 120,
                    "the 1-node run to reach step 10", logs[0])
        procs.append(node(False, logs[2]))  # node C joins
        for p, lg in ((procs[0], logs[0]), (procs[2], logs[2])):
            assert p.wait(180) == 0, tr.tail(lg)
    except BaseException:
        print("\n".join(f"--- node {n}\n{tr.tail(lg)}" for n, lg in zip("ABC", logs)))
        raise
    finally:
        for p in procs:
            tr.stop(p)
    saved = _committed(run_dir / "checkpoints")
    assert saved == {4: 2, 8: 1, 10: 1, 12: 2}, saved  # {step: world size that saved it}
    tr.assert_same_losses(reference, tr.step_losses(run_dir))
