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
    TrainConfig,
)
from moetrain.config.validate import Layout
from moetrain.parallel.activation_checkpoint import apply_ac, apply_compile
from moetrain.parallel.expert import apply_ep, count_all_reducer, ep_bytes_sent
from moetrain.parallel.fsdp import GradReplicator, apply_fsdp
from moetrain.parallel.grad_norm import clip_grad_norm_
from moetrain.parallel.mesh import MeshAxis, MoEMesh, build_mesh
from moetrain.parallel.pipeline import Pipeline, apply_pp
from moetrain.parallel.tensor import TPWiring, align_grad_placements, apply_tp, loss_context


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
    # Pipeline parallelism: this rank's stage modules (``[model]`` without PP), the
    # schedule runner (None without PP), the pp group, and every MoE layer of the model in
    # layer order with None where another stage holds it (for the router statistics).
    parts: list[nn.Module] = field(default_factory=list)
    pipeline: Pipeline | None = None
    pp_group: dist.ProcessGroup | None = None
    all_moe_layers: list[nn.Module | None] = field(default_factory=list)
    # Tensor parallelism (None without it), and the ranks over which router statistics are
    # summed: dp, or dp x tp when tp ranks route different tokens.
    tp: TPWiring | None = None
    stats_group: dist.ProcessGroup | None = None
    stats_size: int = 1

    def set_aux_loss_scale(self, scale: float) -> None:
        """Aux-loss gradients are scaled like the LM loss (1 / accumulation steps), and by
        1/tp under TP (see moetrain/parallel/tensor.py)."""
        factor = self.tp.aux_loss_factor if self.tp is not None else 1.0
        for layer in self.moe_layers:
            layer.aux_loss_scale = scale * factor

    def loss_parallel(self):
        """Context for the cross-entropy forward and backward (vocabulary-parallel under TP)."""
        return loss_context(self.tp is not None)

    def no_grad_sync(self, last: bool):
        """Skip the FSDP gradient reduce-scatter on all but the last micro-batch."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        if self.tp is not None:
            align_grad_placements(self.params)
        if self.replicator is not None:
            self.replicator.sync()
        return clip_grad_norm_(self.params, max_norm, pp_group=self.pp_group)

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
    train: TrainConfig | None = None,
) -> ParallelModel:
    """``train`` (micro-batch size, sequence length, accumulation) is needed for pp > 1."""
    mesh = build_mesh(layout, device.type)
    model.to(device)
    moe_layers = model.moe_layers()

    tp = apply_tp(model, mesh.submesh(MeshAxis.tp), par.expert_tp) if layout.tp > 1 else None
    if layout.ep > 1:
        apply_ep(moe_layers, mesh.submesh(MeshAxis.ep), moe_cfg)
    dp_group = mesh.group(MeshAxis.dp) if layout.dp > 1 else None
    # Expert counts of the load-balancing loss: summed over dp for global-batch statistics,
    # and over tp when each tp rank routes a sequence shard.
    over_dp = moe_cfg.aux_loss_scope == AuxLossScope.global_batch and dp_group is not None
    over_tp = tp is not None and tp.routes_token_shard
    count_axis = {(True, False): MeshAxis.dp, (False, True): MeshAxis.tp,
                  (True, True): MeshAxis.dp_tp}.get((over_dp, over_tp))
    if count_axis is not None:
        for layer in moe_layers:
            layer.count_reducer = count_all_reducer(mesh.group(count_axis))

    # Activation checkpointing, then per-block compile: after TP/EP, before FSDP.
    apply_ac(model, par.ac, attention=par.ac_attention)
    if par.compile:
        apply_compile(model)

    # Pipeline split: after the steps above (per module, FQNs kept), before FSDP, whose
    # roots are the stage modules. Keeps this rank's stages of the full model.
    all_moe_layers, parts, plan = moe_layers, [model], None
    if layout.pp > 1:
        plan = apply_pp(model, layout, par, mesh, train)
        parts = plan.parts
        moe_layers = [layer for part in parts for layer in part.moe_layers()]
        local = {id(layer) for layer in moe_layers}
        all_moe_layers = [layer if id(layer) in local else None for layer in all_moe_layers]
    params = [p for part in parts for p in part.parameters()]

    # Experts are reduced over their expert-data-parallel group when EP shards them or when
    # tp ranks feed them different tokens; TP-replicated modules (routers) over dp x tp.
    experts_edp = layout.ep > 1 or (tp is not None and tp.experts_replicated_over_tp)
    held = {id(m) for part in parts for m in part.modules()}
    replicated = [m for m in tp.replicated if id(m) in held] if tp is not None else []
    fsdp = layout.dp > 1 and par.dp_mode == DataParallelMode.fsdp
    replicator = None
    param_dtype = torch.bfloat16 if device.type == "cuda" and fsdp else None
    if fsdp:
        edp_mesh = mesh.submesh(MeshAxis.edp) if experts_edp else None
        for part in parts:
            mine = [m for m in replicated if id(m) in {id(x) for x in part.modules()}]
            apply_fsdp(part, part.moe_layers(), mesh.submesh(MeshAxis.dp), edp_mesh,
                       layout.dp, param_dtype,
                       replicated=(mine, mesh.submesh(MeshAxis.dp_tp)) if mine else None)
    elif layout.dp > 1 or tp is not None:
        expert_ids = _expert_params(moe_layers) if experts_edp else set()
        stage_ids = {id(p) for m in replicated for p in m.parameters()}
        dense = [p for p in params if id(p) not in expert_ids | stage_ids]
        experts = [p for p in params if id(p) in expert_ids]
        edp_group = mesh.group(MeshAxis.edp) if experts_edp else None
        replicator = GradReplicator(
            dense, dp_group, experts, edp_group, layout.dp,
            replicated=([p for p in params if id(p) in stage_ids], mesh.group(MeshAxis.dp_tp)))

    pipeline = None
    if plan is not None:
        pipeline = Pipeline(plan, par.pp_schedule, mesh.group(MeshAxis.pp), device, train,
                            layout.dp, hidden_dtype=param_dtype or torch.float32,
                            tp_mesh=mesh.submesh(MeshAxis.tp) if tp is not None else None)
    return ParallelModel(
        model=model if plan is None else (parts[0] if len(parts) == 1 else nn.ModuleList(parts)),
        mesh=mesh,
        layout=layout,
        moe_layers=moe_layers,
        dp_rank=mesh.local_rank(MeshAxis.dp),
        dp_group=dp_group,
        fsdp=fsdp,
        replicator=replicator,
        params=[p for part in parts for p in part.parameters()],  # FSDP swaps parameters
        parts=parts,
        pipeline=pipeline,
        pp_group=mesh.group(MeshAxis.pp) if plan is not None else None,
        all_moe_layers=all_moe_layers,
        tp=tp,
        stats_group=mesh.group(MeshAxis.dp_tp) if tp is not None else dp_group,
        stats_size=layout.dp * layout.tp,
    )
