"""Pure-torch references of the MoE kernels: the oracle in tests and the torch path.

Legend: T tokens, D model dim, E experts, K top-k, N = T*K routed (token, slot) pairs,
R dispatched rows (R = N when dropless, fewer when capacity drops rows), F expert hidden.

``moetrain.models.moe.dispatcher.LocalDispatcher`` runs :func:`routing_metadata_ref` and
:func:`permute_ref` on its torch path; :func:`topk_router_ref` restates
``moetrain.models.moe.router.TopKRouter`` (tests hold the two to each other). Semantics:
- rows are sorted by expert with a stable sort over the flat slot index n = t*K + k, so
  within an expert rows keep token order;
- with a capacity C, each expert keeps its first C rows in that order (Switch
  Transformer, Fedus et al., 2021); dropped slots get position -1 and contribute zero;
- combine sums each token's K slot outputs with the router weights in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutingMeta:
    """Where each routed (token, slot) pair goes.

    row_index_R: int64 flat slot index n = t*K + k of each dispatched row, expert-sorted.
    pos_TK: int32 position of each slot among the dispatched rows; -1 where dropped.
    tokens_per_expert: int64 (E,) dispatched (kept) rows per expert.
    counts_E: int64 (E,) routed rows per expert before any capacity drop.
    """

    row_index_R: torch.Tensor
    pos_TK: torch.Tensor
    tokens_per_expert: torch.Tensor
    counts_E: torch.Tensor

    @property
    def num_dropped(self) -> torch.Tensor:
        """int64 0-dim: slots dropped for capacity."""
        return self.pos_TK.numel() - self.tokens_per_expert.sum()


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 (E,) number of entries of ``ids`` equal to each expert id.

    A scatter-add rather than ``torch.bincount``: on CUDA bincount reads the largest id back
    to the host to size its output (a device sync on every MoE layer's forward).
    """
    flat = ids.reshape(-1).long()
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return counts_E.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int64))


def routing_metadata_ref(ids_TK: torch.Tensor, num_experts: int,
                         capacity: int | None = None) -> RoutingMeta:
    """Stable sort of the N slots by expert, keeping at most ``capacity`` rows per expert."""
    T, K = ids_TK.shape
    flat = ids_TK.reshape(-1)
    order_N = torch.argsort(flat, stable=True)
    counts_E = expert_counts(flat, num_experts)
    if capacity is None:
        row_index_R = order_N
        tokens_per_expert = counts_E
    else:
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        rank_N = torch.arange(order_N.numel(), device=flat.device) - starts_E[flat[order_N]]
        row_index_R = order_N[rank_N < capacity]
        tokens_per_expert = counts_E.clamp(max=capacity)
    pos = torch.full((T * K,), -1, dtype=torch.int32, device=flat.device)
    pos[row_index_R] = torch.arange(row_index_R.numel(), dtype=torch.int32, device=flat.device)
    return RoutingMeta(row_index_R, pos.view(T, K), tokens_per_expert, counts_E)


def permute_ref(x_TD: torch.Tensor, row_index_R: torch.Tensor, top_k: int) -> torch.Tensor:
    """x_RD[r] = x_TD[row_index_R[r] // K]: each token's row replicated once per kept slot."""
    return x_TD.index_select(0, torch.div(row_index_R, top_k, rounding_mode="floor"))


def unpermute_combine_ref(y_RD: torch.Tensor, weights_TK: torch.Tensor, pos_TK: torch.Tensor,
                          out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out_t = sum_k w_tk * y_RD[pos_tk] in float32 (dropped slots, pos = -1, add zero)."""
    T, K = pos_TK.shape
    D = y_RD.shape[-1]
    flat = pos_TK.reshape(-1).long()
    kept = flat >= 0
    y_ND = y_RD.new_zeros(T * K, D)
    y_ND[kept] = y_RD.index_select(0, flat[kept])
    out = (y_ND.view(T, K, D).float() * weights_TK.float().unsqueeze(-1)).sum(dim=1)
    return out.to(out_dtype or y_RD.dtype)


def topk_router_ref(logits_TE: torch.Tensor, expert_bias_E: torch.Tensor | None, top_k: int,
                    sigmoid: bool, renormalize: bool, temperature: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores, top-k selection and weights of ``TopKRouter`` from the gate logits.

    Returns (ids_TK int64, weights_TK float32, scores_TE float32). The bias shifts the
    selection only (DeepSeek-V3's auxiliary-loss-free balancing); weights come from the
    unbiased scores. Sigmoid scores are normalised to sum to 1 for the losses.
    """
    z_TE = logits_TE.float() / temperature
    if sigmoid:
        raw_TE = torch.sigmoid(z_TE)
        scores_TE = raw_TE / raw_TE.sum(dim=-1, keepdim=True)
    else:
        raw_TE = torch.softmax(z_TE, dim=-1)
        scores_TE = raw_TE
    biased_TE = raw_TE.detach()
    if expert_bias_E is not None:
        biased_TE = biased_TE + expert_bias_E.float()
    ids_TK = torch.topk(biased_TE, top_k, dim=-1, sorted=True).indices
    weights_TK = raw_TE.gather(1, ids_TK)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return ids_TK, weights_TK, scores_TE


def swiglu_ref(a_RF: torch.Tensor, b_RF: torch.Tensor) -> torch.Tensor:
    """h_RF = silu(a_RF) * b_RF, the SwiGLU gate of the experts (Shazeer, 2020).

    The math is float32 whatever the inputs' dtype, and the result is cast to a's dtype
    once, as :func:`moetrain.kernels.swiglu.swiglu` does. Autograd through it differentiates
    the same float32 expression: the oracle of the fused backward.
    """
    return (torch.nn.functional.silu(a_RF.float()) * b_RF.float()).to(a_RF.dtype)
