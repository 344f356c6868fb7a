"""A real two-node SLURM cluster for the tests of this folder: launch/slurm_local_cluster.sh
starts munge, slurmctld and two slurmd daemons as nodes n1 and n2 on 127.0.0.1, once per
session, and stops what it started at the end.

Without SLURM (the Debian packages slurmctld, slurmd, slurm-client and munge) or without
root, the tests skip with the reason; under CI=true they fail instead: CI installs SLURM
with apt-get, as README's "Set up" says.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import in_ci

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "slurm_local_cluster.sh"
STATE_DIR = Path(os.environ.get("MOETRAIN_SLURM_DIR", "/tmp/moetrain-slurm"))
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "scancel", "scontrol", "squeue")
INSTALL = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _missing() -> str | None:
    absent = [c for c in COMMANDS if shutil.which(c) is None]
    if absent:
        return f"SLURM is not installed ({', '.join(absent)} not found): {INSTALL}"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (its daemons and /etc/hosts)"
    return None


_SESSION_ENV = dict(os.environ)  # before any test runs (see Cluster.env)


class Cluster:
    """Client commands of the test cluster. ``lock`` serialises what must not overlap with
    a node being down (submissions, signals, requeues) against the node-loss test."""

    def __init__(self, conf: Path) -> None:
        self.conf = conf
        self.lock = threading.Lock()

    def env(self, **extra: str) -> dict[str, str]:
        """The environment a job is submitted with (sbatch exports it to the job): the
        session's environment as it was at collection, since the scenarios run while other
        tests set variables of their own (monkeypatch.setenv) in this process."""
        e = {k: v for k, v in _SESSION_ENV.items()
             if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "MOETRAIN_FAULTS"))}
        e.update(SLURM_CONF=str(self.conf), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                 MOETRAIN_DIST_TIMEOUT_S="60", HYDRA_FULL_ERROR="1")
        e["PATH"] = f"{Path(sys.executable).parent}:{e.get('PATH', '/usr/bin:/bin')}"
        e.update(extra)
        return e

    def run(self, *cmd: str, env: dict[str, str] | None = None, check: bool = True) -> str:
        # a fixed working directory (a job's, for sbatch): other tests may chdir meanwhile
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False,
                           env=env or self.env(), cwd=ROOT)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}")
        return r.stdout

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> str:
        with self.lock:
            return self.run("sbatch", "--parsable", *args, env=env).strip().split(";")[0]

    def signal(self, job: str, *args: str) -> None:
        """``scancel ARGS JOB`` (e.g. ``-s USR1``, ``-b -s USR1``)."""
        with self.lock:
            self.run("scancel", *args, job)

    def control(self, *args: str) -> None:
        with self.lock:
            self.run("scontrol", *args)

    def job(self, job: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, NodeList, ExitCode...)."""
        out = self.run("scontrol", "-o", "show", "job", job)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job: str, until, timeout_s: float, what: str) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.job(job)
            if until(info):
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job}: timed out after {timeout_s} s waiting for {what}; "
                             f"last state {info.get('JobState')} ({info.get('Reason')})")

    def wait_ended(self, job: str, timeout_s: float = 240) -> dict[str, str]:
        return self.wait(job, lambda j: j.get("JobState") in ENDED, timeout_s, "its end")


def _report(config, lines: list[str]) -> None:
    """Print lines past pytest's output capture, so that the test log (CI's) shows them."""
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + "\n".join(lines), flush=True)


@pytest.fixture(scope="session")
def slurm_cluster(request) -> Cluster:
    reason = _missing()
    if reason is not None:
        if in_ci():
            pytest.fail(f"CI=true: {reason}. CI installs SLURM (.ci/run), so this is a "
                        "failure, not a skip", pytrace=False)
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["MOETRAIN_SLURM_DIR"] = str(STATE_DIR)
    status = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True,
                            env=env, check=False)
    ours = status.returncode != 0  # not running yet: this session starts and stops it
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True,
                       env=env, timeout=120, check=False)
    lines = [f"tests/slurm: {line}" for line in (r.stdout + r.stderr).splitlines()]
    _report(request.config, [*lines, f"tests/slurm: cluster up in {time.monotonic() - t0:.1f} s"])
    if r.returncode != 0:
        pytest.fail(f"launch/slurm_local_cluster.sh start failed:\n{r.stdout}{r.stderr}")
    yield Cluster(STATE_DIR / "slurm.conf")
    if ours:
        r = subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True,
                           env=env, timeout=120, check=False)
        _report(request.config, [f"tests/slurm: {line}" for line in r.stdout.splitlines()])

