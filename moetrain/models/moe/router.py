"""Routers: which experts each token visits, and with what weight.

Legend: T tokens, D model dim, E experts, K top-k (slots per token).

A router maps ``x_TD`` to a :class:`RouterOutput`. Scores are always float32: the gate
matmul runs in float32 with autocast disabled, because routing decisions are sensitive to
rounding (ST-MoE, Zoph et al., 2022, section 3). Routers form a registry keyed by
:class:`~moetrain.config.schema.RouterType`; add one with :func:`register_router`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config.schema import (
    ConfigError,
    GateActivation,
    KernelBackend,
    RNNCell,
    RouterConfig,
    RouterType,
    ScoreFunc,
)
from moetrain.kernels.backend import use_triton
from moetrain.models.moe import losses, routing


@dataclass(frozen=True)
class RouterOutput:
    """What the router decided for one batch of tokens.

    ids_TK: int64 expert ids, best first (K = the router's ``slots``).
    weights_TK: float32 combine weights (differentiable w.r.t. the gate).
    scores_TE: float32 per-token probabilities over all experts, used by the losses:
        softmax(logits / temperature), or for sigmoid routers sigmoid(logits / temperature)
        normalised to sum to 1 per token.
    logits_TE: float32 logits that enter the score function (after the temperature), used
        by the z-loss.
    active_TK: bool, False for unused slots of routers with a variable number of experts
        per token (threshold, expert-choice); None when every slot is used.
    router_loss: the router's own balance loss, already weighted (noisy top-k's
        importance and load losses); None for routers without one.
    state_TH: the recurrent router's new state (RMoE), handed to the next MoE layer;
        None for the other routers.
    """

    ids_TK: torch.Tensor
    weights_TK: torch.Tensor
    scores_TE: torch.Tensor
    logits_TE: torch.Tensor
    active_TK: torch.Tensor | None = None
    router_loss: torch.Tensor | None = None
    state_TH: torch.Tensor | None = None


@dataclass
class RoutingContext:
    """Runtime keys of the routers' random draws, set by the trainer (never the config).

    seed: the run's seed. step: the optimizer step being trained (0-based).
    token_keys: int64 (T,) global position of each routed token (sample index * seq_len +
        position), in the order of the layer's tokens; None outside training.
    """

    seed: int = 0
    step: int = 0
    token_keys: torch.Tensor | None = None
    total_steps: int = 0  # train.steps (the competition schedule's warm-up is a share of it)
    # The same step and seed as int64 0-dim tensors, updated in place: keyed draws read
    # these, so a compiled router does not specialise (and recompile) on the step.
    step_t: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    seed_t: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))

    def set_step(self, seed: int, step: int) -> None:
        self.seed, self.step = seed, step
        self.seed_t.fill_(seed)
        self.step_t.fill_(step)


ROUTERS: dict[RouterType, type[nn.Module]] = {}


def _activate(logits_TE: torch.Tensor, act: GateActivation) -> torch.Tensor:
    """sigma of the activation dense-to-sparse gate (arXiv 2401.13875); ``none`` returns
    the logits themselves (no op, so the plain gate is unchanged bit for bit)."""
    act = GateActivation(act)
    if act == GateActivation.none:
        return logits_TE
    if act == GateActivation.tanh:
        return torch.tanh(logits_TE)
    if act == GateActivation.sigmoid:
        return torch.sigmoid(logits_TE)
    return F.gelu(logits_TE)


def register_router(kind: RouterType) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator adding a router to the registry under ``kind``."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        ROUTERS[kind] = cls
        return cls

    return deco


class Router(nn.Module):
    """Base of the routers: a float32 gate ``x_TD -> logits_TE`` plus the runtime hooks.

    - ``expert_bias`` (E,): a persistent float32 buffer added to the scores for the
      selection only (DeepSeek-V3's auxiliary-loss-free balancing); the expert-bias
      callback moves it once per optimizer step. It stays float32 under ``.to(bf16)``
      (Megatron-LM #1482: a bf16 bias loses the 1e-3 steps).
    - ``temperature`` divides the logits before the score function; ``top_k`` and
      ``temperature`` are attributes that schedules may change between steps. The
      temperature lives in a float32 0-dim buffer (``temperature_t``, not saved) that the
      forward reads, so a compiled router does not recompile when a schedule anneals it.
    - ``score_activation`` (:class:`GateActivation`): sigma in softmax(sigma(logits) / tau),
      the activation dense-to-sparse gate (arXiv 2401.13875), set by ``schedule=dts_gate``;
      ``none`` (the default) is the plain temperature gate, bit for bit.
    - ``context`` (:class:`RoutingContext`) keys the random draws; ``layer_idx`` is set by
      the model.
    - ``slots``: the width K of ``ids_TK`` (``top_k`` unless the router varies it).
    - ``uses_balance_loss``: False for routers that balance by construction (Sinkhorn,
      expert-choice): the MoE layer then logs the balance loss without training on it.
    - ``whole_batch``: True when a token's routing depends on the other tokens of the
      micro-batch (not causal), or its own loss sums over them (noisy top-k). When tp
      ranks each route a sequence shard (``parallel.expert_tp=ep``), such a router runs
      :meth:`forward_gathered`: it routes the all-gathered micro-batch and keeps this
      rank's tokens, so every layout routes like one process.
    - ``seq_gather``: set by the parallel wiring when tp ranks each hold one shard of every
      sequence (``moetrain.parallel.tensor.SequenceGather``; None without it): it gathers
      the micro-batch's rows in sequence order and slices this rank's rows back out. The
      router holds no process group itself.
    """

    uses_balance_loss = True
    whole_batch = False
    needs_token_keys = False  # its training forward draws per-token noise
    recurrent = False  # takes and returns a state carried across MoE layers (RMoE)

    def __init__(self, dim: int, num_experts: int, top_k: int, cfg: RouterConfig) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ConfigError(
                f"model.top_k={top_k} is invalid: must be in [1, model.num_experts={num_experts}]"
            )
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.cfg = cfg
        self.score_func = ScoreFunc(cfg.score_func)
        self.renormalize = cfg.renormalize
        self.route_scale = float(cfg.route_scale)
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=True)
        self._temperature = float(cfg.temperature)
        self.register_buffer("temperature_t", torch.tensor(self._temperature),
                             persistent=False)
        self.score_activation = GateActivation.none
        self.kernel_backend = KernelBackend.auto
        self.context = RoutingContext()
        self.layer_idx = 0
        self.seq_gather = None

    @property
    def slots(self) -> int:
        return self.top_k

    @property
    def temperature(self) -> float:
        return self._temperature  # the host copy: no device read

    @temperature.setter
    def temperature(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"router temperature must be > 0, got {value!r}")
        self._temperature = float(value)
        with torch.no_grad():
            self.temperature_t.fill_(self._temperature)

    def init_weights(self, init_std: float) -> None:
        nn.init.normal_(self.gate.weight, mean=0.0, std=init_std)
        with torch.no_grad():
            self.expert_bias.zero_()
            self.temperature_t.fill_(self._temperature)  # complete after to_empty()

    def _apply(self, fn, recurse=True):
        # Keep the bias and the temperature float32 through module casts (.to(bf16),
        # .half()); devices follow.
        keep = {name: getattr(self, name) for name in ("expert_bias", "temperature_t")}
        out = super()._apply(fn, recurse)
        for name, old in keep.items():
            new = getattr(self, name)
            if new.dtype != torch.float32:
                setattr(self, name, old.to(device=new.device, dtype=torch.float32))
        return out

    def _logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        # float32 matmul even under autocast: routing is precision sensitive.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), self.gate.weight.float())

    def _z(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """The logits that enter the score function: sigma(logits) / temperature."""
        return _activate(logits_TE, self.score_activation) / self.temperature_t

    def _token_keys(self, T: int, device: torch.device) -> torch.Tensor:
        keys = self.context.token_keys
        if keys is None:
            return torch.arange(T, device=device)
        if keys.numel() != T:
            raise RuntimeError(
                f"router of layer {self.layer_idx}: {keys.numel()} token keys for {T} tokens; "
                f"the trainer sets one key per token of the micro-batch")
        return keys.to(device)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"score_func={self.score_func.value}, renormalize={self.renormalize}")

    # ------------------------------------------------------------ sequence shards
    def forward_gathered(self, x_TD: torch.Tensor, batch: int) -> RouterOutput:
        """Route the all-gathered micro-batch (``batch`` sequences) and keep this rank's
        tokens. The gather is autograd-aware (its backward sums the ranks' gradients), the
        router's own loss is the whole micro-batch's on every rank (the tp aux-loss scale
        1/tp makes its gradient count once), and the other outputs are this rank's."""
        g, keys = self.seq_gather, self.context.token_keys
        if keys is not None:
            self.context.token_keys = g.gather(keys.view(-1, 1), batch, grad=False).view(-1)
        try:
            full = self(g.gather(x_TD, batch, grad=True))
        finally:
            self.context.token_keys = keys
        return RouterOutput(
            ids_TK=g.local(full.ids_TK, batch),
            weights_TK=g.local(full.weights_TK, batch),
            scores_TE=g.local(full.scores_TE, batch),
            logits_TE=g.local(full.logits_TE, batch),
            active_TK=g.local(full.active_TK, batch),
            router_loss=full.router_loss,
        )


@register_router(RouterType.topk)
class TopKRouter(Router):
    """Top-k routing over softmax (Mixtral; Jiang et al., 2024) or sigmoid scores
    (DeepSeek-V3; DeepSeek-AI, 2024).

    The selection is on the scores plus ``expert_bias``, limited to the best
    ``moe.router.topk_groups`` of ``n_groups`` expert groups when ``n_groups > 1``; the
    weights are the unbiased scores of the picks, renormalised when ``renormalize`` and
    k > 1 (a single weight is never renormalised: it would be 1.0 and the gate would get
    no gradient from the LM loss), then times ``route_scale``.
    With ``moe.kernel_backend`` selecting Triton and no groups, scores, biased top-k and
    weights run in one fused kernel (``moetrain.kernels.ops.topk_router``); same outputs.
    """

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        z_TE = self._z(self._logits(x_TD))
        renorm = self.renormalize and self.top_k > 1
        if self.cfg.n_groups == 1 and use_triton(self.kernel_backend, z_TE):
            from moetrain.kernels import ops

            # The kernel gets the tempered logits (temperature 1): a float temperature
            # argument would make a compiled router specialise on an annealed value.
            ids_TK, weights_TK, scores_TE = ops.topk_router(
                z_TE, self.expert_bias, self.top_k, self.score_func == ScoreFunc.sigmoid,
                renorm, 1.0)
            if self.route_scale != 1.0:
                weights_TK = weights_TK * self.route_scale
            return RouterOutput(ids_TK=ids_TK, weights_TK=weights_TK, scores_TE=scores_TE,
                                logits_TE=z_TE)
        raw_TE = routing.score(z_TE, self.score_func)
        ids_TK = routing.topk_select(raw_TE, self.top_k, self.expert_bias, self.cfg.n_groups,
                                     self.cfg.topk_groups, self.cfg.group_score)
        weights_TK = routing.topk_gates(raw_TE, ids_TK, renorm, self.route_scale)
        scores_TE = (raw_TE if self.score_func == ScoreFunc.softmax
                     else routing.sigmoid_probs(z_TE))
        return RouterOutput(ids_TK=ids_TK, weights_TK=weights_TK, scores_TE=scores_TE,
                            logits_TE=z_TE)


@register_router(RouterType.deepseek_v3)
class DeepSeekV3Router(TopKRouter):
    """DeepSeek-V3 routing (DeepSeek-AI, 2024, arXiv 2412.19437, section 2.1.2): sigmoid
    scores, node-limited (group-limited) top-k, weights renormalised over the picks and
    scaled by ``route_scale`` (2.5 in the 671B model), and an expert bias moved by
    auxiliary-loss-free balancing (``moe.router.bias_update_rate``, Wang et al. 2024)."""

    def __init__(self, dim: int, num_experts: int, top_k: int, cfg: RouterConfig) -> None:
        if ScoreFunc(cfg.score_func) != ScoreFunc.sigmoid:
            raise ConfigError(
                f"moe.router.score_func={ScoreFunc(cfg.score_func).value} is invalid for "
                f"moe.router.name=deepseek_v3, which scores with a sigmoid: set "
                f"moe.router.score_func=sigmoid, or use moe/router=topk")
        super().__init__(dim, num_experts, top_k, cfg)


@register_router(RouterType.switch)
class SwitchRouter(TopKRouter):
    """Switch Transformer routing (Fedus et al., 2021): top-1, weight = the raw probability.

    ``renormalize`` is ignored: renormalising a single weight gives 1.0 and cuts the
    router's gradient from the language-model loss.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, cfg: RouterConfig) -> None:
        if top_k != 1:
            raise ConfigError(
                f"model.top_k={top_k} is invalid for moe.router.name=switch: the Switch router "
                f"sends each token to exactly one expert; set model.top_k=1 or use "
                f"moe/router=topk"
            )
        super().__init__(dim, num_experts, top_k, cfg)
        self.renormalize = False


@register_router(RouterType.noisy_topk)
class NoisyTopKRouter(Router):
    """Noisily gated top-k (Shazeer et al. 2017, arXiv 1701.06538, section 2.1, App. A).

    H(x)_i = (x W_g)_i + eps_i * (softplus((x W_noise)_i) + noise_epsilon), eps ~ N(0, 1)
    in training only (evaluation routes on the clean logits). The weights are the softmax
    over the k kept noisy logits. The router's own loss is
    importance_coef * CV^2(Importance) + load_coef * CV^2(Load), with Importance_i =
    sum_x G(x)_i and Load_i = sum_x P(x, i) (:func:`losses.prob_in_topk`), CV^2 with the
    population variance. The noise is keyed by (seed, step, layer, token position,
    expert) (:func:`routing.keyed_normal`), so every layout draws the same numbers.
    W_noise starts at zero, and so does W_g with ``moe.router.noisy_zero_init`` (the
    default), as in the paper (App. A) and tensor2tensor's ``noisy_top_k_gating``: the
    first steps route by the noise alone, std softplus(0) + noise_epsilon.
    """

    whole_batch = True  # the importance and load losses sum over the micro-batch
    needs_token_keys = True

    def __init__(self, dim: int, num_experts: int, top_k: int, cfg: RouterConfig) -> None:
        super().__init__(dim, num_experts, top_k, cfg)
        if top_k >= num_experts:
            raise ConfigError(
                f"model.top_k={top_k} is invalid for moe.router.name=noisy_topk with "
                f"model.num_experts={num_experts}: the load loss needs k < E; lower model.top_k")
        self.w_noise = nn.Linear(dim, num_experts, bias=False)

    def init_weights(self, init_std: float) -> None:
        super().init_weights(init_std)
        nn.init.zeros_(self.w_noise.weight)
        if self.cfg.noisy_zero_init:
            nn.init.zeros_(self.gate.weight)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        clean_TE = self._z(self._logits(x_TD))
        T, E = clean_TE.shape
        if not self.training:
            noisy_TE = clean_TE
        else:
            with torch.autocast(device_type=x_TD.device.type, enabled=False):
                std_TE = F.softplus(F.linear(x_TD.float(), self.w_noise.weight.float()))
            std_TE = std_TE + self.cfg.noise_epsilon
            keys_TE = (self._token_keys(T, clean_TE.device)[:, None] * E
                       + torch.arange(E, device=clean_TE.device))
            eps_TE = routing.keyed_normal(keys_TE, self.context.seed_t, self.context.step_t,
                                          self.layer_idx, 0x5EED)
            noisy_TE = clean_TE + eps_TE * std_TE
        top_TK, ids_TK = noisy_TE.topk(self.top_k, dim=-1)
        weights_TK = torch.softmax(top_TK, dim=-1)
        scores_TE = torch.softmax(noisy_TE, dim=-1)
        router_loss = None
        # The load loss needs k < E; a schedule may raise k at run time (then: no loss).
        if (self.training and self.top_k < E
                and (self.cfg.importance_coef > 0 or self.cfg.load_coef > 0)):
            gates_TE = torch.zeros_like(clean_TE).scatter(1, ids_TK, weights_TK)
            load_E = losses.prob_in_topk(clean_TE, noisy_TE, std_TE, self.top_k).sum(dim=0)
            router_loss = (self.cfg.importance_coef * losses.cv_squared(gates_TE.sum(dim=0))
                           + self.cfg.load_coef * losses.cv_squared(load_E))
        return RouterOutput(ids_TK=ids_TK, weights_TK=weights_TK, scores_TE=scores_TE,
                            logits_TE=clean_TE, router_loss=router_loss)


@register_router(RouterType.expert_choice)
class ExpertChoiceRouter(Router):
    """Expert-choice routing (Zhou et al. 2022, arXiv 2202.09368): each expert picks the
    ``round(ec_capacity_factor * T / E)`` tokens of the micro-batch with the highest
    softmax score and weights them by that raw probability (not renormalised). Every
    expert processes exactly its capacity; a token may get several experts or none (it
    then rides the residual, and the layer counts it). The choice looks at the whole
    micro-batch, so it is not causal: a token's experts depend on later tokens.
    Balanced by construction: no balance loss is trained on.
    """

    uses_balance_loss = False
    whole_batch = True

    @property
    def slots(self) -> int:
        return self.num_experts

    def capacity(self, num_tokens: int) -> int:
        c = round(self.cfg.ec_capacity_factor * num_tokens / self.num_experts)
        return min(num_tokens, max(1, c))

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        z_TE = self._z(self._logits(x_TD))
        scores_TE = torch.softmax(z_TE, dim=-1)
        ids_TE, active_TE = routing.expert_choice_select(scores_TE, self.capacity(z_TE.shape[0]))
        return RouterOutput(ids_TK=ids_TE, weights_TK=scores_TE, scores_TE=scores_TE,
                            logits_TE=z_TE, active_TK=active_TE)


@register_router(RouterType.sinkhorn)
class SinkhornRouter(Router):
    """S-BASE routing (Clark et al. 2022, arXiv 2202.01169), as Megatron-core's
    ``sinkhorn`` load-balancing type: in training the top-k experts of the Sinkhorn-
    balanced plan of exp(logits) (:func:`routing.sinkhorn_plan`, log domain, capped at
    ``moe.router.sinkhorn_iters``), chosen without gradient; the weights are the gate
    activation of the raw logits at the picks: sigmoid for k = 1, else the softmax over
    all experts (not renormalised). Evaluation takes the plain top-k of that activation.
    The plan balances the micro-batch by construction: no balance loss is trained on.
    """

    uses_balance_loss = False
    whole_batch = True

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        z_TE = self._z(self._logits(x_TD))
        act_TE = torch.sigmoid(z_TE) if self.top_k == 1 else torch.softmax(z_TE, dim=-1)
        if self.training:
            plan_TE = routing.sinkhorn_plan(z_TE, self.cfg.sinkhorn_iters, self.cfg.sinkhorn_tol)
            ids_TK = torch.topk(plan_TE, self.top_k, dim=-1).indices
        else:
            ids_TK = torch.topk(act_TE.detach(), self.top_k, dim=-1).indices
        return RouterOutput(ids_TK=ids_TK, weights_TK=act_TE.gather(1, ids_TK),
                            scores_TE=torch.softmax(z_TE, dim=-1), logits_TE=z_TE)


@register_router(RouterType.selective_sinkhorn)
class SelectiveSinkhornRouter(TopKRouter):
    """Selective Sinkhorn Routing (SSR, arXiv 2511.08972): softmax top-k, except on a
    fraction ``ssr_prob`` of training steps, where tokens are routed by entropic optimal
    transport: the plan P of cost logits / ``ssr_epsilon`` with rows summing to 1 (one
    unit of mass per token) and columns to T/E (balanced experts); each token takes the
    top-k of its row and the weights are P's entries renormalised over them (for k = 1,
    P's entry itself: its rows sum to 1).

    The step's draw is Bernoulli(p) keyed by (seed, step, layer) (:func:`routing.
    keyed_uniform`), so a resume and every layout make the same draws. The plan's
    scalings are constants for the gradient (the gate's gradient flows through exp(cost)).
    At p = 0 the router is bit-identical to ``topk``. The transport step looks at the
    whole micro-batch, so it is not causal.
    """

    whole_batch = True

    def ot_step(self) -> bool:
        if not self.training or self.cfg.ssr_prob <= 0:
            return False
        # Drawn on the host (the same value as keyed_uniform's): no tensor to read back.
        u = routing.keyed_uniform_host(self.context.step, self.context.seed, self.layer_idx,
                                       0x55A)
        return u < self.cfg.ssr_prob

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        if not self.ot_step():
            return super().forward(x_TD)
        z_TE = self._z(self._logits(x_TD))
        T, E = z_TE.shape
        cost_TE = z_TE / self.cfg.ssr_epsilon
        # sync=False: the early exit's scalings, without a host read per iteration.
        _, log_d1 = routing.sinkhorn_log(cost_TE, 1.0, T / E, self.cfg.sinkhorn_iters,
                                         self.cfg.sinkhorn_tol, sync=False)
        plan_logits_TE = cost_TE + log_d1  # the row scaling cancels in the renormalisation
        ids_TK = torch.topk(plan_logits_TE.detach(), self.top_k, dim=-1).indices
        if self.top_k == 1:  # one weight is not renormalised (to 1.0): the plan's entry
            weights_TK = torch.softmax(plan_logits_TE, dim=-1).gather(1, ids_TK)
        else:
            weights_TK = torch.softmax(plan_logits_TE.gather(1, ids_TK), dim=-1)
        if self.route_scale != 1.0:
            weights_TK = weights_TK * self.route_scale
        return RouterOutput(ids_TK=ids_TK, weights_TK=weights_TK,
                            scores_TE=torch.softmax(z_TE, dim=-1), logits_TE=z_TE)


@register_router(RouterType.threshold)
class ThresholdRouter(Router):
    """XMoE threshold routing (Yang et al. 2024, arXiv 2403.18926): softmax scores; each
    token takes experts, best first, until their cumulative probability reaches
    ``moe.router.threshold`` (at least 1, at most ``moe.router.max_k``; by default every
    expert may be chosen, as ``main_thresholdGating`` in ysngki/XMoE has no cap). The
    weights are the raw probabilities (not renormalised), as in the reference code. The
    number of experts varies per token: unused slots are inactive. Its recipe trains on
    XMoE's top-1 balance loss (``moe.balance_loss=xmoe``) and, with
    ``moe.dispatch=capacity``, keeps max(ceil(cf * T / E), 4) rows per expert by choice
    rank (``moe.capacity_rule=tokens``, ``moe.drop_policy=rank``).
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, cfg: RouterConfig) -> None:
        super().__init__(dim, num_experts, top_k, cfg)
        self.max_k = cfg.max_k or num_experts
        if self.max_k > num_experts:
            raise ConfigError(
                f"moe.router.max_k={self.max_k} is invalid: must be <= model.num_experts="
                f"{num_experts}")

    @property
    def slots(self) -> int:
        return self.max_k

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        z_TE = self._z(self._logits(x_TD))
        probs_TE = torch.softmax(z_TE, dim=-1)
        ids_TK, active_TK = routing.threshold_select(probs_TE, self.cfg.threshold, self.max_k)
        return RouterOutput(ids_TK=ids_TK, weights_TK=probs_TE.gather(1, ids_TK),
                            scores_TE=probs_TE, logits_TE=z_TE, active_TK=active_TK)


class DTSPhase(str, Enum):
    """Phase of the :class:`DTSRouter`, set by ``schedule=evomoe`` between steps."""

    diversify = "diversify"  # every token to expert 0 with weight 1
    soft = "soft"  # Gumbel-softmax threshold: a variable number of experts per token
    hard = "hard"  # top-k of the Gumbel-perturbed logits


@register_router(RouterType.dts)
class DTSRouter(Router):
    """EvoMoE's Dense-to-Sparse gate (Nie et al. 2021, arXiv 2112.14397; the reference
    code is codecaution/EvoMoE ``fairseq/modules/moe/topkgate.py``) and its
    expert-diversify stage.

    p = softmax(logits) on the plain logits: the temperature only enters the Gumbel
    softmax. In training, by ``phase`` (set by ``schedule=evomoe``):

    - diversify: every token goes to expert 0 with weight 1. The base expert trains alone,
      and the gate gets no gradient from the LM loss (only from a z-loss, 0 in the recipe).
    - soft: g = softmax((logits + G) / tau), with G ~ Gumbel(0, 1) keyed by (seed, step,
      layer, token, expert) like noisy top-k's noise. Token t uses expert e iff g_te >
      ``gumbel_threshold`` (a variable number per token; at least 1 while the threshold
      is below 1/E). The weight is p_te, not renormalised, as in the reference.
    - hard: the top_k of logits + G. This is the Gumbel-top-k trick (k draws without
      replacement from p); EvoMoE's hard phase is its k = 1 case, the argmax
      (``schedule.hard_k``). The weights are p at the picks, renormalised when
      ``renormalize`` and k > 1.

    ``gumbel_gates`` (EvoMoE's ``--use-gumbel-gates``): the weights are g instead of p, at
    the same experts (gates = chosen * gumbel_softmax in the reference); the gradient
    flows through g's logits, G is a constant. Evaluation then weights by the noise-free
    softmax(logits / tau). The reference draws Gumbel noise in evaluation too; here
    validation stays deterministic.

    Evaluation routes on the top_k of the clean logits in the soft and hard phases, as
    EvoMoE validates with top-k (top-1 there). In the diversify phase it uses expert 0,
    the only trained expert.
    """

    needs_token_keys = True

    def __init__(self, dim: int, num_experts: int, top_k: int, cfg: RouterConfig) -> None:
        super().__init__(dim, num_experts, top_k, cfg)
        self.phase = DTSPhase.hard
        self.gumbel_threshold = 1e-3
        self.gumbel_gates = False

    @property
    def slots(self) -> int:
        return self.num_experts  # the widest phase (soft: one slot per expert)

    def gumbel(self, T: int, device: torch.device) -> torch.Tensor:
        """Keyed Gumbel(0, 1) noise (T, E): -log(-log(u)), u uniform in (0, 1)."""
        E = self.num_experts
        keys_TE = self._token_keys(T, device)[:, None] * E + torch.arange(E, device=device)
        u_TE = routing.keyed_uniform(keys_TE, self.context.seed_t, self.context.step_t,
                                     self.layer_idx, 0x6B1)
        return -torch.log(-torch.log(u_TE))

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        logits_TE = self._logits(x_TD)
        T, E = logits_TE.shape
        probs_TE = torch.softmax(logits_TE, dim=-1)
        phase = DTSPhase(self.phase)
        if phase == DTSPhase.diversify:
            ids_TK = torch.zeros(T, 1, dtype=torch.int64, device=logits_TE.device)
            base_TE = torch.zeros_like(probs_TE)
            base_TE[:, 0] = 1.0
            return RouterOutput(ids_TK=ids_TK, weights_TK=torch.ones_like(probs_TE[:, :1]),
                                scores_TE=base_TE, logits_TE=logits_TE)
        gates_TE = probs_TE
        if self.training:
            noisy_TE = logits_TE + self.gumbel(T, logits_TE.device)
            if phase == DTSPhase.soft or self.gumbel_gates:
                # the Gumbel softmax; with a gradient only where it weights the experts
                z_TE = noisy_TE if self.gumbel_gates else noisy_TE.detach()
                g_TE = torch.softmax(z_TE / self.temperature_t, dim=-1)
                if self.gumbel_gates:
                    gates_TE = g_TE
            if phase == DTSPhase.soft:
                ids_TE = torch.arange(E, device=logits_TE.device).expand(T, E).contiguous()
                return RouterOutput(ids_TK=ids_TE, weights_TK=gates_TE, scores_TE=probs_TE,
                                    logits_TE=logits_TE,
                                    active_TK=g_TE.detach() > self.gumbel_threshold)
        else:
            noisy_TE = logits_TE
            if self.gumbel_gates:
                gates_TE = torch.softmax(logits_TE / self.temperature_t, dim=-1)
        ids_TK = torch.topk(noisy_TE.detach(), self.top_k, dim=-1).indices
        weights_TK = routing.topk_gates(gates_TE, ids_TK, self.renormalize and self.top_k > 1)
        return RouterOutput(ids_TK=ids_TK, weights_TK=weights_TK, scores_TE=probs_TE,
                            logits_TE=logits_TE)


@register_router(RouterType.recurrent)
class RecurrentRouter(Router):
    """RMoE's layerwise recurrent router (Qiu et al. 2024, arXiv 2408.06793; the reference
    code is qiuzh20/RMoE ``llama_moe_rnn/llama_moe_modeling.py``).

        x'_l = u_l W1_l^T              W1_l (H, D): ``proj``, per layer, no bias
        h_l  = cell(x'_l, h_{l-1})      one GRU (or tanh RNN) cell shared by every MoE layer
        logits_l = h_l W2_l^T          W2_l (E, H): ``head``, per layer, no bias

    then softmax top-k with the weights renormalised (Mixtral). The logits come from h_l
    only. h_0 = 0 at the first MoE layer, and h_l goes to the next MoE layer without a
    detach, so the LM loss reaches earlier layers' routers through it. The cell belongs to
    the model (``Transformer.router_rnn``: saved once, its gradients summed over every
    layer and pipeline stage that uses it); :meth:`bind_cell` hands it to the router.
    Everything runs in float32 with autocast off, like every gate. The state is
    token-local, so sequence shards need no gather.
    """

    recurrent = True

    def __init__(self, dim: int, num_experts: int, top_k: int, cfg: RouterConfig) -> None:
        super().__init__(dim, num_experts, top_k, cfg)
        del self.gate  # the logits come from the state: no D -> E gate
        self.hidden = cfg.rnn_hidden
        self.proj = nn.Linear(dim, self.hidden, bias=False)
        self.head = nn.Linear(self.hidden, num_experts, bias=False)
        self._cell: list[nn.Module] = []  # a plain list: the model registers the cell

    def bind_cell(self, cell: nn.Module) -> None:
        self._cell[:] = [cell]

    @property
    def cell(self) -> nn.Module:
        if not self._cell:
            raise RuntimeError(
                f"the recurrent router of layer {self.layer_idx} has no cell: the model "
                f"binds its shared router_rnn (Transformer.bind_router_cells)")
        return self._cell[0]

    def init_weights(self, init_std: float) -> None:
        nn.init.normal_(self.proj.weight, mean=0.0, std=init_std)
        nn.init.normal_(self.head.weight, mean=0.0, std=init_std)
        with torch.no_grad():
            self.expert_bias.zero_()
            self.temperature_t.fill_(self._temperature)

    def _logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the recurrent router's logits need its state: call forward")

    def forward(self, x_TD: torch.Tensor, state_TH: torch.Tensor | None = None) -> RouterOutput:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            u_TH = F.linear(x_TD.float(), self.proj.weight.float())
            if state_TH is None:
                state_TH = torch.zeros_like(u_TH)
            h_TH = rnn_cell_step(self.cell, u_TH, state_TH.float())
            logits_TE = F.linear(h_TH, self.head.weight.float())
        z_TE = self._z(logits_TE)
        raw_TE = routing.score(z_TE, self.score_func)
        ids_TK = routing.topk_select(raw_TE, self.top_k, self.expert_bias, 1, 1,
                                     self.cfg.group_score)
        weights_TK = routing.topk_gates(raw_TE, ids_TK, self.renormalize and self.top_k > 1,
                                        self.route_scale)
        scores_TE = (raw_TE if self.score_func == ScoreFunc.softmax
                     else routing.sigmoid_probs(z_TE))
        return RouterOutput(ids_TK=ids_TK, weights_TK=weights_TK, scores_TE=scores_TE,
                            logits_TE=z_TE, state_TH=h_TH)


def build_rnn_cell(cfg: RouterConfig) -> nn.Module:
    """The recurrent router's shared cell: ``nn.GRUCell`` or a tanh ``nn.RNNCell``,
    input = hidden = ``moe.router.rnn_hidden``."""
    H = cfg.rnn_hidden
    if RNNCell(cfg.rnn_cell) == RNNCell.gru:
        return nn.GRUCell(H, H)
    return nn.RNNCell(H, H, nonlinearity="tanh")


def rnn_cell_step(cell: nn.Module, x_TH: torch.Tensor, h_TH: torch.Tensor) -> torch.Tensor:
    """One step of ``cell``, returned in float32. The cell module itself is called (so a
    wrapper's hooks, e.g. FSDP's all-gather of its weights, run), in its weights' dtype:
    float32 unless FSDP computes in bf16."""
    dtype = cell.weight_ih.dtype
    return cell(x_TH.to(dtype), h_TH.to(dtype)).float()


@register_router(RouterType.compete)
class CompeteRouter(TopKRouter):
    """CompeteSMoE's router (Nguyen et al. 2025, arXiv 2505.13380; the reference code is
    Fsoft-AIC/CompeteSMoE ``moe_model/model/moe/competesmoe.py``): a softmax top-k router
    (weights renormalised) that on competition steps hands the choice to the experts.

    :meth:`competes` says whether this layer competes now: on training forwards with
    gradients, at the (step, layer) pairs of :func:`routing.compete_schedule`, drawn from
    (seed, step, layer) like every random draw here, so every rank, layout and resume
    agrees. The competition itself runs in :meth:`MoELayer._compete` (it needs every
    expert). ``force`` (tests, tools) overrides the schedule: True competes on every
    training forward, False never.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, cfg: RouterConfig) -> None:
        super().__init__(dim, num_experts, top_k, cfg)
        self.moe_layer_ids: tuple[int, ...] = ()  # every MoE layer of the model (the cap)
        self.force: bool | None = None

    @torch.compiler.disable  # a host decision from a cached schedule: never traced
    def competes(self) -> bool:
        if not (self.training and torch.is_grad_enabled()):
            return False
        if self.force is not None:
            return self.force
        ctx, cfg = self.context, self.cfg
        layers = self.moe_layer_ids or (self.layer_idx,)
        pairs = routing.compete_schedule(ctx.seed, ctx.total_steps, layers, cfg.compete_rate,
                                         cfg.compete_warmup, cfg.max_compete_layers)
        return (ctx.step, self.layer_idx) in pairs


def build_router(dim: int, num_experts: int, top_k: int, cfg: RouterConfig) -> Router:
    """Instantiate the router registered under ``cfg.name``."""
    kind = RouterType(cfg.name)
    if kind not in ROUTERS:
        raise ConfigError(
            f"moe.router.name={cfg.name!r} has no registered router: use one of "
            f"{sorted(k.value for k in ROUTERS)}"
        )
    return ROUTERS[kind](dim, num_experts, top_k, cfg)
