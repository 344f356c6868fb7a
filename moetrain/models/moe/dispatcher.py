"""Token dispatchers: move routed rows to their experts and back.

Legend: T tokens, D model dim, E experts, e local experts, K top-k (the slot width),
C capacity (rows per expert in capacity mode), R routed rows (the rows handed to the
experts: R = T*K when dropless and every slot is active; R = E*C in capacity mode).

A dispatcher is not an nn.Module: it owns no parameters, only the data movement.
``dispatch`` returns the rows sorted by (local) expert plus a frozen :class:`DispatchMeta`;
``combine`` consumes that meta to undo the permutation and apply the router weights.
The MoE layer only sees the :class:`Dispatcher` protocol, so the expert-parallel
:class:`AllToAllDispatcher` replaces :class:`LocalDispatcher` at wiring time. It is the
one object in moetrain/models/ that holds a process group (handed to it by
``moetrain.parallel.expert.apply_ep``).

Capacity mode with a factor > 0 never reads a device value on the host: every expert
owns a block of exactly C rows (:func:`capacity_layout`), so every shape follows from the
config and the input shape, the forward and backward run without a device
synchronisation, and ``torch.compile(fullgraph=True)`` traces the layer. A factor <= 0
is Tutel's adaptive capacity (C follows the step's largest expert load), which reads C
back once per call. Dropless mode sizes its buffers from the routing itself (see
:class:`LocalDispatcher`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

from moetrain.config.schema import CapacityRule, ConfigError, DropPolicy, KernelBackend
from moetrain.kernels.backend import use_triton
from moetrain.kernels.reference import (
    capacity_keep,
    expert_counts,
    permute_ref,
    routing_metadata_ref,
)


@dataclass(frozen=True)
class DispatchMeta:
    """What ``combine`` needs to undo ``dispatch``.

    row_index_R: int64 flat slot index t*K+k of each dispatched row, in dispatch order;
        T*K for an unfilled row of the capacity layout.
    kept_TK: bool, True where a (token, slot) row was dispatched: False where it was
        dropped for lack of capacity or the slot is inactive.
    weights_TK: float32 router weights (differentiable), applied in ``combine``.
    num_tokens, top_k: T and K.
    out_dtype: dtype of ``combine``'s result (the dtype of x_TD).
    tokens_per_expert: int64 (e,) dispatched rows per local expert, in dispatch order: the
        experts' split of x_RD (C each in capacity mode, unfilled zero rows included).
    num_dropped: int64 0-dim tensor, number of active (token, slot) rows dropped for
        capacity (inactive slots are not counted: they were never routed).
    pos_TK: int32 row of each (token, slot) among the dispatched rows, -1 if not kept;
        set by the Triton path (``combine`` then runs the fused unpermute+combine kernel).
    kept_per_expert: int64 (e,) rows per expert that hold a routed (token, slot) (equal to
        ``tokens_per_expert`` when dropless).
    rows_per_expert: capacity mode: the fixed number of rows of every expert's block, a
        host int, so the experts need no counts on the host; None when dropless.
    run: None, or ``run(x_RD, compute) -> y_RD`` for a dispatcher that moves the rows to
        the experts itself, inside the experts' call (``GroupedExperts.forward``'s ``run``;
        the chunked all-to-all of ``moetrain.parallel.expert``). The layer then passes it
        to the experts, which call it once with their ``compute``.
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
    kept_per_expert: torch.Tensor | None = None
    rows_per_expert: int | None = None
    run: Callable[[torch.Tensor, Callable[..., torch.Tensor]], torch.Tensor] | None = None


@runtime_checkable
class Dispatcher(Protocol):
    """Moves routed rows to experts (``dispatch``) and back (``combine``).

    ``ids_TK``/``weights_TK`` have a fixed width of K slots. ``active_TK`` (bool, None = all
    True) marks the slots that route to ``ids_TK[t, k]``; routers that give a token a
    variable number of experts (threshold routing, XMoE; expert choice) leave the rest
    False. An inactive slot is not dispatched, not counted in ``tokens_per_expert`` or
    ``num_dropped``, and adds exactly zero in ``combine`` (its weight gets a zero gradient);
    its id may be any expert.

    The layer runs ``y_RD = experts(x_RD, meta.tokens_per_expert, meta.rows_per_expert)``
    between the two, with ``run=meta.run`` when the meta carries one: ``y_RD`` is then
    in ``x_RD``'s order whatever ``run`` did in between.
    """

    def dispatch(
        self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
        active_TK: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, DispatchMeta]: ...

    def combine(self, y_RD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor: ...

    def dense(self, x_TD: torch.Tensor, experts: Callable) -> torch.Tensor:
        """(E, T, D): every expert's output on every token of ``x_TD`` (a dense step)."""
        ...

    def skip_rows(self, rows: torch.Tensor, row_bytes: int) -> None:
        """``rows`` (a device count) were computed where their tokens are and never
        dispatched (MoE++'s zero-computation experts): an exchanging dispatcher counts
        the bytes they saved."""
        ...


# DeepSpeed's (and XMoE's) min_capacity: the tokens rule never gives fewer rows.
MIN_TOKENS_CAPACITY = 4


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float,
                    rule: CapacityRule = CapacityRule.slots) -> int:
    """Rows one expert accepts (``moe.capacity_rule``):

    - ``slots``: ceil(capacity_factor * T * K / E) (Switch, Fedus et al., 2021, with K
      slots per token; Megatron-core's ``get_capacity``). K is the slot width, also when
      some slots are inactive (variable-k routing).
    - ``tokens``: max(ceil(capacity_factor * T / E), 4), whatever K (DeepSpeed's and XMoE's
      ``_capacity`` with ``min_capacity`` 4: a router with up to E slots per token, as
      XMoE's, would otherwise get E times the rows).

    A tolerance of 1e-9 keeps float noise (1.1 * 10 = 11.000000000000002) from adding a row.
    """
    if capacity_factor <= 0:
        raise ConfigError(f"moe.capacity_factor={capacity_factor!r} is invalid: must be > 0, "
                          f"or use moe.dispatch=dropless")
    if CapacityRule(rule) == CapacityRule.tokens:
        c = math.ceil(capacity_factor * num_tokens / num_experts - 1e-9)
        return max(MIN_TOKENS_CAPACITY, c)
    return max(0, math.ceil(capacity_factor * num_tokens * top_k / num_experts - 1e-9))


@dataclass(frozen=True)
class CapacityLayout:
    """The fixed layout of capacity mode: expert g owns rows g*C .. g*C + C - 1.

    slot_TK: int64 (T, K) row of the layout that holds slot (t, k); -1 where the slot is
        dropped or inactive.
    row_index_S: int64 (E*C,) flat slot index t*K+k held by each row; T*K where the
        row is unfilled (the expert received fewer than C rows).
    kept_E: int64 (E,) filled rows per expert.
    counts_E: int64 (E,) active rows per expert before the drop.
    """

    slot_TK: torch.Tensor
    row_index_S: torch.Tensor
    kept_E: torch.Tensor
    counts_E: torch.Tensor


def _block_rows(order_N: torch.Tensor, starts_E: torch.Tensor, kept_E: torch.Tensor,
                capacity: int, num_slots: int) -> torch.Tensor:
    """int64 (E*C,) row_index of the layout: row g*C + j holds ``order_N[starts_E[g] + j]``
    if j < kept_E[g], else the marker N = ``num_slots``. A gather, no host read."""
    E = kept_E.numel()
    if num_slots == 0 or capacity == 0:
        return torch.full((E * capacity,), num_slots, dtype=torch.int64, device=kept_E.device)
    j_C = torch.arange(capacity, device=kept_E.device)
    at_EC = (starts_E[:, None] + j_C).clamp(max=num_slots - 1)
    rows_EC = torch.where(j_C < kept_E[:, None], order_N[at_EC].long(), num_slots)
    return rows_EC.reshape(-1)


def capacity_layout(ids_TK: torch.Tensor, num_experts: int, capacity: int, *,
                    policy: DropPolicy | str = DropPolicy.position,
                    weights_TK: torch.Tensor | None = None,
                    active_TK: torch.Tensor | None = None,
                    kernels: bool = False) -> CapacityLayout:
    """Capacity routing into a fixed E x C layout, with no device-to-host read.

    Each expert keeps ``capacity`` of its active slots, chosen by ``policy``
    (:func:`moetrain.kernels.reference.capacity_keep`: the same kept set as
    :func:`~moetrain.kernels.reference.routing_metadata_ref`), and its kept slots fill
    the first rows of its block in flat-index order t*K+k; the rest of the block is
    unfilled. ``kernels`` sorts with the Triton routing kernels instead of
    ``torch.argsort``: they run dropless, without an active mask, over the candidate slots
    (other slots get id -1), so their buffers hold T*K rows, known on the host.
    """
    T, K = ids_TK.shape
    N, E, C, dev = T * K, num_experts, capacity, ids_TK.device
    policy = DropPolicy(policy)
    flat = ids_TK.reshape(-1).long()
    if active_TK is not None:
        flat = torch.where(active_TK.reshape(-1), flat, E)  # bucket E: never routed
    counts_all = expert_counts(flat, E + 1)
    if policy == DropPolicy.position:  # flat order is the priority order: rank < C keeps
        key = flat
    else:
        keep_N = capacity_keep(ids_TK, E, C, policy, weights_TK, active_TK).reshape(-1)
        key = torch.where(keep_N, flat, E)
    if kernels:
        from moetrain.kernels import ops  # imports triton: only on this path

        # Ids outside [0, E) are skipped; with no capacity and no mask the kernels size
        # their outputs by T*K, so they read nothing back.
        route = ops.routing_metadata(torch.where(key < E, key, -1).view(T, K), E)
        order_N, key_counts_E = route.row_index_R, route.tokens_per_expert
        starts_E = torch.cumsum(key_counts_E, 0) - key_counts_E
        pos_N = route.pos_TK.reshape(-1).long()
        e_N = key.clamp(max=E - 1)
        rank_N = pos_N - starts_E[e_N]
        slot_N = torch.where((pos_N >= 0) & (rank_N < C), e_N * C + rank_N, -1)
    else:
        order_N = torch.argsort(key, stable=True)  # unrouted (bucket E) last
        key_counts_all = (counts_all if policy == DropPolicy.position
                          else expert_counts(key, E + 1))
        starts_all = torch.cumsum(key_counts_all, 0) - key_counts_all
        key_counts_E, starts_E = key_counts_all[:E], starts_all[:E]
        e_sorted = key[order_N]
        rank_sorted = torch.arange(N, device=dev) - starts_all[e_sorted]
        slot_sorted = torch.where((e_sorted < E) & (rank_sorted < C),
                                  e_sorted * C + rank_sorted, -1)
        slot_N = torch.empty_like(slot_sorted).scatter_(0, order_N, slot_sorted)
    kept_E = key_counts_E.clamp(max=C)
    return CapacityLayout(
        slot_TK=slot_N.view(T, K),
        row_index_S=_block_rows(order_N, starts_E, kept_E, C, N),
        kept_E=kept_E,
        counts_E=counts_all[:E],
    )


class _ZeroGradRows(torch.autograd.Function):
    """Identity whose backward zeroes the gradient of the rows where ``keep_R`` is False.

    The fused combine kernel writes the gradient of the rows it reads (the kept slots)
    and leaves the others uninitialised; unfilled rows of the capacity layout must get
    an exact zero, or stale memory would reach the experts' weight gradients.
    """

    @staticmethod
    def forward(ctx, y_RD: torch.Tensor, keep_R: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(keep_R)
        return y_RD.view_as(y_RD)

    @staticmethod
    def backward(ctx, grad_RD: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep_R,) = ctx.saved_tensors
        return torch.where(keep_R[:, None], grad_RD, 0.0), None


class LocalDispatcher:
    """Single-device dispatcher: sorts the T*K (token, slot) rows by expert.

    Rows are ordered by a stable sort of the expert ids over the flat index t*K+k, so within
    an expert rows keep token order. Each token's x row is replicated once per slot.

    ``capacity_factor=None`` is dropless: x_RD holds exactly the routed rows. With
    inactive slots (variable-k routers) their number is data-dependent and is read back
    once to size x_RD; with every slot active it is T*K and nothing is read back.

    Otherwise each expert keeps :func:`expert_capacity` C of its active rows and the rest
    are dropped: they contribute zero in ``combine``, and the block's residual connection
    carries those tokens (Switch Transformer, section 2.2). ``capacity_rule``
    (``moe.capacity_rule``) sets C (:func:`expert_capacity`) and ``drop_policy``
    (``moe.drop_policy``) chooses the kept rows: ``probs`` the highest router weights,
    ``slot`` first choices before second choices (GShard), ``rank`` first choices before
    second choices, then by weight (XMoE), ``position`` the earliest flat
    index t*K+k (:func:`moetrain.kernels.reference.capacity_keep`). x_RD is the fixed
    E x C layout of :func:`capacity_layout`: expert g's kept rows, in flat-index order,
    then zero rows up to C (a SwiGLU expert maps a zero row to zero, and ``combine``
    never reads it). Its shape depends only on T, K, E and the factor, so this mode never
    synchronises with the device.

    A factor <= 0 is Tutel's adaptive capacity (Hwang et al., 2023, arXiv 2206.03382;
    ``extract_critical`` of its fast dispatcher), with the same E x C layout:
    ``0`` sets C to the step's largest expert load L (the active rows routed to one
    expert), so nothing is dropped; ``-c`` sets C = min(L, nominal C of factor c under
    ``capacity_rule``), which drops by ``drop_policy`` only where L exceeds the nominal
    capacity. C is a host int, so it costs one device-to-host read per call
    (:meth:`adaptive_capacity`). Under expert parallelism every rank needs the same C:
    ``agree_capacity`` (set by :class:`AllToAllDispatcher`) takes each rank's value to the
    largest over the group before the read.

    ``kernel_backend`` (``moe.kernel_backend``) selects the Triton kernels of
    ``moetrain.kernels`` (routing metadata, permute, fused unpermute+combine); otherwise
    their torch references in ``moetrain.kernels.reference`` run: the same rows in the same
    order.

    ``expert_order`` (None: the identity) lists the global expert id of each expert SLOT:
    rows are sorted by slot, ``tokens_per_expert`` counts per slot, and ``dense`` still
    returns experts in id order. HMoE's ragged experts hold their size classes in slot
    order (``RaggedExperts.expert_order``), so each class's rows are contiguous. Relabelling
    is a bijection: every expert keeps the same rows (and, with a capacity, drops the same
    ones), only the blocks' order changes.
    """

    def __init__(self, num_experts: int, capacity_factor: float | None = None,
                 kernel_backend: KernelBackend = KernelBackend.auto,
                 drop_policy: DropPolicy = DropPolicy.probs,
                 capacity_rule: CapacityRule = CapacityRule.slots,
                 expert_order: list[int] | None = None) -> None:
        if capacity_factor is not None and not math.isfinite(capacity_factor):
            raise ConfigError(
                f"moe.capacity_factor={capacity_factor!r} is invalid: must be a finite "
                f"number (> 0 fixed, 0 adaptive, < 0 adaptive with a cap), or use "
                f"moe.dispatch=dropless"
            )
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        # Adaptive capacity (factor <= 0) under expert parallelism: maps this rank's
        # capacity (a 0-dim int64 tensor) to the one every rank of the group uses.
        self.agree_capacity: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.kernel_backend = KernelBackend(kernel_backend)
        self.drop_policy = DropPolicy(drop_policy)
        self.capacity_rule = CapacityRule(capacity_rule)
        self.expert_order = None
        if expert_order is not None and list(expert_order) != list(range(num_experts)):
            if sorted(expert_order) != list(range(num_experts)):
                raise ValueError(f"expert_order={list(expert_order)} is not a permutation of "
                                 f"the {num_experts} expert ids")
            self.expert_order = list(expert_order)
        self._slot_of: dict[torch.device, torch.Tensor] = {}

    def slot_of(self, device: torch.device) -> torch.Tensor | None:
        """int64 (E,): the slot of each global expert id (None: the identity)."""
        if self.expert_order is None:
            return None
        if device not in self._slot_of:
            order = torch.tensor(self.expert_order, dtype=torch.int64)
            slot = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
            self._slot_of[device] = slot.to(device)
        return self._slot_of[device]

    def dispatch(
        self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
        active_TK: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, DispatchMeta]:
        slot_of = self.slot_of(ids_TK.device)
        if slot_of is not None:  # sort by slot: the experts' storage order
            ids_TK = slot_of[ids_TK.long()].to(ids_TK.dtype)
        if self.capacity_factor is not None:
            return self._dispatch_capacity(x_TD, ids_TK, weights_TK, active_TK)
        T, K = ids_TK.shape
        how = {"policy": self.drop_policy, "weights_TK": weights_TK, "active_TK": active_TK}
        if use_triton(self.kernel_backend, x_TD):
            from moetrain.kernels import ops

            route = ops.routing_metadata(ids_TK, self.num_experts, None, **how)
            x_RD = ops.permute(x_TD, route.row_index_R, route.pos_TK, K)
            pos_TK = route.pos_TK  # combine then runs the fused unpermute+combine kernel
        else:
            route = routing_metadata_ref(ids_TK, self.num_experts, None, **how)
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
            kept_per_expert=route.tokens_per_expert,
        )
        return x_RD, meta

    @torch.compiler.disable  # a host read sizes the layout: run eagerly, C a plain int
    def adaptive_capacity(self, ids_TK: torch.Tensor,
                          active_TK: torch.Tensor | None = None) -> int:
        """C for a factor <= 0: the largest expert load L (active rows of ``ids_TK``
        routed to one expert), capped for a factor -c at :func:`expert_capacity` with
        factor c, then passed through ``agree_capacity``, then read back: the one
        device-to-host read of the call. Taking the largest capped value over the ranks
        equals capping the largest load whenever the ranks' T (so their caps) agree."""
        T, K = ids_TK.shape
        E = self.num_experts
        flat = ids_TK.reshape(-1).long()
        if active_TK is not None:
            flat = torch.where(active_TK.reshape(-1), flat, E)  # bucket E: never routed
        load = expert_counts(flat, E + 1)[:E].max()
        if self.capacity_factor < 0:
            nominal = expert_capacity(T, K, E, -self.capacity_factor, self.capacity_rule)
            load = load.clamp(max=nominal)
        if self.agree_capacity is not None:
            load = self.agree_capacity(load)
        return int(load)

    def _dispatch_capacity(self, x_TD, ids_TK, weights_TK, active_TK):
        T, K = ids_TK.shape
        E = self.num_experts
        if self.capacity_factor > 0:
            C = expert_capacity(T, K, E, self.capacity_factor, self.capacity_rule)
        else:  # Tutel's adaptive capacity: one host read
            C = self.adaptive_capacity(ids_TK, active_TK)
        kernels = use_triton(self.kernel_backend, x_TD)
        lay = capacity_layout(ids_TK, E, C, policy=self.drop_policy, weights_TK=weights_TK,
                              active_TK=active_TK, kernels=kernels)
        # Unfilled rows hold the marker T*K, i.e. token T: a zero row appended to x.
        x_pad = torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[1])])
        if kernels:
            from moetrain.kernels import ops

            pos_TK = lay.slot_TK.to(torch.int32)
            no_slots = torch.full((1, K), -1, dtype=torch.int32, device=pos_TK.device)
            x_RD = ops.permute(x_pad, lay.row_index_S, torch.cat([pos_TK, no_slots]), K)
        else:
            pos_TK = None
            x_RD = permute_ref(x_pad, lay.row_index_S, K)
        meta = DispatchMeta(
            row_index_R=lay.row_index_S,
            kept_TK=lay.slot_TK >= 0,
            weights_TK=weights_TK,
            num_tokens=T,
            top_k=K,
            out_dtype=x_TD.dtype,
            tokens_per_expert=torch.full((E,), C, dtype=torch.int64, device=ids_TK.device),
            num_dropped=lay.counts_E.sum() - lay.kept_E.sum(),
            pos_TK=pos_TK,
            kept_per_expert=lay.kept_E,
            rows_per_expert=C,
        )
        return x_RD, meta

    def skip_rows(self, rows: torch.Tensor, row_bytes: int) -> None:
        """Nothing is exchanged on one device: nothing to count."""

    def dense(self, x_TD: torch.Tensor, experts: Callable) -> torch.Tensor:
        """Every expert's output on every token, (E, T, D): a dense step (CompeteSMoE's
        competition). Nothing is dropped, whatever the capacity factor."""
        T = x_TD.shape[0]
        counts = torch.full((self.num_experts,), T, dtype=torch.int64, device=x_TD.device)
        y = experts(x_TD.repeat(self.num_experts, 1), counts, T).view(self.num_experts, T, -1)
        slot_of = self.slot_of(x_TD.device)
        return y if slot_of is None else y.index_select(0, slot_of)  # slot -> expert id order

    def combine(self, y_RD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        if meta.pos_TK is not None:
            from moetrain.kernels import ops

            if meta.rows_per_expert is not None:  # unfilled rows: gradient exactly zero
                y_RD = _ZeroGradRows.apply(y_RD, meta.row_index_R < meta.num_tokens * meta.top_k)
            return ops.unpermute_combine(y_RD, meta.weights_TK, meta.pos_TK, meta.out_dtype)
        return combine_rows(y_RD, meta)


def combine_rows(y_RD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
    """Scatter rows back to their (token, slot) positions and sum the slots with the weights.

    out_t = sum_k w_tk * y_(t,k), in float32; dropped and inactive slots hold zeros and
    their weights are masked to zero (so they add exactly zero and get no weight gradient).
    Each slot is written exactly once (index_copy), so the result is deterministic on every
    device; unfilled rows of the capacity layout (marker T*K) land in one extra row that
    is cut off (so they get a zero gradient).
    """
    T, K = meta.num_tokens, meta.top_k
    D = y_RD.shape[-1]
    y_TKD = y_RD.new_zeros(T * K + 1, D).index_copy(0, meta.row_index_R, y_RD)[: T * K]
    w_TK = torch.where(meta.kept_TK, meta.weights_TK.float(), 0.0)
    out_TD = (y_TKD.view(T, K, D).float() * w_TK.unsqueeze(-1)).sum(dim=1)
    return out_TD.to(meta.out_dtype)


# ----------------------------------------------------------------------------- all-to-all
def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Autograd-aware all-to-all with variable splits (backward is the reverse exchange)."""
    y = funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)
    return funcol.wait_tensor(y)


def max_over_group(group: dist.ProcessGroup) -> Callable[[torch.Tensor], torch.Tensor]:
    """``LocalDispatcher.agree_capacity`` for the ranks of ``group``: the largest of their
    0-dim values (an adaptive capacity), one MAX all-reduce, no autograd (an integer).
    Any dispatcher that exchanges fixed E x C blocks over ``group`` needs it."""

    def agree(value: torch.Tensor) -> torch.Tensor:
        out = value.reshape(1).clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
        return out[0]

    return agree


@dataclass(frozen=True)
class AllToAllMeta:
    local: DispatchMeta  # the sort (and capacity drop) by global expert on this rank
    in_splits: list[int]  # rows this rank sends to each EP rank
    out_splits: list[int]  # rows this rank receives from each EP rank
    regroup_idx: torch.Tensor | None  # dropless: received (source-major) row -> expert-major
    tokens_per_expert: torch.Tensor  # rows per LOCAL expert after the exchange
    num_dropped: torch.Tensor
    rows_per_expert: int | None = None  # capacity: ep * C rows per local expert (host int)
    run: None = None  # the experts run where they are called (see DispatchMeta.run)


class AllToAllDispatcher:
    """Expert-parallel dispatch: each of the ``ep`` ranks holds E/ep experts: rank j the
    slots j*E/ep .. (j+1)*E/ep - 1 of ``expert_order`` (None: the expert ids themselves;
    HMoE's ragged experts place every size class evenly, ``class_slot_order``).

    Tokens are first sorted by global expert on their own rank (and, in capacity mode,
    the overflow dropped with the same ``drop_policy`` as :class:`LocalDispatcher`, per
    source rank; inactive slots are never sent), then exchanged:
    - dropless: per-expert counts are exchanged first, then exactly the routed rows with
      variable splits (no padding); the splits are host lists, read back once;
    - capacity: the local E x C layout is sent as is, ``C`` rows per expert (zero rows
      fill unused slots; a SwiGLU expert maps a zero row to zero), so no counts are
      exchanged and nothing is read back. With an adaptive factor (<= 0) each rank's
      capacity is all-reduced with MAX over the group first (one all-reduce of one
      integer, read back once), so every rank sends and receives e*C rows per peer with
      the same C.
    Received rows arrive grouped by source rank; they are regrouped by local expert
    before the experts run, and the whole path is undone in ``combine``. Autograd runs
    through both exchanges.
    """

    def __init__(self, num_experts: int, group: dist.ProcessGroup,
                 capacity_factor: float | None = None,
                 kernel_backend: KernelBackend = KernelBackend.auto,
                 drop_policy: DropPolicy = DropPolicy.probs,
                 capacity_rule: CapacityRule = CapacityRule.slots,
                 expert_order: list[int] | None = None):
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
        # Sorting by slot puts rank j's experts (slots j*e .. j*e + e - 1) in one block.
        self.local = LocalDispatcher(num_experts, capacity_factor, kernel_backend, drop_policy,
                                     capacity_rule, expert_order)
        self.local.agree_capacity = max_over_group(group)  # adaptive capacity: one C
        self.bytes_sent = 0  # token bytes sent by dispatch + combine since the last reset
        # Bytes that rows never dispatched (MoE++) did not send, a device count (no host
        # read on the step's path), since the last reset.
        self.bytes_saved: torch.Tensor | None = None
        # The token exchange, ``exchange(x, out_splits, in_splits, group)``: the flat
        # all-to-all, or one with the same contract set by the parallel wiring
        # (``moetrain.parallel.hierarchical``'s 2DH exchange).
        self.exchange = _all_to_all

    def _exchange_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """counts_E[j*e + l]: rows for expert l of EP rank j -> counts_Se[src, l] received."""
        recv = torch.empty_like(counts_E)
        dist.all_to_all_single(recv, counts_E.contiguous(), group=self.group)
        return recv.view(self.ep, self.local_experts)

    def dispatch(self, x_TD, ids_TK, weights_TK, active_TK=None):
        ep, e = self.ep, self.local_experts
        x_RD, lmeta = self.local.dispatch(x_TD, ids_TK, weights_TK, active_TK)
        C = lmeta.rows_per_expert
        if C is not None:
            # x_RD is [EP rank][local expert][C]: every split is e*C rows.
            in_splits = out_splits = [e * C] * ep
            recv_RD = self.exchange(x_RD, out_splits, in_splits, self.group)
            # [source][local expert][C] -> [local expert][source][C]: a transpose.
            D = recv_RD.shape[1]
            x_out = recv_RD.view(ep, e, C, D).transpose(0, 1).reshape(e * ep * C, D)
            regroup_idx = None
            tokens_per_expert = torch.full((e,), ep * C, dtype=torch.int64,
                                           device=x_RD.device)
        else:
            counts_E = lmeta.tokens_per_expert
            counts_Se = self._exchange_counts(counts_E)
            # The splits are host lists: one device-to-host read for both.
            in_splits, out_splits = torch.stack(
                [counts_E.view(ep, e).sum(1), counts_Se.sum(1)]).tolist()
            recv_RD = self.exchange(x_RD, out_splits, in_splits, self.group)
            # Received rows are [source][local expert][rows]; regroup to [local expert][source].
            local_id = torch.repeat_interleave(
                torch.arange(e, device=recv_RD.device).repeat(ep), counts_Se.flatten(),
                output_size=recv_RD.shape[0],
            )
            regroup_idx = torch.argsort(local_id, stable=True)
            x_out = recv_RD.index_select(0, regroup_idx)
            tokens_per_expert = counts_Se.sum(0)
        self.bytes_sent += sum(in_splits) * x_RD.shape[1] * x_RD.element_size()
        meta = AllToAllMeta(
            local=lmeta,
            in_splits=in_splits,
            out_splits=out_splits,
            regroup_idx=regroup_idx,
            tokens_per_expert=tokens_per_expert,
            num_dropped=lmeta.num_dropped,
            rows_per_expert=None if C is None else ep * C,
        )
        return x_out, meta

    def skip_rows(self, rows: torch.Tensor, row_bytes: int) -> None:
        """Count what the rows would have sent: dispatch and combine, as ``bytes_sent``."""
        saved = rows * (2 * row_bytes)
        self.bytes_saved = saved if self.bytes_saved is None else self.bytes_saved + saved

    def dense(self, x_TD: torch.Tensor, experts: Callable) -> torch.Tensor:
        """Every expert's output on this rank's tokens, (E, T, D) (CompeteSMoE's dense
        step under EP): the ep ranks' tokens are all-gathered, each rank runs its e local
        experts on all ep * T of them, and one all-to-all returns each rank's (e, T, D)
        block to the token's owner. Autograd runs through both (the gather's backward is
        a reduce-scatter). ``bytes_sent`` counts what the rank hands to the exchanges,
        its own share included, as ``dispatch`` does: ep * T * D values gathered and
        ep * e * T * D returned, against T * K * D each way on a routed step. Nothing is
        dropped, whatever the capacity factor. Every rank must hold the same T (equal
        micro-batch shapes)."""
        ep, e = self.ep, self.local_experts
        T, D = x_TD.shape
        X = funcol.wait_tensor(funcol.all_gather_tensor_autograd(x_TD.contiguous(), 0,
                                                                 self.group))
        counts = torch.full((e,), ep * T, dtype=torch.int64, device=x_TD.device)
        y = experts(X.repeat(e, 1), counts, ep * T)  # (e, ep, T, D), local expert major
        y = y.view(e, ep, T, D).transpose(0, 1).reshape(ep * e * T, D)  # owner major
        back = self.exchange(y, [e * T] * ep, [e * T] * ep, self.group)
        self.bytes_sent += ep * (T * D + e * T * D) * x_TD.element_size()
        y = back.view(ep * e, T, D)  # [source rank][local expert] = global slot
        slot_of = self.local.slot_of(x_TD.device)
        return y if slot_of is None else y.index_select(0, slot_of)  # expert id order

    def combine(self, y_RD, meta: AllToAllMeta):
        # Undo the regroup: source-major order, as received.
        if meta.regroup_idx is None:
            ep, e, D = self.ep, self.local_experts, y_RD.shape[1]
            C = meta.local.rows_per_expert
            y_recv = y_RD.view(e, ep, C, D).transpose(0, 1).reshape(ep * e * C, D)
        else:
            y_recv = torch.empty_like(y_RD).index_copy(0, meta.regroup_idx, y_RD)
        back = self.exchange(y_recv, meta.in_splits, meta.out_splits, self.group)
        self.bytes_sent += sum(meta.out_splits) * y_RD.shape[1] * y_RD.element_size()
        return self.local.combine(back, meta.local)


class SlotAllToAllDispatcher(AllToAllDispatcher):
    """:class:`AllToAllDispatcher` for experts held in several slots: HMoE size classes
    split along F over the ep ranks (``moetrain.models.moe.experts.virtual_slots``).

    ``slots[e]`` lists the global slots holding expert e (rank-major, the same number per
    rank): one for a whole expert, one per rank for a split one. Each (token, slot) pair is
    sent to every slot of its expert with the same router weight, as extra active slots of
    the token, so each slice computes its partial SwiGLU and the combine's weighted sum
    adds the slices up: w * sum_j y_j = w * y. Dropless only (``config.validate``): a
    capacity would count the copies."""

    def __init__(self, slots: list[list[int]], group: dist.ProcessGroup,
                 kernel_backend: KernelBackend = KernelBackend.auto,
                 drop_policy: DropPolicy = DropPolicy.probs):
        width = max(len(s) for s in slots)
        super().__init__(sum(len(s) for s in slots), group, None, kernel_backend, drop_policy)
        self.copies = width
        table = torch.full((len(slots), width), -1, dtype=torch.int64)
        for e, held in enumerate(slots):
            table[e, :len(held)] = torch.tensor(held)
        self._table = table
        self._tables: dict[torch.device, torch.Tensor] = {}

    def dispatch(self, x_TD, ids_TK, weights_TK, active_TK=None):
        dev = ids_TK.device
        if dev not in self._tables:
            self._tables[dev] = self._table.to(dev)
        T, K, n = ids_TK.shape[0], ids_TK.shape[1], self.copies
        slot_TKn = self._tables[dev][ids_TK.long()]
        act_TKn = slot_TKn >= 0
        if active_TK is not None:
            act_TKn = act_TKn & active_TK.unsqueeze(-1)
        ids = slot_TKn.clamp(min=0).to(ids_TK.dtype).reshape(T, K * n)
        weights = weights_TK.unsqueeze(-1).expand(T, K, n).reshape(T, K * n)
        return super().dispatch(x_TD, ids, weights, act_TKn.reshape(T, K * n))

    def dense(self, x_TD: torch.Tensor, experts: Callable) -> torch.Tensor:
        raise NotImplementedError("dense steps over split experts are refused (config.validate)")
