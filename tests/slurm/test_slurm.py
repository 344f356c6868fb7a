"""launch/slurm.sbatch, launch/elastic.sh and the Hydra submitit launcher on a real two-node
SLURM cluster (conftest.py). Every run is held to the per-step losses and gradient norms of
an uninterrupted 1-process run (rtol 1e-5): a layout, a stop or a restart changes no math.

The scenarios run concurrently, one thread each, started by the ``scenarios`` fixture for
the tests selected: on a 2-core machine their time goes to starting Python processes and
to SLURM's timers. Each test waits for its own scenario and checks it. The runs hold at a
chosen step (``MOETRAIN_FAULTS=...:action=hold``) until the signal under test arrives, so
the step a checkpoint lands on is known.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from moetrain.checkpoint import MARKER, is_committed
from moetrain.testing import find_free_port
from tests.conftest import in_ci, oracle
from tests.distributed import _torchrun as tr
from tests.distributed._runs import train
from tests.slurm.conftest import ROOT, STATE_DIR, _report

pytestmark = pytest.mark.slow

SBATCH = ROOT / "launch" / "slurm.sbatch"
ELASTIC = ROOT / "launch" / "elastic.sh"
STEPS = 12
SWEEP_STEPS = 8
SWEEP_LRS = ("1e-3", "3e-3")
BASE = tr.FT  # TINY, validation off, a metrics row every step, checkpoint.resume=auto
MEASURED: dict[str, str] = {}  # test -> measured numbers, printed at the end of the module


# ----------------------------------------------------------------------------- helpers
@dataclass
class Scene:
    """What a scenario leaves for its test: the run directory, the SLURM log, the state of
    each job when it ended, and notes (what was committed when)."""

    run_dir: Path
    log: Path
    jobs: list[dict[str, str]] = field(default_factory=list)
    notes: dict[str, object] = field(default_factory=dict)
    wall_s: float = 0.0

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"


class Ctx:
    def __init__(self, cluster, root: Path, cache: str) -> None:
        self.cluster, self.root, self.cache = cluster, root, cache

    def overrides(self, name: str, *extra: str, steps: int = STEPS) -> list[str]:
        return [*BASE, f"train.steps={steps}", f"run.dir={self.root / name}",
                f"data.cache_dir={self.cache}", *extra]

    def submit(self, name: str, *sbatch_args: str, faults: str = "", minutes: int = 10,
               nodes: int = 2, overrides: tuple[str, ...] = ()) -> str:
        """``sbatch launch/slurm.sbatch``: one process per node, ep=2 on two nodes. Every
        submission of ``name`` appends to ``<name>.out`` (the script's --open-mode)."""
        env = self.cluster.env(MOETRAIN_FAULTS=faults) if faults else self.cluster.env()
        layout = ("parallel.ep=2",) if nodes == 2 else ()
        return self.cluster.sbatch(
            f"--job-name={name}", f"--output={self.root / name}.out", f"--nodes={nodes}",
            "--gpus-per-node=1", "--cpus-per-task=1", f"--time={minutes}", *sbatch_args,
            str(SBATCH), *self.overrides(name, *layout, *overrides), env=env)

    def wait_step(self, name: str, step: int, timeout_s: float = 180) -> None:
        metrics = self.root / name / "metrics.jsonl"
        tr.wait_for(lambda: tr.logged_step(metrics, step), timeout_s,
                    f"{name} to log step {step}", self.root / f"{name}.out")


def committed(run_dir: Path) -> dict[int, int]:
    """{step: world size that saved it} of the committed checkpoints."""
    d = run_dir / "checkpoints"
    return {json.loads((p / MARKER).read_text())["step"]:
            json.loads((p / MARKER).read_text())["world_size"]
            for p in (d.iterdir() if d.is_dir() else ()) if is_committed(p)}


def unfinished(run_dir: Path) -> list[str]:
    d = run_dir / "checkpoints"
    return sorted(p.name for p in (d.iterdir() if d.is_dir() else ()) if not is_committed(p))


def max_rel(ref: dict, got: dict) -> float:
    tr.assert_same_losses(ref, got)
    return max(abs(a - b) / abs(a) for s in ref for a, b in zip(ref[s], got[s]))


def check_losses(test: str, ref: dict, run_dir: Path, scene: Scene) -> None:
    got = tr.step_losses(run_dir)
    diff = max_rel(ref, got)
    MEASURED[test] = (f"{len(got)} steps, max rel diff (loss, grad_norm) {diff:.2e}, "
                      f"scenario wall {scene.wall_s:.0f} s")


def resumed_from(text: str) -> list[str]:
    return [Path(m).name for m in re.findall(r"resumed from (\S+) at step", text)]


# ----------------------------------------------------------------------------- scenarios
def scene_ep2(ctx: Ctx) -> Scene:
    """One uninterrupted job: two nodes, one process each, parallel.ep=2."""
    s = Scene(ctx.root / "ep2", ctx.root / "ep2.out")
    job = ctx.submit("ep2", overrides=("checkpoint.every=0",))
    s.jobs.append(ctx.cluster.wait_ended(job))
    return s


def scene_time_limit(ctx: Ctx) -> Scene:
    """--time=1 with the script's warning off (--signal=B:USR1@0): at the limit (slurmctld
    checks every 30 s) SLURM sends SIGTERM to every process of the job, srun and the batch
    shell included, and SIGKILL KillWait (30 s) later. The run holds after step 2 until then.
    Then the same line is submitted again, with time to finish."""
    s = Scene(ctx.root / "time_limit", ctx.root / "time_limit.out")
    faults = "step_end:step=2:action=hold:seconds=170"
    job = ctx.submit("time_limit", "--signal=B:USR1@0", faults=faults, minutes=1,
                     overrides=("checkpoint.every=0",))
    s.jobs.append(ctx.cluster.wait_ended(job, 240))
    s.notes.update(committed=committed(s.run_dir), unfinished=unfinished(s.run_dir))
    job = ctx.submit("time_limit", faults=faults, overrides=("checkpoint.every=0",))
    s.jobs.append(ctx.cluster.wait_ended(job))
    return s


def scene_warning(ctx: Ctx) -> Scene:
    """The script's own pre-timeout warning, --signal=B:USR1@180, at --time=1 (one node, one
    process): longer than the limit, so SLURM's timer sends it at its first check, within
    30 s. SIGUSR1 to the batch shell, which passes SIGTERM to the step. The run holds after
    step 1 until it arrives (a warning during start-up is kept and honoured after step 1).
    Then the same line again, with time to finish."""
    s = Scene(ctx.root / "warning", ctx.root / "warning.out")
    args = {"faults": "step_end:step=1:action=hold:seconds=170", "nodes": 1,
            "overrides": ("checkpoint.every=0",)}
    job = ctx.submit("warning", minutes=1, **args)
    s.jobs.append(ctx.cluster.wait_ended(job, 240))
    s.notes[1] = {"committed": committed(s.run_dir), "unfinished": unfinished(s.run_dir)}
    job = ctx.submit("warning", **args)
    s.jobs.append(ctx.cluster.wait_ended(job))
    return s


def scene_stops(ctx: Ctx) -> Scene:
    """One run stopped twice, each stop followed by a resubmission of the same line:
    `scancel -s USR1` (SIGUSR1 to every process of the step) at step 4, `scancel -b -s USR1`
    (SIGUSR1 to the batch shell, as --signal=B:USR1@N sends it) at step 8. Then the run
    finishes."""
    s = Scene(ctx.root / "stops", ctx.root / "stops.out")
    args = {"faults": ";".join(f"step_end:step={n}:action=hold:seconds=170" for n in (4, 8)),
            "overrides": ("checkpoint.every=0",)}
    for step, how in ((4, ("-s", "USR1")), (8, ("-b", "-s", "USR1"))):
        job = ctx.submit("stops", **args)
        ctx.wait_step("stops", step)
        ctx.cluster.signal(job, *how)
        s.jobs.append(ctx.cluster.wait_ended(job))
        s.notes[step] = {"committed": committed(s.run_dir), "unfinished": unfinished(s.run_dir)}
    job = ctx.submit("stops", **args)
    s.jobs.append(ctx.cluster.wait_ended(job))
    return s


def scene_requeue(ctx: Ctx) -> Scene:
    """`scontrol requeue` at step 6 (checkpoints every 4 steps): SLURM ends the job and
    queues it again as the same job, which resumes on its own. SLURM holds a requeued job
    for about two minutes (its BeginTime); the test lifts that hold (StartTime=now)."""
    s = Scene(ctx.root / "requeue", ctx.root / "requeue.out")
    job = ctx.submit("requeue", faults="step_end:step=6:action=hold:seconds=8",
                     overrides=("checkpoint.every=4",))
    ctx.wait_step("requeue", 6)
    ctx.cluster.control("requeue", job)
    s.jobs.append(ctx.cluster.wait(job, lambda j: j.get("Restarts") == "1" and
                                   j.get("JobState") == "PENDING", 120, "the requeue"))
    ctx.cluster.control("update", f"JobId={job}", "StartTime=now")
    s.jobs.append(ctx.cluster.wait_ended(job))
    return s


ELASTIC_BATCH = """#!/bin/bash
# launch/elastic.sh under SLURM, as its header says: one task per node, MASTER_ADDR the
# allocation's first host, srun without --kill-on-bad-exit (and sbatch --no-kill).
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${hosts[0]} srun --kill-on-bad-exit=0 --ntasks-per-node=1 %s "$@"
"""


def _quiet(cluster, timeout_s: float = 12) -> None:
    """Wait (bounded) until no job is about to start a batch script or a step: every
    running job has its step 0, and none is waiting for nodes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = [ln.split("|") for ln in cluster.run("squeue", "-h", "-o", "%i|%T|%r")
                .splitlines()]
        steps = set(cluster.run("squeue", "-h", "-s", "-o", "%i").split())
        if all(state == "RUNNING" and f"{jid}.0" in steps or
               state == "PENDING" and reason == "BeginTime" for jid, state, reason in jobs):
            return
        time.sleep(0.3)


def _kill_n2(cluster, job: str) -> list[str]:
    """Node n2 dies: its slurmd and the job's processes on it (torchrun agent and worker)
    get SIGKILL. slurmd is started again at once: the job keeps n2 in its allocation, and
    the other tests' jobs need the node back."""
    killed = []
    os.kill(int((STATE_DIR / "slurmd-n2.pid").read_text()), signal.SIGKILL)
    for p in Path("/proc").iterdir():
        try:
            env = set((p / "environ").read_bytes().split(b"\0"))
        except (OSError, ValueError):
            continue
        if {f"SLURM_JOB_ID={job}".encode(), b"SLURMD_NODENAME=n2"} <= env:
            os.kill(int(p.name), signal.SIGKILL)
            killed.append((p / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:60])
    subprocess.run(["slurmd", "-N", "n2", "-f", str(cluster.conf)], check=True,
                   env=cluster.env(), timeout=60)
    return killed


def scene_elastic(ctx: Ctx) -> Scene:
    """launch/elastic.sh on n1 and n2 (one process each, data parallel); at step 6 n2 is
    lost. n1's worker fails in its next collective, its agent restarts it alone, and the
    run resumes from step 4 on one process (same global batch) and finishes."""
    s = Scene(ctx.root / "elastic", ctx.root / "elastic.out")
    batch = ctx.root / "elastic.sbatch"
    batch.write_text(ELASTIC_BATCH % ELASTIC)
    env = ctx.cluster.env(
        MOETRAIN_FAULTS="step_end:step=6:attempt=0:action=hold:seconds=25", NPROC="1",
        MIN_NODES="1", MAX_NODES="2", MAX_RESTARTS="3", RDZV_ID=f"elastic-{os.getpid()}",
        MASTER_PORT=str(find_free_port()),
        RDZV_CONF="keep_alive_interval=1,keep_alive_max_attempt=2,last_call_timeout=2")
    job = ctx.cluster.sbatch(
        "--job-name=elastic", f"--output={s.log}", "--nodes=2", "--no-kill",
        "--gpus-per-node=1", "--cpus-per-task=1", "--time=10", str(batch),
        *ctx.overrides("elastic", "checkpoint.every=4"), env=env)
    ctx.wait_step("elastic", 6)
    with ctx.cluster.lock:
        _quiet(ctx.cluster)
        s.notes["killed"] = _kill_n2(ctx.cluster, job)
    s.jobs.append(ctx.cluster.wait_ended(job))
    return s


def scene_sweep(ctx: Ctx) -> Scene:
    """`moetrain-train -m hydra/launcher=submitit_slurm optim.lr=1e-3,3e-3`, each job in its
    own run dir (a multirun sets run.dir to <sweep dir>/<job number>). Job 0 gets
    SIGUSR2 at step 4, submitit's timeout/preemption signal: moetrain checkpoints, then
    submitit's handler requeues the job (as at a time limit), which resumes and finishes."""
    sweep = ctx.root / "sweep"
    s = Scene(sweep, ctx.root / "sweep.out")
    cmd = [sys.executable, "-m", "moetrain.train", "-m", "hydra/launcher=submitit_slurm",
           f"hydra.sweep.dir={sweep}", *BASE,
           f"train.steps={SWEEP_STEPS}", "checkpoint.every=0", f"data.cache_dir={ctx.cache}",
           f"optim.lr={','.join(SWEEP_LRS)}"]
    env = ctx.cluster.env(MOETRAIN_FAULTS="step_end:step=4:action=hold:seconds=12")
    with open(s.log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=ctx.root)
    try:
        tr.wait_for(lambda: any((sweep / ".submitit").glob("*_0")), 120,
                    "the sweep's submission", s.log)
        job0 = next((sweep / ".submitit").glob("*_0")).name
        tr.wait_for(lambda: tr.logged_step(sweep / "0" / "metrics.jsonl", 4), 180,
                    "sweep job 0 to log step 4", s.log)
        ctx.cluster.signal(job0, "-s", "USR2")
        s.jobs.append(ctx.cluster.wait(job0, lambda j: j.get("Restarts") == "1" and
                                       j.get("JobState") == "PENDING", 120, "the requeue"))
        s.notes["after_usr2"] = committed(sweep / "0")
        ctx.cluster.control("update", f"JobId={job0}", "StartTime=now")
        s.notes["rc"] = proc.wait(240)
    finally:
        tr.stop(proc)
    return s


SCENES = {  # the longest first: SLURM's time limit comes a minute after the job starts
    "time_limit": scene_time_limit, "stops": scene_stops, "requeue": scene_requeue,
    "elastic": scene_elastic, "warning": scene_warning, "sweep": scene_sweep, "ep2": scene_ep2}
TESTS = {  # test -> its scenarios
    "test_two_node_ep2": ("ep2",), "test_time_limit_stop_then_resubmission": ("time_limit",),
    "test_usr1_to_the_step_then_resubmission": ("stops",),
    "test_b_usr1_to_the_batch_shell_then_resubmission": ("stops", "warning"),
    "test_scontrol_requeue_resumes_by_itself": ("requeue",),
    "test_elastic_loses_n2_and_finishes_on_n1": ("elastic",),
    "test_hydra_submitit_sweep": ("sweep",),
}


@pytest.fixture(scope="module")
def scenarios(request, slurm_cluster, tmp_path_factory, data_cache):
    """Start the scenarios of the selected tests at once (the data cache is built first, by
    the reference run); yield {name: Future[Scene]}."""
    selected = {name for i in request.session.items
                if i.module.__name__ == __name__ and i.name in TESTS for name in TESTS[i.name]}
    if not in_ci() and not _has_submitit():
        selected.discard("sweep")  # its test skips, naming the install
    root = tmp_path_factory.mktemp("slurm")
    reference(data_cache)  # builds the data cache
    ctx = Ctx(slurm_cluster, root, data_cache)
    t0 = time.monotonic()

    def timed(fn):
        def run() -> Scene:
            scene = fn(ctx)
            scene.wall_s = time.monotonic() - t0
            return scene
        return run

    pool = ThreadPoolExecutor(max_workers=len(SCENES))
    futures = {name: pool.submit(timed(fn)) for name, fn in SCENES.items() if name in selected}
    yield futures
    pool.shutdown(wait=True)
    _report(request.config, [f"tests/slurm: {t}: {m}" for t, m in MEASURED.items()] +
            [f"tests/slurm: scenarios done in {time.monotonic() - t0:.0f} s"])


def _has_submitit() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:
        return False


_REFS: dict[tuple, dict] = {}


def reference(cache: str, steps: int = STEPS, lr: str | None = None) -> dict:
    """The uninterrupted 1-process run's {step: (loss, grad_norm)} (in this process)."""
    key = (cache, steps, lr)
    if key not in _REFS:
        run_dir = Path(cache).parent / f"ref-{steps}-{lr}"
        extra = [f"optim.lr={lr}"] if lr else []
        train([*BASE, f"train.steps={steps}", f"run.dir={run_dir}", f"data.cache_dir={cache}",
               "checkpoint.every=0", *extra])
        _REFS[key] = tr.step_losses(run_dir)
    return _REFS[key]


def scene(scenarios: dict[str, Future], name: str) -> Scene:
    return scenarios[name].result(timeout=600)


def ended_ok(info: dict[str, str]) -> bool:
    return info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0"


# ----------------------------------------------------------------------------- tests
def test_two_node_ep2(scenarios, data_cache):
    s = scene(scenarios, "ep2")
    assert ended_ok(s.jobs[0]), (s.jobs[0], s.text()[-3000:])
    assert s.jobs[0]["NodeList"] == "n[1-2]" and "2 nodes x 1 GPUs" in s.text()
    check_losses("test_two_node_ep2", reference(data_cache), s.run_dir, s)


def test_time_limit_stop_then_resubmission(scenarios, data_cache):
    """SLURM's SIGTERM at the time limit: the workers checkpoint step 2 within KillWait.
    srun also gets SIGTERM ("forcing job termination"), but the job is already ending, so
    its SIGKILL of the step does not land: SLURM's own SIGKILL, KillWait later, is the
    deadline."""
    s = scene(scenarios, "time_limit")
    first, second = s.jobs
    text = s.text()
    assert first["JobState"] == "TIMEOUT", (first, text[-3000:])
    assert "CANCELLED AT" in text and "DUE TO TIME LIMIT" in text
    assert "the batch shell got SIGTERM" in text and "got SIGUSR1" not in text
    assert "stop signal received (SIGTERM)" in text
    assert s.notes == {"committed": {2: 2}, "unfinished": []}, s.notes
    assert ended_ok(second), (second, text[-3000:])
    assert resumed_from(text) == ["step_0000002"] * 2, resumed_from(text)
    check_losses("test_time_limit_stop_then_resubmission", reference(data_cache), s.run_dir, s)


def test_usr1_to_the_step_then_resubmission(scenarios, data_cache):
    """The agents ignore SIGUSR1 and outlive their workers' save: step 4 is committed (it
    was left as step_0000004.tmp-... when the agent died and took the rendezvous store)."""
    s = scene(scenarios, "stops")
    assert ended_ok(s.jobs[0]), (s.jobs[0], s.text()[-3000:])
    assert s.notes[4] == {"committed": {4: 2}, "unfinished": []}, s.notes
    assert "stop signal received (SIGUSR1)" in s.text()
    assert resumed_from(s.text()) == [f"step_000000{n}" for n in (4, 4, 8, 8)]
    check_losses("test_usr1_to_the_step_then_resubmission", reference(data_cache), s.run_dir,
                 s)


def test_b_usr1_to_the_batch_shell_then_resubmission(scenarios, data_cache):
    """SIGUSR1 to the batch shell, from `scancel -b` (step 8) and from SLURM's timer (the
    script's --signal=B:USR1@180 at --time=1, step 1): the shell sends SIGTERM to the step,
    which stops with a checkpoint; each job ends COMPLETED, before any limit."""
    for name, step, before in (("stops", 8, {4: 2}), ("warning", 1, {})):
        s = scene(scenarios, name)
        text = s.text()
        assert all(ended_ok(j) for j in s.jobs), [(j["JobId"], j["JobState"]) for j in s.jobs]
        assert text.count("the batch shell got SIGUSR1; SIGTERM to the training step") == 1
        assert "stop signal received (SIGTERM)" in text and "DUE TO TIME LIMIT" not in text
        world = 2 if name == "stops" else 1
        assert s.notes[step] == {"committed": {**before, step: world}, "unfinished": []}
        check_losses(f"test_b_usr1_to_the_batch_shell_then_resubmission[{name}]",
                     reference(data_cache), s.run_dir, s)


def test_scontrol_requeue_resumes_by_itself(scenarios, data_cache):
    """The requeue kills the job (srun gets SIGTERM and SIGKILLs the step, racing the
    workers' own stop): it resumes from step 6 if that save won, else from step 4."""
    s = scene(scenarios, "requeue")
    requeued, final = s.jobs
    text = s.text()
    assert requeued["JobState"] == "PENDING" and requeued["Reason"] == "BeginTime", requeued
    assert ended_ok(final) and final["Restarts"] == "1", (final, text[-3000:])
    assert "(restart 1)" in text
    assert resumed_from(text) in (["step_0000004"] * 2, ["step_0000006"] * 2), text[-3000:]
    assert unfinished(s.run_dir) == []
    check_losses("test_scontrol_requeue_resumes_by_itself", reference(data_cache), s.run_dir,
                 s)


def test_elastic_loses_n2_and_finishes_on_n1(scenarios, data_cache):
    s = scene(scenarios, "elastic")
    text = s.text()
    assert len(s.notes["killed"]) == 2, s.notes  # n2's torchrun agent and worker
    assert "n2: task 1: Killed" in text, text[-3000:]
    assert resumed_from(text) == ["step_0000004"], text[-3000:]
    assert committed(s.run_dir) == {4: 2, 8: 1, 12: 1}  # {step: world size that saved it}
    check_losses("test_elastic_loses_n2_and_finishes_on_n1", reference(data_cache), s.run_dir,
                 s)


def test_hydra_submitit_sweep(scenarios, data_cache):
    oracle("hydra_plugins.hydra_submitit_launcher")
    s = scene(scenarios, "sweep")
    assert s.notes["rc"] == 0, s.text()[-3000:]
    assert s.notes["after_usr2"] == {4: 1}, s.notes  # checkpointed before the requeue
    diffs = []
    for num, lr in enumerate(SWEEP_LRS):
        job_dir = s.run_dir / str(num)
        overrides = (job_dir / ".hydra" / "overrides.yaml").read_text()
        assert re.findall(r"optim\.lr=(\S+)", overrides) == [str(float(lr))], overrides
        got = tr.step_losses(job_dir)
        diffs.append(max_rel(reference(data_cache, SWEEP_STEPS, lr), got))
        assert committed(job_dir) == ({4: 1} if num == 0 else {})  # the SIGUSR2 stop only
    log0 = (s.run_dir / "0" / "main.log").read_text()
    assert resumed_from(log0) == ["step_0000004"], log0[-3000:]
    MEASURED["test_hydra_submitit_sweep"] = (
        f"jobs lr={SWEEP_LRS}: max rel diff (loss, grad_norm) "
        f"{', '.join(f'{d:.2e}' for d in diffs)}, scenario wall {s.wall_s:.0f} s")
