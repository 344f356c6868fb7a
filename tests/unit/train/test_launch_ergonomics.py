"""What a new user meets first: the defaults fit any small world size
(train.micro_batch_size=auto), a config error under torchrun is one line from rank 0 and
exit status 2 on every rank, and a log file gets plain progress lines, not tqdm redraws."""

from __future__ import annotations

import io
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moetrain.config import ConfigError, validate
from moetrain.metrics.progress import (
    ProgressBar,
    ProgressLines,
    format_eta,
    line_every,
    progress_display,
)
from moetrain.testing import find_free_port
from tests.conftest import TINY, compose
from tests.distributed._runs import assert_same_trajectory, step_rows, train

ROOT = Path(__file__).resolve().parents[3]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={find_free_port()}", "-m", "moetrain.train"]


# ------------------------------------------------------------ micro_batch_size=auto
def _auto(overrides: list[str], world: int) -> tuple[int, int]:
    cfg = compose(overrides + ["run.dir=/tmp/x"])
    assert cfg.train.micro_batch_size == "auto"  # the default
    layout = validate(cfg, world)
    return cfg.train.micro_batch_size, layout.dp


# Hand-computed: the largest m <= cap dividing global_batch_size / dp, with >= pp
# micro-batches per step when pipelined. Defaults: global batch 16, cap 8.
@pytest.mark.parametrize("overrides,world,expected", [
    ([], 1, (8, 1)),  # 16 per rank: 8, accumulated twice
    ([], 2, (8, 2)),
    ([], 4, (4, 4)),  # the default that used to fail: 16 / (8 * 4)
    ([], 8, (2, 8)),
    (["train.global_batch_size=12"], 4, (3, 4)),
    (["train.max_micro_batch_size=3"], 1, (2, 1)),  # 3 does not divide 16
    (["parallel.tp=2"], 4, (8, 2)),  # tp ranks share a micro-batch: dp = 2, not 4
    (["parallel.ep=4"], 4, (4, 4)),  # ep is carved out of dp: dp stays 4
    (["parallel.pp=2"], 4, (4, 2)),  # 8 per rank, but 1F1B needs >= 2 micro-batches
    (["parallel.pp=4"], 4, (4, 1)),  # 16 per rank, >= 4 micro-batches
    (["parallel.pp=2", "parallel.pp_schedule=gpipe"], 2, (8, 1)),  # 2 x 8 already >= pp
    # 9 per rank: 1 x 9 is not whole rounds of 4 (2 rounds), so 3 x 3, although 3 < pp
    (["parallel.pp=4", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2",
      "model.n_layers=8", "train.global_batch_size=9"], 4, (3, 1)),
])
def test_auto_micro_batch(overrides, world, expected):
    assert _auto(overrides, world) == expected


@pytest.mark.parametrize("overrides,world,words", [
    ([], 3, ["train.global_batch_size=16", "data-parallel size dp=3", "multiple of 3",
             "e.g. 18 or 15"]),
    (["parallel.pp=4", "train.global_batch_size=2"], 4,
     ["train.micro_batch_size=auto", "parallel.pp=4", "2/1 = 2",
      "set train.global_batch_size to 4"]),
])
def test_auto_micro_batch_errors(overrides, world, words):
    cfg = compose(overrides + ["run.dir=/tmp/x"])
    with pytest.raises(ConfigError) as e:
        validate(cfg, world)
    msg = str(e.value)
    for w in words:
        assert w in msg, msg


def test_explicit_micro_batch_keeps_its_checks():
    cfg = compose(["train.micro_batch_size=8", "run.dir=/tmp/x"])
    with pytest.raises(ConfigError, match=r"train.micro_batch_size\*dp=8\*4=32"):
        validate(cfg, 4)
    with pytest.raises(ConfigError, match="train.micro_batch_size='big' is invalid"):
        compose(["train.micro_batch_size=big", "run.dir=/tmp/x"])
    assert compose(["train.micro_batch_size='4'", "run.dir=/tmp/x"]).train.micro_batch_size == 4


def test_auto_is_chosen_again_for_another_layout():
    """The memory estimator validates one config for many layouts: the choice follows."""
    cfg = compose(["run.dir=/tmp/x"])
    validate(cfg, 1)
    assert cfg.train.micro_batch_size == 8
    validate(cfg, 4)
    assert cfg.train.micro_batch_size == 4
    cfg.train.micro_batch_size = 2  # set by hand after validation: explicit from now on
    validate(cfg, 1)
    assert cfg.train.micro_batch_size == 2


def test_memory_estimator_sees_the_resolved_int():
    from moetrain.parallel import memory

    cfg = compose(["run.dir=/tmp/x"])
    est = memory.estimate(cfg, 4, 257, device="cpu")
    assert (est.layout.dp, cfg.train.micro_batch_size) == (4, 4)
    validate(cfg, 1)
    assert cfg.train.micro_batch_size == 8  # would not fit dp=4 if it were taken as explicit
    fits, _ = memory.suggest_layouts(cfg, 4, 80.0, vocab_size=257)
    assert {f.estimate.layout.dp for f in fits} == {1, 2, 4}


# ------------------------------------------------------------ progress without a terminal
class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_lines_cadence_and_format():
    """Plain lines every 5% of train.steps, after 10 s without one, and at the end."""
    out = io.StringIO()
    now = [0.0]
    p = ProgressLines(total=100, initial=0, every=line_every(100), end=12, stream=out,
                      clock=lambda: now[0])
    for step in range(1, 13):
        now[0] += 15.0 if step == 8 else 1.0  # step 8 comes 11 s after the line at step 5
        p.update(step, 5.0 - step / 10, 1234.5)
    lines = out.getvalue().splitlines()
    assert [int(re.match(r"step (\d+)/100 \|", ln).group(1)) for ln in lines] == [5, 8, 10, 12]
    assert lines[0].startswith("step 5/100 | loss 4.5000 | 1,234 tok/s | ETA ")
    # The ETA extrapolates this invocation's time per step: 5 s for 5 steps, 95 to go.
    assert lines[0].endswith("ETA 0:01:35")
    assert "\r" not in out.getvalue()
    assert isinstance(progress_display(10, 0, stream=_Tty()), ProgressBar)
    assert (format_eta(3725.4), format_eta(59.6), format_eta(math.nan)) == (
        "1:02:05", "0:01:00", "?")


def test_progress_lines_per_run_length():
    """A long run of fast steps prints ~20 lines, not one per step; a short one every step."""
    for total, want in ((300, list(range(15, 301, 15))), (7, list(range(1, 8)))):
        out = io.StringIO()
        p = progress_display(total, 0, stream=out)
        for step in range(1, total + 1):
            p.update(step, 1.0, 1.0)
        got = [int(ln.split()[1].split("/")[0]) for ln in out.getvalue().splitlines()]
        assert got == want
    # A resumed run keeps the cadence of the whole run and prints its last step.
    out = io.StringIO()
    p = progress_display(300, 100, end=212, stream=out)
    for step in range(101, 213):
        p.update(step, 1.0, 1.0)
    got = [int(ln.split()[1].split("/")[0]) for ln in out.getvalue().splitlines()]
    assert got == [*range(105, 211, 15), 212]


def test_progress_lines_through_a_pipe(tmp_path, data_cache):
    """A 1-process run whose stderr is a pipe prints a plain line every 5% of the run (plus
    any 10 s apart, and the last), with the losses metrics.jsonl records for every step, and
    no carriage return."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "moetrain.train", *TINY, f"run.dir={run_dir}",
           f"data.cache_dir={data_cache}", "train.steps=40", "train.log_every=1",
           "train.progress=true", "eval.every=0"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(),
                          check=False)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "\r" not in out
    pat = re.compile(r"^step (\d+)/40 \| loss (\S+) \| ([\d,]+) tok/s \| ETA (\d+:\d\d:\d\d)$")
    got = [pat.match(ln) for ln in proc.stderr.splitlines() if ln.startswith("step ")]
    assert all(got), proc.stderr
    rows = {r["step"]: r for r in step_rows(_read(run_dir))}
    assert sorted(rows) == list(range(1, 41))  # metrics.jsonl keeps every step
    steps = [int(m.group(1)) for m in got]
    assert set(range(2, 41, 2)) <= set(steps) and steps == sorted(set(steps))
    # Any other line is a 10-s one: few of them, whatever the machine's speed.
    assert len(steps) - 20 <= wall / 10 + 1
    for m in got:
        assert float(m.group(2)) == pytest.approx(rows[int(m.group(1))]["loss"], abs=1e-4)
        assert int(m.group(3).replace(",", "")) > 0


def test_progress_false_prints_no_progress(tiny_overrides, capfd):
    from moetrain.train.main import run

    run(compose(tiny_overrides + ["train.steps=2", "eval.every=0", "train.progress=false"]))
    out, err = capfd.readouterr()
    assert not re.search(r"^step \d+/", out + err, re.MULTILINE)
    assert "\r" not in err


def _read(run_dir: Path) -> list[dict]:
    from moetrain.metrics import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


# ------------------------------------------------------------ torchrun
# The defaults, but short: a 5-step run with shorter sequences, no validation, no checkpoint.
DEFAULTS_SHORT = ["train.steps=5", "train.seq_len=32", "eval.every=0", "checkpoint.every=0",
                  "logging.tensorboard=false"]


def test_defaults_run_on_four_processes(tmp_path, data_cache):
    """`torchrun --nproc_per_node=4 -m moetrain.train` with the default batch sizes: auto
    picks 4 sequences per forward, and the run is the 1-process run with the same
    micro-batches (train.micro_batch_size=4: 4 accumulated) step for step."""
    run_dir = tmp_path / "tr"
    cmd = _torchrun(4) + DEFAULTS_SHORT + [f"run.dir={run_dir}", f"data.cache_dir={data_cache}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env(),
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("train.micro_batch_size=auto -> 4 ") == 1, proc.stdout
    got = _read(run_dir)
    assert [r["step"] for r in step_rows(got)] == [1, 2, 3, 4, 5]
    ref = train(DEFAULTS_SHORT + [f"run.dir={tmp_path / 'ref'}", f"data.cache_dir={data_cache}",
                                  "train.micro_batch_size=4", "train.progress=false"])
    assert_same_trajectory(ref, got, rtol=1e-4)


def _assert_reported_once(proc: subprocess.CompletedProcess, words: list[str]) -> str:
    err = proc.stderr
    lines = [ln for ln in err.splitlines() if re.match(r"moetrain( \(rank \d+\))?:", ln)]
    assert len(lines) == 1 and lines[0].startswith("moetrain: invalid config: "), err[-3000:]
    for w in words:
        assert w in err.split("moetrain: invalid config: ", 1)[1].split("\n\n")[0], err[-3000:]
    assert "Error executing job" not in err
    assert f'File "{ROOT}/moetrain' not in err  # no worker traceback
    return lines[0]


def test_bad_override_under_torchrun_reported_once(tmp_path):
    """Every rank meets the error; rank 0 prints it, every rank exits 2, and torchrun's
    failure summary names it (TORCHELASTIC_ERROR_FILE) instead of <N/A>."""
    cmd = _torchrun(2) + [f"run.dir={tmp_path}", "train.global_batch_size=15"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env(),
                          check=False)
    assert proc.returncode != 0
    line = _assert_reported_once(proc, ["train.global_batch_size=15", "dp=2", "e.g. 16 or 14"])
    err = proc.stderr
    # torchrun's own traceback (ChildFailedError) is the only one.
    assert err.count("Traceback (most recent call last)") == err.count("ChildFailedError:") <= 1
    assert sorted(re.findall(r"rank      : (\d)", err)) == ["0", "1"], err[-3000:]
    assert re.findall(r"exitcode  : (-?\d+)", err) == ["2", "2"], err[-3000:]
    root = err.split("Root Cause (first observed failure):", 1)[1]
    assert "rank      : 0" in root and f"traceback : {line}" in root, root


def test_misspelt_key_reported_once(tmp_path, monkeypatch, capfd):
    """A composition error (Hydra's) gets the same treatment as a validation error: one
    line, exit status 2, no traceback, and the HYDRA_FULL_ERROR setting left as it was."""
    from moetrain.train import main as entry

    monkeypatch.setattr(sys, "argv", ["moetrain-train", f"run.dir={tmp_path}", "trian.steps=5"])
    monkeypatch.setattr(entry, "_job_started", False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    with pytest.raises(SystemExit) as e:
        entry.main()
    assert e.value.code == 2
    out, err = capfd.readouterr()
    proc = subprocess.CompletedProcess([], 2, out, err)
    _assert_reported_once(proc, ["Could not override 'trian.steps'", "Key 'trian' not in"])
    assert "Traceback" not in out + err
    assert "HYDRA_FULL_ERROR" not in os.environ
