"""Tutel's adaptive parallelism (Hwang et al., 2023, arXiv 2206.03382): fewer experts than
expert-parallel ranks, one stored layout, and the way to run it chosen per step.

**The stored layout.** With E experts on an ep group of W > E ranks, each expert is held
by s = W/E ranks (the sharded count): rank q = e*s + j holds slice j of expert e's hidden
dimension F (w1, w3 rows and w2 columns [j*F/s, (j+1)*F/s)). The weights are DTensors
on a 2-D view of the ep axis, (``ep_e``, ``ep_f``) = (E, s), placed ``[Shard(0),
Shard(1)]`` (w2: ``Shard(2)``): their global shape is (E, F, D) as under every other
layout, so checkpoints reshard to and from any ep, and the optimizer state never moves.

**The ways to run it** (Tutel's r, ``valid_rs = {0} U divisors(s)``):

- r = 0 (gathered): all-gather every expert's slices over the whole group and run all E
  experts on this rank's own rows; no all-to-all.
- r = 1 (expert-parallel): all-gather each expert's slices within its s ranks; each of
  them receives 1/s of the expert's rows by all-to-all.
- 1 < r <= s: all-gather within groups of s/r consecutive ranks (slices of F/r); every
  routed row is sent r times, each copy to one slice group and split over its s/r ranks;
  the r partial outputs are summed. r = s moves no weights (expert-tensor-parallel).

The all-gathers are autograd-aware (backward: reduce-scatter), so the gradients land on
the same shards in every mode, and every mode computes the same function (SwiGLU is a sum
over hidden units). :func:`choose_r` picks r per layer call from the step's routed rows
(a cost model in the spirit of Tutel's rule, which compared ``tokens*(s-1)*2`` with the
expert parameters); ``parallel.expert_r`` pins it.

Legend: T tokens, D model dim, E experts, F expert hidden, K top-k, W ep ranks, s sharded
count (W/E), R routed rows on this rank, N_e rows routed to expert e over the group.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import _functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from moetrain.config.recipes import recipe_values
from moetrain.config.schema import ConfigError, DispatchMode, ExpertMode, MoEConfig
from moetrain.models.moe.dispatcher import (
    DispatchMeta,
    LocalDispatcher,
    _all_to_all,
    max_over_group,
)
from moetrain.models.moe.experts import _local


def sharded_count(num_experts: int, ep: int) -> int:
    """Ranks that share one expert: ep / E when there are fewer experts than ep ranks."""
    return ep // num_experts if ep > num_experts else 1


def valid_rs(s: int) -> list[int]:
    """Tutel's valid parallel degrees for sharded count s: 0 and the divisors of s."""
    return [0] + [r for r in range(1, s + 1) if s % r == 0]


# ----------------------------------------------------------------------------- cost model
@dataclass(frozen=True)
class ModeCost:
    """Elements one rank moves in a forward and backward of one MoE layer in mode r."""

    r: int
    weight_elems: float  # received by weight all-gathers (fwd) + sent by reduce-scatters (bwd)
    token_elems: float  # the busiest rank's all-to-all rows x D, dispatch + combine, fwd + bwd

    @property
    def total(self) -> float:
        return self.weight_elems + self.token_elems


def mode_costs(rows: int, max_expert_rows: int, dim: int, expert_params: int,
               num_experts: int, s: int) -> list[ModeCost]:
    """The communication of every valid r, in elements per rank.

    ``rows``: the most rows any rank routes (R); ``max_expert_rows``: the most rows any
    expert receives over the group (max_e N_e); ``expert_params``: one expert's weights
    (3 F D for SwiGLU).

    - Weights: mode r all-gathers each local slice (P/s) into a slice of P/r, receiving
      P/r - P/s in the forward and reduce-scattering as much in the backward; r = 0
      gathers all E experts: E P - P/s each way.
    - Tokens: every rank sends r R rows; the busiest receives r max_e N_e / s (each of the
      expert's s ranks gets 1/(s/r) of one of r copies). Dispatch and combine, forward
      and backward: 4 x the larger of the two, times D. r = 0 sends nothing.
    """
    P = float(expert_params)
    out = []
    for r in valid_rs(s):
        if r == 0:
            out.append(ModeCost(0, 2 * (num_experts * P - P / s), 0.0))
            continue
        busiest = max(r * rows, r * max_expert_rows / s)
        out.append(ModeCost(r, 2 * (P / r - P / s), 4.0 * busiest * dim))
    return out


def choose_r(rows: int, max_expert_rows: int, dim: int, expert_params: int,
             num_experts: int, s: int) -> int:
    """The r that moves the fewest elements (:func:`mode_costs`); ties go to r = 1,
    Tutel's default, then to the smaller r."""
    costs = mode_costs(rows, max_expert_rows, dim, expert_params, num_experts, s)
    return min(costs, key=lambda c: (c.total, c.r != 1, c.r)).r


# ----------------------------------------------------------------------------- dispatcher
def _parts(n: int, g: int) -> list[int]:
    """n rows split into g near-equal consecutive parts (the first parts the smaller)."""
    return [(b + 1) * n // g - b * n // g for b in range(g)]


@dataclass(frozen=True)
class ShardedPlan:
    """One layer call's exchange in mode r (host lists, known on every rank).

    in_splits / out_splits: rows sent to / received from each of the W ranks.
    send_idx: this rank's rows (expert-major, as the local sort left them) repeated r
        times per expert block, in send order; None when the send order is the rows'
        own order (r = 1) or nothing is sent (r = 0).
    blocks: rows of each expert on this rank (to sum the r copies back).
    recv_rows: rows this rank's expert slice receives, as a host int.
    """

    r: int
    in_splits: list[int]
    out_splits: list[int]
    send_idx: torch.Tensor | None
    blocks: list[int]
    recv_rows: int


@dataclass(frozen=True)
class ShardedMeta:
    """The layer's fields of :class:`DispatchMeta` and the plan ``run`` executes."""

    local: DispatchMeta
    plan: ShardedPlan
    tokens_per_expert: torch.Tensor
    num_dropped: torch.Tensor
    run: object
    rows_per_expert: int | None = None


class ShardedExpertDispatcher:
    """Dispatch for experts sharded along F over s ranks each (module docstring).

    ``dispatch`` sorts this rank's rows by expert (:class:`LocalDispatcher`, the same
    capacity and drop rules), agrees on r with the other ep ranks and plans the
    exchange; the experts' module call then hands its rows to ``run``, which gathers the
    weights of mode r, exchanges, computes and returns the outputs in the sorted rows'
    order, so ``combine`` is the local one. In dropless mode the ranks' per-expert counts
    are all-gathered once per call (one host read): every split and the cost model's
    inputs follow from them. Capacity mode reads nothing back.
    """

    def __init__(self, experts: nn.Module, num_experts: int, group: dist.ProcessGroup,
                 mesh: DeviceMesh, slice_groups: dict[int, dist.ProcessGroup],
                 moe_cfg: MoEConfig, pinned_r: int | None, mode: ExpertMode) -> None:
        capacity = (moe_cfg.capacity_factor if moe_cfg.dispatch == DispatchMode.capacity
                    else None)
        recipe = recipe_values(moe_cfg)
        self.local = LocalDispatcher(num_experts, capacity, moe_cfg.kernel_backend,
                                     recipe["drop_policy"], recipe["capacity_rule"])
        self.local.agree_capacity = max_over_group(group)  # capacity_factor <= 0: one C
        self.experts, self.num_experts, self.group = experts, num_experts, group
        self.mesh = mesh  # (ep_e, ep_f)
        self.W = dist.get_world_size(group)
        self.s = self.W // num_experts
        q = dist.get_rank(group)
        self.e, self.j = divmod(q, self.s)
        # r -> the group of s/r consecutive ranks whose slices make one slice of F/r
        self.slice_groups = slice_groups
        self.pinned_r, self.mode = pinned_r, ExpertMode(mode)
        self.step = 0  # steps taken (``take_modes``): the cycle's position
        self.bytes_sent = 0  # token bytes through all-to-all since the last reset
        self.bytes_gathered = 0  # weight bytes received by all-gathers since the last reset
        self.r_sum, self.r_calls = 0, 0  # the modes of this step's calls
        # Count the bytes of a training call's first run only: not validation, not the
        # recompute of activation checkpointing.
        self._count_gathers = False

    # -- the choice
    def _choose(self, rows: int, max_expert_rows: int, dim: int) -> int:
        if self.pinned_r is not None:
            return self.pinned_r
        if self.mode == ExpertMode.cycle:
            rs = valid_rs(self.s)
            return rs[self.step % len(rs)]
        if self.mode == ExpertMode.fixed:
            return 1
        w = self.experts.w1_EFD
        params = 3 * w.shape[1] * w.shape[2]
        return choose_r(rows, max_expert_rows, dim, params, self.num_experts, self.s)

    def take_modes(self) -> float | None:
        """The mean r of the calls since the last take (None if none), then reset; once
        per training step (it also moves ``expert_mode=cycle`` on)."""
        self.step += 1
        if not self.r_calls:
            return None
        mean = self.r_sum / self.r_calls
        self.r_sum = self.r_calls = 0
        return mean

    # -- the plan
    def _plan(self, r: int, counts_WE: list[list[int]], device: torch.device) -> ShardedPlan:
        """Splits of mode r from every rank's per-expert rows ``counts_WE``."""
        W, s, E = self.W, self.s, self.num_experts
        me = counts_WE[dist.get_rank(self.group)]
        if r == 0:
            return ShardedPlan(0, [0] * W, [0] * W, None, me, sum(me))
        g = s // r  # ranks per slice group
        b = self.j % g  # my part of the rows of my F/r slice (slice j // g)
        in_splits = [p for e in range(E) for _ in range(r) for p in _parts(me[e], g)]
        out_splits = [_parts(counts[self.e], g)[b] for counts in counts_WE]
        send_idx = None
        if r > 1:
            starts = [sum(me[:e]) for e in range(E)]
            send_idx = torch.cat([torch.arange(starts[e], starts[e] + me[e], device=device)
                                  .repeat(r) for e in range(E)]) if E else None
        return ShardedPlan(r, in_splits, out_splits, send_idx, me, sum(out_splits))

    @torch.compiler.disable  # host-side splits: run eagerly
    def dispatch(self, x_TD, ids_TK, weights_TK, active_TK=None):
        x_RD, lmeta = self.local.dispatch(x_TD, ids_TK, weights_TK, active_TK)
        E, W, D = self.num_experts, self.W, x_TD.shape[1]
        C = lmeta.rows_per_expert
        if C is None:  # every rank's per-expert rows: one all-gather, one host read
            counts = lmeta.tokens_per_expert.contiguous()
            all_counts = torch.empty(W * E, dtype=counts.dtype, device=counts.device)
            dist.all_gather_into_tensor(all_counts, counts, group=self.group)
            flat = all_counts.tolist()
            counts_WE = [flat[w * E:(w + 1) * E] for w in range(W)]
        else:  # E blocks of C rows on every rank
            counts_WE = [[C] * E for _ in range(W)]
        rows = max(sum(c) for c in counts_WE)
        max_expert_rows = max(sum(c[e] for c in counts_WE) for e in range(E))
        r = self._choose(rows, max_expert_rows, D)
        self._count_gathers = torch.is_grad_enabled()
        if torch.is_grad_enabled():  # training calls only: validation is not logged
            self.r_sum, self.r_calls = self.r_sum + r, self.r_calls + 1
        plan = self._plan(r, counts_WE, x_RD.device)
        meta = ShardedMeta(local=lmeta, plan=plan, tokens_per_expert=lmeta.tokens_per_expert,
                           num_dropped=lmeta.num_dropped, rows_per_expert=C,
                           run=functools.partial(self.run, plan, lmeta))
        return x_RD, meta

    # -- the weights of mode r
    def _gather(self, w: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        n = dist.get_world_size(group)
        if n == 1:
            return w
        out = funcol.wait_tensor(funcol.all_gather_tensor_autograd(w.contiguous(), dim, group))
        if self._count_gathers:
            self.bytes_gathered += (out.numel() - w.numel()) * w.element_size()
        return out

    def weights(self, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1, w3, w2) of mode r as local tensors: (E, F, D) for r = 0, else this rank's
        expert's slice of F/r. Autograd reduce-scatters the gradients back to the shards."""
        ex = self.experts
        ws = [_local(ex.w1_EFD), _local(ex.w3_EFD), _local(ex.w2_EDF)]
        fdim = (1, 1, 2)
        if r == 0:
            f_group = self.mesh.get_group("ep_f")
            e_group = self.mesh.get_group("ep_e")
            ws = [self._gather(self._gather(w, d, f_group), 0, e_group)
                  for w, d in zip(ws, fdim)]
        else:
            group = self.slice_groups[r]
            ws = [self._gather(w, d, group) for w, d in zip(ws, fdim)]
        return ws[0], ws[1], ws[2]

    @torch.compiler.disable  # collectives with host-side splits: run eagerly
    def run(self, plan: ShardedPlan, lmeta: DispatchMeta, x_RD: torch.Tensor,
            compute) -> torch.Tensor:
        """Exchange, compute and exchange back in mode ``plan.r``; the experts' output rows
        in ``x_RD``'s order. ``compute`` (the module's SwiGLU on its own slice) serves
        r = s; the other modes call the module's compute on gathered weights."""
        try:
            return self._run(plan, lmeta, x_RD, compute)
        finally:
            self._count_gathers = False  # a recompute of this call is not counted again

    def _run(self, plan: ShardedPlan, lmeta: DispatchMeta, x_RD: torch.Tensor,
             compute) -> torch.Tensor:
        r, ex = plan.r, self.experts
        if r == 0:
            return ex._compute(self.weights(0), x_RD, lmeta.tokens_per_expert,
                               lmeta.rows_per_expert)
        send = x_RD if plan.send_idx is None else x_RD.index_select(0, plan.send_idx)
        recv = _all_to_all(send, plan.out_splits, plan.in_splits, self.group)
        row_bytes = x_RD.shape[1] * x_RD.element_size()
        counts = torch.tensor([plan.recv_rows], dtype=torch.int64, device=x_RD.device)
        rows = plan.recv_rows if lmeta.rows_per_expert is not None else None
        if r == self.s:
            y = compute(recv, counts, rows)
        else:
            y = ex._compute(self.weights(r), recv, counts, rows)
        back = _all_to_all(y, plan.in_splits, plan.out_splits, self.group)
        if self._count_gathers:
            self.bytes_sent += (sum(plan.in_splits) + sum(plan.out_splits)) * row_bytes
        if r == 1:
            return back
        # Each expert block came back r times (partial sums over F): add the copies.
        outs, at, D = [], 0, back.shape[1]
        for n in plan.blocks:
            outs.append(back[at:at + r * n].view(r, n, D).sum(0))
            at += r * n
        return torch.cat(outs) if outs else back

    def combine(self, y_RD, meta: ShardedMeta):
        return self.local.combine(y_RD, meta.local)

    def skip_rows(self, rows: torch.Tensor, row_bytes: int) -> None:
        raise NotImplementedError("zero-computation experts are refused with sharded experts")

    def dense(self, x_TD, experts):
        raise NotImplementedError("dense expert steps are refused with sharded experts")


# ----------------------------------------------------------------------------- wiring
def sharded_expert_mesh(expert_ranks: torch.Tensor, num_experts: int, device_type: str,
                        ) -> tuple[DeviceMesh, dict[int, DeviceMesh]]:
    """The (pp, edp, ep_e, ep_f) view of the expert ranks (pp, edp, ep) with ep split as
    (E, s), and for each r in divisors(s) a (pp, edp, ep_e, ep_a, ep_b) view whose ep_b
    groups are the s/r consecutive ranks that gather one slice of F/r. Collective: every
    rank builds every view, in the same order."""
    pp, edp, ep = expert_ranks.shape
    s = ep // num_experts
    mesh = DeviceMesh(device_type, expert_ranks.reshape(pp, edp, num_experts, s),
                      mesh_dim_names=("pp", "edp", "ep_e", "ep_f"))
    views = {}
    for r in valid_rs(s)[1:]:
        views[r] = DeviceMesh(device_type, expert_ranks.reshape(pp, edp, num_experts, r, s // r),
                              mesh_dim_names=("pp", "edp", "ep_e", "ep_a", "ep_b"))
    return mesh, views


def apply_sharded_ep(moe_layers: list[nn.Module], ep_mesh: DeviceMesh, mesh: DeviceMesh,
                     views: dict[int, DeviceMesh], moe_cfg: MoEConfig, pinned_r: int | None,
                     mode: ExpertMode) -> None:
    """Shard each layer's E experts along F over s = ep / E ranks each, and hand the layer
    a :class:`ShardedExpertDispatcher` on the ep group."""
    em = mesh["ep_e", "ep_f"]
    groups = {r: v.get_group("ep_b") for r, v in views.items()}
    for layer in moe_layers:
        experts = layer.experts
        for name, param in list(experts.named_parameters(recurse=False)):
            fdim = 2 if name == "w2_EDF" else 1
            if param.shape[fdim] % em.size(1):
                raise ConfigError(
                    f"model.expert_hidden={param.shape[fdim]} is not divisible by the "
                    f"sharded count {em.size(1)} (parallel.ep / model.num_experts): pick an "
                    f"expert_hidden that is a multiple of {em.size(1)}")
            dt = distribute_tensor(param.data, em, [Shard(0), Shard(fdim)])
            experts.register_parameter(name, nn.Parameter(dt, requires_grad=param.requires_grad))
        layer.set_dispatcher(ShardedExpertDispatcher(
            experts, layer.num_ffn_experts, ep_mesh.get_group(), em, groups, moe_cfg,
            pinned_r, mode))


def weight_gather_bytes(moe_layers: list[nn.Module]) -> int:
    """Expert-weight bytes this rank received by all-gathers since the last call (then
    reset): the weight traffic of modes r < s."""
    total = 0
    for layer in moe_layers:
        d = layer.dispatcher
        if isinstance(d, ShardedExpertDispatcher):
            total += d.bytes_gathered
            d.bytes_gathered = 0
    return total


def expert_modes(moe_layers: list[nn.Module]) -> dict[int, float]:
    """Layer index -> the mean r of its calls since the last read (sharded experts only)."""
    out = {}
    for layer in moe_layers:
        d = layer.dispatcher
        if isinstance(d, ShardedExpertDispatcher):
            r = d.take_modes()
            if r is not None:
                out[layer.router.layer_idx] = r
    return out

