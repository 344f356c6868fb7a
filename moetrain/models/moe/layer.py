"""The MoE layer: router -> dispatch -> experts -> combine (+ shared experts).

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, R routed rows.

Auxiliary losses are not returned. They ride on the layer's output through
:class:`AuxLossInjector`, so any backward through the output (a plain loss, gradient
accumulation, a pipeline stage's backward) also back-propagates
``aux_loss_scale * (aux_loss_coef * balance + z_loss_coef * z)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moetrain.config.schema import DispatchMode, ModelConfig, MoEConfig
from moetrain.kernels.reference import expert_counts
from moetrain.models.moe.dispatcher import Dispatcher, LocalDispatcher
from moetrain.models.moe.experts import FeedForward, GroupedExperts
from moetrain.models.moe.losses import load_balancing_loss, router_entropy, z_loss
from moetrain.models.moe.router import RouterOutput, build_router


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
    num_routed: int64, T*K rows routed in this micro-batch.
    entropy: mean per-token routing entropy (nats).
    """

    load_E: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    num_dropped: torch.Tensor
    num_routed: torch.Tensor
    entropy: torch.Tensor


class MoELayer(nn.Module):
    """Sparse SwiGLU FFN with ``model.num_experts`` routed experts and optional shared ones.

    Runtime hooks, set by the trainer or parallel wiring (never by the config):
    - ``dispatcher`` (via :meth:`set_dispatcher`): LocalDispatcher by default; an
      expert-parallel dispatcher follows the same protocol.
    - ``aux_loss_scale``: multiplies the injected aux gradient (e.g. 1/accumulation steps).
    - ``count_reducer``: for ``moe.aux_loss_scope=global_batch``, sums the per-expert
      counts over data-parallel ranks before the load-balancing loss. It receives an int64
      vector of length E+1: the E counts followed by the routed-row count.
    """

    def __init__(self, dim: int, model_cfg: ModelConfig, moe_cfg: MoEConfig) -> None:
        super().__init__()
        self.dim = dim
        self.num_experts = model_cfg.num_experts
        self.top_k = model_cfg.top_k
        self.aux_loss_coef = moe_cfg.aux_loss_coef
        self.z_loss_coef = moe_cfg.z_loss_coef
        self.router = build_router(dim, model_cfg.num_experts, model_cfg.top_k, moe_cfg.router)
        self.router.kernel_backend = moe_cfg.kernel_backend  # fused Triton top-k when selected
        self.experts = GroupedExperts(model_cfg.num_experts, dim, model_cfg.expert_hidden,
                                      moe_cfg.expert_backend, moe_cfg.recompute_experts)
        self.experts.kernel_backend = moe_cfg.kernel_backend  # fused SwiGLU on grouped_mm
        self.shared_experts = (
            FeedForward(dim, model_cfg.n_shared_experts * model_cfg.expert_hidden)
            if model_cfg.n_shared_experts > 0 else None
        )
        capacity = (moe_cfg.capacity_factor
                    if DispatchMode(moe_cfg.dispatch) == DispatchMode.capacity else None)
        self.dispatcher: Dispatcher = LocalDispatcher(model_cfg.num_experts, capacity,
                                                      moe_cfg.kernel_backend)
        self.aux_loss_scale: float = 1.0
        self.count_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.last_stats: MoEStats | None = None

    def set_dispatcher(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    def init_weights(self, init_std: float, out_std: float) -> None:
        self.router.init_weights(init_std)
        self.experts.init_weights(init_std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(init_std, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, self.dim)
        routed: RouterOutput = self.router(x_TD)
        x_RD, meta = self.dispatcher.dispatch(x_TD, routed.ids_TK, routed.weights_TK)
        y_RD = self.experts(x_RD, meta.tokens_per_expert)
        y_TD = self.dispatcher.combine(y_RD, meta)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        out = y_TD.view(shape)

        counts_E = expert_counts(routed.ids_TK, self.num_experts)
        balance, z = self._losses(routed, counts_E)
        self._record_stats(routed, counts_E, balance, z, meta.num_dropped)
        if torch.is_grad_enabled() and (self.aux_loss_coef > 0 or self.z_loss_coef > 0):
            aux = self.aux_loss_coef * balance + self.z_loss_coef * z
            if aux.requires_grad:
                out = AuxLossInjector.apply(out, aux, self.aux_loss_scale)
        return out

    def _losses(self, routed: RouterOutput,
                counts_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num_routed: int | torch.Tensor = routed.ids_TK.numel()
        if self.count_reducer is not None:
            # One collective for both: E counts then the routed-row count (their sum; a
            # device-side sum, not a host scalar copied to the device).
            total = self.count_reducer(torch.cat([counts_E, counts_E.sum().view(1)]))
            counts_E, num_routed = total[: self.num_experts], total[self.num_experts]
        balance = load_balancing_loss(routed.scores_TE, routed.ids_TK, self.num_experts,
                                      counts_E=counts_E, num_routed=num_routed)
        return balance, z_loss(routed.logits_TE)

    @torch.no_grad()
    def _record_stats(self, routed: RouterOutput, counts_E: torch.Tensor, balance: torch.Tensor,
                      z: torch.Tensor, num_dropped: torch.Tensor) -> None:
        self.last_stats = MoEStats(
            load_E=counts_E.float(),
            aux_loss=balance.detach(),
            z_loss=z.detach(),
            num_dropped=num_dropped.detach().to(torch.int64),
            num_routed=counts_E.sum(),  # = T*K, computed on the device (no host copy)
            entropy=router_entropy(routed.scores_TE.detach()),
        )
