"""Expert parallelism: shard each MoE layer's experts over the ``ep`` mesh axis and hand
the layer an all-to-all dispatcher on that axis's process group.

The expert weights become DTensors ``Shard(0)`` on the ep axis, so their global shape
stays (E, F, D): checkpoints are layout-free and reshard when the EP degree changes.
"""

from __future__ import annotations

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
    """For ``moe.aux_loss_scope=global_batch``: sum expert counts over data parallelism.

    The all-reduce is autograd-free: counts are integers and carry no gradient.
    """

    def reduce(counts):
        counts = counts.clone()
        dist.all_reduce(counts, group=group)
        return counts

    return reduce
