"""Deterministic fault injection for fault-tolerance tests and drills.

``$MOETRAIN_FAULTS`` holds ``;``-separated faults, each ``POINT[:key=value]...``::

    MOETRAIN_FAULTS="mid_step:step=7:rank=1:attempt=0;sync_save:step=12:rank=0:attempt=1"

A fault fires when the training process reaches ``POINT`` and every filter matches:

- ``step=N``: the optimizer step (1-based) being run, saved or just finished;
- ``rank=R``: the global rank; ``world=W``: the world size;
- ``attempt=A``: torchrun's restart count (``$TORCHELASTIC_RESTART_COUNT``, 0 at first).

Points: ``mid_step`` (after the step's forward and backward passes, before the update),
``sync_save`` (a synchronous checkpoint's files written, not yet committed), ``async_save``
(an asynchronous checkpoint's write in flight) and ``step_end`` (the step finished and
logged, before validation and checkpointing). Rank 0 alone reaches the commit points of
checkpoint ``step`` (synchronous or asynchronous): ``commit`` (its marker written, its
directory not yet renamed to ``step_N``), ``committed`` (renamed, retention not yet run) and
``retention`` (once per old checkpoint retention deletes: withdrawn, its files not yet
deleted).

Actions (``action=``): ``kill`` (the default: SIGKILL this process), ``kill_node`` (SIGKILL
this process's parent, the torchrun agent, then this process: a lost node), ``sigterm``
(send SIGTERM to this process only, as one rank of a preempted job) and ``hold`` (wait up to
``seconds=S`` until a stop signal arrives, e.g. the agent's SIGTERM when a node joins; the
wait ends early when ``stopped()`` is true). At ``mid_step`` only, ``nan_grad`` and
``inf_grad`` fill this rank's local gradients (its shards, under FSDP or EP) with NaN or
infinity, as a rank whose backward overflowed: every rank must then skip the step
(docs/nonfinite.md). ``param=GLOB`` limits them to the parameters whose name matches
(fnmatch), e.g. ``param=*.experts.*``.

Unset, it costs one environment lookup per point.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

ENV = "MOETRAIN_FAULTS"
POINTS = ("mid_step", "sync_save", "async_save", "step_end", "commit", "committed",
          "retention")
ACTIONS = ("kill", "kill_node", "sigterm", "hold", "nan_grad", "inf_grad")
_GRAD_ACTIONS = {"nan_grad": float("nan"), "inf_grad": float("inf")}
_FILTERS = ("step", "rank", "world", "attempt")
_FIELDS = (*_FILTERS, "action", "seconds", "param")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fault:
    point: str
    action: str = "kill"
    step: int | None = None
    rank: int | None = None
    world: int | None = None
    attempt: int | None = None
    seconds: float = 60.0
    param: str | None = None  # nan_grad/inf_grad: the parameters they poison (fnmatch)

    def matches(self, point: str, step: int, rank: int, world: int, attempt: int) -> bool:
        return self.point == point and all(
            want is None or want == got
            for want, got in ((self.step, step), (self.rank, rank), (self.world, world),
                              (self.attempt, attempt)))


def parse(spec: str) -> list[Fault]:
    """Faults of a ``$MOETRAIN_FAULTS`` value; ValueError names the bad part."""
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        point, *fields = part.split(":")
        if point not in POINTS:
            raise ValueError(f"{ENV}: unknown point {point!r} in {part!r}; points: "
                             f"{', '.join(POINTS)}")
        kw: dict[str, object] = {}
        for f in fields:
            key, sep, value = f.partition("=")
            if not sep or key not in _FIELDS:
                raise ValueError(f"{ENV}: bad field {f!r} in {part!r}; use key=value with "
                                 f"key one of {', '.join(_FIELDS)}")
            if key == "action" and value not in ACTIONS:
                raise ValueError(f"{ENV}: unknown action {value!r} in {part!r}; actions: "
                                 f"{', '.join(ACTIONS)}")
            try:
                kw[key] = value if key in ("action", "param") else (
                    float(value) if key == "seconds" else int(value))
            except ValueError:
                raise ValueError(f"{ENV}: {key}={value!r} in {part!r} is not a number") from None
        fault = Fault(point, **kw)  # type: ignore[arg-type]
        if fault.action in _GRAD_ACTIONS and point != "mid_step":
            raise ValueError(f"{ENV}: action={fault.action} in {part!r} needs gradients: use "
                             f"the point mid_step")
        if fault.param is not None and fault.action not in _GRAD_ACTIONS:
            raise ValueError(f"{ENV}: param= in {part!r} applies to action=nan_grad or "
                             f"inf_grad only")
        faults.append(fault)
    return faults


_cache: tuple[str, list[Fault]] = ("", [])


def _faults() -> list[Fault]:
    global _cache
    spec = os.environ.get(ENV, "")
    if spec != _cache[0]:
        _cache = (spec, parse(spec))
    return _cache[1]


def _poison_grads(modules: Iterable[nn.Module], pattern: str | None, value: float) -> int:
    """Fill the local gradients of ``modules``' parameters named like ``pattern`` with
    ``value``; the number of gradients filled."""
    import torch

    n = 0
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                if p.grad is None or (pattern is not None and not fnmatch(name, pattern)):
                    continue
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                g.fill_(value)
                n += g.numel() > 0
    return n


def hit(point: str, step: int, stopped: Callable[[], bool] | None = None,
        modules: Iterable[nn.Module] = ()) -> None:
    """Fire the faults of ``$MOETRAIN_FAULTS`` matching ``point`` at ``step`` (if any).
    ``modules``: this rank's model parts, whose gradients ``nan_grad``/``inf_grad`` fill."""
    faults = _faults()
    if not faults:
        return
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if on else 0
    world = dist.get_world_size() if on else 1
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    for f in faults:
        if not f.matches(point, step, rank, world, attempt):
            continue
        log.warning("%s: %s at %s, step %d (rank %d of %d, attempt %d)", ENV, f.action,
                    point, step, rank, world, attempt)
        sys.stdout.flush()
        sys.stderr.flush()
        if f.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif f.action == "kill_node":
            os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        elif f.action == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        elif f.action in _GRAD_ACTIONS:
            if not _poison_grads(modules, f.param, _GRAD_ACTIONS[f.action]):
                log.warning("%s: %s matched no local gradient (param=%s)", ENV, f.action,
                            f.param)
        elif f.action == "hold":
            deadline = time.monotonic() + f.seconds
            while time.monotonic() < deadline and not (stopped and stopped()):
                time.sleep(0.05)
