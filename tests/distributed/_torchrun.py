"""Launch the real entry point under torchrun for the fault-tolerance tests.

Each launch is a subprocess group with a hard timeout: a hang kills the group and fails the
test. Faults are injected with ``$MOETRAIN_FAULTS`` (moetrain/faults.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from moetrain.metrics import read_metrics
from tests.conftest import TINY

# A tiny run: 2 MoE layers, 8 sequences of 32 tokens per step, 2 per micro-batch.
FT = [o for o in TINY if not o.startswith(("train.steps", "eval.every", "checkpoint.every"))] + [
    "eval.every=0", "train.log_every=1", "checkpoint.resume=auto",
]


def env(faults: str = "", **extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.pop("MOETRAIN_FAULTS", None)
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MOETRAIN_DIST_TIMEOUT_S="60",
             HYDRA_FULL_ERROR="1")
    if faults:
        e["MOETRAIN_FAULTS"] = faults
    e.update(extra)
    return e


def torchrun_cmd(launcher: list[str], overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "moetrain.train",
            *overrides]


def start(cmd: list[str], log: Path, environ: dict[str, str]) -> subprocess.Popen:
    f = open(log, "ab")  # noqa: SIM115 - closed with the process by the caller's stop()
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=environ,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """Kill a launch's whole process group (agent and workers) if still alive."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def run(launcher: list[str], overrides: list[str], log: Path, environ: dict[str, str],
        timeout_s: float) -> int:
    """Run one torchrun launch to completion; its return code (the test fails on timeout)."""
    proc = start(torchrun_cmd(launcher, overrides), log, environ)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"torchrun did not finish in {timeout_s} s; log:\n"
                             + tail(log)) from None
    finally:
        stop(proc)


def tail(log: Path, n: int = 60) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


def wait_for(pred, timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}"
                         + (f"; log:\n{tail(log)}" if log else ""))


def step_losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    """{step: (loss, grad_norm)} of a run's metrics.jsonl (resumes truncate it)."""
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step is logged twice: {steps}"
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows}


def logged_step(metrics: Path, step: int) -> bool:
    """Whether ``metrics`` (being written) already holds a row for ``step``."""
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return False
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a line being written
            continue
        if row.get("step") == step and "loss" in row:
            return True
    return False


def assert_same_losses(ref: dict, got: dict, rtol: float = 1e-5) -> None:
    assert sorted(got) == sorted(ref), f"steps {sorted(got)} != {sorted(ref)}"
    for s in sorted(ref):
        for name, a, b in zip(("loss", "grad_norm"), ref[s], got[s]):
            assert abs(a - b) <= rtol * abs(a), f"step {s} {name}: reference {a!r}, got {b!r}"
