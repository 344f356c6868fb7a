"""A multi-process test harness on CPU: ``run_distributed(fn, world_size, *args)``.

Each rank is a fresh ``spawn`` process that joins a gloo group through a FileStore in a
private temp dir, runs ``fn(rank, world_size, *args)`` and sends its return value back.
An exception on any rank is re-raised in the caller with the rank's traceback; a rank that
dies or hangs fails the call at once or at ``timeout_s``, never a hung test run.
Modelled on OLMo-core's ``testing/distributed.py::run_distributed_test``.

``fn`` and its arguments must be picklable: define ``fn`` at module level.
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["RemoteTraceback", "find_free_port", "run_distributed"]

_STACK_SIGNAL = getattr(signal, "SIGUSR1", None)  # dumps a hung rank's stacks (POSIX only)


class RemoteTraceback(Exception):
    """Carries a rank's formatted traceback as the ``__cause__`` of the re-raised error."""

    def __str__(self) -> str:
        return self.args[0]


def find_free_port() -> int:
    """A TCP port that was free a moment ago (for torchrun-style rendezvous in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _child_env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables while the children start (spawn copies os.environ)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _dump(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(obj, f)
    os.replace(tmp, path)


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    args: tuple[Any, ...],
    backend: str,
    workdir: str,
    timeout_s: float,
    init: bool,
    port: int,
) -> None:
    torch.set_num_threads(1)
    stack_file = open(os.path.join(workdir, f"stack{rank}.txt"), "w")  # noqa: SIM115
    if _STACK_SIGNAL is not None:
        faulthandler.register(_STACK_SIGNAL, file=stack_file, all_threads=True)
    try:
        if init:
            store = dist.FileStore(os.path.join(workdir, "store"), world_size)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=timeout_s))
        else:  # what torchrun would set: fn initialises the group itself
            os.environ.update(
                RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                LOCAL_WORLD_SIZE=str(world_size), GROUP_RANK="0",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
            )
        result = fn(rank, world_size, *args)
        _dump(os.path.join(workdir, f"result{rank}.pkl"), result)
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller
        tb = traceback.format_exc()
        try:
            payload = pickle.dumps(exc)
            pickle.loads(payload)
        except Exception:  # noqa: BLE001 - an unpicklable error travels as text only
            payload = None
        _dump(os.path.join(workdir, f"error{rank}.pkl"), (payload, tb))
        sys.stderr.flush()
        os._exit(1)  # skip interpreter teardown: peers may still hold our sockets
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _load(path: str) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)


# Errors a rank gets because a peer died first: reported only when nothing better exists.
_PEER_ERROR_MARKERS = ("gloo/transport", "Connection reset by peer", "Connection closed by peer")


def _failure(
    workdir: str, rank: int, world_size: int, exitcode: int | None
) -> tuple[int, Exception]:
    """(priority, exception to raise) for a failed rank; a lower priority is a likelier cause:
    0 an exception of its own, 1 a hard exit, 2 a collective broken by a dead peer."""
    path = os.path.join(workdir, f"error{rank}.pkl")
    if not os.path.exists(path):
        how = f"was killed by signal {-exitcode}" if exitcode and exitcode < 0 else (
            f"exited with code {exitcode}")
        return 1, RuntimeError(f"rank {rank} of {world_size} {how} without raising an exception")
    payload, tb = _load(path)
    exc = pickle.loads(payload) if payload is not None else None
    if not isinstance(exc, Exception):
        exc = RuntimeError(f"rank {rank} of {world_size} failed")
    else:
        exc.add_note(f"(raised on rank {rank} of {world_size})")
    exc.__cause__ = RemoteTraceback(f"\n--- traceback of rank {rank} of {world_size} ---\n{tb}")
    peer = isinstance(exc, dist.DistError) or any(m in tb for m in _PEER_ERROR_MARKERS)
    return (2 if peer else 0), exc


def _raise_first_failure(procs: list[mp.Process], workdir: str) -> None:
    """Give the other ranks a moment to fail too, then raise the likeliest root cause."""
    running = [p.sentinel for p in procs if p.exitcode is None]
    deadline = time.monotonic() + 1.0
    while running and time.monotonic() < deadline:
        multiprocessing.connection.wait(running, timeout=deadline - time.monotonic())
        running = [p.sentinel for p in procs if p.exitcode is None]
    world_size = len(procs)
    failures = [
        (*_failure(workdir, r, world_size, p.exitcode), r)
        for r, p in enumerate(procs)
        if p.exitcode not in (None, 0) or os.path.exists(os.path.join(workdir, f"error{r}.pkl"))
    ]
    _, exc, _ = min(failures, key=lambda f: (f[0], f[2]))
    raise exc


def _stacks(procs: list[mp.Process], workdir: str) -> str:
    """Ask the still-running ranks for their Python stacks (faulthandler)."""
    alive = [(r, p) for r, p in enumerate(procs) if p.exitcode is None]
    if _STACK_SIGNAL is None or not alive:
        return ""
    for _, p in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, _STACK_SIGNAL)
    time.sleep(0.5)
    out = []
    for r, _ in alive:
        with open(os.path.join(workdir, f"stack{r}.txt")) as f:
            out.append(f"--- rank {r} ---\n{f.read()}")
    return "\n".join(out)


# Imported once by the forkserver, so every rank it forks starts with them: torch and what a
# training rank imports on top (about 2 s of CPU per process otherwise). Nothing here
# starts a thread at import, which a fork could not carry over.
_PRELOAD = ["torch", "torch.distributed", __name__, "torch.distributed.checkpoint",
            "torch.distributed.fsdp", "hydra", "omegaconf", "moetrain.train.main",
            "moetrain.train.trainer", "moetrain.parallel.parallelize"]


def _context(start_method: str) -> mp.context.BaseContext:
    """A clean-start context. forkserver imports torch once per test session and forks the
    ranks from that clean server, so a call costs no torch import; spawn re-imports it."""
    if start_method == "forkserver" and "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return mp.get_context("spawn")


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    init: bool = True,
    start_method: str = "forkserver",
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` CPU processes.

    With ``init=True`` each rank joins a ``backend`` group first (collectives time out
    after ``timeout_s``) and destroys it afterwards. With ``init=False`` the ranks instead
    get torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a
    free port), so ``fn`` can exercise ``init_distributed``.

    ``start_method`` is "forkserver" (default, falls back to "spawn" where missing) or
    "spawn"; both start each rank from a fresh interpreter, never a fork of the caller.

    Returns the return values of ``fn``, indexed by rank. Raises the first failing rank's
    exception (its traceback chained as the cause), or TimeoutError with the stacks of the
    ranks still running after ``timeout_s``.
    """
    ctx = _context(start_method)
    port = 0 if init else find_free_port()
    with tempfile.TemporaryDirectory(prefix="moetrain-dist-") as workdir:
        procs = [
            ctx.Process(
                target=_worker,
                args=(fn, rank, world_size, args, backend, workdir, timeout_s, init, port),
                name=f"rank{rank}",
            )
            for rank in range(world_size)
        ]
        try:
            # One thread per rank: the test machine has few cores.
            with _child_env({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}):
                for p in procs:
                    p.start()
            deadline = time.monotonic() + timeout_s
            while True:
                if any(p.exitcode not in (None, 0) for p in procs):
                    _raise_first_failure(procs, workdir)
                running = [p for p in procs if p.exitcode is None]
                if not running:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    ranks = [r for r, p in enumerate(procs) if p.exitcode is None]
                    raise TimeoutError(
                        f"ranks {ranks} of {world_size} still running after {timeout_s}s "
                        f"(a hang, or raise timeout_s); their stacks:\n{_stacks(procs, workdir)}"
                    )
                multiprocessing.connection.wait([p.sentinel for p in running],
                                                timeout=min(remaining, 1.0))
            return [_load(os.path.join(workdir, f"result{r}.pkl")) for r in range(world_size)]
        finally:
            for p in procs:
                if p.exitcode is None and p.pid is not None:
                    p.kill()
            for p in procs:
                if p.pid is not None:
                    p.join(timeout=5)
