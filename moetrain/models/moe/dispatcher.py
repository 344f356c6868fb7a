"""Token dispatchers: move routed rows to their experts and back.

Legend: T tokens, D model dim, E experts, e local experts, K top-k (the slot width),
R routed rows (the (token, slot) pairs that reach an expert; R = T*K when dropless and
every slot is active).

A dispatcher is not an nn.Module: it owns no parameters, only the data movement.
``dispatch`` returns the rows sorted by (local) expert plus a frozen :class:`DispatchMeta`;
``combine`` consumes that meta to undo the permutation and apply the router weights.
The MoE layer only sees the :class:`Dispatcher` protocol, so the expert-parallel
:class:`AllToAllDispatcher` replaces :class:`LocalDispatcher` at wiring time. It is the
one object in moetrain/models/ that holds a process group (handed to it by
``moetrain.parallel.expert.apply_ep``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

from moetrain.config.schema import ConfigError, DropPolicy, KernelBackend
from moetrain.kernels import use_triton
from moetrain.kernels.reference import permute_ref, routing_metadata_ref


@dataclass(frozen=True)
class DispatchMeta:
    """What ``combine`` needs to undo ``dispatch``.

    row_index_R: int64 flat slot index t*K+k of each dispatched row, in dispatch order.
    kept_TK: bool, True where a (token, slot) row was dispatched: False where it was
        dropped for lack of capacity or the slot is inactive.
    weights_TK: float32 router weights (differentiable), applied in ``combine``.
    num_tokens, top_k: T and K.
    out_dtype: dtype of ``combine``'s result (the dtype of x_TD).
    tokens_per_expert: int64 (e,) rows per local expert, in dispatch order.
    num_dropped: int64 0-dim tensor, number of active (token, slot) rows dropped for
        capacity (inactive slots are not counted: they were never routed).
    pos_TK: int32 position of each (token, slot) among the dispatched rows, -1 if not kept;
        set by the Triton path (``combine`` then runs the fused unpermute+combine kernel).
    """

    row_index_R: torch.Tensor
    kept_TK: torch.Tensor
    weights_TK: torch.Tensor
    num_tokens: int
    top_k: int
    out_dtype: torch.dtype
    tokens_per_expert: torch.Tensor
    num_dropped: torch.Tensor
    pos_TK: torch.Tensor | None = None


@runtime_checkable
class Dispatcher(Protocol):
    """Moves routed rows to experts (``dispatch``) and back (``combine``).

    ``ids_TK``/``weights_TK`` have a fixed width of K slots. ``active_TK`` (bool, None = all
    True) marks the slots that route to ``ids_TK[t, k]``; routers that give a token a
    variable number of experts (threshold routing, XMoE; expert choice) leave the rest
    False. An inactive slot is not dispatched, not counted in ``tokens_per_expert`` or
    ``num_dropped``, and adds exactly zero in ``combine`` (its weight gets a zero gradient);
    its id may be any expert.
    """

    def dispatch(
        self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
        active_TK: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, DispatchMeta]: ...

    def combine(self, y_RD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor: ...


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Rows one expert accepts: ceil(capacity_factor * T * K / E) (Switch, Fedus et al., 2021).

    K is the slot width, also when some slots are inactive (variable-k routing).

    A tolerance of 1e-9 keeps float noise (1.1 * 10 = 11.000000000000002) from adding a row.
    """
    if capacity_factor <= 0:
        raise ConfigError(f"moe.capacity_factor={capacity_factor!r} is invalid: must be > 0, "
                          f"or use moe.dispatch=dropless")
    return max(0, math.ceil(capacity_factor * num_tokens * top_k / num_experts - 1e-9))


class LocalDispatcher:
    """Single-device dispatcher: sorts the T*K (token, slot) rows by expert.

    Rows are ordered by a stable sort of the expert ids over the flat index t*K+k, so within
    an expert rows keep token order. Each token's x row is replicated once per slot.

    ``capacity_factor=None`` is dropless. Otherwise each expert keeps
    :func:`expert_capacity` of its active rows and the rest are dropped: they are not sent
    to any expert (no padding rows) and contribute zero in ``combine``; the block's residual
    connection carries those tokens (Switch Transformer, section 2.2). ``drop_policy``
    (``moe.drop_policy``) chooses the kept rows: ``probs`` the highest router weights,
    ``slot`` first choices before second choices (GShard), ``position`` the earliest flat
    index t*K+k (:func:`moetrain.kernels.reference.capacity_keep`). Whatever the policy,
    an expert's kept rows go out in flat-index order.

    ``kernel_backend`` (``moe.kernel_backend``) selects the Triton kernels of
    ``moetrain.kernels`` (routing metadata, permute, fused unpermute+combine); otherwise
    their torch references in ``moetrain.kernels.reference`` run: the same rows in the same
    order.
    """

    def __init__(self, num_experts: int, capacity_factor: float | None = None,
                 kernel_backend: KernelBackend = KernelBackend.auto,
                 drop_policy: DropPolicy = DropPolicy.probs) -> None:
        if capacity_factor is not None and capacity_factor <= 0:
            raise ConfigError(
                f"moe.capacity_factor={capacity_factor!r} is invalid: must be > 0, or use "
                f"moe.dispatch=dropless"
            )
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.kernel_backend = KernelBackend(kernel_backend)
        self.drop_policy = DropPolicy(drop_policy)

    def dispatch(
        self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
        active_TK: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, DispatchMeta]:
        T, K = ids_TK.shape
        cap = (None if self.capacity_factor is None
               else expert_capacity(T, K, self.num_experts, self.capacity_factor))
        how = {"policy": self.drop_policy, "weights_TK": weights_TK, "active_TK": active_TK}
        if use_triton(self.kernel_backend, x_TD):
            from moetrain.kernels import ops

            route = ops.routing_metadata(ids_TK, self.num_experts, cap, **how)
            x_RD = ops.permute(x_TD, route.row_index_R, route.pos_TK, K)
            pos_TK = route.pos_TK  # combine then runs the fused unpermute+combine kernel
        else:
            route = routing_metadata_ref(ids_TK, self.num_experts, cap, **how)
            x_RD = permute_ref(x_TD, route.row_index_R, K)
            pos_TK = None
        meta = DispatchMeta(
            row_index_R=route.row_index_R,
            kept_TK=route.pos_TK >= 0,
            weights_TK=weights_TK,
            num_tokens=T,
            top_k=K,
            out_dtype=x_TD.dtype,
            tokens_per_expert=route.tokens_per_expert,
            num_dropped=route.num_dropped,
            pos_TK=pos_TK,
        )
        return x_RD, meta

    def combine(self, y_RD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        if meta.pos_TK is not None:
            from moetrain.kernels import ops

            return ops.unpermute_combine(y_RD, meta.weights_TK, meta.pos_TK, meta.out_dtype)
        return combine_rows(y_RD, meta)


def combine_rows(y_RD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
    """Scatter rows back to their (token, slot) positions and sum the slots with the weights.

    out_t = sum_k w_tk * y_(t,k), in float32; dropped and inactive slots hold zeros and
    their weights are masked to zero (so they add exactly zero and get no weight gradient).
    Each slot is written exactly once (index_copy), so the result is deterministic on every
    device.
    """
    T, K = meta.num_tokens, meta.top_k
    D = y_RD.shape[-1]
    y_TKD = y_RD.new_zeros(T * K, D).index_copy(0, meta.row_index_R, y_RD)
    w_TK = torch.where(meta.kept_TK, meta.weights_TK.float(), 0.0)
    out_TD = (y_TKD.view(T, K, D).float() * w_TK.unsqueeze(-1)).sum(dim=1)
    return out_TD.to(meta.out_dtype)


# ----------------------------------------------------------------------------- all-to-all
def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Autograd-aware all-to-all with variable splits (backward is the reverse exchange)."""
    y = funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)
    return funcol.wait_tensor(y)


@dataclass(frozen=True)
class AllToAllMeta:
    local: DispatchMeta  # the sort (and capacity drop) by global expert on this rank
    in_splits: list[int]  # rows this rank sends to each EP rank
    out_splits: list[int]  # rows this rank receives from each EP rank
    regroup_idx: torch.Tensor  # received (source-major) row -> expert-major position
    pad_idx: torch.Tensor | None  # capacity mode: kept row -> slot in the fixed-size buffer
    tokens_per_expert: torch.Tensor  # rows per LOCAL expert after the exchange
    num_dropped: torch.Tensor


class AllToAllDispatcher:
    """Expert-parallel dispatch: each of the ``ep`` ranks holds E/ep experts.

    Tokens are first sorted by global expert on their own rank (and, in capacity mode,
    the overflow dropped with the same ``drop_policy`` as :class:`LocalDispatcher`, per
    source rank; inactive slots are never sent), then exchanged:
    - dropless: per-expert counts are exchanged first, then exactly the routed rows with
      variable splits (no padding);
    - capacity: a fixed-size exchange of ``C`` slots per expert (zero rows fill unused
      slots; a SwiGLU expert maps a zero row to zero), so no counts are exchanged.
    Received rows arrive grouped by source rank; they are regrouped by local expert
    before the experts run, and the whole path is undone in ``combine``. Autograd runs
    through both exchanges.
    """

    def __init__(self, num_experts: int, group: dist.ProcessGroup,
                 capacity_factor: float | None = None,
                 kernel_backend: KernelBackend = KernelBackend.auto,
                 drop_policy: DropPolicy = DropPolicy.probs):
        self.num_experts = num_experts
        self.group = group
        self.ep = dist.get_world_size(group)
        if num_experts % self.ep:
            raise ConfigError(
                f"model.num_experts={num_experts} is not divisible by parallel.ep={self.ep}: "
                f"set parallel.ep to a divisor of model.num_experts"
            )
        self.local_experts = num_experts // self.ep
        self.capacity_factor = capacity_factor
        self.local = LocalDispatcher(num_experts, capacity_factor, kernel_backend, drop_policy)
        self.bytes_sent = 0  # token bytes sent by dispatch + combine since the last reset

    def _exchange_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """counts_E[j*e + l]: rows for expert l of EP rank j -> counts_Se[src, l] received."""
        recv = torch.empty_like(counts_E)
        dist.all_to_all_single(recv, counts_E.contiguous(), group=self.group)
        return recv.view(self.ep, self.local_experts)

    def dispatch(self, x_TD, ids_TK, weights_TK, active_TK=None):
        ep, e = self.ep, self.local_experts
        x_RD, lmeta = self.local.dispatch(x_TD, ids_TK, weights_TK, active_TK)
        counts_E = lmeta.tokens_per_expert
        pad_idx = None
        if self.capacity_factor is None:
            counts_Se = self._exchange_counts(counts_E)
            # The splits are host lists: one device-to-host read for both.
            in_splits, out_splits = torch.stack(
                [counts_E.view(ep, e).sum(1), counts_Se.sum(1)]).tolist()
            send_RD = x_RD
        else:
            cap = expert_capacity(ids_TK.shape[0], ids_TK.shape[1], self.num_experts,
                                  self.capacity_factor)
            # Row r of expert g goes to slot g*cap + (r - start of g's rows).
            starts_E = torch.cumsum(counts_E, 0) - counts_E
            expert_of_row = torch.repeat_interleave(
                torch.arange(self.num_experts, device=x_RD.device), counts_E,
                output_size=x_RD.shape[0],  # known: no device-to-host read of the counts
            )
            rank_in_expert = torch.arange(x_RD.shape[0], device=x_RD.device) - starts_E[expert_of_row]
            pad_idx = expert_of_row * cap + rank_in_expert
            send_RD = x_RD.new_zeros(self.num_experts * cap, x_RD.shape[1])
            send_RD = send_RD.index_copy(0, pad_idx, x_RD)
            counts_Se = torch.full((ep, e), cap, dtype=counts_E.dtype, device=counts_E.device)
            in_splits = out_splits = [e * cap] * ep
        recv_RD = _all_to_all(send_RD, out_splits, in_splits, self.group)
        # Received rows are [source][local expert][rows]; regroup to [local expert][source].
        local_id = torch.repeat_interleave(
            torch.arange(e, device=recv_RD.device).repeat(ep), counts_Se.flatten(),
            output_size=recv_RD.shape[0],
        )
        regroup_idx = torch.argsort(local_id, stable=True)
        self.bytes_sent += sum(in_splits) * send_RD.shape[1] * send_RD.element_size()
        meta = AllToAllMeta(
            local=lmeta,
            in_splits=in_splits,
            out_splits=out_splits,
            regroup_idx=regroup_idx,
            pad_idx=pad_idx,
            tokens_per_expert=counts_Se.sum(0),
            num_dropped=lmeta.num_dropped,
        )
        return recv_RD.index_select(0, regroup_idx), meta

    def combine(self, y_RD, meta: AllToAllMeta):
        # Undo the regroup: source-major order, as received.
        y_recv = torch.empty_like(y_RD).index_copy(0, meta.regroup_idx, y_RD)
        back = _all_to_all(y_recv, meta.in_splits, meta.out_splits, self.group)
        self.bytes_sent += sum(meta.out_splits) * y_RD.shape[1] * y_RD.element_size()
        if meta.pad_idx is not None:
            back = back.index_select(0, meta.pad_idx)
        return self.local.combine(back, meta.local)
