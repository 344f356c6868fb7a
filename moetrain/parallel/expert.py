"""Expert parallelism: shard each MoE layer's experts over the ``ep`` mesh axis and hand
the layer an all-to-all dispatcher on that axis's process group.

The expert weights become DTensors ``Shard(0)`` on the ep axis, so their global shape
stays (E, F, D): checkpoints are layout-free and reshard when the EP degree changes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from moetrain.config.schema import DispatchMode, MoEConfig
from moetrain.models.moe.dispatcher import AllToAllDispatcher


def apply_ep(moe_layers: list[nn.Module], ep_mesh: DeviceMesh, moe_cfg: MoEConfig) -> None:
    """Keep each rank's E/ep experts and route tokens to them by all-to-all."""
    capacity = moe_cfg.capacity_factor if moe_cfg.dispatch == DispatchMode.capacity else None
    group = ep_mesh.get_group()
    for layer in moe_layers:
        experts = layer.experts
        for name, param in list(experts.named_parameters(recurse=False)):
            dt = distribute_tensor(param.data, ep_mesh, [Shard(0)])
            experts.register_parameter(name, nn.Parameter(dt, requires_grad=param.requires_grad))
        layer.set_dispatcher(AllToAllDispatcher(layer.router.num_experts, group, capacity,
                                                 moe_cfg.kernel_backend, moe_cfg.drop_policy))


def ep_bytes_sent(moe_layers: list[nn.Module]) -> int:
    """Token bytes this rank sent through all-to-all since the last call (then reset)."""
    total = 0
    for layer in moe_layers:
        d = layer.dispatcher
        if isinstance(d, AllToAllDispatcher):
            total += d.bytes_sent
            d.bytes_sent = 0
    return total


def count_all_reducer(group: dist.ProcessGroup):
    """Sum expert counts over ``group`` (the tp ranks that each route a sequence shard).

    The all-reduce is autograd-free: counts are integers and carry no gradient.
    """

    def reduce(counts):
        counts = counts.clone()
        dist.all_reduce(counts, group=group)
        return counts

    return reduce


def count_prefix_reducer(group: dist.ProcessGroup, dp_rank: int, shards: int):
    """For ``moe.aux_loss_scope=global_batch``: one round of micro-batches (one per
    data-parallel rank) -> (counts of the round's micro-batches up to this rank's,
    counts of the whole round).

    ``group`` holds dp x ``shards`` ranks, dp-major (the dp or dp_tp axis; ``shards`` tp
    ranks route shards of the same micro-batch). Rank r's micro-batch j is global
    micro-batch j * dp + r (``GlobalBatchSampler.micro_batches``), so adding the rows of
    ranks <= r to the earlier rounds' totals gives exactly the counts of global
    micro-batches 0..j * dp + r: the running counts one process sees. One all-gather.
    """
    n = dist.get_world_size(group)

    def reduce(counts):
        flat = torch.empty(n * counts.numel(), dtype=counts.dtype, device=counts.device)
        dist.all_gather_into_tensor(flat, counts.contiguous().view(-1), group=group)
        rows = flat.view(n, *counts.shape)
        return rows[: (dp_rank + 1) * shards].sum(0), rows.sum(0)

    return reduce
