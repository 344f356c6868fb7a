"""Named mesh axes, the rank layout, and every process group of the project.

The world is laid out as ``rank = (pp_i * dp + dp_i) * tp + tp_i``: pipeline stages
outermost, tensor parallelism innermost, so that the chatty axes (tp, ep) stay inside a
node. Expert parallelism is carved out of the ``dp * tp`` ranks of one pipeline stage:
with ``dpt = dp_i * tp + tp_i``,

    ep_i  = dpt % ep      (consecutive ranks form an EP group)
    edp_i = dpt // ep     (expert-data-parallel: replicas of one expert shard)

Experts are sharded over ``ep`` and replicated over ``edp``. With ``tp > 1`` and
``ep == tp`` the EP group is the TP group. Two DeviceMeshes view the same ranks:
``dense`` is ``(pp, dp, tp)`` and ``expert`` is ``(pp, edp, ep)``.

:class:`ParallelDims` is pure arithmetic (unit-tested without processes);
:func:`build_mesh` creates the process groups. "Axis" means a mesh axis, "dim" a tensor
dimension.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moetrain.config import ConfigError, Layout, ParallelConfig, resolve_layout

TIMEOUT_ENV = "MOETRAIN_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class MeshAxis(str, Enum):
    """Names of the mesh axes. ``dp_tp`` is all ranks of one pipeline stage (= edp x ep)."""

    pp = "pp"  # pipeline stages
    dp = "dp"  # data parallel (FSDP or replication) of the dense parameters
    tp = "tp"  # tensor parallel
    ep = "ep"  # expert parallel: each rank holds num_experts / ep experts
    edp = "edp"  # expert-data parallel: replicas of one expert shard
    dp_tp = "dp_tp"  # dp and tp flattened: the ranks of one pipeline stage
    world = "world"  # every rank


# For each axis: the coordinates that stay fixed inside one of its groups.
_FIXED: dict[MeshAxis, tuple[str, ...]] = {
    MeshAxis.pp: ("dp_tp",),
    MeshAxis.dp: ("pp", "tp"),
    MeshAxis.tp: ("pp", "dp"),
    MeshAxis.ep: ("pp", "edp"),
    MeshAxis.edp: ("pp", "ep"),
    MeshAxis.dp_tp: ("pp",),
    MeshAxis.world: (),
}


@dataclass(frozen=True)
class ParallelDims:
    """Parallel degrees and the pure rank <-> coordinate map (no process group needed)."""

    world_size: int
    pp: int = 1
    dp: int = 1
    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        # Reuse the config arithmetic so the error messages name the config fields.
        par = ParallelConfig(dp=self.dp, ep=self.ep, tp=self.tp, pp=self.pp)
        resolve_layout(par, self.world_size)

    @classmethod
    def from_layout(cls, layout: Layout) -> ParallelDims:
        return cls(layout.world_size, pp=layout.pp, dp=layout.dp, tp=layout.tp, ep=layout.ep)

    # ------------------------------------------------------------------ degrees
    @property
    def edp(self) -> int:
        """Expert-data-parallel degree: replicas of each expert shard."""
        return self.dp * self.tp // self.ep

    @property
    def dp_tp(self) -> int:
        """Ranks of one pipeline stage."""
        return self.dp * self.tp

    def size(self, axis: MeshAxis | str) -> int:
        axis = MeshAxis(axis)
        return self.world_size if axis is MeshAxis.world else getattr(self, axis.value)

    # ------------------------------------------------------------------ layout
    def coords(self, rank: int) -> dict[str, int]:
        """Coordinates of ``rank`` on every axis (see the module docstring for the map)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={self.world_size})")
        pp_i, dpt = divmod(rank, self.dp_tp)
        dp_i, tp_i = divmod(dpt, self.tp)
        edp_i, ep_i = divmod(dpt, self.ep)
        return {"pp": pp_i, "dp": dp_i, "tp": tp_i, "dp_tp": dpt, "edp": edp_i, "ep": ep_i,
                "world": rank}

    def rank(self, pp: int = 0, dp: int = 0, tp: int = 0) -> int:
        """Inverse of :meth:`coords` on the dense axes."""
        return (pp * self.dp + dp) * self.tp + tp

    def group_ranks(self, axis: MeshAxis | str) -> list[list[int]]:
        """Member ranks of every group of ``axis``, ordered by the axis coordinate.

        Every rank is in exactly one group; groups are ordered by their first member.
        """
        axis = MeshAxis(axis)
        fixed = _FIXED[axis]
        groups: dict[tuple[int, ...], list[int]] = {}
        for r in range(self.world_size):
            c = self.coords(r)
            groups.setdefault(tuple(c[name] for name in fixed), []).append(r)
        return sorted(groups.values())

    def dense_ranks(self) -> torch.Tensor:
        """Ranks laid out as the dense mesh, shape (pp, dp, tp)."""
        return torch.arange(self.world_size).view(self.pp, self.dp, self.tp)

    def expert_ranks(self) -> torch.Tensor:
        """Ranks laid out as the expert mesh, shape (pp, edp, ep)."""
        return torch.arange(self.world_size).view(self.pp, self.edp, self.ep)


@dataclass(frozen=True)
class MoEMesh:
    """The device meshes of one run: ``dense`` (pp, dp, tp) and ``expert`` (pp, edp, ep)."""

    dims: ParallelDims
    dense: DeviceMesh
    expert: DeviceMesh
    stage: DeviceMesh  # 1-D, ("dp_tp",): the ranks of this rank's pipeline stage
    world: DeviceMesh  # 1-D, ("world",)

    @property
    def device_type(self) -> str:
        return self.dense.device_type

    @property
    def rank(self) -> int:
        return dist.get_rank()

    def submesh(self, axis: MeshAxis | str) -> DeviceMesh:
        """The 1-D mesh of ``axis`` that contains this rank."""
        axis = MeshAxis(axis)
        if axis in (MeshAxis.pp, MeshAxis.dp, MeshAxis.tp):
            return self.dense[axis.value]
        if axis in (MeshAxis.ep, MeshAxis.edp):
            return self.expert[axis.value]
        return self.stage if axis is MeshAxis.dp_tp else self.world

    def group(self, axis: MeshAxis | str) -> dist.ProcessGroup:
        """The process group of ``axis`` that contains this rank."""
        return self.submesh(axis).get_group()

    def local_rank(self, axis: MeshAxis | str) -> int:
        """This rank's coordinate on ``axis``."""
        return self.dims.coords(self.rank)[MeshAxis(axis).value]


def build_mesh(layout: Layout, device_type: str) -> MoEMesh:
    """Create the dense and expert meshes (and their process groups) for ``layout``.

    Collective: every rank must call it. All checks run before the first group is created,
    so a bad layout fails on every rank instead of hanging.
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "build_mesh needs the default process group: call "
            "moetrain.parallel.mesh.init_distributed() first"
        )
    world_size = dist.get_world_size()
    if layout.world_size != world_size:
        raise ConfigError(
            f"the layout parallel.pp*parallel.dp*parallel.tp={layout.pp}*{layout.dp}*"
            f"{layout.tp}={layout.world_size} was resolved for a world of "
            f"{layout.world_size} processes but {world_size} were launched: resolve it with "
            f"resolve_layout(cfg.parallel, world_size={world_size}) or launch "
            f"{layout.world_size} processes"
        )
    dims = ParallelDims.from_layout(layout)
    dense = init_device_mesh(
        device_type, (dims.pp, dims.dp, dims.tp), mesh_dim_names=("pp", "dp", "tp")
    )
    # The expert view reshapes the same ranks through the public constructor (one group per
    # axis; its pp groups duplicate the dense ones). It is a root mesh of its own: expert
    # parameters live on it, dense parameters on `dense`, and no DTensor mixes the two.
    expert = DeviceMesh(device_type, dims.expert_ranks(), mesh_dim_names=("pp", "edp", "ep"))
    # _flatten is the (private, long-standing) way to get a flattened axis that slicing
    # `dense["dp_tp"]` also finds afterwards.
    stage = dense["dp", "tp"]._flatten("dp_tp")
    world = DeviceMesh(device_type, torch.arange(world_size), mesh_dim_names=("world",))
    return MoEMesh(dims=dims, dense=dense, expert=expert, stage=stage, world=world)


# ---------------------------------------------------------------------- process group
def _timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(
            f"{TIMEOUT_ENV}={raw!r} is not a number: set it to the collective timeout in seconds"
        ) from None
    return timedelta(seconds=seconds)


def _launched_by_torchrun() -> bool:
    present = [name for name in _TORCHRUN_ENV if name in os.environ]
    if present and len(present) < len(_TORCHRUN_ENV) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        missing = sorted(set(_TORCHRUN_ENV) - set(present))
        raise RuntimeError(
            f"the environment sets {present} but not {missing}: launch multi-process runs "
            f"with torchrun (launch/torchrun.sh), which sets all of {list(_TORCHRUN_ENV)}"
        )
    return len(present) == len(_TORCHRUN_ENV)


_FRESH = "moetrain/launch"


def _fresh_namespace(store: dist.Store, rank: int, world_size: int,
                     timeout: timedelta) -> dist.Store:
    """A key namespace of ``store`` private to this launch of the workers.

    torchrun's agent hosts the store the workers rendezvous on (``TORCHELASTIC_USE_AGENT_
    STORE``) and it outlives them: after a restart, the keys the dead workers wrote (their
    gloo addresses) are still there, and a new worker may read them and fail connecting to
    a dead peer (``Gloo connectFullMesh failed ... Connection refused``). So the workers of
    each launch agree on a fresh prefix: rank 0 publishes a new nonce, every other rank
    acknowledges the nonce it read together with a nonce of its own, and rank 0 answers each
    acknowledgement of its nonce by echoing the rank's own nonce. A rank accepts only an
    echo of its own nonce, so no key left by an earlier launch can satisfy it, and the
    agreement does not depend on the restart counts, which differ between the agents of
    an elastic job once a node joins.
    """
    mine = uuid.uuid4().hex
    deadline = time.monotonic() + timeout.total_seconds()
    pause = [0.002]  # polling backs off to 0.1 s, so thousands of ranks do not flood the store

    def tick(what: str) -> None:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"rank {rank}: timed out after {timeout.total_seconds():.0f} s agreeing on "
                f"the workers' store namespace ({what}); a worker did not start: check the "
                f"other ranks' logs (${TIMEOUT_ENV} sets the timeout)")
        time.sleep(pause[0])
        pause[0] = min(0.1, pause[0] * 1.5)

    if rank == 0:
        store.set(f"{_FRESH}/epoch", mine)
        pending = {r: f"{_FRESH}/ack/{r}" for r in range(1, world_size)}
        if pending:  # until every rank has acknowledged something (perhaps a stale epoch)
            try:
                store.wait(list(pending.values()), timedelta(seconds=max(
                    1.0, deadline - time.monotonic())))
            except (RuntimeError, TimeoutError):  # DistStoreError: a rank never started
                time.sleep(max(0.0, deadline - time.monotonic()))
                tick(f"waiting for ranks {sorted(pending)[:8]}")
        while pending:
            ready = list(pending)
            values = store.multi_get([pending[r] for r in ready])
            for r, value in zip(ready, values):
                epoch, _, theirs = value.decode().partition(":")
                if epoch == mine:
                    store.set(f"{_FRESH}/go/{r}", f"{mine}:{theirs}")
                    del pending[r]
            if pending:
                tick(f"waiting for ranks {sorted(pending)[:8]}")
        epoch = mine
    else:
        acked, go = None, f"{_FRESH}/go/{rank}"
        while True:
            if store.check([f"{_FRESH}/epoch"]):
                current = store.get(f"{_FRESH}/epoch").decode()
                if current != acked:
                    store.set(f"{_FRESH}/ack/{rank}", f"{current}:{mine}")
                    acked = current
            if store.check([go]):
                epoch, _, echoed = store.get(go).decode().partition(":")
                if echoed == mine:
                    break
            tick("waiting for rank 0")
    return dist.PrefixStore(f"{_FRESH}/{epoch}", store)


def agent_store(timeout: timedelta) -> dist.Store | None:
    """A client of the store torchrun's agent hosts for the workers (``MASTER_ADDR:PORT``
    with ``TORCHELASTIC_USE_AGENT_STORE``), or None when the workers do not share one."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                         is_master=False, timeout=timeout)


def _torchrun_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store | None:
    """The store to initialise on under torchrun: a fresh namespace of the agent's store
    when the workers share it (see :func:`_fresh_namespace`); None (plain ``env://``) when
    rank 0 hosts a new store for every launch."""
    store = agent_store(timeout)
    return None if store is None else _fresh_namespace(store, rank, world_size, timeout)


def init_distributed(backend: str | None = None) -> tuple[int, int, torch.device]:
    """Initialise the default process group and pick this process's device.

    Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) the group joins the
    rendezvous from the environment; SLURM jobs reach here through torchrun too
    (launch/slurm.sbatch). A plain ``python -m moetrain.train`` gets a 1-process group on
    an in-memory store, so every code path has a process group. The backend defaults to
    nccl on CUDA and gloo otherwise. Collectives time out after ``$MOETRAIN_DIST_TIMEOUT_S``
    seconds (default 600), so a missing peer fails instead of hanging. Idempotent.

    Returns ``(rank, world_size, device)``.
    """
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    backend = backend or ("nccl" if cuda else "gloo")
    # device_id binds NCCL eagerly so DeviceMesh can split groups instead of creating them.
    device_id = device if "nccl" in backend else None
    if _launched_by_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = _torchrun_store(rank, world, _timeout())
        if store is None:
            dist.init_process_group(backend, init_method="env://", timeout=_timeout(),
                                    device_id=device_id)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                    timeout=_timeout(), device_id=device_id)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=_timeout(), device_id=device_id)
    return dist.get_rank(), dist.get_world_size(), device


def destroy_distributed() -> None:
    """Tear down every process group (no-op when none exists)."""
    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "MeshAxis",
    "MoEMesh",
    "ParallelDims",
    "build_mesh",
    "destroy_distributed",
    "init_distributed",
]
