"""Pure-torch references of the MoE kernels: the oracle in tests and the torch path.

Legend: T tokens, D model dim, E experts, K top-k (the slot width), N = T*K (token, slot)
pairs, R dispatched rows (R = N when dropless and every slot is active, fewer when capacity
drops rows or slots are inactive), F expert hidden.

``moetrain.models.moe.dispatcher.LocalDispatcher`` runs :func:`routing_metadata_ref` and
:func:`permute_ref` on its torch path; :func:`topk_router_ref` restates
``moetrain.models.moe.router.TopKRouter`` (tests hold the two to each other). Semantics:
- rows are sorted by expert with a stable sort over the flat slot index n = t*K + k, so
  within an expert rows keep token order;
- a slot may be inactive (``active_TK`` False: routers that give a token a variable number
  of experts, such as threshold or expert-choice routing): it is never routed, counted or
  dropped, and contributes zero;
- with a capacity C, each expert keeps C of its active rows, chosen by a
  :class:`~moetrain.config.schema.DropPolicy` (:func:`capacity_keep`), and the kept rows
  still go out in flat-index order; dropped slots get position -1 and contribute zero;
- combine sums each token's K slot outputs with the router weights in float32 (a slot
  with position -1 adds exactly zero, whatever its weight, and gets a zero weight gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moetrain.config.schema import ConfigError, DropPolicy


@dataclass(frozen=True)
class RoutingMeta:
    """Where each routed (token, slot) pair goes.

    row_index_R: int64 flat slot index n = t*K + k of each dispatched row, expert-sorted.
    pos_TK: int32 position of each slot among the dispatched rows; -1 where dropped or
        inactive.
    tokens_per_expert: int64 (E,) dispatched (kept) rows per expert.
    counts_E: int64 (E,) active rows per expert before any capacity drop.
    """

    row_index_R: torch.Tensor
    pos_TK: torch.Tensor
    tokens_per_expert: torch.Tensor
    counts_E: torch.Tensor

    @property
    def num_dropped(self) -> torch.Tensor:
        """int64 0-dim: active slots dropped for capacity (inactive slots are not dropped:
        they were never routed)."""
        return self.counts_E.sum() - self.tokens_per_expert.sum()


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 (E,) number of entries of ``ids`` equal to each expert id.

    A scatter-add rather than ``torch.bincount``: on CUDA bincount reads the largest id back
    to the host to size its output (a device sync on every MoE layer's forward).
    """
    flat = ids.reshape(-1).long()
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return counts_E.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int64))


def _routed_ids(ids_TK: torch.Tensor, num_experts: int,
                active_TK: torch.Tensor | None) -> torch.Tensor:
    """int64 (N,) flat expert ids with inactive slots mapped to E (a bucket past the last
    expert, so a stable sort puts them last and counting them is one slice away)."""
    flat = ids_TK.reshape(-1).long()
    if active_TK is None:
        return flat
    return torch.where(active_TK.reshape(-1), flat, num_experts)


def capacity_keep(ids_TK: torch.Tensor, num_experts: int, capacity: int,
                  policy: DropPolicy | str = DropPolicy.position,
                  weights_TK: torch.Tensor | None = None,
                  active_TK: torch.Tensor | None = None) -> torch.Tensor:
    """bool (T, K): the active slots that survive a capacity of ``capacity`` rows per expert.

    Each expert keeps its ``capacity`` active slots of highest priority under ``policy``:
    - ``position``: the lowest flat index n = t*K + k (Switch Transformer; earlier tokens
      first, so an earlier token's second choice beats a later token's first);
    - ``slot``: the lowest (k, t): every first choice before any second choice, then by
      token (GShard, Lepikhin et al., 2020, Algorithm 1);
    - ``probs``: the highest router weight ``weights_TK[t, k]``, ties to the lower flat
      index (Megatron-core's default ``probs`` drop policy);
    - ``rank``: the lowest choice rank k (every first choice before any second choice),
      then the highest weight, then the lower token (XMoE's ``_top_idx`` on the priority
      choice rank + probability).
    One sort of the key expert * N + priority rank: no loop over tokens or experts.
    """
    T, K = ids_TK.shape
    N, E, dev = T * K, num_experts, ids_TK.device
    policy = DropPolicy(policy)
    flat = _routed_ids(ids_TK, E, active_TK)
    n_N = torch.arange(N, device=dev)
    if policy == DropPolicy.position:
        prio_N = n_N
    elif policy == DropPolicy.slot:
        prio_N = (n_N % K) * T + torch.div(n_N, K, rounding_mode="floor")
    else:
        if weights_TK is None:
            raise ConfigError(f"moe.drop_policy={policy.value} needs the router weights: pass "
                              f"weights_TK, or set moe.drop_policy=slot|position")
        # descending + stable: equal weights keep flat order (the lower index first).
        best_N = torch.argsort(weights_TK.detach().reshape(-1), descending=True, stable=True)
        if policy == DropPolicy.rank:  # then a stable sort by choice rank k = n % K
            best_N = best_N[torch.argsort(best_N % K, stable=True)]
        prio_N = torch.empty_like(n_N).scatter_(0, best_N, n_N)
    order_N = torch.argsort(flat * N + prio_N)  # unique keys: expert, then priority
    counts_E = expert_counts(flat, E + 1)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    e_sorted = flat[order_N]
    rank_N = n_N - starts_E[e_sorted]
    keep_N = torch.zeros(N, dtype=torch.bool, device=dev)
    keep_N[order_N] = (rank_N < capacity) & (e_sorted < E)
    return keep_N.view(T, K)


def routing_metadata_ref(ids_TK: torch.Tensor, num_experts: int,
                         capacity: int | None = None, *,
                         policy: DropPolicy | str = DropPolicy.position,
                         weights_TK: torch.Tensor | None = None,
                         active_TK: torch.Tensor | None = None) -> RoutingMeta:
    """Stable sort of the active slots by expert, keeping at most ``capacity`` rows per
    expert chosen by ``policy`` (see :func:`capacity_keep`; ``probs`` needs ``weights_TK``).

    ``active_TK`` (bool, None = all active) marks the slots that route to ``ids_TK``; the
    ids of inactive slots are ignored. Dropless with every slot active needs no host sync;
    otherwise the number of dispatched rows is read back once.
    """
    T, K = ids_TK.shape
    E, dev = num_experts, ids_TK.device
    flat = _routed_ids(ids_TK, E, active_TK)
    order_N = torch.argsort(flat, stable=True)  # inactive slots (bucket E) last
    counts_all = expert_counts(flat, E + 1)
    counts_E = counts_all[:E]
    if capacity is None and active_TK is None:
        row_index_R, tokens_per_expert = order_N, counts_E
    elif capacity is None:
        row_index_R, tokens_per_expert = order_N[: int(counts_E.sum())], counts_E  # one sync
    elif DropPolicy(policy) == DropPolicy.position:  # the sort order is the priority order
        starts_all = torch.cumsum(counts_all, 0) - counts_all
        e_sorted = flat[order_N]
        rank_N = torch.arange(order_N.numel(), device=dev) - starts_all[e_sorted]
        row_index_R = order_N[(rank_N < capacity) & (e_sorted < E)]  # one sync
        tokens_per_expert = counts_E.clamp(max=capacity)
    else:
        keep_N = capacity_keep(ids_TK, E, capacity, policy, weights_TK, active_TK).reshape(-1)
        row_index_R = order_N[keep_N[order_N]]  # one sync
        tokens_per_expert = expert_counts(torch.where(keep_N, flat, E), E + 1)[:E]
    pos = torch.full((T * K,), -1, dtype=torch.int32, device=dev)
    pos[row_index_R] = torch.arange(row_index_R.numel(), dtype=torch.int32, device=dev)
    return RoutingMeta(row_index_R, pos.view(T, K), tokens_per_expert, counts_E)


def permute_ref(x_TD: torch.Tensor, row_index_R: torch.Tensor, top_k: int) -> torch.Tensor:
    """x_RD[r] = x_TD[row_index_R[r] // K]: each token's row replicated once per kept slot."""
    return x_TD.index_select(0, torch.div(row_index_R, top_k, rounding_mode="floor"))


def unpermute_combine_ref(y_RD: torch.Tensor, weights_TK: torch.Tensor, pos_TK: torch.Tensor,
                          out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out_t = sum_k w_tk * y_RD[pos_tk] in float32.

    Dropped or inactive slots (pos = -1) add exactly zero: their weight is masked to 0 (so
    a NaN or inf there cannot leak in) and gets a zero gradient.
    """
    T, K = pos_TK.shape
    D = y_RD.shape[-1]
    flat = pos_TK.reshape(-1).long()
    kept = flat >= 0
    y_ND = y_RD.new_zeros(T * K, D)
    y_ND[kept] = y_RD.index_select(0, flat[kept])
    w_TK = torch.where(kept.view(T, K), weights_TK.float(), 0.0)
    out = (y_ND.view(T, K, D).float() * w_TK.unsqueeze(-1)).sum(dim=1)
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
