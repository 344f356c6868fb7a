"""The MoE layer: router -> dispatch -> experts -> combine (+ shared experts).

Three designs change the layer itself (docs/designs.md): Chain-of-Experts runs
``moe.chain_iterations`` rounds of it, each on the previous round's output; RMoE's
recurrent router takes and returns a state carried from layer to layer; CompeteSMoE's
competition steps run every expert on every token (``dispatcher.dense``).

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, R routed rows.

Auxiliary losses are not returned. They ride on the layer's output through
:class:`AuxLossInjector`, so any backward through the output (a plain loss, gradient
accumulation, a pipeline stage's backward) also back-propagates
``aux_loss_scale * (aux_loss_coef * balance + z_loss_coef * z)``. The balance loss, both
coefficients and the capacity rule are the router's training recipe unless the config sets
them (:func:`moetrain.config.recipes.recipe_values`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config.recipes import recipe_values
from moetrain.config.schema import (
    AuxLossScope,
    BalanceLoss,
    ChainResidual,
    ChainRouter,
    DispatchMode,
    ModelConfig,
    MoEConfig,
    RouterType,
)
from moetrain.models.moe.dispatcher import Dispatcher, LocalDispatcher
from moetrain.models.moe.experts import FeedForward, build_routed_experts
from moetrain.models.moe.losses import (
    evomoe_balance_loss,
    load_balancing_loss,
    router_entropy,
    seq_load_balancing_loss,
    size_weighted_balance_loss,
    xmoe_balance_loss,
    z_loss,
)
from moetrain.models.moe.router import CompeteRouter, RouterOutput, build_router


class AuxLossInjector(torch.autograd.Function):
    """Identity on ``out`` whose backward also seeds ``aux`` with gradient ``scale``.

    forward(out, aux, scale) = out; backward: d/d out = grad_out, d/d aux = scale.
    Equivalent to adding ``scale * aux`` to the final loss, without returning ``aux``
    (Megatron-core's MoEAuxLossAutoScaler, with the scale held per layer, not per class).
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux)
        ctx.scale = float(scale)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        (aux,) = ctx.saved_tensors
        return grad_out, torch.full_like(aux, ctx.scale), None


@dataclass(frozen=True)
class MoEStats:
    """Detached routing statistics of the last forward, read by metrics and callbacks.

    load_E: float32 (E,) routed rows per expert in this micro-batch (before any drop).
    aux_loss: raw load-balancing loss (no coefficient; global-batch counts if reduced).
    z_loss: raw router z-loss.
    num_dropped: int64, (token, slot) rows dropped for capacity.
    num_routed: int64, rows routed in this micro-batch (T*K, fewer with a variable k).
    entropy: mean per-token routing entropy (nats).
    router_loss: the router's own weighted loss (noisy top-k), 0 if it has none.
    num_unrouted: int64, tokens that reach no expert (expert-choice leaves some out).
    num_tokens: int64, tokens of the micro-batch.
    num_null: int64, slots routed to MoE++'s zero-computation experts (not in num_routed).
    """

    load_E: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    num_dropped: torch.Tensor
    num_routed: torch.Tensor
    entropy: torch.Tensor
    router_loss: torch.Tensor
    num_unrouted: torch.Tensor
    num_tokens: torch.Tensor
    num_null: torch.Tensor | None = None


class MoELayer(nn.Module):
    """Sparse SwiGLU FFN with ``model.num_experts`` routed experts and optional shared ones.

    Runtime hooks, set by the trainer or parallel wiring (never by the config):
    - ``dispatcher`` (via :meth:`set_dispatcher`): LocalDispatcher by default; an
      expert-parallel dispatcher follows the same protocol.
    - ``aux_loss_scale``: multiplies the injected aux gradient (e.g. 1/accumulation steps).
    - ``count_reducer``: sums the per-expert counts over the tp ranks that route
      sequence shards of the same micro-batch. It receives an int64 vector: the E counts
      followed by the routed-row count (``balance_loss=seq``: B*E per-sequence counts).
    - ``count_prefix``: for ``moe.aux_loss_scope=global_batch`` with dp > 1, maps this
      rank's counts to (counts of this round's micro-batches of dp ranks <= this one,
      counts of the whole round) (``parallel.expert.count_prefix_reducer``).

    Global-batch statistics (``moe.aux_loss_scope=global_batch``, Megatron-core's
    ``global_aux_loss``; Qiu et al. 2025, arXiv 2501.11873): the counts of f accumulate
    over the micro-batches of the optimizer step in global order, so global micro-batch g
    of a step (rank r's j-th is g = j * dp + r) uses the counts of micro-batches 0..g of
    the step. That is what one process running the same micro-batches sees, so the
    losses are the same under every layout. The routing-context callback calls
    :meth:`reset_step_counts` when a step starts; evaluation forwards use the counts of
    their own round, and a recompute (activation checkpointing) reuses its forward's.
    """

    def __init__(self, dim: int, model_cfg: ModelConfig, moe_cfg: MoEConfig) -> None:
        super().__init__()
        self.dim = dim
        self.top_k = model_cfg.top_k
        recipe = recipe_values(moe_cfg)  # the config's values, or the router's recipe
        self.aux_loss_coef = recipe["aux_loss_coef"]
        self.z_loss_coef = recipe["z_loss_coef"]
        self.balance_loss = recipe["balance_loss"]
        self.global_scope = AuxLossScope(moe_cfg.aux_loss_scope) == AuxLossScope.global_batch
        # Global-batch counts of this step, per chain round (one entry without a chain).
        self.round_counts: list[torch.Tensor | None] = []
        # The accumulated counts each training forward of this step used, per round, so
        # that the recompute of micro-batch j (pipeline schedules run later forwards
        # first) uses the same f; ``micro_index`` is set by the routing-context callback.
        self.round_history: list[list[torch.Tensor]] = []
        self.micro_index: int | None = None
        self.seq_shards = 1  # tp ranks that each hold a shard of every sequence
        self.seq_shard_rank = 0
        # MoE++ zero-computation experts: ids E.. of the router, in MoE++'s order
        # (SkyworkAI/MoE-plus-plus Experts): constant, copy, zero. Never dispatched.
        self.num_ffn_experts = model_cfg.num_experts
        self.num_constant = model_cfg.constant_experts
        self.num_copy = model_cfg.copy_experts
        self.num_zero = model_cfg.zero_experts
        self.num_null = model_cfg.null_experts
        self.num_experts = model_cfg.num_experts + self.num_null  # what the router scores
        self.null_tau = float(moe_cfg.null_expert_tau)
        self.router = build_router(dim, self.num_experts, model_cfg.top_k, moe_cfg.router)
        self.router.kernel_backend = moe_cfg.kernel_backend  # fused Triton top-k when selected
        # Chain-of-Experts: C rounds; rounds 1.. have their own routers (per_iteration),
        # which share round 0's routing context (step, seed, token keys).
        self.chain_iterations = moe_cfg.chain_iterations
        residual = moe_cfg.chain_residual or (ChainResidual.inner if self.chain_iterations > 1
                                              else ChainResidual.outer)
        self.chain_residual = ChainResidual(residual)
        self.inner_residual = self.chain_residual != ChainResidual.outer
        # False: the block's output is this layer's output alone (CoE's inner residual:
        # x_C, where x_0 is the normalised input); True: the block adds its residual h.
        self.adds_block_residual = self.chain_residual != ChainResidual.inner
        self.chain_routers = nn.ModuleList()
        if (self.chain_iterations > 1
                and ChainRouter(moe_cfg.chain_router) == ChainRouter.per_iteration):
            for _ in range(self.chain_iterations - 1):
                r = build_router(dim, self.num_experts, model_cfg.top_k, moe_cfg.router)
                r.kernel_backend = moe_cfg.kernel_backend
                r.context = self.router.context
                self.chain_routers.append(r)
        self.is_compete = RouterType(moe_cfg.router.name) == RouterType.compete
        # Uniform GroupedExperts, or HMoE's RaggedExperts (model.expert_sizes): one stack
        # per size class, rows sorted by expert slot (the dispatcher's expert_order).
        self.experts = build_routed_experts(dim, model_cfg, moe_cfg)
        self.expert_sizes = model_cfg.expert_sizes  # size_weighted balance loss
        self.shared_experts = (
            FeedForward(dim, model_cfg.n_shared_experts * model_cfg.expert_hidden)
            if model_cfg.n_shared_experts > 0 else None
        )
        # MoE++'s constant experts: E_j(x) = a_1 x + a_2 v_j, [a_1, a_2] = softmax(W_j x)
        # (eq. 5); v_j (D,) and W_j (2, D), no bias.
        if self.num_constant:
            self.constant_v = nn.Parameter(torch.empty(self.num_constant, dim))
            self.constant_gate = nn.Parameter(torch.empty(self.num_constant, 2, dim))
        else:
            self.constant_v = self.constant_gate = None
        capacity = (moe_cfg.capacity_factor
                    if DispatchMode(moe_cfg.dispatch) == DispatchMode.capacity else None)
        self.dispatcher: Dispatcher = LocalDispatcher(model_cfg.num_experts, capacity,
                                                      moe_cfg.kernel_backend,
                                                      recipe["drop_policy"],
                                                      recipe["capacity_rule"],
                                                      getattr(self.experts, "expert_order",
                                                              None))
        self.aux_loss_scale: float = 1.0
        self.count_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.count_prefix: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.last_stats: MoEStats | None = None
        # Per chain round (C > 1): each round's statistics of the last forward.
        self.last_round_stats: list[MoEStats] = []
        self.competed = False  # the last training forward was a competition step
        # The recurrent router's new state after the last forward (handed to the block).
        self.state_out: torch.Tensor | None = None

    @property
    def routers(self) -> list[nn.Module]:
        """The router of each distinct chain round (round 0's first)."""
        return [self.router, *self.chain_routers]

    def round_router(self, t: int) -> nn.Module:
        return self.router if t == 0 or not len(self.chain_routers) else self.chain_routers[t - 1]

    def set_layer_idx(self, layer_idx: int) -> None:
        """Key the routers' random draws: round t of layer i draws as layer i + t * 2^16."""
        for t, r in enumerate(self.routers):
            r.layer_idx = layer_idx + (t << 16)

    def set_dispatcher(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    def init_weights(self, init_std: float, out_std: float) -> None:
        for r in self.routers:
            r.init_weights(init_std)
        self.experts.init_weights(init_std, out_std)
        if self.constant_v is not None:  # MoE++: v ~ N(0, 1) (its code), W ~ N(0, init_std)
            nn.init.normal_(self.constant_v, mean=0.0, std=1.0)
            nn.init.normal_(self.constant_gate, mean=0.0, std=init_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(init_std, out_std)

    def reset_step_counts(self) -> None:
        """Start a new optimizer step's global-batch counts."""
        self.round_counts = [None] * self.chain_iterations
        self.round_history = [[] for _ in range(self.chain_iterations)]

    @property
    def step_counts(self) -> torch.Tensor | None:
        """Round 0's global-batch counts of this step."""
        return self.round_counts[0] if self.round_counts else None

    def forward(self, x: torch.Tensor, router_state: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's output for ``x`` (B, S, D) or (T, D).

        ``router_state``: the recurrent router's state from the previous MoE layer (T, H)
        (None: zeros); its new state is left in ``state_out``. With a chain (CoE) the
        rounds run in order, each routing the previous round's output.
        """
        shape = x.shape
        x_TD = x.reshape(-1, self.dim)
        if self.is_compete and self.router.competes():
            out_TD, aux = self._compete(x_TD)
            self.competed = True
        else:
            self.competed = False
            out_TD, aux = self._chain(x_TD, shape, router_state)
        out = out_TD.view(shape)
        if aux is not None and aux.requires_grad:
            out = AuxLossInjector.apply(out, aux, self.aux_loss_scale)
        return out

    def _route(self, router: nn.Module, x_TD: torch.Tensor, batch: int,
               state_TH: torch.Tensor | None) -> RouterOutput:
        if getattr(router, "recurrent", False):
            return router(x_TD, state_TH)
        if getattr(router, "seq_gather", None) is not None and router.whole_batch:
            return router.forward_gathered(x_TD, batch)
        return router(x_TD)

    def _chain(self, x_TD: torch.Tensor, shape: torch.Size,
               state_TH: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The C rounds of route -> dispatch -> experts -> combine (+ shared experts)."""
        terms: list[torch.Tensor] = []
        stats: list[MoEStats] = []
        cur_TD = x_TD
        for t in range(self.chain_iterations):
            router = self.round_router(t)
            routed = self._route(router, cur_TD, shape[0], state_TH)
            if routed.state_TH is not None:
                state_TH = routed.state_TH
            if self.num_null:
                routed = self._null_weights(routed, router)
            ids_TK, active_TK = routed.ids_TK, routed.active_TK
            if self.num_null:  # only the FFN slots are dispatched
                null_TK = ids_TK >= self.num_ffn_experts
                ffn_TK = ~null_TK if active_TK is None else active_TK & ~null_TK
                ids_TK, active_TK = torch.where(null_TK, 0, ids_TK), ffn_TK
            extra = () if active_TK is None else (active_TK,)
            x_RD, meta = self.dispatcher.dispatch(cur_TD, ids_TK, routed.weights_TK, *extra)
            # A dispatcher that moves rows inside the experts' call (chunked all-to-all)
            # hands its ``run`` over; the experts' output is in x_RD's order either way.
            run = {} if meta.run is None else {"run": meta.run}
            y_RD = self.experts(x_RD, meta.tokens_per_expert, meta.rows_per_expert, **run)
            y_TD = self.dispatcher.combine(y_RD, meta)
            if self.num_null:
                y_TD = y_TD + self._null_out(cur_TD, routed)
                kept_TK = null_TK if routed.active_TK is None else null_TK & routed.active_TK
                self.dispatcher.skip_rows(kept_TK.sum(), cur_TD.shape[1] * cur_TD.element_size())
            if self.shared_experts is not None:  # re-run every round (CoE's official code)
                y_TD = y_TD + self.shared_experts(cur_TD)
            cur_TD = cur_TD + y_TD if self.inner_residual else y_TD

            counts_E = _active_counts(routed.ids_TK, routed.active_TK, self.num_experts)
            balance, z = self._losses(routed, counts_E, shape, router, t)
            stats.append(self._stats(routed, counts_E, balance, z, meta.num_dropped))
            if torch.is_grad_enabled():
                if self.z_loss_coef > 0:
                    terms.append(self.z_loss_coef * z)
                if self.aux_loss_coef > 0 and getattr(router, "uses_balance_loss", True):
                    terms.append(self.aux_loss_coef * balance)
                if routed.router_loss is not None:
                    terms.append(routed.router_loss)
        self.state_out = state_TH
        self._record(stats)
        aux = sum(terms[1:], terms[0]) if terms else None
        return cur_TD, aux

    def _null_weights(self, routed: RouterOutput, router: nn.Module) -> RouterOutput:
        """MoE++'s zero expert takes no share of a renormalised top-k: its weight is set to
        0 and the others are scaled back to the same total (SkyworkAI/MoE-plus-plus
        Router: ``gates = where(index == zero, 0, gates); gates /= gates.sum()``), so a
        token that picks it gives its other experts their full weight. Other routers'
        weights stay as they are (the zero expert adds 0 either way)."""
        if not self.num_zero or not (getattr(router, "renormalize", False) and router.top_k > 1):
            return routed
        w_TK = routed.weights_TK
        zero_TK = routed.ids_TK >= self.num_experts - self.num_zero
        kept_TK = torch.where(zero_TK, torch.zeros_like(w_TK), w_TK)
        # w / sum(w): a lone kept expert gets exactly 1 (times route_scale), so capacity's
        # ranking by weight sees exact ties, not values a rounding apart
        kept_TK = kept_TK / kept_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        if router.route_scale != 1.0:
            kept_TK = kept_TK * router.route_scale
        return dataclasses.replace(routed, weights_TK=kept_TK)

    def _null_out(self, x_TD: torch.Tensor, routed: RouterOutput) -> torch.Tensor:
        """The zero-computation experts' share of the output, computed where the token is
        (MoE++, arXiv 2410.07348, eqs. 3-5): zero experts add 0, copy experts w * x,
        constant expert j adds w * (a_1 x + a_2 v_j) with [a_1, a_2] = softmax(W_j x)."""
        E, Cn, Cp = self.num_ffn_experts, self.num_constant, self.num_copy
        ids_TK = routed.ids_TK
        w_TK = routed.weights_TK.float()
        if routed.active_TK is not None:
            w_TK = torch.where(routed.active_TK, w_TK, torch.zeros_like(w_TK))
        x = x_TD.float()
        out = torch.zeros_like(x)
        if Cp:
            copy_TK = (ids_TK >= E + Cn) & (ids_TK < E + Cn + Cp)
            out = out + (w_TK * copy_TK).sum(-1, keepdim=True) * x
        if Cn:
            slot_TKC = ids_TK[:, :, None] == E + torch.arange(Cn, device=ids_TK.device)
            coef_TC = (w_TK[:, :, None] * slot_TKC).sum(1)
            with torch.autocast(device_type=x.device.type, enabled=False):
                a_TC2 = torch.softmax(torch.einsum("td,cjd->tcj", x,
                                                   self.constant_gate.float()), dim=-1)
            out = out + (coef_TC * a_TC2[..., 0]).sum(-1, keepdim=True) * x
            out = out + (coef_TC * a_TC2[..., 1]) @ self.constant_v.float()
        return out.to(x_TD.dtype)

    def _compete(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A CompeteSMoE competition step (arXiv 2505.13380; Fsoft-AIC/CompeteSMoE
        ``competesmoe.py``): every expert runs on every token (``dispatcher.dense``; under
        EP the tokens are all-gathered to every expert rank). The neural response
        a_te = mean_d softplus(o_te) picks the top-k experts, weighted a_S / sum a_S (the
        gradient reaches the experts through the weights too). The router learns the
        choice: MSE(softmax(logits), stopgrad softmax(a)) over T * E entries (hybrid: plus
        theta * the MSE at the picks). The diversity loss is the mean cosine similarity of
        each token's selected outputs (k x k, diagonal zeroed, mean over T * k * k), and
        the competition balance term is the top-1 balance loss on softmax(a) (not
        detached). The router's own balance and z-losses are not computed on this step."""
        router: CompeteRouter = self.router
        cfg = router.cfg
        T, E, K = x_TD.shape[0], self.num_experts, router.top_k
        logits_TE = router._z(router._logits(x_TD))  # the temperature, as on router steps
        gate_TE = torch.softmax(logits_TE, dim=-1)
        o_ETD = self.dispatcher.dense(x_TD, self.experts)
        # softplus in the outputs' dtype, as the reference (under bf16 a float32 copy of
        # every expert's output would be saved for its backward); the mean in float32
        a_TE = F.softplus(o_ETD).float().mean(dim=-1).transpose(0, 1)  # (T, E)
        aff_TE = torch.softmax(a_TE, dim=-1)
        top_TK, ids_TK = torch.topk(a_TE, K, dim=-1)
        weights_TK = top_TK / top_TK.sum(dim=-1, keepdim=True)
        idx_TKD = ids_TK[:, :, None].expand(T, K, o_ETD.shape[-1])
        sel_TKD = o_ETD.transpose(0, 1).gather(1, idx_TKD)  # (T, K, D): the picks' outputs
        y_TD = (weights_TK[:, :, None].to(sel_TKD.dtype) * sel_TKD).sum(dim=1)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        out_TD = x_TD + y_TD if self.inner_residual else y_TD

        target_TE = aff_TE.detach()
        router_loss = F.mse_loss(gate_TE, target_TE)
        if cfg.compete_hybrid:
            router_loss = router_loss + cfg.compete_theta * F.mse_loss(
                gate_TE.gather(1, ids_TK), target_TE.gather(1, ids_TK))
        diversity = diversity_loss(sel_TKD)
        top1_E = _active_counts(ids_TK[:, :1], None, E)  # the top-1 picks
        total = torch.cat([top1_E, top1_E.new_full((1,), T)])
        if self.count_reducer is not None:  # tp sequence shards: the micro-batch's counts
            total = self.count_reducer(total)
        if self.global_scope:
            total = self._global_counts(total)
        balance = xmoe_balance_loss(aff_TE, E, counts_E=total[:-1], num_tokens=total[-1])
        aux = (cfg.compete_router_coef * router_loss + cfg.compete_diversity_coef * diversity
               + cfg.compete_balance_coef * balance)
        routed = RouterOutput(ids_TK=ids_TK, weights_TK=weights_TK, scores_TE=aff_TE,
                              logits_TE=logits_TE, router_loss=aux.detach())
        all_E = _active_counts(ids_TK, None, E)
        zero = torch.zeros((), device=x_TD.device)
        stats = self._stats(routed, all_E, balance, zero,
                            torch.zeros((), dtype=torch.int64, device=x_TD.device))
        # The load counts the top-k picks; the compute (MFU's routed rows) is E per token.
        self._record([dataclasses.replace(stats, num_routed=all_E.new_full((), T * E))])
        self.state_out = None
        self.last_compete = {"router_loss": router_loss.detach(),
                             "diversity_loss": diversity.detach(),
                             "balance_loss": balance.detach()}
        return out_TD, aux

    def _losses(self, routed: RouterOutput, counts_E: torch.Tensor, shape: torch.Size,
                router: nn.Module, t: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        z = z_loss(routed.logits_TE)
        kind = self.balance_loss
        if kind == BalanceLoss.seq:
            return self._seq_loss(routed, shape, router.top_k), z
        # Each loss is E * sum_e (count_e / n) * mean_t q_te: the counts and their
        # denominator n are summed over sequence shards (and the step, for global-batch
        # statistics); the mean q stays local, as P in the Switch loss.
        T = routed.ids_TK.shape[0]
        if kind == BalanceLoss.xmoe:  # tokens by their top-1 choice, over T
            top1_E = _active_counts(routed.scores_TE.detach().argmax(dim=-1, keepdim=True),
                                    None, self.num_experts)
            total = torch.cat([top1_E, top1_E.new_full((1,), T)])
        elif kind == BalanceLoss.evomoe:  # tokens using each expert, over T
            total = torch.cat([counts_E, counts_E.new_full((1,), T)])
        else:  # switch: routed rows per expert, over the routed rows
            total = torch.cat([counts_E, counts_E.sum().view(1)])
        if self.count_reducer is not None:  # tp sequence shards: the whole micro-batch's
            total = self.count_reducer(total)
        if self.global_scope:
            total = self._global_counts(total, t)
        if kind == BalanceLoss.xmoe:
            balance = xmoe_balance_loss(routed.scores_TE, self.num_experts,
                                        counts_E=total[:-1], num_tokens=total[-1])
        elif kind == BalanceLoss.evomoe:
            gates_TE, chosen_TE = _gates(routed, self.num_experts)
            balance = evomoe_balance_loss(gates_TE, chosen_TE, counts_E=total[:-1],
                                          num_tokens=total[-1])
        elif kind == BalanceLoss.size_weighted:  # HMoE: f_e weighted by F_e / mean F
            balance = size_weighted_balance_loss(routed.scores_TE, total[:-1], total[-1],
                                                 self.expert_sizes)
        else:
            counts = total[:-1]
            if self.num_null:  # MoE++ eq. 7: the zero-computation experts' terms times tau
                eta_E = torch.ones(self.num_experts, device=counts.device)
                eta_E[self.num_ffn_experts:] = self.null_tau
                counts = counts * eta_E
            balance = load_balancing_loss(routed.scores_TE, routed.ids_TK, self.num_experts,
                                          counts_E=counts, num_routed=total[-1])
        return balance, z

    @torch.compiler.disable  # Python state per micro-batch: run eagerly, never recompile
    def _global_counts(self, total: torch.Tensor, t: int = 0) -> torch.Tensor:
        """The running counts this micro-batch's f uses in chain round ``t`` (see the
        class docstring)."""
        training = self.training and torch.is_grad_enabled()
        if len(self.round_counts) != self.chain_iterations:
            self.reset_step_counts()
        history, counts = self.round_history[t], self.round_counts[t]
        # A recompute (activation checkpointing) runs inside the backward: it reuses the
        # counts its forward used and runs no collective (every rank recomputes alike).
        if training and torch._C._current_graph_task_id() != -1:
            j = self.micro_index
            if j is not None and j < len(history):
                return history[j]
            if counts is not None:
                return counts
        prefix, round_total = (self.count_prefix(total) if self.count_prefix is not None
                               else (total, total))
        if not training:
            return prefix
        used = prefix if counts is None else counts + prefix
        self.round_counts[t] = round_total if counts is None else counts + round_total
        history.append(used)
        return used

    def _seq_loss(self, routed: RouterOutput, shape: torch.Size, K: int) -> torch.Tensor:
        """DeepSeek-V3's sequence-wise loss: f from the unbiased top-k before any drop."""
        B, S = shape[0], shape[1] if len(shape) == 3 else 1
        E = self.num_experts
        ids_TK = torch.topk(routed.scores_TE.detach(), K, dim=-1).indices
        ones = torch.ones_like(ids_TK, dtype=torch.int64)
        counts_BE = torch.zeros(B, E, dtype=torch.int64, device=ids_TK.device)
        counts_BE = counts_BE.scatter_add_(1, ids_TK.view(B, S * K), ones.view(B, S * K))
        scores_BSE = routed.scores_TE.view(B, S, E)
        if self.count_reducer is not None:  # sequence shards: sum each sequence's counts
            counts_BE = self.count_reducer(counts_BE.flatten()).view(B, E)
        return seq_load_balancing_loss(scores_BSE, counts_BE, K, seq_len=S * self.seq_shards)

    @torch.no_grad()
    def _stats(self, routed: RouterOutput, counts_E: torch.Tensor, balance: torch.Tensor,
               z: torch.Tensor, num_dropped: torch.Tensor) -> MoEStats:
        T = routed.ids_TK.shape[0]
        if routed.active_TK is None:
            unrouted = torch.zeros((), dtype=torch.int64, device=counts_E.device)
        else:
            unrouted = (~routed.active_TK.any(dim=-1)).sum()
        # MoE++: the routed rows (MFU's experts per token) are the FFN experts'; the
        # zero-computation experts' are num_null
        ffn_E = counts_E[:self.num_ffn_experts]
        return MoEStats(
            load_E=counts_E.float(),
            aux_loss=balance.detach(),
            z_loss=z.detach(),
            num_dropped=num_dropped.detach().to(torch.int64),
            num_routed=ffn_E.sum(),  # computed on the device (no host copy)
            entropy=router_entropy(routed.scores_TE.detach()),
            router_loss=(routed.router_loss.detach() if routed.router_loss is not None
                         else torch.zeros((), device=counts_E.device)),
            num_unrouted=unrouted,
            num_tokens=counts_E.new_full((), T),  # a fill on the device, no host copy
            num_null=counts_E[self.num_ffn_experts:].sum(),
        )

    @torch.no_grad()
    def _record(self, stats: list[MoEStats]) -> None:
        """The layer's statistics: with C rounds, the loads, drops, routed rows and the
        router's own loss summed over the rounds (the routed rows per token are then C * K,
        the expert evaluations MFU counts); the balance and z-losses (1.0 = balanced),
        the entropy and the unrouted tokens averaged over them. Each round's own are in
        ``last_round_stats``."""
        self.last_round_stats = stats if len(stats) > 1 else []
        if len(stats) == 1:
            self.last_stats = stats[0]
            return
        C = len(stats)

        def total(name):
            return sum((getattr(s, name) for s in stats[1:]), getattr(stats[0], name))

        self.last_stats = MoEStats(
            load_E=total("load_E"), aux_loss=total("aux_loss") / C, z_loss=total("z_loss") / C,
            num_dropped=total("num_dropped"), num_routed=total("num_routed"),
            entropy=total("entropy") / C, router_loss=total("router_loss"),
            num_unrouted=total("num_unrouted") // C, num_tokens=stats[0].num_tokens,
            num_null=total("num_null"))


def diversity_loss(sel_TKD: torch.Tensor) -> torch.Tensor:
    """CompeteSMoE's diversity loss: the mean over T * K * K of the cosine similarity
    between a token's selected expert outputs, the diagonal zeroed (signed, not abs)."""
    u_TKD = F.normalize(sel_TKD.float(), dim=-1)
    sim_TKK = u_TKD @ u_TKD.transpose(1, 2)
    K = sim_TKK.shape[-1]
    return (sim_TKK * (1 - torch.eye(K, device=sim_TKK.device))).mean()


def _gates(routed: RouterOutput, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gates_TE, chosen_TE), float32 (T, E): the combine weight of each expert a token
    uses (EvoMoE's gates = chosen * softmax(logits), or * the Gumbel softmax with Gumbel
    gates: the DTS router's weights) and 1 where it uses it, 0 elsewhere. A router lists
    an expert at most once per token."""
    ids_TK = routed.ids_TK.long()
    T = ids_TK.shape[0]
    hit_TK = (torch.ones_like(ids_TK, dtype=torch.bool) if routed.active_TK is None
              else routed.active_TK)
    zeros_TE = torch.zeros(T, num_experts, device=ids_TK.device)
    chosen_TE = zeros_TE.scatter(1, ids_TK, hit_TK.float())
    gates_TE = zeros_TE.scatter(1, ids_TK, torch.where(hit_TK, routed.weights_TK.float(), 0.0))
    return gates_TE, chosen_TE


def _active_counts(ids_TK: torch.Tensor, active_TK: torch.Tensor | None,
                   num_experts: int) -> torch.Tensor:
    """int64 (E,) routed rows per expert, counting only active slots (no host sync)."""
    flat = ids_TK.reshape(-1).long()
    ones = (torch.ones_like(flat) if active_TK is None
            else active_TK.reshape(-1).to(torch.int64))
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, ones)
