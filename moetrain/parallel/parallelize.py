"""Placement of a single-device model on the mesh, in a fixed order:
TP -> EP -> activation checkpointing -> compile -> FSDP (see torchtitan's
``models/deepseek_v3/parallelize.py``). The model code itself never sees a mesh.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from moetrain.config.schema import (
    AuxLossScope,
    DataParallelMode,
    MoEConfig,
    ParallelConfig,
)
from moetrain.config.validate import Layout
from moetrain.parallel.expert import apply_ep, count_all_reducer, ep_bytes_sent
from moetrain.parallel.fsdp import GradReplicator, apply_fsdp
from moetrain.parallel.grad_norm import clip_grad_norm_
from moetrain.parallel.mesh import MeshAxis, MoEMesh, build_mesh


@dataclass
class ParallelModel:
    """The placed model plus what the training loop needs from the layout."""

    model: nn.Module
    mesh: MoEMesh
    layout: Layout
    moe_layers: list[nn.Module]
    dp_rank: int
    dp_group: dist.ProcessGroup | None
    fsdp: bool
    replicator: GradReplicator | None = None
    params: list[nn.Parameter] = field(default_factory=list)

    def set_aux_loss_scale(self, scale: float) -> None:
        """Aux-loss gradients are scaled like the LM loss (1 / accumulation steps)."""
        for layer in self.moe_layers:
            layer.aux_loss_scale = scale

    def no_grad_sync(self, last: bool):
        """Skip the FSDP gradient reduce-scatter on all but the last micro-batch."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        if self.replicator is not None:
            self.replicator.sync()
        return clip_grad_norm_(self.params, max_norm)

    def ep_bytes_sent(self) -> int:
        return ep_bytes_sent(self.moe_layers)


def _expert_params(moe_layers: list[nn.Module]) -> set[int]:
    return {id(p) for layer in moe_layers for p in layer.experts.parameters()}


def parallelize(
    model: nn.Module,
    layout: Layout,
    par: ParallelConfig,
    moe_cfg: MoEConfig,
    device: torch.device,
) -> ParallelModel:
    mesh = build_mesh(layout, device.type)
    model.to(device)
    moe_layers = model.moe_layers()

    if layout.ep > 1:
        apply_ep(moe_layers, mesh.submesh(MeshAxis.ep), moe_cfg)
    dp_group = mesh.group(MeshAxis.dp) if layout.dp > 1 else None
    if moe_cfg.aux_loss_scope == AuxLossScope.global_batch and dp_group is not None:
        for layer in moe_layers:
            layer.count_reducer = count_all_reducer(dp_group)

    fsdp = layout.dp > 1 and par.dp_mode == DataParallelMode.fsdp
    replicator = None
    if fsdp:
        param_dtype = torch.bfloat16 if device.type == "cuda" else None
        edp_mesh = mesh.submesh(MeshAxis.edp) if layout.ep > 1 else None
        apply_fsdp(model, moe_layers, mesh.submesh(MeshAxis.dp), edp_mesh, layout.dp,
                   param_dtype)
    elif layout.dp > 1:
        expert_ids = _expert_params(moe_layers) if layout.ep > 1 else set()
        dense = [p for p in model.parameters() if id(p) not in expert_ids]
        experts = [p for p in model.parameters() if id(p) in expert_ids]
        edp_group = mesh.group(MeshAxis.edp) if layout.ep > 1 else None
        replicator = GradReplicator(dense, dp_group, experts, edp_group, layout.dp)

    return ParallelModel(
        model=model,
        mesh=mesh,
        layout=layout,
        moe_layers=moe_layers,
        dp_rank=mesh.local_rank(MeshAxis.dp),
        dp_group=dp_group,
        fsdp=fsdp,
        replicator=replicator,
        params=list(model.parameters()),
    )
