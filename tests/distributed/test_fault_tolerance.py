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



def _reference(tmp_path: Path, overrides: list[str], steps: int) -> dict:
    run_dir = tmp_path / "reference"
    train(overrides + [f"train.steps={steps}", f"run.dir={run_dir}",
                       f"checkpoint.dir={run_dir}/checkpoints"])
    return tr.step_losses(run_dir)


def _resumes(log: Path) -> list[str]:
    return [line.split("resumed from ", 1)[1].split(" at step")[0]
            for line in log.read_text(errors="replace").splitlines() if "resumed from " in line]


def _committed(ckpt_dir: Path) -> dict[int, int]:
    """{step: world size that saved it} of the committed checkpoints; no leftovers allowed."""
    left = [p.name for p in ckpt_dir.iterdir() if not is_committed(p)]
    assert not left, f"unfinished checkpoint directories left behind: {left}"
    return {json.loads((p / MARKER).read_text())["step"]:
            json.loads((p / MARKER).read_text())["world_size"] for p in ckpt_dir.iterdir()}


@pytest.fixture
def base(data_cache) -> list[str]:
    return tr.FT + [f"data.cache_dir={data_cache}"]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_killed_workers_resume_with_the_same_losses(tmp_path, base, async_save):
    """Kill points: mid-step, during a synchronous save, during an asynchronous save.

    sync: rank 1 is SIGKILLed in the middle of step 6 (resume from step 4), then rank 0
    while the step-8 checkpoint is written but not committed (resume from step 4 again).
    async: rank 1 is SIGKILLed while the step-8 asynchronous write is in flight.
    """
    steps = 12
    run_dir = tmp_path / "run"
    overrides = base + ["parallel.ep=2", "checkpoint.every=4", "checkpoint.keep=0",
                        f"checkpoint.async_save={str(async_save).lower()}",
                        f"train.steps={steps}", f"run.dir={run_dir}",
                        f"checkpoint.dir={run_dir}/checkpoints"]
    if async_save:
        faults = "async_save:step=8:rank=1:attempt=0"
        want_resumes = ["step_0000004"]
    else:
        faults = "mid_step:step=6:rank=1:attempt=0;sync_save:step=8:rank=0:attempt=1"
        want_resumes = ["step_0000004", "step_0000004"]
    log = tmp_path / "torchrun.log"
    rc = tr.run(["--standalone", "--nproc-per-node=2", "--max-restarts=3"], overrides, log,
                tr.env(faults), timeout_s=240)
    assert rc == 0, tr.tail(log)
    text = log.read_text(errors="replace")
    assert text.count("MOETRAIN_FAULTS: kill at") == len(want_resumes), tr.tail(log)
    # Every rank of a restart resumes from the same, newest intact checkpoint.
    resumes = _resumes(log)
    assert [Path(r).name for r in resumes[::2]] == want_resumes, resumes
    assert resumes[::2] == resumes[1::2], resumes
    assert _committed(run_dir / "checkpoints") == {4: 2, 8: 2, 12: 2}
    ref = _reference(tmp_path, [o for o in overrides if not o.startswith(
        ("run.dir", "checkpoint.dir", "parallel.ep", "train.steps"))], steps)
    tr.assert_same_losses(ref, tr.step_losses(run_dir))


def test_one_rank_sigterm_stops_every_rank_at_the_same_step(tmp_path, base):
    """Only rank 1 receives SIGTERM (end of step 5): both ranks stop after step 5 with one
    checkpoint, exit 0, and a restart finishes the run on the uninterrupted losses."""
    steps = 10
    run_dir = tmp_path / "run"
    overrides = base + ["checkpoint.every=0", f"train.steps={steps}", f"run.dir={run_dir}",
                        f"checkpoint.dir={run_dir}/checkpoints"]
    log = tmp_path / "torchrun.log"
    rc = tr.run(["--standalone", "--nproc-per-node=2"], overrides, log,
                tr.env("step_end:step=5:rank=1:action=sigterm"), timeout_s=120)
    assert rc == 0, tr.tail(log)
    assert _committed(run_dir / "checkpoints") == {5: 2}
    assert max(tr.step_losses(run_dir)) == 5
    assert log.read_text().count("stop signal received") == 2, tr.tail(log)  # both ranks
    rc = tr.run(["--standalone", "--nproc-per-node=2"], overrides, log, tr.env(),
                timeout_s=120)
    assert rc == 0, tr.tail(log)
    ref = _reference(tmp_path, [o for o in overrides if not o.startswith(
        ("run.dir", "checkpoint.dir", "train.steps"))], steps)
    tr.assert_same_losses(ref, tr.step_losses(run_dir))


def test_elastic_run_loses_a_node_and_gains_it_back(tmp_path, base):
    """Two torchrun agents ("nodes", one process each) on a c10d rendezvous, --nnodes=1:2.

    Step 6: node B dies with its worker (SIGKILL to agent and worker). Node A's worker
    fails in its next collective; A restarts it, the rendezvous closes with A alone, and
    the run resumes from step 4 on one process (dp 2 -> 1, same global batch). At step 10
    the single-node run holds until node C joins: the agent stops its worker (SIGTERM:
    checkpoint at step 10), and both nodes resume from it (dp 1 -> 2) to step 14.
    """
    steps = 14
    run_dir = tmp_path / "run"
    overrides = base + ["checkpoint.every=4", "checkpoint.keep=0", f"train.steps={steps}",
                        f"run.dir={run_dir}", f"checkpoint.dir={run_dir}/checkpoints"]
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
    assert saved[4] == 2 and saved[8] == 1 and saved[10] == 1 and saved[12] == 2, saved
    assert saved[14] == 2, saved
    ref = _reference(tmp_path, [o for o in overrides if not o.startswith(
        ("run.dir", "checkpoint.dir", "train.steps"))], steps)
    tr.assert_same_losses(ref, tr.step_losses(run_dir))
