"""Data parallelism: FSDP2 ``fully_shard`` (parameters, gradients and optimizer state
sharded) or plain replication with an all-reduce of gradients.

Gradient scale. Each rank's loss is the mean over its own tokens, and the objective is
the mean over the ``dp`` data-parallel replicas. Dense gradients are therefore averaged
over dp. An expert shard already receives the summed gradient of every token that any
rank of its EP group routed to it (through the all-to-all backward), so across its
expert-data-parallel group it must be summed and divided by dp (not by edp).

Expert shard dim. FSDP2 splits a parameter like ``torch.chunk`` along its shard dim and
pads every shard to the largest. The routed-expert weights (w1_EFD, w3_EFD: (e, F, D);
w2_EDF: (e, D, F); e = E/ep local experts) default to dim 0, which wastes memory when e
does not divide evenly over the edp ranks: Mixtral (E=8) with ep=8 on 64 GPUs leaves e=1
expert over edp=8, so one rank keeps the whole expert and seven hold padding. They are
then sharded on dim 1 (F of w1/w3, D of w2), as torchtitan does for ``dp_mod_ep * ep >
num_experts`` (``models/deepseek_v3/parallelize.py``); see :func:`expert_fsdp_shard_dim`.

Gradient accumulation (``parallel.fsdp_grad_sync``). Skipping the reduce-scatter on all
but the last micro-batch (``last_microbatch``) saves communication and costs memory:
FSDP2 keeps every unit's unsharded gradient, upcast to the fp32 reduce dtype, for the whole
step, i.e. 4 bytes per parameter of the rank's unsharded (dp-gathered) model instead of
4/dp. ``every_microbatch`` reduce-scatters after each micro-batch into the sharded fp32
gradient (torchtitan's behaviour): ``accum`` reduce-scatters per step instead of one, which
overlap with the backward, and only one unit's unsharded gradient at a time. The sum is
linear, so both give the same gradients. ``moetrain.parallel.memory`` counts both.

Legend: E experts, e local experts (E/ep), F expert hidden, D model dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor, Shard

from moetrain.config.schema import DataParallelMode, FSDPGradSync, ParallelConfig


def expert_fsdp_shard_dim(local_shape: Sequence[int], degree: int) -> int:
    """The dim FSDP shards a routed-expert weight of local shape ``local_shape`` (e, ., .)
    on over ``degree`` ranks: 0 when the e local experts split evenly (``e % degree ==
    0``), else 1 when that dim does (FSDP2 shards a nonzero dim only evenly), else 0.

    Dim 1 is F for w1_EFD/w3_EFD and D for w2_EDF. Sharding it gives every rank 1/degree
    of each expert instead of whole experts to some ranks and padding to the others.
    ``moetrain.parallel.memory`` applies the same rule, so its estimate stays exact.
    """
    e = local_shape[0]
    if degree > 1 and e % degree and local_shape[1] % degree == 0:
        return 1
    return 0


def grad_sync_mode(par: ParallelConfig, dp: int, pp: int) -> FSDPGradSync:
    """The resolved ``parallel.fsdp_grad_sync`` of a layout with ``dp`` data-parallel and
    ``pp`` pipeline ranks: when gradients are reduced under gradient accumulation.

    ``auto`` is ``every_microbatch`` under FSDP: the fp32 unsharded gradients that
    ``last_microbatch`` keeps do not shrink with dp (``moetrain.parallel.memory``: 12.3 GiB
    a rank for deepseekmoe_16b at ep=8 on 8 or 64 GPUs, against 0.95 GiB sharded over
    dp=64); the price is a reduce-scatter per micro-batch, overlapped with the backward.
    Under pipeline parallelism the schedule (``torch.distributed.pipelining``) decides: it
    defers every FSDP stage's reduce-scatter to after the last micro-batch, i.e.
    ``last_microbatch``. Replicated data parallelism (and dp=1) reduces once per step, at
    the gradient clip: ``last_microbatch``.
    ``validate`` rejects an explicit ``every_microbatch`` where it cannot apply.
    """
    mode = FSDPGradSync(par.fsdp_grad_sync)
    fsdp = dp > 1 and DataParallelMode(par.dp_mode) == DataParallelMode.fsdp
    if not fsdp or pp > 1:
        return FSDPGradSync.last_microbatch
    return FSDPGradSync.every_microbatch if mode == FSDPGradSync.auto else mode


def _expert_placement(degree: int):
    """``shard_placement_fn`` for ``fully_shard`` of a GroupedExperts module."""

    def placement(param: nn.Parameter) -> Shard:
        local = param.to_local() if isinstance(param, DTensor) else param
        return Shard(expert_fsdp_shard_dim(local.shape, degree))

    return placement


def apply_fsdp(
    model: nn.Module,
    moe_layers: list[nn.Module],
    dp_mesh: DeviceMesh,
    edp_mesh: DeviceMesh | None,
    dp_degree: int,
    param_dtype: torch.dtype | None,
    replicated: tuple[list[nn.Module], DeviceMesh] | None = None,
    cpu_offload: bool = False,
    ignored: set[nn.Parameter] | None = None,
) -> None:
    """Shard experts over edp (when expert-parallel), each block and the root over dp.

    ``ignored``: parameters FSDP leaves alone (sharded experts, whose 2-D ep layout has no
    expert-data-parallel replicas to shard over; ``moetrain/parallel/adaptive.py``).

    The experts are sharded on dim 0 when their local experts split evenly over edp, else
    on dim 1 (:func:`expert_fsdp_shard_dim`).

    ``replicated``: modules replicated over a mesh wider than dp whose ranks see different
    tokens (routers under sequence-parallel TP, over dp x tp): sharded over that mesh,
    their gradients summed there and divided by dp, like the experts over edp.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    off = (CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload
           else OffloadPolicy())
    for module in replicated[0] if replicated is not None else []:
        fully_shard(module, mesh=replicated[1], mp_policy=mp, offload_policy=off)
        module.set_gradient_divide_factor(float(dp_degree))
        if dist.get_backend() == "gloo" and replicated[1].size() > 1:
            module.set_force_sum_reduction_for_comms(True)
    if edp_mesh is not None:
        for layer in moe_layers:
            fully_shard(layer.experts, mesh=edp_mesh, mp_policy=mp, offload_policy=off,
                        shard_placement_fn=_expert_placement(edp_mesh.size()))
            layer.experts.set_gradient_divide_factor(float(dp_degree))
            # gloo has no PREMUL_SUM: sum, then scale. Not on a 1-rank mesh, where FSDP
            # skips the collective and would then divide twice.
            if dist.get_backend() == "gloo" and edp_mesh.size() > 1:
                layer.experts.set_force_sum_reduction_for_comms(True)
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, offload_policy=off,
                    ignored_params=ignored or None)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, offload_policy=off,
                ignored_params=ignored or None)


class GradReplicator:
    """Plain data parallelism: all-reduce each gradient over its replica group, then
    divide by the number of data-parallel replicas (see the module docstring)."""

    def __init__(self, dense: list[nn.Parameter], dense_group, expert: list[nn.Parameter],
                 expert_group, dp_degree: int, replicated=None):
        # replicated: (params, group) replicated over a group wider than dp (routers under
        # sequence-parallel TP, over dp x tp), summed there and divided by dp.
        self.buckets = [(dense, dense_group), (expert, expert_group)]
        if replicated is not None:
            self.buckets.append(replicated)
        self.dp = dp_degree

    @torch.no_grad()
    def sync(self) -> None:
        for params, group in self.buckets:
            grads = [p.grad for p in params if p.grad is not None]
            if not grads or group is None:
                continue
            locals_ = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
            flat = torch.cat([g.reshape(-1) for g in locals_])
            if dist.get_world_size(group) > 1:
                dist.all_reduce(flat, group=group)
            flat /= self.dp
            offset = 0
            for g in locals_:
                n = g.numel()
                g.copy_(flat[offset:offset + n].view_as(g))
                offset += n
