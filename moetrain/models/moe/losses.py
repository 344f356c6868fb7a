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


def xmoe_balance_loss(scores_TE: torch.Tensor, num_experts: int,
                      counts_E: torch.Tensor | None = None,
                      num_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """XMoE's balance loss (Yang et al. 2024, arXiv 2403.18926; ysngki/XMoE
    ``sharded_moe.py::main_thresholdGating``): the Switch loss on each token's top-1 choice,
    whatever the number of experts the token uses.

        loss = E * sum_e mean_t(p_te) * ce_e,   ce_e = (tokens whose argmax_e p_te = e) / T

    ``counts_E`` / ``num_tokens``: the top-1 counts and T, summed over ranks for
    global-batch statistics (default: this micro-batch's). 1 at perfect balance.
    """
    if counts_E is None:
        counts_E = expert_counts(scores_TE.detach().argmax(dim=-1, keepdim=True), num_experts)
    if num_tokens is None:
        num_tokens = scores_TE.shape[0]
    return load_balancing_loss(scores_TE, None, num_experts, counts_E, num_tokens)


def evomoe_balance_loss(gates_TE: torch.Tensor, chosen_TE: torch.Tensor,
                        counts_E: torch.Tensor | None = None,
                        num_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """EvoMoE's gate loss (Nie et al. 2021, arXiv 2112.14397; codecaution/EvoMoE
    ``fairseq/modules/moe/topkgate.py``), with gates = chosen * softmax(logits):

        loss = E^2 * mean_e(me_e * ce_e) = E * sum_e me_e * ce_e
        me_e = mean_t gates_te           (carries the gradient)
        ce_e = mean_t chosen_te          (1 where token t uses expert e; no gradient)

    ``gates_TE`` are the chosen experts' probabilities (zero elsewhere). ``counts_E`` /
    ``num_tokens``: sum_t chosen_te and T, summed over ranks for global statistics.
    Top-1 routing at perfect balance with gate p gives p; every token on every expert
    with gates 1/E (dense) gives E.
    """
    E = gates_TE.shape[-1]
    if counts_E is None:
        counts_E = chosen_TE.detach().float().sum(dim=0)
    if num_tokens is None:
        num_tokens = gates_TE.shape[0]
    ce_E = counts_E.float() / num_tokens
    me_E = gates_TE.float().mean(dim=0)
    return E * (me_E * ce_E).sum()


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


def seq_load_balancing_loss(scores_BSE: torch.Tensor, counts_BE: torch.Tensor,
                            top_k: int, seq_len: int | None = None) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss (arXiv 2412.19437, eqs. 17-20), without alpha:

        L = mean_b sum_e f_be P_be
        f_be = E / (K * S) * (tokens of sequence b whose *unbiased* top-K holds e)
        P_be = (1/S) sum_s s'_bse          (s' = scores normalised per token)

    ``counts_BE`` must come from the unbiased top-k before any capacity drop (Megatron-LM
    #1513); under sequence sharding they are summed over the shards, and ``scores_BSE``
    holds this rank's positions (``seq_len`` = the whole sequence's). Perfect balance
    gives 1.
    """
    _, S, E = scores_BSE.shape
    f_BE = counts_BE.float() * (E / (top_k * (seq_len or S)))
    P_BE = scores_BSE.float().mean(dim=1)
    return (f_BE * P_BE).sum(dim=-1).mean()


def cv_squared(x_E: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation var(x) / mean(x)^2 with the population variance
    (divide by n, as tensor2tensor's ``cv_squared``): CV^2([1, 0]) = 1. 0 for n = 1."""
    x = x_E.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var(unbiased=False) / (x.mean().square() + 1e-10)


def prob_in_topk(clean_TE: torch.Tensor, noisy_TE: torch.Tensor, noise_std_TE: torch.Tensor,
                 top_k: int) -> torch.Tensor:
    """Shazeer et al. 2017, App. A: P(x, i) = Phi((clean_i - kth_excluding(noisy, k, i)) /
    std_i), the probability that expert i stays in the top k under a fresh noise draw.

    kth_excluding: if i is in the noisy top k, the threshold is the (k+1)-th noisy value,
    otherwise the k-th (tensor2tensor's ``_prob_in_top_k``). Needs k < E.
    """
    top_TK1 = noisy_TE.topk(top_k + 1, dim=-1).values
    in_thr = top_TK1[:, top_k:top_k + 1]
    out_thr = top_TK1[:, top_k - 1:top_k]
    is_in = noisy_TE > in_thr
    p_in = torch.special.ndtr((clean_TE - in_thr) / noise_std_TE)  # the normal CDF
    p_out = torch.special.ndtr((clean_TE - out_thr) / noise_std_TE)
    return torch.where(is_in, p_in, p_out)


# ----------------------------------------------------------------------------- HMoE
def size_weighted_balance_loss(scores_TE: torch.Tensor, counts_E: torch.Tensor,
                               num_routed: int | torch.Tensor,
                               sizes_E: torch.Tensor | list[int]) -> torch.Tensor:
    """HMoE's size-aware balance loss (``moe.balance_loss=size_weighted``): the Switch loss
    with each expert's routed share weighted by its hidden size relative to the mean.

        loss = E * sum_e (f_e * F_e / mean(F)) * P_e
        f_e  = counts_E[e] / num_routed (routed rows, T*K; not differentiable)
        P_e  = mean_t scores_te (carries the gradient)

    An expert's cost is tokens x F_e, so the weight makes routing to large experts cost
    more than routing to small ones, pushing activation toward smaller experts as HMoE's
    parameter penalty is described to (Wang et al., 2024, arXiv 2408.10681). UNVERIFIED:
    the paper's exact P-Penalty formula; the normalisation by mean(F) is moetrain's
    choice, so that with equal sizes it is the Switch loss (1.0 at perfect balance).
    ``counts_E`` / ``num_routed`` may be summed over ranks (global-batch statistics), as
    in :func:`load_balancing_loss`.
    """
    sizes = torch.as_tensor(sizes_E, dtype=torch.float32, device=scores_TE.device)
    f_E = counts_E.float() / num_routed
    P_E = scores_TE.float().mean(dim=0)
    return sizes.numel() * (f_E * sizes / sizes.mean() * P_E).sum()
