"""Pipeline parallelism (PP): the decoder split into stages, run by a
``torch.distributed.pipelining`` schedule.

Split. Stage ``s`` holds layers ``split[s] .. split[s+1]-1``; stage 0 also holds the token
embedding, the last stage the final norm, the output projection and the loss. The
default split (:func:`default_split`) balances a cost that weighs each stage's share of
the parameters and its share of the forward FLOPs equally (:func:`pipeline_costs`): an MoE
layer holds all E experts' parameters but computes with only K of them per token, so it
is heavy in memory and light in FLOPs. ``parallel.pp_split`` overrides it.

Placement. Every rank builds the full model from the same seed (so the weights equal
the 1-process run's), then :func:`split_model` keeps this rank's stages and drops the rest.
Layers stay in ``layers`` (a ModuleDict keyed by the global layer index), so parameter
FQNs and checkpoints do not depend on the layout. With ``parallel.pp_virtual_stages = v``
there are ``pp * v`` stages; stage ``s`` lives on pp rank ``s % pp`` (looped, Narayanan et
al., 2021). ``parallelize`` splits after TP, EP, activation checkpointing and compile
(per-module steps that keep FQNs) and before FSDP, whose roots are the stage modules.
Under TP the tensors crossing a stage boundary are DTensors (hidden states sharded over
the sequence, logits over the vocabulary); their shapes are given to the stages up front
(static metadata), so no placeholder forward ever runs.

Schedules (``parallel.pp_schedule``): ``gpipe`` (Huang et al., 2019), ``1f1b`` (PipeDream-
Flush, Narayanan et al., 2021), ``interleaved_1f1b`` (Megatron's interleaved 1F1B over the
virtual stages) and ``zero_bubble`` (ZB-1P, Qi et al., 2024: the backward is split into an
input-gradient and a weight-gradient half, and the weight halves fill the bubble).

Numbers. The schedule's micro-batches are exactly the trainer's accumulation micro-batches
of one step (``n_microbatches = accumulation steps``). The loss handed to the backward is
``loss / n_microbatches`` with ``scale_grads=False``: the same scaling as the 1-process
``(loss / accum).backward()``, and the same ``aux_loss_scale = 1 / accum`` the trainer
gives the MoE layers, whose aux losses ride on each stage's backward (AuxLossInjector).
Router statistics are recorded by forward hooks (one record per micro-batch forward,
never for a recompute in the backward) and summed over the pp group by the stats
tracker; the LM loss lives on the last stage and is summed over the pp group, so every
rank logs the 1-process numbers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.tensor import DTensor, Shard

from moetrain.config.schema import (
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    PipelineSchedule,
    TrainConfig,
)
from moetrain.config.validate import Layout
from moetrain.models.transformer import rnn_params, router_params
from moetrain.parallel.mesh import MeshAxis, MoEMesh
from moetrain.parallel.tensor import local_loss, loss_context

__all__ = [
    "Pipeline",
    "PipelinePlan",
    "StageCost",
    "StageOptimizers",
    "apply_pp",
    "balanced_split",
    "default_split",
    "pipeline_costs",
    "split_model",
    "stage_ids_of",
    "stage_split",
]

# Cross-entropy work per logit and token (max, subtract, exp, sum), on top of the output GEMM.
LOSS_FLOPS_PER_LOGIT = 4

_SINGLE = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
_MULTI = {"interleaved_1f1b": ScheduleInterleaved1F1B,
          "zero_bubble": ScheduleInterleavedZeroBubble}


# ----------------------------------------------------------------------------- the split
@dataclass(frozen=True)
class StageCost:
    """Parameters held and forward FLOPs per token of one piece of the model."""

    params: int
    flops: int


def pipeline_costs(model_cfg: ModelConfig, vocab_size: int, seq_len: int,
                   moe_cfg: MoEConfig | None = None,
                   ) -> tuple[StageCost, list[StageCost], StageCost]:
    """(embedding, [each layer], final norm + output + loss) costs.

    Forward FLOPs per token: 2 per multiply-accumulate of every GEMM; attention adds
    4 * seq_len * dim (scores and the weighted sum); an MoE layer counts its router, its
    shared experts and only top_k routed experts, times ``moe.chain_iterations`` (a chain
    of experts runs them C times), while its parameters count all E. RMoE's router counts
    its projection, one cell step and its head; its shared cell's parameters go to the
    embedding's piece (every stage holds a copy; the split counts it once). A Mamba
    layer (``model.mixer``) counts its mixer instead of the attention (``mamba_flops``:
    projections, conv and the sequential scan, linear in seq_len). The embedding is a
    lookup (no FLOPs). Parameter totals equal ``count_params``.
    """
    from moetrain.models.mamba import mamba_flops, mamba_params

    m = model_cfg
    D, H = m.dim, m.n_heads
    kv, hd = m.n_kv_heads or H, m.dim // m.n_heads
    attn_w = D * H * hd * 2 + D * kv * hd * 2  # wq, wo; wk, wv
    qkv_b = (H + 2 * kv) * hd if m.qkv_bias else 0  # model.qkv_bias
    attn = StageCost(params=attn_w + qkv_b + 2 * D,
                     flops=2 * attn_w + 4 * seq_len * D)  # + 2 norms
    expert = 3 * D * m.expert_hidden
    router, router_macs = router_params(m, moe_cfg)
    router += m.constant_experts * 3 * D  # MoE++'s constant experts (v, W)
    router_macs += m.constant_experts * 3 * D
    C = moe_cfg.chain_iterations if moe_cfg is not None else 1
    shared = m.n_shared_experts * expert
    # HMoE's ragged experts: 3 D sum(F_e) weights, a routed row 3 D mean(F) (count_params)
    sizes = m.expert_sizes
    routed_all = m.num_experts * expert if sizes is None else 3 * D * sum(sizes)
    routed_k = (m.top_k * expert if sizes is None
                else m.top_k * 3 * D * sum(sizes) // m.num_experts)
    moe = StageCost(params=router + shared + routed_all,
                    flops=2 * (router_macs + C * (shared + routed_k)))
    dense = StageCost(params=3 * D * m.ffn_hidden, flops=2 * 3 * D * m.ffn_hidden)
    mamba = StageCost(params=mamba_params(m) + 2 * D, flops=mamba_flops(m))  # + 2 norms
    layers = []
    for i in range(m.n_layers):
        mixer = attn if m.uses_attention(i) else mamba
        ffn = moe if m.is_moe_layer(i) else dense
        layers.append(StageCost(mixer.params + ffn.params, mixer.flops + ffn.flops))
    head = StageCost(params=vocab_size * D + rnn_params(moe_cfg), flops=0)
    out = 0 if m.tie_embeddings else vocab_size * D
    tail = StageCost(params=D + out, flops=2 * vocab_size * D + LOSS_FLOPS_PER_LOGIT * vocab_size)
    return head, layers, tail


def balanced_split(layer_costs: Sequence[float], n_stages: int, head: float = 0.0,
                   tail: float = 0.0) -> list[int]:
    """First layer of each of ``n_stages`` contiguous stages (>= 1 layer each).

    Stage 0 also carries ``head`` and the last stage ``tail``. Minimises the largest
    stage cost; among those splits, the sum of squared stage costs (the most even); among
    those, the one whose earlier stages are lighter (under 1F1B the first stage keeps the
    most micro-batches in flight).
    """
    L, n = len(layer_costs), n_stages
    if not 1 <= n <= L:
        raise ValueError(f"cannot split {L} layers into {n} stages of at least one layer")
    prefix = [0.0]
    for c in layer_costs:
        prefix.append(prefix[-1] + float(c))

    def cost(a: int, b: int) -> float:  # stage of layers a..b-1
        return prefix[b] - prefix[a] + (head if a == 0 else 0.0) + (tail if b == L else 0.0)

    inf = math.inf
    tol = 1e-9 * (prefix[-1] + abs(head) + abs(tail) + 1.0)

    def suffix_table(value, combine, allowed) -> list[list[float]]:
        # t[k][i]: best value over splits of layers i..L-1 into k stages
        t = [[inf] * (L + 1) for _ in range(n + 1)]
        t[0][L] = 0.0
        for k in range(1, n + 1):
            for i in range(L - k, -1, -1):
                for e in range(i + 1, L - k + 2):
                    if t[k - 1][e] < inf and allowed(i, e):
                        t[k][i] = min(t[k][i], combine(value(i, e), t[k - 1][e]))
        return t

    worst = suffix_table(cost, max, lambda i, e: True)[n][0]

    def fits(i: int, e: int) -> bool:
        return cost(i, e) <= worst + tol

    square = suffix_table(lambda i, e: cost(i, e) ** 2, lambda a, b: a + b, fits)
    starts, i = [0], 0
    for k in range(n, 1, -1):  # the earliest end that keeps both criteria optimal
        i = next(e for e in range(i + 1, L - k + 2)
                 if fits(i, e) and square[k - 1][e] < inf
                 and cost(i, e) ** 2 + square[k - 1][e] <= square[k][i] + tol * (worst + 1))
        starts.append(i)
    return starts


def default_split(model_cfg: ModelConfig, vocab_size: int, seq_len: int,
                  n_stages: int, moe_cfg: MoEConfig | None = None) -> list[int]:
    """The balanced split: cost = params share + forward-FLOPs share (see module doc)."""
    head, layers, tail = pipeline_costs(model_cfg, vocab_size, seq_len, moe_cfg)
    pieces = [head, *layers, tail]
    P = sum(c.params for c in pieces)
    Fl = sum(c.flops for c in pieces)

    def weight(c: StageCost) -> float:
        return c.params / P + c.flops / Fl

    return balanced_split([weight(c) for c in layers], n_stages, weight(head), weight(tail))


def stage_split(model_cfg: ModelConfig, vocab_size: int, seq_len: int, n_stages: int,
                pp_split: Sequence[int] | None, moe_cfg: MoEConfig | None = None) -> list[int]:
    """``parallel.pp_split`` if set, else the balanced default."""
    if pp_split is not None:
        return list(pp_split)
    return default_split(model_cfg, vocab_size, seq_len, n_stages, moe_cfg)


def stage_ids_of(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """Stages held by pipeline rank ``pp_rank``: ``pp_rank, pp_rank + pp, ...`` (looped)."""
    return [pp_rank + v * pp for v in range(virtual_stages)]


def split_model(model: nn.Module, split: Sequence[int], stage_ids: Sequence[int]) -> list[nn.Module]:
    """Move the stages ``stage_ids`` of ``model`` into stage modules; drop the rest.

    Each stage module is a copy of the model's shell (config, RoPE tables) holding its
    layers under their global keys, the embedding on stage 0 and norm + output on the
    last stage (``None`` elsewhere; ``Transformer.forward`` then passes hidden states).
    Layers are moved, not copied. ``model`` is left empty.
    """
    n_layers, n_stages = len(model.layers), len(split)
    bounds = [*split, n_layers]
    layers = dict(model.layers.items())
    embed, norm, output = model.tok_embeddings, model.norm, model.output
    model.layers = nn.ModuleDict()
    model.tok_embeddings = model.norm = model.output = None
    parts = []
    for s in stage_ids:
        part = copy.deepcopy(model)
        part.layers = nn.ModuleDict(
            {str(i): layers[str(i)] for i in range(bounds[s], bounds[s + 1])})
        if s == 0:
            part.tok_embeddings = embed
        if s == n_stages - 1:
            part.norm, part.output = norm, output
        part.bind_router_cells()  # RMoE: the stage's own copy of the shared cell
        parts.append(part)
    return parts


@dataclass
class PipelinePlan:
    """This rank's share of the split: its stage modules and their stage indices."""

    parts: list[nn.Module]
    stage_ids: list[int]
    n_stages: int
    split: list[int]


def apply_pp(model: nn.Module, layout: Layout, par: ParallelConfig, mesh: MoEMesh,
             train: TrainConfig | None) -> PipelinePlan:
    """Split ``model`` (built whole on every rank) and keep this rank's stages."""
    if train is None:
        raise ValueError("pipeline parallelism needs the train config (micro-batch shapes): "
                         "call parallelize(..., train=cfg.train)")
    n_stages = layout.pp * par.pp_virtual_stages
    split = stage_split(model.model_cfg, model.vocab_size, train.seq_len, n_stages,
                        par.pp_split, model.moe_cfg)
    stage_ids = stage_ids_of(mesh.local_rank(MeshAxis.pp), layout.pp, par.pp_virtual_stages)
    return PipelinePlan(split_model(model, split, stage_ids), stage_ids, n_stages, split)


# ----------------------------------------------------------------------------- runtime
class StageOptimizers:
    """One optimizer per model part (this rank's pipeline stages), stepped as one.

    Per-part optimizers let each part's state be saved under its own FQNs
    (``ModelOptimizerState(parts, optimizers)``); ``param_groups`` is their union, so the
    LR schedule sets every part.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


def _example(shape: tuple[int, ...], dtype: torch.dtype, tp_mesh: DeviceMesh | None,
             shard_dim: int, requires_grad: bool) -> torch.Tensor:
    """A storage-free tensor with the shape of a stage boundary tensor.

    Under TP the boundary tensors are DTensors sharded on ``shard_dim`` over the tp mesh
    (the sequence for hidden states, the vocabulary for logits); the local shard follows
    DTensor's ``Shard`` (torch.chunk) sizes.
    """
    if tp_mesh is None:
        return torch.empty(shape, dtype=dtype, device="meta", requires_grad=requires_grad)
    n, r = tp_mesh.size(), tp_mesh.get_local_rank()
    size = shape[shard_dim]
    chunk = -(-size // n)
    local = list(shape)
    local[shard_dim] = max(0, min(chunk, size - r * chunk))
    full = torch.empty(shape, device="meta")
    out = DTensor.from_local(torch.empty(local, dtype=dtype, device="meta"), tp_mesh,
                             [Shard(shard_dim)], shape=full.shape, stride=full.stride(),
                             run_check=False)
    return out.requires_grad_(requires_grad)


def _local_of(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _in_backward() -> bool:
    """True while the autograd engine runs (e.g. an activation-checkpoint recompute)."""
    return torch._C._current_graph_task_id() != -1


class Pipeline:
    """This rank's stages under one schedule; the trainer's view of pipeline parallelism.

    ``step`` runs one optimizer step's micro-batches forward and backward (gradients end
    in the stage modules' ``.grad``); ``eval`` runs micro-batches forward only. Both return
    the sum of the micro-batch LM losses on every rank of the pp group.
    """

    def __init__(
        self,
        plan: PipelinePlan,
        schedule: PipelineSchedule,
        group: dist.ProcessGroup,
        device: torch.device,
        train: TrainConfig,
        dp: int,
        hidden_dtype: torch.dtype = torch.float32,
        tp_mesh: DeviceMesh | None = None,
    ):
        parts, stage_ids, n_stages = plan.parts, plan.stage_ids, plan.n_stages
        self.parts, self.stage_ids, self.group = parts, stage_ids, group
        # The trainer's accumulation micro-batches of one step (see GlobalBatchSampler).
        self.n_microbatches = train.global_batch_size // (train.micro_batch_size * dp)
        self.shape = (train.micro_batch_size, train.seq_len)
        self.device = device
        self._losses: list[torch.Tensor] = []
        self._stats = None
        self.tp = tp_mesh is not None
        m, S = self.shape
        stages = []
        for part, s in zip(parts, stage_ids):
            # sequence-sharded under TP; with a recurrent router (RMoE) its state rides
            # beside the hidden states (Transformer.boundary_dim)
            hidden = (m, S, part.boundary_dim)
            logits = (m, S, part.vocab_size)  # vocabulary-sharded under TP
            x_shape, x_dim = ((m, S), None) if s == 0 else (hidden, 1)
            y_shape, y_dim = (logits, 2) if s == n_stages - 1 else (hidden, 1)
            if s == 0:  # token ids: no gradient
                x, dx = torch.empty(x_shape, dtype=torch.long, device="meta"), None
            else:
                x = _example(x_shape, hidden_dtype, tp_mesh, x_dim, True)
                dx = _example(x_shape, hidden_dtype, tp_mesh, x_dim, False)
            y = _example(y_shape, hidden_dtype, tp_mesh, y_dim, True)
            dy = _example(y_shape, hidden_dtype, tp_mesh, y_dim, False)
            grads = {}
            if self.tp:  # DTensor boundaries need their gradients' layouts too
                grads = {"input_grads": (dx,), "output_grads": dy}
            # Static shapes: no metadata-inference forward (which would run the MoE layers,
            # their collectives and statistics on placeholder data).
            stages.append(PipelineStage(part, s, n_stages, device, input_args=x,
                                        output_args=y, group=group, **grads))
        name = PipelineSchedule(schedule).value
        # Keep FSDP-sharded stages gathered from forward to backward (as torchtitan does
        # under PP). Otherwise every micro-batch re-gathers each block's parameters twice.
        # Zero bubble needs it for correctness too: the input half of its split backward
        # collects the stage's parameters before it runs, and blocks resharded after their
        # forward would hand it sharded DTensors that are not in the graph (no gradient).
        for part in parts:
            if isinstance(part, FSDPModule):
                part.set_reshard_after_forward(False)
        kwargs = {"n_microbatches": self.n_microbatches, "loss_fn": self._loss_fn,
                  "scale_grads": False}
        if name in _SINGLE:
            self.schedule = _SINGLE[name](stages[0], **kwargs)
        else:
            self.schedule = _MULTI[name](stages, **kwargs)
        self.has_last = n_stages - 1 in stage_ids
        for part in parts:
            for layer in part.moe_layers():
                layer.register_forward_hook(self._record_stats)
        # Modules every stage holds a copy of (RMoE's shared router cell), like tied
        # weights: their gradients are summed over the copies (sync_tied_grads).
        self.tied = [part.router_rnn for part in parts
                     if getattr(part, "router_rnn", None) is not None]
        self.owns_tied = bool(self.tied) and 0 in stage_ids

    @torch.no_grad()
    def sync_tied_grads(self) -> None:
        """Sum the gradients of the tied copies over this rank's stages and the pp group,
        and give every copy the sum (a copy on a stage without MoE layers, or that got no
        gradient, adds zero), so each copy takes the same optimizer step. Called once
        the data-parallel reduction is done (:meth:`ParallelModel.clip_grad_norm_`)."""
        if not self.tied:
            return
        for name, _ in self.tied[0].named_parameters():
            params = [dict(m.named_parameters())[name] for m in self.tied]
            local = [_local_of(p) for p in params]
            total = torch.zeros_like(local[0])
            for p in params:
                if p.grad is not None:
                    total += _local_of(p.grad)
            dist.all_reduce(total, group=self.group)
            for p in params:
                if isinstance(p, DTensor):
                    p.grad = DTensor.from_local(total.clone(), p.device_mesh, p.placements,
                                                shape=p.shape, stride=p.stride(),
                                                run_check=False)
                else:
                    p.grad = total.clone()

    def uncounted_params(self) -> list[nn.Parameter]:
        """Tied copies whose gradients the global norm must not count again: all but
        stage 0's copy."""
        if not self.tied:
            return []
        keep = self.tied[0] if self.owns_tied else None
        return [p for m in self.tied if m is not keep for p in m.parameters()]

    # The loss of one micro-batch on the last stage. Scaled like the 1-process
    # `(loss / accum).backward()`; the unscaled value is kept for logging.
    def _loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = local_loss(F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()))
        self._losses.append(loss.detach())
        return loss / self.n_microbatches

    def _record_stats(self, layer: nn.Module, args, output) -> None:
        if self._stats is not None and layer.training and not _in_backward():
            self._stats.accumulate(only=layer)

    def _run(self, batches: list[tuple[torch.Tensor, torch.Tensor]],
             train: bool) -> list[torch.Tensor]:
        """One schedule run; returns its micro-batch losses (empty off the last stage)."""
        self._losses.clear()
        inputs = torch.cat([b[0] for b in batches]).to(self.device)
        targets = torch.cat([b[1] for b in batches]).to(self.device)
        # Under TP the loss runs on vocabulary-sharded logits, forward and backward inside.
        with loss_context(self.tp):
            if train:
                self.schedule.step(inputs, target=targets, return_outputs=False)
            else:
                self.schedule.eval(inputs, target=targets)
        return self._losses[-self.n_microbatches:] if self.has_last else []

    def _sum_over_pp(self, losses: list[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for loss in losses:  # in micro-batch order, like the 1-process accumulation
            total += loss
        dist.all_reduce(total, group=self.group)  # only the last stage holds losses
        return total

    def step(self, batches: list[tuple[torch.Tensor, torch.Tensor]], stats=None) -> torch.Tensor:
        """Forward and backward of one step's micro-batches ``[(inputs, targets), ...]``.

        ``stats`` (a MoEStatsTracker) accumulates each local MoE layer's router statistics
        once per micro-batch. Returns the sum of the micro-batch LM losses.
        """
        if len(batches) != self.n_microbatches:
            raise ValueError(f"the pipeline schedule runs {self.n_microbatches} micro-batches "
                             f"per step, got {len(batches)}")
        self._stats = stats
        try:
            losses = self._run(batches, train=True)
        finally:
            self._stats = None
        return self._sum_over_pp(losses)

    @torch.no_grad()
    def eval(self, batches: list[tuple[torch.Tensor, torch.Tensor]], pad_to: int) -> torch.Tensor:
        """Sum of the LM losses of ``batches``, forward only.

        The schedule takes ``n_microbatches`` at a time, so the list is padded (padding
        losses are dropped) to ``ceil(pad_to / n_microbatches)`` schedule runs: pass the
        same ``pad_to`` on every rank so that collectives inside the stages (expert
        all-to-all) meet.
        """
        n = self.n_microbatches
        runs = -(-max(pad_to, len(batches)) // n)
        filler = torch.zeros(self.shape, dtype=torch.long, device=self.device)
        padded = list(batches) + [(filler, filler)] * (runs * n - len(batches))
        losses = []
        for r in range(runs):
            losses += self._run(padded[r * n:(r + 1) * n], train=False)
        return self._sum_over_pp(losses[:len(batches)])
