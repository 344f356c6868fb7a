"""Routers: which experts each token visits, and with what weight.

Legend: T tokens, D model dim, E experts, K top-k.

A router maps ``x_TD`` to a :class:`RouterOutput`. Scores are always float32: the gate
matmul runs in float32 with autocast disabled, because routing decisions are sensitive to
rounding (ST-MoE, Zoph et al., 2022, section 3). Routers form a registry keyed by
:class:`~moetrain.config.schema.RouterType`; add one with :func:`register_router`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config.schema import ConfigError, KernelBackend, RouterConfig, RouterType, ScoreFunc
from moetrain.kernels import use_triton


@dataclass(frozen=True)
class RouterOutput:
    """What the router decided for one batch of tokens.

    ids_TK: int64 expert ids, best first.
    weights_TK: float32 combine weights (differentiable w.r.t. the gate).
    scores_TE: float32 per-token probabilities over all experts, used by the losses:
        softmax(logits / temperature), or for sigmoid routers sigmoid(logits / temperature)
        normalised to sum to 1 per token.
    logits_TE: float32 raw gate logits (before temperature), used by the z-loss.
    """

    ids_TK: torch.Tensor
    weights_TK: torch.Tensor
    scores_TE: torch.Tensor
    logits_TE: torch.Tensor


ROUTERS: dict[RouterType, type[nn.Module]] = {}


def register_router(kind: RouterType) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator adding a router to the registry under ``kind``."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        ROUTERS[kind] = cls
        return cls

    return deco


@register_router(RouterType.topk)
class TopKRouter(nn.Module):
    """Top-k routing over softmax (Mixtral; Jiang et al., 2024) or sigmoid scores
    (DeepSeek-V3; DeepSeek-AI, 2024).

    - ``expert_bias`` (E,), a persistent buffer of zeros, is added to the scores for the
      top-k *selection* only; the weights are gathered from the unbiased scores. A callback
      nudges it towards balanced load (DeepSeek-V3's auxiliary-loss-free balancing,
      Wang et al., 2024). With the bias at zero, routing is plain top-k.
    - ``temperature`` divides the logits before the score function (dense-to-sparse
      schedules anneal it); ``top_k`` and ``temperature`` are plain attributes that
      callbacks may change between steps.
    - ``renormalize`` rescales the k weights of each token to sum to 1.
    - ``kernel_backend`` (set by the MoE layer from ``moe.kernel_backend``): with Triton,
      scores, biased top-k and weights run in one fused kernel
      (``moetrain.kernels.ops.topk_router``); same outputs, same gradients.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, cfg: RouterConfig) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ConfigError(
                f"model.top_k={top_k} is invalid: must be in [1, model.num_experts={num_experts}]"
            )
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.score_func = ScoreFunc(cfg.score_func)
        self.renormalize = cfg.renormalize
        self.temperature = float(cfg.temperature)
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=True)
        self.kernel_backend = KernelBackend.auto

    def init_weights(self, init_std: float) -> None:
        nn.init.normal_(self.gate.weight, mean=0.0, std=init_std)
        with torch.no_grad():
            self.expert_bias.zero_()

    def _logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        # float32 matmul even under autocast: routing is precision sensitive.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), self.gate.weight.float())

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        logits_TE = self._logits(x_TD)
        # The fused kernel implements this class's selection; subclasses that change
        # _select keep the torch path.
        if type(self)._select is TopKRouter._select and use_triton(self.kernel_backend, logits_TE):
            from moetrain.kernels import ops

            ids_TK, weights_TK, scores_TE = ops.topk_router(
                logits_TE, self.expert_bias, self.top_k, self.score_func == ScoreFunc.sigmoid,
                self.renormalize, self.temperature)
            return RouterOutput(ids_TK=ids_TK, weights_TK=weights_TK, scores_TE=scores_TE,
                                logits_TE=logits_TE)
        z_TE = logits_TE / self.temperature
        if self.score_func == ScoreFunc.softmax:
            raw_TE = torch.softmax(z_TE, dim=-1)
            scores_TE = raw_TE
        else:
            raw_TE = torch.sigmoid(z_TE)
            scores_TE = raw_TE / raw_TE.sum(dim=-1, keepdim=True)
        ids_TK = self._select(raw_TE)
        weights_TK = raw_TE.gather(1, ids_TK)
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return RouterOutput(ids_TK=ids_TK, weights_TK=weights_TK, scores_TE=scores_TE,
                            logits_TE=logits_TE)

    def _select(self, raw_TE: torch.Tensor) -> torch.Tensor:
        biased_TE = raw_TE.detach() + self.expert_bias.float()
        return torch.topk(biased_TE, self.top_k, dim=-1, sorted=True).indices

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"score_func={self.score_func.value}, renormalize={self.renormalize}")


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


def build_router(dim: int, num_experts: int, top_k: int, cfg: RouterConfig) -> nn.Module:
    """Instantiate the router registered under ``cfg.name``."""
    kind = RouterType(cfg.name)
    if kind not in ROUTERS:
        raise ConfigError(
            f"moe.router.name={cfg.name!r} has no registered router: use one of "
            f"{sorted(k.value for k in ROUTERS)}"
        )
    return ROUTERS[kind](dim, num_experts, top_k, cfg)
