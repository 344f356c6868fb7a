"""Training progress on rank 0: a tqdm bar on a terminal, plain lines in a log file.

A progress bar redraws itself with carriage returns; a log file (SLURM output, ``| tee``)
keeps every redraw, one fragment per step on a single line. So the bar is drawn only when
the stream is a terminal. Otherwise a plain line is printed every ``train.log_every`` steps
(and at the last step of the invocation):

    step 40/300 | loss 3.2141 | 51,200 tok/s | ETA 0:04:31

The ETA extrapolates the wall time per step of this invocation (validation and checkpoints
included) to ``train.steps``.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

__all__ = ["ProgressBar", "ProgressLines", "format_eta", "progress_display"]


def format_eta(seconds: float) -> str:
    """``H:MM:SS``, as tqdm prints it; ``?`` before the first step."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressLines:
    """Plain progress lines for a log file: one every ``every`` steps, and one at ``end``."""

    def __init__(self, total: int, initial: int, every: int, end: int, stream: TextIO):
        self.total, self.initial, self.every, self.end = total, initial, every, end
        self.stream = stream
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        """Report optimizer step ``step`` (1-based) that just finished."""
        if step % self.every and step != self.end:
            return
        done = step - self.initial
        per_step = (time.perf_counter() - self.t0) / done if done > 0 else float("nan")
        self.write(f"step {step}/{self.total} | loss {loss:.4f} | {tokens_per_s:,.0f} tok/s | "
                   f"ETA {format_eta(per_step * (self.total - step))}")

    def write(self, msg: str) -> None:
        print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        self.stream.flush()


class ProgressBar:
    """The tqdm bar, for a terminal; the same methods as :class:`ProgressLines`."""

    def __init__(self, total: int, initial: int, stream: TextIO):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True,
                        file=stream)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")

    def write(self, msg: str) -> None:
        self.bar.write(msg)

    def close(self) -> None:
        self.bar.close()


def progress_display(total: int, initial: int, every: int, *, end: int | None = None,
                     stream: TextIO | None = None) -> ProgressBar | ProgressLines:
    """A bar when ``stream`` (default: stderr) is a terminal, else plain lines.

    ``total`` is train.steps, ``initial`` the step the run resumed at, ``every`` the line
    cadence (train.log_every) and ``end`` the last step of this invocation (train.stop_at)."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return ProgressBar(total, initial, stream)
    return ProgressLines(total, initial, every, total if end is None else end, stream)
