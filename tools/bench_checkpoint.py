"""Checkpoint cost: step time without a save, with a synchronous and with an asynchronous save.

Builds moetrain's own :class:`~moetrain.train.trainer.Trainer` from the real Hydra config
and runs what ``Trainer.fit`` runs at a checkpoint step: ``train_step`` then
``CheckpointManager.save(step, trainer._state())``. For each model and mode it times

- ``--steps-before`` steps before the first save (after ``--warmup`` untimed steps),
- the step that saves: its ``train_step`` and the blocking part of ``save()`` (the whole
  write and commit when synchronous; staging only when ``checkpoint.async_save=true``),
- ``--steps-after`` steps after it (an async write runs under them; it is committed by
  ``wait()`` after the last one, timed as ``commit_s``),

and reports the checkpoint's size on disk (every file of the committed ``step_N``
directory), the write throughput (size / time from the start of ``save()`` until the files
were written: the blocking call for a synchronous save, the background write for an
async one) and the regression guard ``ratio_after_before``: tokens/s after the first save
over tokens/s before it (1.0 = a save leaves training as fast as before).

    python tools/bench_checkpoint.py --device cpu                     # tiny and small
    python tools/bench_checkpoint.py --models tiny --modes sync async --out ckpt.json
    OMP_NUM_THREADS=2 python tools/bench_checkpoint.py --models tiny --steps-before 40 \\
        --steps-after 40                                              # the regression guard
Extra Hydra overrides go after ``--``: ``python tools/bench_checkpoint.py -- moe.top_k=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

MODES = ("nosave", "sync", "async")


def build_overrides(a: argparse.Namespace, model: str, mode: str, run_dir: str) -> list[str]:
    gbs = a.global_batch or a.micro_batch
    total = a.warmup + a.steps_before + 1 + a.steps_after
    return [
        f"model={model}",
        f"train.steps={total}",
        f"train.seq_len={a.seq_len}",
        f"train.micro_batch_size={a.micro_batch}",
        f"train.global_batch_size={gbs}",
        "train.progress=false",
        "eval.every=0",
        "checkpoint.every=0",  # the loop below saves, at the step fit() would
        "checkpoint.resume=none",
        "checkpoint.keep=0",
        f"checkpoint.async_save={str(mode == 'async').lower()}",
        "logging.tensorboard=false",
        "logging.heatmap_every=0",
        f"run.dir={run_dir}",
    ] + list(a.overrides)


def dir_bytes(path: Path) -> tuple[int, int]:
    """(total bytes, number of files) of every file under ``path``."""
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def _pending_future(ckpt):
    """The in-flight async write's future (AsyncSaveResponse.upload_completion or a plain
    Future), or None."""
    pending = getattr(ckpt, "_pending", None)
    fut = getattr(pending, "future", None)
    return getattr(fut, "upload_completion", fut)


def run_one(a: argparse.Namespace, model: str, mode: str) -> dict:
    import torch.distributed as dist

    from moetrain.config import compose_config, validate
    from moetrain.parallel.mesh import destroy_distributed, init_distributed
    from moetrain.train.trainer import Trainer

    run_dir = tempfile.mkdtemp(prefix=f"moetrain_bench_ckpt_{model}_{mode}_",
                               dir=a.run_dir)
    cfg = compose_config(build_overrides(a, model, mode, run_dir))
    layout = validate(cfg, 1)
    owns_group = not dist.is_initialized()
    _, _, device = init_distributed()
    trainer = Trainer(cfg, layout, device)
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len

    def step() -> float:
        t0 = time.perf_counter()
        trainer.train_step()  # returns host floats: the step has finished
        return time.perf_counter() - t0

    row: dict = {"model": model, "mode": mode, "params_total": trainer.params.total,
                 "tokens_per_step": tokens_per_step}
    try:
        for _ in range(a.warmup):
            step()
        before = [step() for _ in range(a.steps_before)]
        save_step_train_s = step()
        save_call_s = write_s = commit_s = None
        write_done = None
        after_ends: list[float] = []
        t_save = time.perf_counter()
        if mode != "nosave":
            trainer.ckpt.save(trainer.progress.step, trainer._state())
            save_call_s = time.perf_counter() - t_save
            fut = _pending_future(trainer.ckpt) if mode == "async" else None
            if fut is not None:
                done: list[float] = []
                fut.add_done_callback(lambda _: done.append(time.perf_counter()))
                write_done = done
            else:
                write_s = save_call_s
        after = []
        for _ in range(a.steps_after):
            after.append(step())
            after_ends.append(time.perf_counter())
            trainer.ckpt.poll()  # as fit() does after every step: commits a finished write
        if mode == "async":
            t0 = time.perf_counter()
            trainer.ckpt.wait()  # no-op when a poll() already committed it
            commit_s = time.perf_counter() - t0
            if write_done:  # the background write's end, seen by its future's callback
                write_s = write_done[0] - t_save
            else:  # no future to watch: until the commit
                write_s = time.perf_counter() - t_save
        row.update(
            warmup_steps=a.warmup,
            step_times_before_s=before,
            step_times_after_s=after,
            step_s_before=statistics.mean(before),
            save_step_train_s=save_step_train_s,
            save_call_s=save_call_s,
            save_step_s=save_step_train_s + (save_call_s or 0.0),
            step_s_after=statistics.mean(after),
            commit_s=commit_s,
        )
        if mode == "async" and write_done:
            # Steps that finished while the write was still in flight share the CPU with
            # it: the ratio below (the regression guard) uses the steps after it, if any.
            row["steps_during_write"] = sum(t < write_done[0] for t in after_ends)
            settled = [dt for dt, t in zip(after, after_ends) if t >= write_done[0]]
            if settled:
                row["step_s_after_write"] = statistics.mean(settled)
        latest = trainer.ckpt.latest()
        if mode != "nosave":
            if latest is None:
                raise RuntimeError(f"{model}/{mode}: no committed checkpoint in "
                                   f"{cfg.checkpoint.dir}")
            size, n_files = dir_bytes(latest)
            row.update(checkpoint=str(latest), ckpt_bytes=size, ckpt_files=n_files,
                       write_s=write_s, write_mb_s=size / write_s / 1e6)
    finally:
        trainer.ckpt.close()
        trainer.metrics.close()
        if owns_group:
            destroy_distributed()
    row["tokens_per_s_before"] = tokens_per_step / row["step_s_before"]
    row["tokens_per_s_after"] = tokens_per_step / row.get("step_s_after_write",
                                                          row["step_s_after"])
    row["ratio_after_before"] = row["tokens_per_s_after"] / row["tokens_per_s_before"]
    return row


def run(a: argparse.Namespace) -> dict:
    results = [run_one(a, model, mode) for model in a.models for mode in a.modes]
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seq_len": a.seq_len,
        "global_batch_size": a.global_batch or a.micro_batch,
        "micro_batch_size": a.micro_batch,
        "overrides": list(a.overrides),
        "results": results,
    }


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_report(r: dict) -> str:
    head = (f"{'model':<8}{'params':>8} {'mode':<8}{'step ms':>9}{'save-step ms':>14}{'save call ms':>14}"
            f"{'after ms':>10}{'size MB':>9}{'write s':>9}{'MB/s':>8}{'after/before':>14}")
    lines = [f"checkpoint bench: {r['device']}, {r['threads']} threads, batch {r['global_batch_size']} x "
             f"{r['seq_len']} tokens, torch {r['torch']}"
             + (f", overrides {' '.join(r['overrides'])}" if r["overrides"] else ""), head]
    for x in r["results"]:
        size = x.get("ckpt_bytes")
        lines.append(
            f"{x['model']:<8}{x['params_total'] / 1e6:>7.1f}M {x['mode']:<8}"
            f"{1e3 * x['step_s_before']:>9.1f}"
            f"{1e3 * x['save_step_s']:>14.1f}"
            f"{_f(None if x['save_call_s'] is None else 1e3 * x['save_call_s'], '.1f'):>14}"
            f"{1e3 * x['step_s_after']:>10.1f}{_f(None if size is None else size / 1e6, '.2f'):>9}"
            f"{_f(x.get('write_s'), '.3f'):>9}{_f(x.get('write_mb_s'), '.1f'):>8}"
            f"{x['ratio_after_before']:>13.2f}x")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "small"],
                   help="conf/model presets (on CPU: tiny, small)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="default: cuda when available; cpu hides the GPUs")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps-before", type=int, default=5, help="timed steps before the save")
    p.add_argument("--steps-after", type=int, default=5, help="timed steps after the save")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward")
    p.add_argument("--global-batch", type=int, default=16,
                   help="sequences per optimizer step (0: one micro-batch)")
    p.add_argument("--run-dir", default=None,
                   help="parent of the runs' directories (default: the system temp dir)")
    p.add_argument("--out", default=None, help="write the report as JSON to this path")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides (after --)")
    a = p.parse_args(argv)
    for name in ("steps_before", "steps_after"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1 (it is "
                    f"{getattr(a, name)}): the ratio needs steps on both sides of the save")
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA initialises
    report = run(a)
    print(format_report(report), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
