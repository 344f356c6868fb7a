"""Training experiments run as subprocesses, and the numbers read back from them.

The shared core of ``tools/compare_routers.py``, ``tools/compare_schedules.py`` and
``tools/reproduce.py``. A tool lists its runs as :class:`Job` s (one ``python -m
moetrain.train`` subprocess each); :func:`run_jobs` trains them, several at a time when
asked, each after the jobs whose outputs it reads, and keeps finished ones with ``reuse``.
The tool then tabulates what the runs' metrics.jsonl hold (:func:`read_run`,
:func:`window_mean`), with seed statistics (:func:`mean_std`, :func:`se_diff`), Markdown
tables and matplotlib figures. :func:`routing_profile` loads a run's final checkpoint in
this process and measures its routing on the validation files: the global load balance
(:func:`max_vio`) and how specialised the experts are (:func:`file_entropy`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "WINDOW", "Job", "add_common_args", "check_common_args", "file_entropy",
    "file_sequences", "fmt", "fmt_mean_std", "is_finished", "machine", "markdown_table",
    "max_vio", "mean_std", "pyplot", "read_run", "route_counts", "routing_profile",
    "run_jobs", "run_logged", "se_diff", "train_command", "window_mean", "window_size",
]

WINDOW = 50  # training steps averaged for the balance numbers (a quarter of a short run)


# ----------------------------------------------------------------------------- running
@dataclass(frozen=True)
class Job:
    """One training subprocess.

    ``end_step``: the run is finished once metrics.jsonl holds a validation at this step
    (with ``train.stop_at``, the stop step). ``checkpoint_step``: it must also have
    committed this step's checkpoint (another job or the analysis reads it). ``after``:
    names of the jobs that must finish first; a job re-trained there re-trains this one.
    """

    name: str
    run_dir: Path
    command: tuple[str, ...]
    end_step: int
    checkpoint_step: int | None = None
    after: tuple[str, ...] = ()
    label: str = ""  # for messages; the name if empty


def train_command(overrides: Sequence[str], run_dir: Path | str) -> tuple[str, ...]:
    """``python -m moetrain.train OVERRIDES run.dir=RUN_DIR`` with this interpreter."""
    return (sys.executable, "-m", "moetrain.train", *overrides, f"run.dir={run_dir}")


def run_logged(cmd: Sequence[str], run_dir: Path, threads: int, label: str) -> dict:
    """Run ``cmd`` in a fresh ``run_dir`` with its output in train.log (its first line the
    command); return and record (timing.json) {"wall_s", "cpu_s", "load_avg"}: the
    subprocess's CPU time (user + system; what the run costs on an idle machine) and the
    1-minute load average when it ended (above the core count, other processes shared
    the cores: wall time and tokens/s are inflated)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    log_path = run_dir / "train.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env)
        if hasattr(os, "wait4"):  # this child's own resource usage
            _, status, usage = os.wait4(proc.pid, 0)
            rc, cpu = os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime
            proc.returncode = rc  # reaped here: Popen must not wait for it again
        else:
            rc, cpu = proc.wait(), None
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{label} failed (exit {rc}); its log is {log_path}:\n{tail}")
    out = {"wall_s": wall, "cpu_s": cpu,
           "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    (run_dir / "timing.json").write_text(json.dumps(out) + "\n")
    return out


def is_finished(job: Job) -> bool:
    """Did ``job`` run to its end with its command (train.log's start): a validation
    at ``end_step``, timing.json, and the committed checkpoint it must leave?"""
    path, log = job.run_dir / "metrics.jsonl", job.run_dir / "train.log"
    if not all(p.is_file() for p in (path, log, job.run_dir / "timing.json")):
        return False
    head = shlex.join(job.command) + "\n"
    with open(log) as f:
        if f.read(len(head)) != head:
            return False  # trained with other settings
    if job.checkpoint_step is not None:
        from moetrain.checkpoint import is_committed, step_dir_name

        if not is_committed(job.run_dir / "checkpoints" / step_dir_name(job.checkpoint_step)):
            return False
    from moetrain.metrics import read_metrics

    return any(r.get("step") == job.end_step and "val_loss" in r for r in read_metrics(path))


def run_jobs(jobs: Sequence[Job], *, parallel: int = 1, threads: int = 1, reuse: bool = False,
             desc: str = "runs", on_done: Callable[[Job, dict], str | None] | None = None
             ) -> dict[str, dict]:
    """Train ``jobs``, at most ``parallel`` at a time, each after its ``after`` jobs.

    Returns, per job name, {"wall_s", "cpu_s", "load_avg", "reused"} (:func:`run_logged`).
    With ``reuse`` a finished job (:func:`is_finished`) is kept unless a job it needs was
    trained again. ``on_done(job, timing)`` may return a line to print when a job
    finishes. A progress bar counts the jobs. If a job fails, the running ones finish,
    nothing new starts, and its error is raised."""
    from tqdm import tqdm

    by_name = {j.name: j for j in jobs}
    if len(by_name) != len(jobs):
        raise ValueError("job names must be unique")
    for j in jobs:
        unknown = [d for d in j.after if d not in by_name]
        if unknown:
            raise ValueError(f"job {j.name!r} runs after {unknown}, which are not in the list")
    done: dict[str, dict] = {}
    trained: set[str] = set()
    pending = list(jobs)
    running: dict[Future, Job] = {}
    error: BaseException | None = None
    # A bar on a terminal; in a log file (no terminal) a plain line per finished job.
    tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
    bar = tqdm(total=len(jobs), desc=desc, unit="run", dynamic_ncols=True, disable=not tty)

    def finish(job: Job, timing: dict) -> None:
        done[job.name] = timing
        bar.update(1)
        line = on_done(job, timing) if on_done else None
        if not tty:
            how = "reused" if timing.get("reused") else f"{timing.get('wall_s', 0):.0f} s"
            line = f"{desc} {len(done)}/{len(jobs)}: {job.name} ({how})" + (
                f" | {line}" if line else "")
        if line:
            bar.write(line, file=sys.stderr)

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        while (pending and error is None) or running:
            progressed = True
            while progressed and error is None:  # keep reusable jobs, start ready ones
                progressed = False
                for job in list(pending):
                    if not all(d in done for d in job.after):
                        continue
                    if reuse and not any(d in trained for d in job.after) and is_finished(job):
                        pending.remove(job)
                        timing = json.loads((job.run_dir / "timing.json").read_text())
                        finish(job, {**timing, "reused": True})
                        progressed = True
                    elif len(running) < max(1, parallel):
                        pending.remove(job)
                        fut = pool.submit(run_logged, job.command, job.run_dir, threads,
                                          job.label or f"run {job.name!r}")
                        running[fut] = job
                        progressed = True
            if not running:
                if pending and error is None:
                    raise RuntimeError(f"jobs {[j.name for j in pending]} wait on each other")
                break
            bar.set_postfix_str(", ".join(j.name for j in running.values()))
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                try:
                    timing = fut.result()
                except Exception as e:  # noqa: BLE001 - raised once the others are done
                    error = error or e
                    continue
                trained.add(job.name)
                finish(job, {**timing, "reused": False})
    bar.close()
    if error is not None:
        raise error
    return done


# ----------------------------------------------------------------------------- metrics
def read_run(metrics_path: str | Path) -> tuple[list[dict], list[tuple[int, float]]]:
    """A run's training rows (those with ``loss``) and validation curve [(step, val_loss)]
    from its metrics.jsonl; other records (a recipe line, events) are skipped."""
    from moetrain.metrics import read_metrics

    rows = read_metrics(metrics_path)
    train = [r for r in rows if "loss" in r and "step" in r]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if "val_loss" in r]
    if not train:
        raise ValueError(f"{metrics_path} holds no training rows: the run did not train")
    return train, val


def window_size(train_steps: int) -> int:
    """Steps averaged: the last 50, or the last quarter of a run of fewer than 200."""
    return max(1, min(WINDOW, train_steps // 4))


def window_mean(train: Sequence[dict], key: str, n: int | None = None) -> float | None:
    """Mean of ``key`` over the last ``n`` training rows (:func:`window_size` by default),
    over the rows that hold it; None if none does."""
    n = window_size(len(train)) if n is None else n
    vals = [float(r[key]) for r in train[-n:] if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


# ----------------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1 in the denominator; None for one value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def se_diff(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Standard error of mean(a) - mean(b) for independent samples (Welch):
    sqrt(s_a^2 / n_a + s_b^2 / n_b), s the sample standard deviation. None unless both
    have at least two values."""
    if len(a) < 2 or len(b) < 2:
        return None
    sa, sb = mean_std(a)[1], mean_std(b)[1]
    return math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b))


# ----------------------------------------------------------------------------- output
def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def fmt_mean_std(values: Sequence[float], spec: str) -> str:
    """``mean ± std`` over seeds (just the value for one seed; ``-`` for none)."""
    if not values:
        return "-"
    mean, std = mean_std(values)
    return format(mean, spec) if std is None else f"{mean:{spec}} ± {std:{spec}}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A Markdown table; ``align`` has one letter per column, ``l`` or ``r``. A ``|`` in a
    cell is escaped."""
    if len(align) != len(header) or any(len(r) != len(header) for r in rows):
        raise ValueError("header, align and every row need the same number of columns")
    sep = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), sep] + [line(r) for r in rows])


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only); ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cpu_name() -> str:
    """The processor's model name (platform.processor() is often just the architecture on
    Linux: /proc/cpuinfo says more)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    import torch

    return (f"{os.cpu_count()} CPU cores ({cpu_name()}), torch {torch.__version__}, "
            f"Python {platform.python_version()}")


# ----------------------------------------------------------------------------- command line
def add_common_args(p: argparse.ArgumentParser, names: Sequence[str], default_out: str,
                    what: str = "method", jobs: int = 1) -> None:
    """The options the comparison tools share."""
    p.add_argument("--out", default=default_out, help="output directory")
    p.add_argument("--only", default="", help=f"comma-separated {what}s: {','.join(names)}")
    p.add_argument("--extra", action="append", default=[],
                   help="Hydra overrides for every run, space-separated (repeatable); "
                        "they come after the tool's own")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per run (1: as fast as 2 for this model on 2 cores, and "
                        "it does not thrash when other processes share the cores)")
    p.add_argument("--jobs", type=int, default=jobs,
                   help=f"training runs at a time ({jobs}); at most the CPU cores / --threads")
    p.add_argument("--reuse", action="store_true",
                   help="keep finished runs already under --out (re-tabulate, re-plot)")
    p.add_argument("--list", action="store_true", help=f"print the {what}s and exit")


def check_common_args(p: argparse.ArgumentParser, a: argparse.Namespace,
                      names: Sequence[str], what: str = "method") -> None:
    """Validate the shared options; sets ``a.names`` and ``a.extra_overrides``."""
    if a.threads < 1:
        p.error(f"--threads={a.threads} is invalid: must be >= 1")
    if a.jobs < 1:
        p.error(f"--jobs={a.jobs} is invalid: must be >= 1")
    chosen = [n.strip() for n in a.only.split(",") if n.strip()] or list(names)
    bad = [n for n in chosen if n not in names]
    if bad:
        p.error(f"--only names unknown {what}(s) {', '.join(map(repr, bad))}: choose from "
                f"{', '.join(names)}")
    a.names = list(dict.fromkeys(chosen))
    a.extra_overrides = [o for chunk in a.extra for o in shlex.split(chunk)]


# ----------------------------------------------------------------------------- routing
def max_vio(counts_E: np.ndarray) -> float:
    """MaxVio (Wang et al., arXiv 2408.15664): max_e load_e / mean_e load_e - 1, 0 when
    every expert gets the same load."""
    counts_E = np.asarray(counts_E, dtype=np.float64)
    mean = counts_E.mean()
    if mean <= 0:
        raise ValueError("max_vio of an empty load (no token was routed)")
    return float(counts_E.max() / mean - 1.0)


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def file_entropy(counts_EF: np.ndarray) -> tuple[float, float]:
    """How specialised the experts are: (H(F | E), H(F)) in nats, from counts_EF[e, f] =
    routed (token, expert) pairs of expert e whose token comes from source file f.

    H(F | e) is the entropy of expert e's tokens over the files; H(F | E) = sum_e (n_e /
    n) H(F | e) weights it by the expert's share of the pairs, so an expert that gets
    almost nothing counts almost nothing. Lower = experts more specialised to files. H(F),
    the files' entropy over all pairs, is the value for experts that ignore the file
    (H(F) - H(F | E) is the mutual information of expert and file)."""
    c = np.asarray(counts_EF, dtype=np.float64)
    n = c.sum()
    if n <= 0:
        raise ValueError("file_entropy of no routed tokens")
    cond = sum(row.sum() / n * _entropy(row / row.sum()) for row in c if row.sum() > 0)
    return float(cond), _entropy(c.sum(axis=0) / n)


def file_sequences(data_dir: str | Path, seq_len: int, per_file: int,
                   split: str = "val") -> tuple[np.ndarray, np.ndarray]:
    """Sequences of whole source files from a split: ``(tokens_NS, file_N)``.

    A data directory's split is its documents, each followed by EOS (for the default
    corpus a document is one stdlib file, :mod:`moetrain.data.corpus`). Each document gives
    its first ``min(per_file, len // seq_len)`` windows of ``seq_len`` tokens, so that a
    sequence never straddles two files; ``file_N`` is the document's index in the split."""
    from moetrain.data import open_split, read_meta

    meta = read_meta(data_dir)
    stream = np.concatenate([np.asarray(s, dtype=np.int64)
                             for s in open_split(data_dir, split, meta)])
    eos = int(meta["tokenizer"]["eos_id"])
    ends = np.flatnonzero(stream == eos)
    starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else np.array([0])
    ends = ends if len(ends) else np.array([len(stream)])
    seqs, files = [], []
    for f, (lo, hi) in enumerate(zip(starts, ends)):
        n = min(per_file, int(hi - lo) // seq_len)
        for j in range(n):
            seqs.append(stream[lo + j * seq_len: lo + (j + 1) * seq_len])
            files.append(f)
    if not seqs:
        raise ValueError(f"{data_dir}: no {split!r} document holds {seq_len} tokens")
    return np.stack(seqs), np.asarray(files, dtype=np.int64)


def route_counts(model, tokens_NS: np.ndarray, file_N: np.ndarray,
                 batch: int = 16) -> np.ndarray:
    """counts_LEF[l, e, f]: (token, expert) pairs that MoE layer l routes to expert e, for
    tokens of file f, over ``tokens_NS`` in batches of ``batch`` sequences (eval mode,
    no gradients). Captured by a forward hook on each router: its ``ids_TK`` and, for
    routers with a variable number of experts per token, ``active_TK``."""
    import torch

    layers = model.moe_layers()
    if not layers:
        raise ValueError("the model has no MoE layer to route with")
    E = layers[0].num_experts
    F = int(file_N.max()) + 1
    counts = np.zeros((len(layers), E, F), dtype=np.int64)
    seen: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * len(layers)

    def hook(i):
        def capture(_module, _inputs, out):
            seen[i] = (out.ids_TK.detach(), None if out.active_TK is None
                       else out.active_TK.detach())
        return capture

    handles = [m.router.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in range(0, len(tokens_NS), batch):
                x_BS = torch.as_tensor(tokens_NS[b:b + batch], dtype=torch.long)
                file_T = np.repeat(file_N[b:b + batch], x_BS.shape[1])
                model(x_BS)
                for i, got in enumerate(seen):
                    ids_TK, active_TK = got
                    ids = ids_TK.cpu().numpy()
                    f_TK = np.broadcast_to(file_T[:, None], ids.shape)
                    keep = (np.ones(ids.shape, bool) if active_TK is None
                            else active_TK.cpu().numpy().astype(bool))
                    np.add.at(counts[i], (ids[keep], f_TK[keep]), 1)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return counts


def routing_profile(run_dir: str | Path, per_file: int = 16, batch: int = 16) -> dict:
    """Routing of a run's final checkpoint on its validation files: global balance and
    expert specialisation, each the mean over MoE layers.

    ``max_vio_global``: :func:`max_vio` of each layer's load over all the sequences;
    ``file_entropy``: H(F | E) and ``file_entropy_ref``: H(F) (:func:`file_entropy`);
    ``files``, ``tokens``: what was routed (:func:`file_sequences`, ``per_file`` sequences
    of ``train.seq_len`` per file at most)."""
    from moetrain.checkpoint import load
    from moetrain.data import build_data

    model, cfg = load(run_dir)
    data = build_data(cfg.data, cfg.train.seq_len, progress=False)
    tokens_NS, file_N = file_sequences(data.data_dir, cfg.train.seq_len, per_file)
    counts_LEF = route_counts(model, tokens_NS, file_N, batch)
    vio = [max_vio(c.sum(axis=1)) for c in counts_LEF]
    ent = [file_entropy(c) for c in counts_LEF]
    return {"max_vio_global": sum(vio) / len(vio),
            "file_entropy": sum(h for h, _ in ent) / len(ent),
            "file_entropy_ref": sum(h for _, h in ent) / len(ent),
            "files": len(np.unique(file_N)), "tokens": int(tokens_NS.size)}
