"""Graceful stop on SIGTERM/SIGUSR1 (SLURM preemption, torchrun shutdown, `scancel`).

The handler only sets a flag. At the end of each optimizer step every rank agrees on it
through one tiny all-reduce (MAX), so all ranks stop at the same step, write a checkpoint
and exit; a flag seen by one rank alone can never leave the others waiting in a collective.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)


class StopSignal:
    def __init__(self, device: torch.device):
        self.device = device
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def install(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def requested(self) -> bool:
        """True on every rank if any rank received a stop signal (a collective call)."""
        flag = torch.tensor(0.0 if self.received is None else 1.0, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            log.warning("stop signal received: checkpointing and exiting")
            return True
        return False
