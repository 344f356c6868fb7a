"""An asynchronous checkpoint overlaps training: steps complete while its write is still in
flight, the commit waits for the write (and comes at the first step after it, not at the
next save), and the committed checkpoint resumes exactly."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from moetrain.checkpoint import CheckpointManager
from moetrain.checkpoint.manager import check_checkpoint
from moetrain.metrics import read_metrics
from moetrain.train.main import run
from tests.conftest import compose

# How long the slowed-down write may wait for the steps that should overlap it. Reached
# only when the write blocks training (then the test fails); normally it waits ~2 steps.
GATE_TIMEOUT_S = 20.0


def _losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    return {m["step"]: (m["loss"], m["grad_norm"])
            for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m}


def test_steps_complete_while_async_write_is_in_flight(tiny_overrides, tmp_path, monkeypatch):
    from torch.distributed.checkpoint import FileSystemWriter

    from moetrain.train.trainer import Trainer

    base = [o for o in tiny_overrides if not o.startswith("run.dir")]
    base += ["train.steps=8", "eval.every=0"]
    ref_dir, async_dir, res_dir = tmp_path / "ref", tmp_path / "async", tmp_path / "resumed"
    run(compose(base + [f"run.dir={ref_dir}"]))  # uninterrupted, no checkpoints

    events: list[tuple[str, int | None, float]] = []  # (what, step, perf_counter)
    writer_threads: list[bool] = []  # per write: did it run on the main thread?
    overlapped = threading.Event()  # two steps finished after the first save started

    def steps_since_first_save() -> int:
        starts = [t for what, _, t in events if what == "save"]
        return sum(what == "step" and t > starts[0] for what, _, t in events) if starts else 0

    step_fn, save_fn, wait_fn = Trainer.train_step, CheckpointManager.save, CheckpointManager.wait
    write_fn = FileSystemWriter.write_data

    def train_step(self):
        out = step_fn(self)
        events.append(("step", self.progress.step, time.perf_counter()))
        if steps_since_first_save() >= 2:
            overlapped.set()
        if self.progress.step == 7:
            # The write was released after step 6; on a loaded machine it may outlast step
            # 7. Let it finish here, so that the poll after step 7 (not the save at step 8)
            # is what must commit it, whatever the machine's speed.
            pending = self.ckpt._pending
            fut = None if pending is None else pending.future
            fut = getattr(fut, "upload_completion", fut)
            deadline = time.perf_counter() + GATE_TIMEOUT_S
            while fut is not None and not fut.done() and time.perf_counter() < deadline:
                time.sleep(0.01)
        return out

    def save(self, step, state, **kw):
        events.append(("save", step, time.perf_counter()))
        return save_fn(self, step, state, **kw)

    def wait(self):
        path = wait_fn(self)
        if path is not None:
            events.append(("commit", CheckpointManager.step_of(path), time.perf_counter()))
        return path

    def slow_write(self, plan, planner):
        on_main = threading.current_thread() is threading.main_thread()
        writer_threads.append(on_main)
        if len(writer_threads) == 1 and not on_main:
            # A slow storage: the first write lasts until training got two steps further
            # (a write on the main thread would block them: it goes on, and fails below).
            overlapped.wait(GATE_TIMEOUT_S)
        result = write_fn(self, plan, planner)
        events.append(("written", None, time.perf_counter()))
        return result

    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(CheckpointManager, "save", save)
    monkeypatch.setattr(CheckpointManager, "wait", wait)
    monkeypatch.setattr(FileSystemWriter, "write_data", slow_write)
    run(compose(base + [f"run.dir={async_dir}", "checkpoint.every=4", "checkpoint.keep=0",
                        "checkpoint.async_save=true"]))
    monkeypatch.undo()

    assert writer_threads and not any(writer_threads), "the async write ran on the main thread"
    t_save = next(t for what, step, t in events if what == "save" and step == 4)
    t_written = next(t for what, _, t in events if what == "written")
    t_commit = next(t for what, step, t in events if what == "commit" and step == 4)
    during = [step for what, step, t in events if what == "step" and t_save < t < t_written]
    assert len(during) >= 2 and during[:2] == [5, 6], (
        f"steps finished during the step-4 write: {during}; events: {events}")
    assert t_commit > t_written  # committed only once the write finished ...
    t_save8 = next(t for what, step, t in events if what == "save" and step == 8)
    assert t_commit < t_save8  # ... by a step's poll(), not left for the next save
    ckpts = async_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000004", "step_0000008"]

    # The write that overlapped training holds the state of step 4, intact.
    has_manifest, problems = check_checkpoint(ckpts / "step_0000004", full=True)
    assert has_manifest and problems == []
    ref = _losses(ref_dir)
    assert _losses(async_dir) == ref  # saving did not perturb training
    run(compose(base + [f"run.dir={res_dir}", f"checkpoint.resume={ckpts / 'step_0000004'}"]))
    resumed = _losses(res_dir)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert resumed == {s: ref[s] for s in range(5, 9)}
