"""Graceful stop on SIGTERM, SIGUSR1 or SIGUSR2 (SLURM's time-limit warning and preemption,
``scancel``, torchrun shutting down).

The handler only sets a flag. At the end of each optimizer step every rank agrees on it
through one tiny all-reduce (MAX), so all ranks stop at the same step, write a checkpoint
and exit; a flag seen by one rank alone can never leave the others waiting in a collective.

Two hand-offs around the trainer's own handler:

- :func:`catch_early` (the entry point calls it first) records a stop signal that lands
  while the process is still starting, e.g. a pre-timeout warning during a long resume;
  the trainer honours it after its first step. Under ``launch/slurm.sbatch`` the workers
  inherit these signals ignored from the torchrun agent (which must outlive their save),
  so without it such a signal would be lost.
- :func:`pass_on` (the entry point calls it after the run) hands a received signal, once
  the checkpoint is written, to the handler that was installed before the trainer's: the
  Hydra submitit launcher's, which requeues a sweep job on its SIGUSR2 (and logs SIGTERM).
  A run that stopped on a signal then ignores further stop signals: ``launch/slurm.sbatch``
  repeats its SIGTERM until the step has ended, and one landing while the interpreter shuts
  down (when Python's handlers are gone) would turn a clean exit into a failed job.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: catch_early runs before torch is loaded
    import torch

log = logging.getLogger(__name__)

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2")
                if hasattr(signal, name))

_early: int | None = None  # a stop signal received before the trainer's handler was in place
_foreign: dict[int, object] = {}  # the handlers before the trainer's (see pass_on)
_received: int | None = None  # the stop signal this process received during the last run
_stopped = False  # the last run stopped on a stop signal (this rank's or another's)


def _record_early(signum, frame) -> None:
    global _early
    _early = signum


def catch_early() -> None:
    """Record stop signals from now until a :class:`StopSignal` is installed. A launcher's
    own handler (a Python function) stays in place, to be passed on to (:func:`pass_on`)."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            if not callable(signal.getsignal(s)):  # the default action, or ignored
                signal.signal(s, _record_early)


def pass_on() -> None:
    """After a run that stopped on a stop signal: ignore further stop signals, then call
    the handler that was installed before the trainer's for the signal received, if it is
    a Python function (not the default action, not ignored): the launcher that installed
    it does what it does on that signal, now that the checkpoint is written."""
    global _received, _stopped
    signum, stopped, _received, _stopped = _received, _stopped, None, False
    if not stopped:
        return
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
    previous = _foreign.get(signum) if signum is not None else None
    if callable(previous) and previous is not _record_early:
        log.info("stop signal %s: passing it on to the launcher's handler",
                 signal.Signals(signum).name)
        previous(signum, None)


class StopSignal:
    def __init__(self, device: torch.device):
        self.device = device
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def install(self) -> StopSignal:
        global _early, _received, _stopped
        _received, _stopped = None, False
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
            _foreign.clear()
            _foreign.update(self._previous)
        if _early is not None:  # it arrived during start-up: stop after the first step
            self.received, _early = _early, None
        return self

    def uninstall(self) -> None:
        global _received
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        _received = self.received

    def requested(self) -> bool:
        """True on every rank if any rank received a stop signal (a collective call)."""
        global _stopped
        import torch
        import torch.distributed as dist

        flag = torch.tensor(0.0 if self.received is None else 1.0, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            _stopped = True
            name = signal.Signals(self.received).name if self.received else "on another rank"
            log.warning("stop signal received (%s): checkpointing and exiting", name)
            return True
        return False
