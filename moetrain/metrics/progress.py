"""Training progress on rank 0: a tqdm bar on a terminal, plain lines in a log file.

A progress bar redraws itself with carriage returns; a log file (SLURM output, ``| tee``)
keeps every redraw, one fragment per step on a single line. So the bar is drawn only when
the stream is a terminal. Otherwise a plain line is printed every 5% of ``train.steps`` or
every 10 s, whichever comes first, and at the last step of the invocation, so a log holds
~20 lines for a long run of fast steps and a line every 10 s for slow ones:

    step 45/300 | loss 3.2141 | 51,200 tok/s | ETA 0:04:31

metrics.jsonl keeps every step (``train.log_every`` sets its cadence), so nothing is lost
by printing less.

The ETA extrapolates the wall time per step of this invocation (validation and checkpoints
included) to ``train.steps``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["ProgressBar", "ProgressLines", "format_eta", "line_every", "progress_display"]


def format_eta(seconds: float) -> str:
    """``H:MM:SS``, as tqdm prints it; ``?`` before the first step."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressLines:
    """Plain progress lines for a log file: at every multiple of ``every`` steps, after
    ``interval_s`` seconds without a line, and at ``end``."""

    def __init__(self, total: int, initial: int, every: int, end: int, stream: TextIO, *,
                 interval_s: float = 10.0, clock: Callable[[], float] = time.perf_counter):
        self.total, self.initial, self.every, self.end = total, initial, every, end
        self.stream, self.interval_s, self.clock = stream, interval_s, clock
        self.t0 = self.last_line = clock()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        """Report optimizer step ``step`` (1-based) that just finished."""
        now = self.clock()
        if step % self.every and step != self.end and now - self.last_line < self.interval_s:
            return
        self.last_line = now
        done = step - self.initial
        per_step = (now - self.t0) / done if done > 0 else float("nan")
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


LINES_PER_RUN = 20  # plain lines: one every 1/20 = 5% of train.steps ...
LINE_INTERVAL_S = 10.0  # ... or after 10 s without one, whichever comes first


def line_every(total: int) -> int:
    """Steps between plain lines: 5% of the run, at least 1."""
    return max(1, total // LINES_PER_RUN)


def progress_display(total: int, initial: int, *, end: int | None = None,
                     stream: TextIO | None = None,
                     interval_s: float = LINE_INTERVAL_S) -> ProgressBar | ProgressLines:
    """A bar when ``stream`` (default: stderr) is a terminal, else plain lines.

    ``total`` is train.steps, ``initial`` the step the run resumed at and ``end`` the last
    step of this invocation (train.stop_at)."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return ProgressBar(total, initial, stream)
    return ProgressLines(total, initial, line_every(total), total if end is None else end,
                         stream, interval_s=interval_s)
