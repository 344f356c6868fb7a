"""Atomic, resharding checkpoints through ``torch.distributed.checkpoint`` (DCP).

Layout under ``checkpoint.dir``::

    step_0000100/                  committed: DCP shards + .metadata + config.yaml + COMMITTED
    step_0000200.tmp-3f9a1c2e/     being written (or left by a crash); never loaded
    step_0000050.tmp-del-7b21c0d4/ withdrawn by retention, being deleted; never loaded

A save writes into ``step_N.tmp-<token>/``. When every rank has finished writing, rank 0
writes ``COMMITTED`` (step, time, world size), fsyncs it and ``os.replace``s the directory to
``step_N/``. Only a directory with the final name *and* the marker counts as a checkpoint, so
a crash at any point leaves either the previous checkpoint set or the new one, never a
half-written checkpoint that resume would pick up. Retention (``checkpoint.keep``) runs
after the commit and withdraws an old checkpoint (one rename to a ``.tmp-del-`` name) before
deleting its files, so a crash leaves no half-deleted checkpoint either; a crash before
retention has finished leaves the checkpoints it would have deleted until the next commit's
retention (a restart cannot delete them before it knows which one the resume loads). Rank 0
owns every filesystem change under ``checkpoint.dir``; the other ranks meet it at
collectives that all ranks reach (no barrier sits on one rank's path only), and a failure on
rank 0 is broadcast so every rank raises.

Integrity (docs/checkpoint_integrity.md): before the marker, rank 0 writes ``MANIFEST.json``,
the size and CRC32 of every other file (each rank hashes a share of them). A load checks the
sizes (``checkpoint.verify=size``, the default), sizes and CRC32s (``full``) or nothing
(``none``); a mismatch raises :class:`CheckpointCorruptError` naming the file on every rank.
``resume=auto`` skips a corrupt checkpoint, with a warning, for the newest intact one.
Checkpoints without a manifest (older saves) are loaded, with one warning.

With ``checkpoint.async_save`` the state is staged (copied to CPU) in ``save()`` and written
by a background thread on a dedicated gloo group; the commit happens once the write finished
on every rank: at the first ``poll()`` (the trainer calls it after every step) that sees
it, else in ``wait()``, at the next ``save()`` or in ``close()``.

Each DCP save or load runs on a gloo group of its own, destroyed when it is done
(:meth:`CheckpointManager._dcp_group`). DCP exchanges pickled plans and metadata (tens of KB
and more); gloo copies them on its worker threads, where a copy that large opens an OpenMP
parallel region, and libgomp keeps a thread team for every thread that did so. A long-lived
group would leave those teams behind: once OpenMP threads outnumber the CPUs, libgomp stops
spinning between parallel regions, so every training step after the first checkpoint would
pay a sleep/wake-up per region (-40% tokens/s with 2 threads on 2 cores). Destroying the group
joins its worker threads, which frees their teams. When training runs on an accelerator
backend (NCCL), the CPU threads do no training compute, and on a large job a new gloo full
mesh per checkpoint would cost more: one long-lived DCP group serves every save and load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from moetrain import faults
from moetrain.config import CheckpointConfig, ConfigError

__all__ = ["MANIFEST", "MARKER", "CheckpointCorruptError", "CheckpointLoadError",
           "CheckpointManager", "check_checkpoint", "commit_seq", "is_committed",
           "retention_victims",
           "step_dir_name"]

log = logging.getLogger(__name__)

MARKER = "COMMITTED"
MANIFEST = "MANIFEST.json"
_MANIFEST_VERSION = 1
_CHUNK = 8 << 20  # bytes per read while hashing
_TMP = ".tmp-"
_STEP_RE = re.compile(r"^step_(\d+)$")
_STEP_DIGITS = 7

T = TypeVar("T")


class CheckpointLoadError(ValueError):
    """A committed checkpoint could not be loaded (raised on every rank)."""


class CheckpointCorruptError(CheckpointLoadError):
    """A checkpoint's files do not match its MANIFEST.json (or its DCP metadata)."""


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _listed_files(root: Path) -> list[str]:
    """Files under ``root`` a manifest covers (relative POSIX paths): all but itself and the
    marker."""
    return sorted(q.relative_to(root).as_posix() for q in root.rglob("*")
                  if q.is_file() and q.name not in (MANIFEST, MARKER))


def _check_files(root: Path, entries: dict[str, dict], names: list[str],
                 full: bool) -> list[str]:
    """Problems of ``names`` against their manifest ``entries``: size, then CRC32 if full."""
    problems = []
    for name in names:
        want, f = entries[name], root / name
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            problems.append(f"{f} is missing (the manifest lists {want['size']} bytes)")
            continue
        if size != want["size"]:
            problems.append(f"{f} has {size} bytes, the manifest says {want['size']} "
                            "(truncated or overwritten)")
        elif full and (got := _crc32(f)) != want["crc32"]:
            problems.append(f"{f} has CRC32 {got}, the manifest says {want['crc32']} "
                            "(same size, changed bytes)")
    return problems


def _check_extents(root: Path) -> list[str]:
    """Problems DCP's own metadata reveals, manifest or not: an unreadable ``.metadata`` or a
    data file shorter than the byte ranges it indexes (a truncated shard)."""
    try:
        meta = dcp.FileSystemReader(str(root)).read_metadata()
    except Exception as e:  # noqa: BLE001 - reported as corruption
        return [f"{root / '.metadata'} is unreadable ({type(e).__name__}: {e})"]
    ends: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        rel, off, n = (getattr(info, a, None) for a in ("relative_path", "offset", "length"))
        if isinstance(rel, str) and isinstance(off, int) and isinstance(n, int):
            ends[rel] = max(ends.get(rel, 0), off + n)
    problems = []
    for rel, end in sorted(ends.items()):
        f = root / rel
        size = f.stat().st_size if f.is_file() else None
        if size is None:
            problems.append(f"{f} is missing (the checkpoint metadata indexes it)")
        elif size < end:
            problems.append(f"{f} has {size} bytes, the checkpoint metadata indexes bytes up "
                            f"to {end} (truncated)")
    return problems


def check_checkpoint(path: str | Path, full: bool = True) -> tuple[bool, list[str]]:
    """Single-process integrity check of checkpoint ``path`` (no process group): whether it
    has a readable ``MANIFEST.json``, and the problems found (sizes, CRC32s if ``full``, and
    the data files against the byte ranges the DCP metadata indexes). The same checks as
    :meth:`CheckpointManager.verify`, for tools such as ``tools/inspect_ckpt.py``."""
    p = Path(path)
    mf = p / MANIFEST
    problems: list[str] = []
    entries: dict[str, dict] = {}
    has_manifest = mf.is_file()
    if has_manifest:
        try:
            entries = json.loads(mf.read_text())["files"]
            if not isinstance(entries, dict):
                raise TypeError("'files' is not a mapping")
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{mf} is unreadable ({type(e).__name__}: {e})")
            entries = {}
    problems += _check_files(p, entries, sorted(entries), full)
    problems += _check_extents(p)
    return has_manifest, problems


def _failure_text(e: BaseException) -> str:
    """One line per failing rank of a DCP CheckpointException, else the exception's text."""
    failures = getattr(e, "failures", None) if isinstance(e, CheckpointException) else None
    if isinstance(failures, dict) and failures:
        parts = []
        for rank, pair in sorted(failures.items()):
            exc = pair[0] if isinstance(pair, tuple) else pair
            parts.append(f"rank {rank}: {type(exc).__name__}: {exc}")
        return "; ".join(parts)
    return f"{type(e).__name__}: {e}"


def step_dir_name(step: int) -> str:
    """``step_0000100`` for step 100 (zero-padded so names sort like steps)."""
    return f"step_{step:0{_STEP_DIGITS}d}"


def is_committed(path: str | Path) -> bool:
    """True for a final-named ``step_N`` directory holding the ``COMMITTED`` marker."""
    p = Path(path)
    return p.is_dir() and _STEP_RE.match(p.name) is not None and (p / MARKER).is_file()


def commit_seq(path: str | Path) -> int:
    """A committed checkpoint's place in its directory's history (its marker's ``seq``; 0
    for checkpoints saved before the field existed, or an unreadable marker)."""
    try:
        return int(json.loads((Path(path) / MARKER).read_text()).get("seq", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def _committed_in(directory: Path) -> list[Path]:
    """Committed checkpoints directly under ``directory``, oldest first.

    Newest means last committed (or last resumed from explicitly: :meth:`CheckpointManager.
    promote`), not highest step: after a resume from an older step, the later steps of
    the abandoned run sort before the resumed run's checkpoints. Checkpoints without a
    ``seq`` sort first, by step."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if is_committed(p)]
    return sorted(found, key=lambda p: (commit_seq(p), CheckpointManager.step_of(p)))


def retention_victims(steps: list[int], keep: int, keep_every: int = 0,
                      just_committed: int | None = None) -> list[int]:
    """Steps that retention deletes, given the steps oldest first (commit order): all but
    the ``keep`` newest (``keep=0`` keeps all) except multiples of ``keep_every`` (``0`` =
    none) and ``just_committed``."""
    if keep <= 0:
        return []
    ordered = list(dict.fromkeys(reversed(steps)))[::-1]  # unique, last occurrence kept
    return [s for s in ordered[:-keep]
            if s != just_committed and not (keep_every > 0 and s % keep_every == 0)]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class _PendingSave:
    step: int
    tmp: Path
    final: Path
    future: Any  # concurrent.futures.Future, or AsyncSaveResponse (upload_completion)
    group: Any = None  # its DCP gloo group, destroyed after the commit (see _dcp_group)


class CheckpointManager:
    """Saves and loads ``dict[str, Stateful]`` training state; see the module docstring.

    Requires an initialised default process group (the trainer always has one, even for a
    single process) and must be constructed on every rank at the same point, since it creates
    process groups and runs the stale-directory cleanup collectively.
    """

    def __init__(self, cfg: CheckpointConfig, files: dict[str, str] | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "CheckpointManager needs an initialised torch.distributed process group "
                "(the trainer creates one, gloo with world size 1 for a single process)"
            )
        self.cfg = cfg
        self.dir = Path(cfg.dir)
        # Small text files rank 0 writes into every checkpoint before its marker, e.g. the
        # run's config.yaml, so that a checkpoint describes itself (moetrain.load).
        self.files = dict(files or {})
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # Coordination (small object collectives, barriers) on gloo: CPU-only and
        # independent of the training backend. DCP's own collectives run on a group per
        # save or load (_dcp_group), so the background thread of an async save never
        # interleaves with the main thread's collectives.
        self._pg = dist.new_group(backend="gloo")
        self._dcp_pg = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self._pending: _PendingSave | None = None
        self._verified: set[Path] = set()  # passed verify() in this process (not re-read)
        self._warned_no_manifest = False
        self._on_rank0(self._clean_stale)

    # ------------------------------------------------------------------ collectives
    def _on_rank0(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0, broadcast its result (or its exception) to every rank."""
        result: Any = None
        err: BaseException | None = None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                err = e
                try:
                    pickle.dumps(e)
                except Exception:  # noqa: BLE001 - unpicklable: send its text
                    err = RuntimeError(f"{type(e).__name__}: {e}")
        box = [(result, err)]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self._pg, 0), group=self._pg)
        result, remote_err = box[0]
        if err is not None:
            raise err
        if remote_err is not None:
            raise remote_err
        return result

    def _agree(self, local_err: BaseException | None, what: str) -> None:
        """All ranks learn whether any rank failed ``what``; doubles as a barrier. A DCP
        ``CheckpointException`` (a BaseException) is re-raised as a RuntimeError naming
        each failing rank, so ordinary error handling sees it."""
        errs: list[Any] = [None] * self.world_size
        dist.all_gather_object(errs, None if local_err is None else _failure_text(local_err),
                               group=self._pg)
        if isinstance(local_err, CheckpointException):
            raise RuntimeError(  # noqa: TRY004 - a failed save, not a type error
                f"{what} failed: {_failure_text(local_err)}") from local_err
        if local_err is not None:
            raise local_err
        bad = [(r, e) for r, e in enumerate(errs) if e is not None]
        if bad:
            raise RuntimeError(f"{what} failed on rank {bad[0][0]}: {bad[0][1]}")

    def _new_dcp_group(self) -> dist.ProcessGroup:
        """A gloo group for one DCP save or load; collective (every rank, same order).

        The long-lived ``self._dcp_pg`` when training runs on an accelerator backend: its
        CPU threads do no training compute, and on a large job a new gloo full mesh per
        checkpoint would cost more than the OpenMP teams it frees."""
        return self._dcp_pg if self._dcp_pg is not None else dist.new_group(backend="gloo")

    def _destroy_dcp_group(self, group: dist.ProcessGroup | None) -> None:
        """Destroy a group of :meth:`_new_dcp_group` after a barrier every rank passed (its
        last collective finished everywhere). Joining its worker threads frees the OpenMP
        thread teams DCP's large copies created on them (see the module docstring)."""
        if group is not None and group is not self._dcp_pg:
            dist.destroy_process_group(group)

    @contextlib.contextmanager
    def _dcp_group(self) -> Iterator[dist.ProcessGroup]:
        """A fresh gloo group for the DCP call inside; destroyed on leaving. The block must
        end with a collective on ``self._pg`` (``_agree``), so that no rank destroys the
        group while another is still in one of its collectives."""
        group = self._new_dcp_group()
        try:
            yield group
        finally:
            self._destroy_dcp_group(group)

    # ------------------------------------------------------------------ discovery
    @staticmethod
    def step_of(path: str | Path) -> int:
        """The optimizer step of a checkpoint directory, from its ``step_N`` name."""
        m = _STEP_RE.match(Path(path).name)
        if m is None:
            raise ValueError(f"{str(path)!r} is not a checkpoint directory named step_<N>")
        return int(m.group(1))

    def committed(self) -> list[Path]:
        """Committed checkpoints in ``checkpoint.dir``, oldest first."""
        return _committed_in(self.dir)

    def latest(self) -> Path | None:
        """The newest committed checkpoint in ``checkpoint.dir``, or None."""
        found = self.committed()
        return found[-1] if found else None

    def resolve_resume(self) -> Path | None:
        """What ``checkpoint.resume`` points at: ``auto`` -> latest() or None, ``none`` -> None,
        otherwise a committed ``step_N`` directory or a directory of them (its latest).

        Decided on rank 0 and broadcast, so every rank resumes from the same path. With
        ``auto`` the candidate is verified (``checkpoint.verify``, collectively); a corrupt one
        is skipped with a warning naming it, for the newest intact one. All corrupt raises
        :class:`CheckpointCorruptError`. An explicit PATH is verified by :meth:`load`.
        """
        if self.cfg.resume.strip().lower() != "auto":
            return self._on_rank0(self._resolve_resume_local)
        candidates = self._on_rank0(self.committed)
        bad: list[str] = []
        for c in reversed(candidates):
            try:
                self.verify(c)
            except CheckpointCorruptError as e:
                bad.append(str(c))
                if self.rank == 0:
                    log.warning("checkpoint.resume=auto: skipping corrupt checkpoint %s: %s",
                                c, e)
                continue
            if bad and self.rank == 0:
                log.warning("checkpoint.resume=auto: resuming from %s, the newest intact "
                            "checkpoint, instead of the corrupt %s", c, ", ".join(bad))
            return c
        if bad:
            raise CheckpointCorruptError(
                f"checkpoint.resume=auto: every checkpoint in {self.dir} is corrupt "
                f"({', '.join(bad)}); move them aside to start over, or set "
                "checkpoint.resume=PATH / checkpoint.verify=none deliberately")
        return None

    def _resolve_resume_local(self) -> Path | None:
        value = self.cfg.resume
        key = value.strip().lower()
        if key == "none":
            return None
        if key == "auto":
            return self.latest()
        p = Path(value).expanduser()
        fix = (f"point it at a committed step_N directory (one holding {MARKER}), at a "
               "checkpoints directory that holds one, or use 'auto' / 'none'")
        if is_committed(p):
            return p
        if not p.exists():
            raise ConfigError(f"checkpoint.resume={value!r} does not exist: {fix}")
        if _TMP in p.name:
            raise ConfigError(f"checkpoint.resume={value!r} is an unfinished save "
                              f"(temporary name): {fix}")
        if _STEP_RE.match(p.name):
            raise ConfigError(f"checkpoint.resume={value!r} has no {MARKER} marker (its save "
                              f"did not finish): {fix}")
        inside = _committed_in(p)
        if inside:
            return inside[-1]
        raise ConfigError(f"checkpoint.resume={value!r} holds no committed checkpoint: {fix}")

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: dict[str, Stateful], *, blocking: bool = False) -> None:
        """Write ``state`` as checkpoint ``step``; collective, call on every rank.

        Blocking unless ``checkpoint.async_save`` (and ``blocking=False``); an earlier async
        save is finished and committed first.
        """
        self.wait()
        final = self.dir / step_dir_name(step)

        def make_tmp() -> Path:
            tmp = final.with_name(f"{final.name}{_TMP}{uuid.uuid4().hex[:8]}")
            tmp.mkdir(parents=True)
            return tmp

        tmp = self._on_rank0(make_tmp)
        if self.cfg.async_save and not blocking:
            group = self._new_dcp_group()  # destroyed in wait(), after the write
            try:
                future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=group)
            except BaseException:
                self._destroy_dcp_group(group)
                raise
            self._pending = _PendingSave(step, tmp, final, future, group)
            faults.hit("async_save", step)
            return
        with self._dcp_group() as group:
            err: BaseException | None = None
            try:
                dcp.save(state, checkpoint_id=str(tmp), process_group=group)
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's is a BaseException
                err = e
            faults.hit("sync_save", step)
            self._agree(err, f"checkpoint save of step {step}")
        self._commit(step, tmp, final)

    def wait(self) -> Path | None:
        """Finish and commit a pending async save (no-op otherwise); collective.

        Returns the committed directory, or None if nothing was pending.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        err: BaseException | None = None
        try:
            fut = pending.future
            (fut if isinstance(fut, Future) else fut.upload_completion).result()
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's is a BaseException
            err = e
        try:
            self._agree(err, f"async checkpoint save of step {pending.step}")
        finally:
            self._destroy_dcp_group(pending.group)
        return self._commit(pending.step, pending.tmp, pending.final)

    def poll(self) -> Path | None:
        """Commit a pending async save as soon as every rank's write has finished; call on
        every rank after each training step. Collective but cheap: while a save is pending,
        one 1-element all-reduce on the coordination group (no-op otherwise; every rank has
        the same pending save, since saves are collective).

        Committing early makes the checkpoint durable sooner, and frees the save's gloo
        group (its threads carry OpenMP teams, see the module docstring) instead of
        keeping it alive, and slowing every step, until the next save.
        """
        pending = self._pending
        if pending is None:
            return None
        fut = pending.future
        done = (fut if isinstance(fut, Future) else fut.upload_completion).done()
        flag = torch.tensor([1 if done else 0], dtype=torch.int32)
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._pg)
        return self.wait() if int(flag.item()) == 1 else None

    def close(self) -> None:
        """Wait for and commit the last async save. Call on every rank before exiting."""
        self.wait()

    def _manifest(self, tmp: Path) -> dict[str, dict]:
        """Size and CRC32 of every file of ``tmp``; collective, each rank hashes a share."""

        def extra_files() -> list[str]:
            for name, text in self.files.items():
                (tmp / name).write_text(text, encoding="utf-8")
            return _listed_files(tmp)

        names = self._on_rank0(extra_files)
        local: dict[str, dict] = {}
        err: BaseException | None = None
        try:
            for name in names[self.rank::self.world_size]:
                local[name] = {"size": (tmp / name).stat().st_size, "crc32": _crc32(tmp / name)}
        except Exception as e:  # noqa: BLE001 - every rank must learn of it, then raise
            err = e
        shares: list[Any] = [None] * self.world_size
        dist.all_gather_object(shares, local, group=self._pg)
        self._agree(err, f"checkpoint manifest of {tmp}")
        return {k: v for share in shares for k, v in sorted((share or {}).items())}

    def _commit(self, step: int, tmp: Path, final: Path) -> Path:
        """Manifest (all ranks hash), then rank 0: manifest + marker + fsync + atomic rename,
        then retention. Every rank returns after."""
        entries = self._manifest(tmp)
        self._verified.discard(final.absolute())  # a re-saved step is new content

        def commit() -> Path:
            meta = {"step": step, "time": time.time(),
                    "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "world_size": self.world_size, "seq": self._next_seq()}
            with open(tmp / MANIFEST, "w") as f:
                json.dump({"version": _MANIFEST_VERSION, "checksum": "crc32",
                           "files": dict(sorted(entries.items()))}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            with open(tmp / MARKER, "w") as f:
                json.dump(meta, f)
                f.flush()
                os.fsync(f.fileno())
            faults.hit("commit", step)
            if final.exists():
                # Re-saving a step (a resume from an older checkpoint): move the old one aside
                # under a temporary name, which the stale cleanup would also catch.
                old = final.with_name(f"{final.name}{_TMP}old-{uuid.uuid4().hex[:8]}")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(final.parent)
            log.info("checkpoint step %d committed at %s", step, final)
            faults.hit("committed", step)
            self._apply_retention(final)
            return final

        return self._on_rank0(commit)

    def _next_seq(self) -> int:
        return 1 + max((commit_seq(p) for p in self.committed()), default=0)

    def promote(self, path: Path) -> None:
        """Make ``path`` (a committed checkpoint of ``checkpoint.dir``) the newest, so that a
        later ``resume=auto`` continues from it and not from the later steps of the run it
        branches from; collective. Rank 0 rewrites its marker with the next ``seq`` (an
        atomic replace; the manifest does not cover the marker)."""

        target = Path(path).absolute()

        def bump() -> None:
            found = [p.absolute() for p in self.committed()]
            if target.parent != self.dir.absolute() or target not in found[:-1]:
                return  # elsewhere, or already the newest
            later = [p.name for p in found if self.step_of(p) > self.step_of(target)]
            meta = json.loads((target / MARKER).read_text())
            meta["seq"] = self._next_seq()
            meta["resumed_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            tmp = target / f"{MARKER}{_TMP}{uuid.uuid4().hex[:8]}"
            with open(tmp, "w") as f:
                json.dump(meta, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target / MARKER)
            _fsync_dir(target)
            if later:
                log.warning("resuming from %s, older than %s: those belong to the abandoned "
                            "run; resume=auto now continues this run (the newest commit), "
                            "and retention removes them first", target.name, ", ".join(later))

        self._on_rank0(bump)

    def _apply_retention(self, just_committed: Path) -> None:
        """Delete what :func:`retention_victims` selects: all but the ``checkpoint.keep``
        newest steps and the multiples of ``checkpoint.keep_every``, never the one just
        committed (a run resumed from an older step would otherwise delete its own new
        checkpoint in favour of later steps already in the directory).

        Each one is first withdrawn, renamed to ``step_N.tmp-del-<token>`` in one atomic
        step, then deleted: deleting in place would leave, after a crash, a directory that
        still counts as committed with some files gone (or, marker gone first, a directory
        the stale cleanup never removes). The stale cleanup removes what a crash left."""
        found = self.committed()  # oldest commit first
        step = self.step_of(just_committed)
        doomed = set(retention_victims([self.step_of(p) for p in found], self.cfg.keep,
                                       self.cfg.keep_every, step))
        for old in found:
            if self.step_of(old) in doomed and old != just_committed:
                log.info("checkpoint.keep=%d, keep_every=%d: deleting %s", self.cfg.keep,
                         self.cfg.keep_every, old)
                gone = old.with_name(f"{old.name}{_TMP}del-{uuid.uuid4().hex[:8]}")
                os.replace(old, gone)
                _fsync_dir(self.dir)
                faults.hit("retention", step)
                shutil.rmtree(gone, ignore_errors=True)

    def _clean_stale(self) -> None:
        """Remove interrupted saves and deletions; finish a commit that was interrupted
        after its marker.

        A temporary directory holding ``COMMITTED`` is complete (the marker is written after
        every rank finished): when its final name is free it is renamed there, unless
        retention withdrew it (``.tmp-del-``: removed, whatever it still holds). That covers
        a crash between the two renames of a re-saved step, which moves the old copy aside
        (``.tmp-old-``) first; the new copy is promoted before the old one is considered.
        """
        if not self.dir.is_dir():
            return
        for p in sorted(self.dir.iterdir(), key=lambda q: (f"{_TMP}old-" in q.name, q.name)):
            base = p.name.split(_TMP)[0]
            if p.is_dir() and _TMP in p.name and _STEP_RE.match(base):
                final = p.with_name(base)
                if p.name.startswith(f"{base}{_TMP}del-"):
                    log.warning("removing %s (left by an interrupted retention)", p)
                    shutil.rmtree(p, ignore_errors=True)
                    continue
                if (p / MARKER).is_file() and not final.exists():
                    log.warning("finishing the interrupted commit of %s as %s", p, final)
                    os.replace(p, final)
                    continue
                log.warning("removing unfinished checkpoint %s (left by an interrupted save)", p)
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_dir() and _STEP_RE.match(p.name) and not (p / MARKER).is_file():
                log.warning("ignoring %s: no %s marker, it is not a complete checkpoint",
                            p, MARKER)

    # ------------------------------------------------------------------ load
    def load(self, path: str | Path, state: dict[str, Stateful],
             optional: tuple[str, ...] = ("callback.",)) -> int:
        """Load committed checkpoint ``path`` into ``state`` in place; returns its step.

        DCP reshards on read, so ``path`` may come from another world size or layout.
        Entries whose key starts with one of ``optional`` (trainer callbacks) may be
        missing from the checkpoint, e.g. a callback enabled on resume: they keep their
        current state, with a warning. Every other entry must be there.
        Collective: call on every rank.
        """
        p = Path(path)
        if not is_committed(p):
            raise ValueError(f"{str(p)!r} is not a committed checkpoint (a step_N directory "
                             f"with a {MARKER} marker); refusing to load it")
        if p.absolute() not in self._verified:
            self.verify(p)
        saved_keys: Any = None
        err: BaseException | None = None
        try:
            saved_keys = dcp.FileSystemReader(str(p)).read_metadata().state_dict_metadata
        except Exception as e:  # noqa: BLE001 - every rank must learn of it, then raise
            err = e
        self._agree_load(err, p)
        missing = [k for k in state if k.startswith(optional)
                   and not any(s == k or s.startswith(k + ".") for s in saved_keys)]
        if missing:
            log.warning("checkpoint %s has no state for %s: they start from their initial "
                        "state", p, ", ".join(missing))
            state = {k: v for k, v in state.items() if k not in missing}
        err = None
        with self._dcp_group() as group:
            try:
                dcp.load(state, checkpoint_id=str(p), process_group=group)
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's is a BaseException
                err = e
            self._agree_load(err, p)
        step = self.step_of(p)
        if self.rank == 0:
            saved = json.loads((p / MARKER).read_text())
            log.info("loaded checkpoint %s (step %d, saved by %d ranks; keys: %s)", p, step,
                     saved.get("world_size", -1), ", ".join(sorted(state)))
        return step

    def _agree_load(self, local_err: BaseException | None, p: Path) -> None:
        """Collective: if any rank failed reading checkpoint ``p``, every rank raises
        :class:`CheckpointLoadError` naming the checkpoint and the first failure."""
        errs: list[Any] = [None] * self.world_size
        dist.all_gather_object(errs, None if local_err is None else _failure_text(local_err),
                               group=self._pg)
        bad = [(r, e) for r, e in enumerate(errs) if e is not None]
        if not bad:
            return
        rank, text = bad[0]
        msg = (f"checkpoint {p} could not be loaded (rank {rank}: {text}); its files may be "
               "damaged (check them with checkpoint.verify=full) or it may not match this "
               "model and state; resume from another checkpoint with checkpoint.resume=PATH")
        raise CheckpointLoadError(msg) from local_err

    # ------------------------------------------------------------------ integrity
    def verify(self, path: str | Path) -> None:
        """Check checkpoint ``path`` against its ``MANIFEST.json`` per ``checkpoint.verify``;
        collective (each rank checks a share of the files, all ranks share the verdict).

        Raises :class:`CheckpointCorruptError` naming every bad file, on every rank. A
        checkpoint without a manifest (an older save) passes with a warning (once), after
        the cheap check of its data files against the byte ranges its DCP metadata indexes.
        """
        if self.cfg.verify == "none":
            return
        p = Path(path)
        full = self.cfg.verify == "full"

        def read_manifest() -> dict | None:
            mf = p / MANIFEST
            if not mf.is_file():
                return None
            try:
                manifest = json.loads(mf.read_text())
                files = manifest["files"]
                if not isinstance(files, dict):
                    raise TypeError("'files' is not a mapping")
                return files
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointCorruptError(
                    f"checkpoint {p} is corrupt: {mf} is unreadable ({type(e).__name__}: {e})"
                ) from None

        entries = self._on_rank0(read_manifest)
        if entries is None:
            if self.rank == 0 and not self._warned_no_manifest:
                log.warning("checkpoint %s has no %s (saved by an older version): only its "
                            "DCP metadata is checked; later saves carry one", p, MANIFEST)
            self._warned_no_manifest = True
            entries = {}
        problems: list[str] = []
        try:
            problems += _check_files(p, entries, sorted(entries)[self.rank::self.world_size],
                                     full)
            if self.rank == 0:
                problems += _check_extents(p)
        except Exception as e:  # noqa: BLE001 - reported on every rank
            problems.append(f"{p}: verification failed ({type(e).__name__}: {e})")
        shares: list[Any] = [None] * self.world_size
        dist.all_gather_object(shares, problems, group=self._pg)
        found = sorted({q for share in shares for q in (share or [])})
        if found:
            raise CheckpointCorruptError(
                f"checkpoint {p} is corrupt (checkpoint.verify={self.cfg.verify}): "
                + "; ".join(found) + ". Resume from an older checkpoint with "
                "checkpoint.resume=PATH (resume=auto skips corrupt checkpoints)")
        self._verified.add(p.absolute())
