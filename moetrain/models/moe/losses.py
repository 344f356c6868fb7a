"""Router losses and statistics, as pure functions.

Legend: T tokens, E experts, K top-k.

All functions compute in float32 and return 0-dim tensors.
"""

from __future__ import annotations

import torch

from moetrain.kernels.reference import expert_counts


def load_balancing_loss(
    scores_TE: torch.Tensor,
    ids_TK: torch.Tensor,
    num_experts: int,
    counts_E: torch.Tensor | None = None,
    num_routed: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch / GShard load-balancing loss (Fedus et al., 2021, eq. 4; Lepikhin et al., 2020).

        loss = E * sum_e f_e * P_e
        f_e  = (routed rows assigned to e) / (T * K)      (not differentiable)
        P_e  = (1/T) * sum_t scores_te                    (carries the gradient)

    ``scores_TE`` are per-token probabilities summing to 1 over experts. At perfect balance
    (f_e = P_e = 1/E) the loss is 1, its minimum over f when P is uniform. Dividing f by
    T*K (not T) keeps that value at 1 for any top-k.

    Global-batch statistics: pass ``counts_E`` (rows per expert, all E experts) and
    ``num_routed`` (sum of counts) after summing them over the data-parallel ranks; P stays
    local, so each rank's gradient is d/dP of its share of the global loss
    (Megatron-core's "global aux loss").
    """
    if counts_E is None:
        counts_E = expert_counts(ids_TK, num_experts)
    if num_routed is None:
        num_routed = ids_TK.numel()
    f_E = counts_E.float() / num_routed
    P_E = scores_TE.float().mean(dim=0)
    return num_experts * (f_E * P_E).sum()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (Zoph et al., 2022, ST-MoE, eq. 5): mean_t (logsumexp_e logits_te)^2.

    Keeps router logits small, which keeps the softmax numerically stable in low precision.
    """
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def router_entropy(scores_TE: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy -sum_e p_te log p_te (nats) of the routing distribution.

    log(E) means uniform routing; 0 means every token is certain of one expert.
    """
    p = scores_TE.float()
    return -torch.special.xlogy(p, p).sum(dim=-1).mean()
