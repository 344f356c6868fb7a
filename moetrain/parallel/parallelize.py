"""Placement of a single-device model on the mesh, in a fixed order (see torchtitan's
``models/deepseek_v3/parallelize.py``):

1. TP (``tensor.apply_tp``), 2. EP (``expert.apply_ep``), 3. activation checkpointing,
4. per-block compile (``activation_checkpoint``), 5. the pipeline split
(``pipeline.apply_pp``), 6. data parallelism: FSDP2 (``fsdp.apply_fsdp``) or gradient
all-reduce (``fsdp.GradReplicator``).

Steps 1-4 work per module and keep parameter FQNs; the split keeps this rank's stages,
which FSDP then wraps as roots. The model code itself never sees a mesh.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from moetrain.config.schema import (
    AuxLossScope,
    DataParallelMode,
    ExpertMode,
    FSDPGradSync,
    MoEConfig,
    ParallelConfig,
    TrainConfig,
)
from moetrain.config.validate import Layout
from moetrain.kernels.backend import use_triton
from moetrain.parallel.activation_checkpoint import apply_ac, apply_compile
from moetrain.parallel.adaptive import (
    apply_sharded_ep,
    expert_modes,
    sharded_expert_mesh,
    weight_gather_bytes,
)
from moetrain.parallel.expert import (
    apply_ep,
    count_all_reducer,
    count_prefix_reducer,
    ep_bytes_saved,
    ep_bytes_sent,
)
from moetrain.parallel.fsdp import GradReplicator, apply_fsdp, grad_sync_mode
from moetrain.parallel.grad_norm import clip_grad_norm_
from moetrain.parallel.mesh import MeshAxis, MoEMesh, build_mesh
from moetrain.parallel.pipeline import Pipeline, apply_pp
from moetrain.parallel.tensor import (
    SequenceGather,
    TPWiring,
    align_grad_placements,
    apply_tp,
    loss_context,
)

log = logging.getLogger(__name__)

@dataclass
class ParallelModel:
    """The placed model plus what the training loop needs from the layout."""

    model: nn.Module
    mesh: MoEMesh
    layout: Layout
    moe_layers: list[nn.Module]  # this rank's MoE layers
    fsdp: bool
    replicator: GradReplicator | None = None
    params: list[nn.Parameter] = field(default_factory=list)
    # Pipeline parallelism: this rank's stage modules (``[model]`` without PP), the
    # schedule runner (None without PP), and every MoE layer of the model in layer order
    # with None where another stage holds it (for the router statistics).
    parts: list[nn.Module] = field(default_factory=list)
    pipeline: Pipeline | None = None
    all_moe_layers: list[nn.Module | None] = field(default_factory=list)
    tp: TPWiring | None = None  # tensor parallelism (None without it)
    # When FSDP reduce-scatters under accumulation (resolved parallel.fsdp_grad_sync).
    grad_sync: FSDPGradSync = FSDPGradSync.last_microbatch

    @property
    def dp_rank(self) -> int:
        return self.mesh.local_rank(MeshAxis.dp)

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.mesh.group(MeshAxis.dp) if self.layout.dp > 1 else None

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        return self.mesh.group(MeshAxis.pp) if self.layout.pp > 1 else None

    @property
    def stats_group(self) -> dist.ProcessGroup | None:
        """The ranks router statistics are summed over: dp, or dp x tp under TP (tp ranks
        route different tokens, or all of them under etp: the statistics are ratios)."""
        return self.mesh.group(MeshAxis.dp_tp) if self.tp is not None else self.dp_group

    @property
    def stats_size(self) -> int:
        return self.layout.dp * self.layout.tp

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
        """Under ``fsdp_grad_sync=last_microbatch``, skip the FSDP gradient reduce-scatter on
        all but the last micro-batch (``last``); under ``every_microbatch`` reduce-scatter
        after each one (see moetrain/parallel/fsdp.py)."""
        if self.fsdp:
            every = self.grad_sync == FSDPGradSync.every_microbatch
            self.model.set_requires_gradient_sync(last or every)
        return contextlib.nullcontext()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        if self.tp is not None:
            align_grad_placements(self.params)
        if self.replicator is not None:
            self.replicator.sync()
        uncounted = []
        if self.tp is not None:
            self._sum_router_cell_grads_over_tp()
        if self.pipeline is not None:
            self.pipeline.sync_tied_grads()
            uncounted = self.pipeline.uncounted_params()
        return clip_grad_norm_(self.params, max_norm, pp_group=self.pp_group,
                               uncounted=uncounted)

    @torch.no_grad()
    def _sum_router_cell_grads_over_tp(self) -> None:
        """RMoE's shared router cell is replicated over tp while each tp rank runs it on
        its own sequence shard: its gradients are summed over tp here (after the dp
        reduction; under FSDP each tp rank holds the same dp shard). Not an FSDP unit of
        its own, unlike the routers: every MoE layer calls it, and one unit gathered per
        layer call would reduce its gradient before the last call's backward."""
        for part in self.parts:
            cell = getattr(part, "router_rnn", None)
            for p in cell.parameters() if cell is not None else ():
                if p.grad is None:
                    continue
                if hasattr(p.grad, "to_local"):  # FSDP: this rank's dp shard
                    g = p.grad.to_local().clone()
                    dist.all_reduce(g, group=self.mesh.group(MeshAxis.tp))
                    p.grad = type(p.grad).from_local(g, p.grad.device_mesh, p.grad.placements,
                                                     shape=p.grad.shape,
                                                     stride=p.grad.stride(), run_check=False)
                else:
                    dist.all_reduce(p.grad, group=self.mesh.group(MeshAxis.tp))

    def ep_bytes_sent(self) -> int:
        return ep_bytes_sent(self.moe_layers)

    def expert_modes(self) -> dict[int, float]:
        """Sharded experts: layer index -> the mean mode r of its calls since the last read."""
        return expert_modes(self.moe_layers)

    def weight_gather_bytes(self) -> int:
        """Sharded experts: expert-weight bytes all-gathered since the last read."""
        return weight_gather_bytes(self.moe_layers)

    def ep_bytes_saved(self, device: torch.device) -> torch.Tensor:
        return ep_bytes_saved(self.moe_layers, device)


def _wire_count_reducers(moe_layers: list[nn.Module], mesh: MoEMesh, layout: Layout,
                         moe_cfg: MoEConfig, tp: TPWiring | None) -> None:
    """Expert counts of the load-balancing loss: summed over tp when each tp rank routes a
    sequence shard; for global-batch statistics, the running counts over the data-parallel
    ranks' micro-batches in global order (``count_prefix_reducer``)."""
    over_dp = moe_cfg.aux_loss_scope == AuxLossScope.global_batch and layout.dp > 1
    over_tp = tp is not None and tp.routes_token_shard
    for layer in moe_layers:
        if over_tp:
            layer.count_reducer = count_all_reducer(mesh.group(MeshAxis.tp))
        if over_dp:
            axis = MeshAxis.dp_tp if over_tp else MeshAxis.dp
            layer.count_prefix = count_prefix_reducer(
                mesh.group(axis), mesh.local_rank(MeshAxis.dp), layout.tp if over_tp else 1)
    if over_tp:  # each tp rank holds one shard of every sequence (seq loss, routing keys,
        # routers that route on the whole micro-batch)
        for layer in moe_layers:
            layer.seq_shards = layout.tp
            layer.seq_shard_rank = mesh.local_rank(MeshAxis.tp)
            for router in layer.routers:  # every chain round's
                router.seq_gather = SequenceGather(mesh.group(MeshAxis.tp), layout.tp,
                                                   layer.seq_shard_rank)


def _apply_dp(parts: list[nn.Module], mesh: MoEMesh, layout: Layout, fsdp: bool,
              tp: TPWiring | None, param_dtype: torch.dtype | None,
              cpu_offload: bool = False, sharded: bool = False) -> GradReplicator | None:
    """Data parallelism over this rank's model parts: FSDP2 if ``fsdp``, else a
    GradReplicator when gradients need reducing (dp > 1 or tp > 1).

    Experts are reduced over their expert-data-parallel group when EP shards them or when
    tp ranks feed them different tokens; TP-replicated modules (routers) over dp x tp.
    """
    experts_edp = layout.ep > 1 or (tp is not None and tp.experts_replicated_over_tp)
    held = {id(m) for part in parts for m in part.modules()}
    replicated = [m for m in tp.replicated if id(m) in held] if tp is not None else []
    if fsdp:
        edp_mesh = mesh.submesh(MeshAxis.edp) if experts_edp and not sharded else None
        for part in parts:
            in_part = {id(m) for m in part.modules()}
            mine = [m for m in replicated if id(m) in in_part]
            # Sharded experts have no replicas under FSDP (config.validate): left alone.
            ignored = ({p for layer in part.moe_layers() for p in layer.experts.parameters()}
                       if sharded else None)
            apply_fsdp(part, part.moe_layers(), mesh.submesh(MeshAxis.dp), edp_mesh,
                       layout.dp, param_dtype,
                       replicated=(mine, mesh.submesh(MeshAxis.dp_tp)) if mine else None,
                       cpu_offload=cpu_offload, ignored=ignored)
        if sharded:  # their gradients are sums over the ep ranks' tokens: divided by dp
            experts = [p for part in parts for layer in part.moe_layers()
                       for p in layer.experts.parameters()]
            return GradReplicator([], None, experts, mesh.group(MeshAxis.edp), layout.dp)
        return None
    if layout.dp == 1 and tp is None:
        return None
    params = [p for part in parts for p in part.parameters()]
    expert_ids = ({id(p) for part in parts for layer in part.moe_layers()
                   for p in layer.experts.parameters()} if experts_edp else set())
    stage_ids = {id(p) for m in replicated for p in m.parameters()}
    return GradReplicator(
        [p for p in params if id(p) not in expert_ids | stage_ids],
        mesh.group(MeshAxis.dp) if layout.dp > 1 else None,
        [p for p in params if id(p) in expert_ids],
        mesh.group(MeshAxis.edp) if experts_edp else None,
        layout.dp,
        replicated=([p for p in params if id(p) in stage_ids], mesh.group(MeshAxis.dp_tp)))


def parallelize(
    model: nn.Module,
    layout: Layout,
    par: ParallelConfig,
    moe_cfg: MoEConfig,
    device: torch.device,
    train: TrainConfig | None = None,
    cpu_offload: bool = False,
) -> ParallelModel:
    """Place ``model`` (built whole on every rank) on the mesh of ``layout``, in the fixed
    order of the module docstring. ``train`` (micro-batch size, sequence length,
    accumulation) is needed for pp > 1; its precision picks FSDP's parameter dtype."""
    mesh = build_mesh(layout, device.type)
    model.to(device)
    all_moe_layers = model.moe_layers()
    if all_moe_layers:
        # moe.kernel_backend=auto: the kernels' start-up self-test runs here, eagerly, so
        # that compiled blocks only look its verdict up.
        use_triton(moe_cfg.kernel_backend, device)

    # 1. Tensor parallelism.
    tp = apply_tp(model, mesh.submesh(MeshAxis.tp), par.expert_tp) if layout.tp > 1 else None
    # 2. Expert parallelism, and the ranks each layer's expert counts are summed over.
    # With fewer experts than ep ranks, each expert is split along F over ep / E ranks and
    # run in Tutel's modes (moetrain/parallel/adaptive.py).
    num_experts = all_moe_layers[0].num_ffn_experts if all_moe_layers else 0
    ragged = bool(all_moe_layers) and hasattr(all_moe_layers[0].experts, "sizes")
    sharded = layout.ep > 1 and 0 < num_experts < layout.ep and not ragged
    if sharded:
        emesh, views = sharded_expert_mesh(mesh.dims.expert_ranks(), num_experts, device.type)
        apply_sharded_ep(all_moe_layers, mesh.submesh(MeshAxis.ep), emesh, views, moe_cfg,
                         par.expert_r, ExpertMode(par.expert_mode))
    elif layout.ep > 1:
        apply_ep(all_moe_layers, mesh.submesh(MeshAxis.ep), moe_cfg, a2a=par.a2a,
                 a2a_local_size=par.a2a_local_size)
        if ExpertMode(par.expert_mode) != ExpertMode.fixed and mesh.rank == 0:
            why = ("HMoE's size classes are placed whole or split along F by their counts "
                   "(docs/hmoe.md)" if ragged else
                   f"model.num_experts={num_experts} >= parallel.ep={layout.ep}, every rank "
                   f"holds whole experts")
            log.warning("parallel.expert_mode=%s: %s, so there is nothing to switch; the "
                        "mode is fixed", ExpertMode(par.expert_mode).value, why)
    _wire_count_reducers(all_moe_layers, mesh, layout, moe_cfg, tp)
    # 3. Activation checkpointing, then 4. per-block compile.
    apply_ac(model, par.ac, attention=par.ac_attention)
    if par.compile:
        apply_compile(model)
    # 5. Pipeline split: per-module steps above keep FQNs; keeps this rank's stages, which
    # become the roots of FSDP.
    plan = apply_pp(model, layout, par, mesh, train) if layout.pp > 1 else None
    parts = plan.parts if plan is not None else [model]

    moe_layers = [layer for part in parts for layer in part.moe_layers()]
    # 6. Data parallelism. FSDP gathers bf16 parameters on CUDA when the run is bf16.
    fsdp = layout.dp > 1 and par.dp_mode == DataParallelMode.fsdp
    bf16 = (train or TrainConfig()).uses_bf16(device.type)
    param_dtype = torch.bfloat16 if fsdp and bf16 and device.type == "cuda" else None
    replicator = _apply_dp(parts, mesh, layout, fsdp, tp, param_dtype, cpu_offload, sharded)

    pipeline = None
    if plan is not None:
        pipeline = Pipeline(plan, par.pp_schedule, mesh.group(MeshAxis.pp), device, train,
                            layout.dp, hidden_dtype=param_dtype or torch.float32,
                            tp_mesh=mesh.submesh(MeshAxis.tp) if tp is not None else None)
    local = {id(layer) for layer in moe_layers}
    return ParallelModel(
        model=parts[0] if len(parts) == 1 else nn.ModuleList(parts),
        mesh=mesh,
        layout=layout,
        moe_layers=moe_layers,
        fsdp=fsdp,
        replicator=replicator,
        params=[p for part in parts for p in part.parameters()],  # FSDP swaps parameters
        parts=parts,
        pipeline=pipeline,
        all_moe_layers=[layer if id(layer) in local else None for layer in all_moe_layers],
        tp=tp,
        grad_sync=grad_sync_mode(par, layout.dp, layout.pp),
    )
