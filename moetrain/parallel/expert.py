"""Expert parallelism: shard each MoE layer's experts over the ``ep`` mesh axis and hand
the layer an all-to-all dispatcher on that axis's process group.

The expert weights become DTensors ``Shard(0)`` on the ep axis, so their global shape
stays (E, F, D): checkpoints are layout-free and reshard when the EP degree changes.

With ``moe.a2a_overlap_chunks=n > 1`` the layer gets a :class:`ChunkedAllToAllDispatcher`,
which overlaps the all-to-all of one chunk of rows with the experts' compute on another
(Tutel's ``a2a_ffn_overlap_degree``; Hwang et al., 2023, arXiv 2206.03382). With
``moe.a2a_overlap_chunks=auto`` the trainer's ``OverlapTuner``
(:mod:`moetrain.parallel.overlap_tuner`) sets ``n`` before every step.

Legend: T tokens, D model dim, E experts, e local experts (E/ep), K top-k, R routed rows
on this rank (E*C in capacity mode: C rows per expert), n chunks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from moetrain.config.recipes import recipe_values
from moetrain.config.schema import (
    AUTO,
    AllToAllMode,
    CapacityRule,
    ConfigError,
    DispatchMode,
    DropPolicy,
    KernelBackend,
    MoEConfig,
)
from moetrain.models.moe.dispatcher import (
    AllToAllDispatcher,
    DispatchMeta,
    SlotAllToAllDispatcher,
)
from moetrain.models.moe.experts import split_classes, virtual_slots
from moetrain.parallel.hierarchical import hierarchical_exchange


def apply_ep(moe_layers: list[nn.Module], ep_mesh: DeviceMesh, moe_cfg: MoEConfig, *,
             a2a: AllToAllMode = AllToAllMode.flat, a2a_local_size: int | None = None) -> None:
    """Keep each rank's E/ep experts and route tokens to them by all-to-all.

    ``a2a`` / ``a2a_local_size`` (``parallel.a2a``, ``parallel.a2a_local_size``): with
    ``hierarchical`` every dispatcher exchanges through one 2DH all-to-all
    (``moetrain.parallel.hierarchical``), whose process groups are created here, by every
    rank: call it on every rank, also on one without MoE layers."""
    capacity = moe_cfg.capacity_factor if moe_cfg.dispatch == DispatchMode.capacity else None
    recipe = recipe_values(moe_cfg)  # the drop policy and capacity rule, as MoELayer's
    drop, rule = recipe["drop_policy"], recipe["capacity_rule"]
    group = ep_mesh.get_group()
    exchange = None
    if AllToAllMode(a2a) == AllToAllMode.hierarchical and ep_mesh.size() > 1:
        if moe_cfg.a2a_overlap_chunks != 1:
            raise ConfigError(
                f"parallel.a2a=hierarchical with moe.a2a_overlap_chunks="
                f"{moe_cfg.a2a_overlap_chunks}: the chunked exchange runs flat all-to-alls: "
                f"set moe.a2a_overlap_chunks=1, or parallel.a2a=flat")
        # Capacity mode: equal splits everywhere, so no counts and no host read.
        exchange = hierarchical_exchange(group, a2a_local_size, uniform=capacity is not None)
    ep = ep_mesh.size()
    for layer in moe_layers:
        experts = layer.experts
        # HMoE's ragged experts: each size class's stack is sharded on its own: on dim 0
        # when its count divides by ep (n_c/ep whole experts per rank, ``class_slot_order``),
        # else on F (every expert split into ep slices, ``split_classes``).
        sizes = getattr(experts, "sizes", None)
        ragged = sizes is not None and getattr(experts, "padded", None) is None
        split = split_classes(sizes, ep) if ragged else [False]
        for stack, is_split in zip(getattr(experts, "groups", [experts]), split):
            for name, param in list(stack.named_parameters(recurse=False)):
                dim = (2 if name == "w2_EDF" else 1) if is_split else 0
                dt = distribute_tensor(param.data, ep_mesh, [Shard(dim)])
                stack.register_parameter(name, nn.Parameter(dt, requires_grad=param.requires_grad))
        if hasattr(experts, "groups"):
            experts.ep = ep
        order = getattr(experts, "expert_order", None)  # rows sorted by slot, not by id
        ffn = layer.num_ffn_experts  # MoE++'s zero-computation experts are never sent
        chunks = moe_cfg.a2a_overlap_chunks  # auto: the trainer's OverlapTuner sets it
        if any(split):  # a row goes to every slice of a split expert (config.validate:
            # dropless, no chunks)
            dispatcher = SlotAllToAllDispatcher(virtual_slots(sizes, ep), group,
                                                moe_cfg.kernel_backend, drop)
        elif chunks == AUTO or chunks > 1:
            dispatcher = ChunkedAllToAllDispatcher(
                ffn, group, 1 if chunks == AUTO else chunks, capacity, moe_cfg.kernel_backend,
                drop, rule, order)
        else:
            dispatcher = AllToAllDispatcher(ffn, group, capacity, moe_cfg.kernel_backend, drop,
                                            rule, order)
        if exchange is not None:
            dispatcher.exchange = exchange
        layer.set_dispatcher(dispatcher)


def ep_bytes_sent(moe_layers: list[nn.Module]) -> int:
    """Token bytes this rank sent through all-to-all since the last call (then reset)."""
    total = 0
    for layer in moe_layers:
        d = layer.dispatcher
        if getattr(d, "bytes_sent", None) is not None:  # all-to-all and sharded experts
            total += d.bytes_sent
            d.bytes_sent = 0
    return total


def ep_bytes_saved(moe_layers: list[nn.Module], device: torch.device) -> torch.Tensor:
    """Bytes that rows never dispatched (MoE++'s zero-computation experts) did not send
    through all-to-all since the last call (then reset), float64 on ``device``."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for layer in moe_layers:
        d = layer.dispatcher
        if isinstance(d, AllToAllDispatcher) and d.bytes_saved is not None:
            total += d.bytes_saved.to(device=device, dtype=torch.float64)
            d.bytes_saved = None
    return total


def count_all_reducer(group: dist.ProcessGroup):
    """Sum expert counts over ``group`` (the tp ranks that each route a sequence shard).

    The all-reduce is autograd-free: counts are integers and carry no gradient.
    """

    def reduce(counts):
        counts = counts.clone()
        dist.all_reduce(counts, group=group)
        return counts

    return reduce


def count_prefix_reducer(group: dist.ProcessGroup, dp_rank: int, shards: int):
    """For ``moe.aux_loss_scope=global_batch``: one round of micro-batches (one per
    data-parallel rank) -> (counts of the round's micro-batches up to this rank's,
    counts of the whole round).

    ``group`` holds dp x ``shards`` ranks, dp-major (the dp or dp_tp axis; ``shards`` tp
    ranks route shards of the same micro-batch). Rank r's micro-batch j is global
    micro-batch j * dp + r (``GlobalBatchSampler.micro_batches``), so adding the rows of
    ranks <= r to the earlier rounds' totals gives exactly the counts of global
    micro-batches 0..j * dp + r: the running counts one process sees. One all-gather.
    """
    n = dist.get_world_size(group)

    def reduce(counts):
        flat = torch.empty(n * counts.numel(), dtype=counts.dtype, device=counts.device)
        dist.all_gather_into_tensor(flat, counts.contiguous().view(-1), group=group)
        rows = flat.view(n, *counts.shape)
        return rows[: (dp_rank + 1) * shards].sum(0), rows.sum(0)

    return reduce


# ----------------------------------------------------------------------------- overlap
class _Pending:
    """The in-flight collectives of one chunk's exchange: the forward's work handle, and
    the backward's reverse exchange (its work handle and the buffer it fills)."""

    __slots__ = ("grad", "grad_src", "grad_work", "work")

    def __init__(self) -> None:
        self.work = self.grad = self.grad_work = self.grad_src = None


class _IssueAllToAll(torch.autograd.Function):
    """Start an all-to-all of ``x`` (rows to each rank by ``in_splits``) and return the
    receive buffer before it is filled: :class:`_WaitAllToAll` must run before it is read.

    Backward: wait for the reverse exchange that ``_WaitAllToAll``'s backward started and
    return what it received (the gradient of ``x``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group,
                box: _Pending) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        box.work = dist.all_to_all_single(out, x, out_splits, in_splits, group=group,
                                          async_op=True)
        ctx.box = box
        return out

    @staticmethod
    def backward(ctx, _unused: torch.Tensor):
        box = ctx.box
        box.grad_work.wait()
        grad = box.grad
        box.grad = box.grad_work = box.grad_src = None
        return grad, None, None, None, None


class _WaitAllToAll(torch.autograd.Function):
    """Wait for the exchange :class:`_IssueAllToAll` started; identity on its buffer.

    Backward: start the reverse exchange of the incoming gradient (asynchronously) and
    pass the gradient on unchanged, only as the edge that runs ``_IssueAllToAll``'s
    backward, which waits for it. The experts' backward of another chunk runs between."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, out_splits: list[int], in_splits: list[int], group,
                box: _Pending) -> torch.Tensor:
        box.work.wait()
        box.work = None
        ctx.box, ctx.out_splits, ctx.in_splits, ctx.group = box, out_splits, in_splits, group
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        box = ctx.box
        box.grad_src = grad.contiguous()  # kept alive until the exchange completes
        box.grad = grad.new_empty(sum(ctx.in_splits), *grad.shape[1:])
        box.grad_work = dist.all_to_all_single(box.grad, box.grad_src, ctx.in_splits,
                                               ctx.out_splits, group=ctx.group, async_op=True)
        return grad, None, None, None, None


class _Exchange:
    """One chunk's all-to-all in flight: ``issue`` starts it, ``wait`` returns the rows."""

    def __init__(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                 group) -> None:
        self.args = (out_splits, in_splits, group, _Pending())
        self.buf = _IssueAllToAll.apply(x, *self.args)

    def wait(self) -> torch.Tensor:
        return _WaitAllToAll.apply(self.buf, *self.args)


def chunk_bounds(counts: torch.Tensor, chunks: int) -> torch.Tensor:
    """Split each block of ``counts[...]`` rows into ``chunks`` near-equal parts: part i
    holds rows [lo_i, lo_(i+1)) with lo_i = floor(i * c / n). Returns lo, shape
    (n + 1, *counts.shape). A block of c < n rows leaves some parts empty."""
    i = torch.arange(chunks + 1, device=counts.device, dtype=counts.dtype)
    return (i.view(-1, *([1] * counts.dim())) * counts.unsqueeze(0)) // chunks


@dataclass(frozen=True)
class ChunkPlan:
    """How one layer call's rows travel in chunks (built by
    :meth:`ChunkedAllToAllDispatcher.dispatch`).

    pos_R: position of each of this rank's rows (LocalDispatcher order: sorted by global
        expert; capacity mode: the E x C layout, unfilled rows included) in the send
        buffer, which is chunk-major, then expert-major.
    in_splits / out_splits: per chunk, rows sent to / received from each EP rank.
    regroup_idx: per chunk, received (source-major) row -> expert-major position.
    chunk_tokens: per chunk, int64 (e,) rows per local expert.
    chunk_rows: per chunk, the rows of every local expert as a host int (capacity mode),
        or None (dropless).
    received: the rows each chunk's exchange brought in, kept by the first run so that
        a recompute of the experts' call (activation checkpointing of the experts module)
        reuses them instead of exchanging again.
    """

    pos_R: torch.Tensor
    in_splits: list[list[int]]
    out_splits: list[list[int]]
    regroup_idx: list[torch.Tensor]
    chunk_tokens: list[torch.Tensor]
    chunk_rows: list[int | None]
    received: list[torch.Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class ChunkedMeta:
    """What the layer and :meth:`ChunkedAllToAllDispatcher.combine` need: the layer's
    fields of :class:`DispatchMeta`, with ``run`` set.

    local: the local sort's meta (``combine`` undoes that sort).
    plan: the chunks' splits and row positions (``run`` is ``run_chunks`` bound to it).
    tokens_per_expert: int64 (e,) rows this rank's local experts receive (all chunks).
    rows_per_expert: capacity mode: rows of every local expert (all chunks); else None.
    run: ``run(x_RD, compute)``: the chunked exchanges and the experts, called once
        inside the experts module's call.
    """

    local: DispatchMeta
    plan: ChunkPlan
    tokens_per_expert: torch.Tensor
    num_dropped: torch.Tensor
    run: Callable[[torch.Tensor, Callable[..., torch.Tensor]], torch.Tensor]
    rows_per_expert: int | None = None


class ChunkedAllToAllDispatcher(AllToAllDispatcher):
    """:class:`AllToAllDispatcher` with the exchanges pipelined against the experts.

    Each (destination rank, expert) block of this rank's rows is split into
    ``chunks`` near-equal parts (:func:`chunk_bounds`); chunk i gathers part i of every
    block. Both sides compute every chunk's splits from the per-expert counts, so one
    count exchange serves all chunks (capacity mode: the blocks are the fixed C slots and
    no counts are exchanged). The all-to-all of chunk i+1 is in flight while the experts
    run on chunk i, and each chunk's result starts back as soon as it is computed. In the
    backward each exchange's reverse starts when its gradient is ready and is waited for
    only where that gradient is used, so the experts' backward overlaps it the same way.

    Every expert sees the same rows as without chunks, only in another order, and the
    combine weights are unchanged: with per-row expert MLPs the result is the same.

    :meth:`dispatch` only sorts locally, exchanges counts and plans the chunks: it returns
    this rank's sorted rows and a meta whose ``run`` the layer hands to its experts
    (``GroupedExperts.forward(..., run=meta.run)``). Inside that one call of the experts
    module, ``run`` exchanges, computes and exchanges back chunk by chunk, and returns
    the results in the sorted rows' order, which :meth:`combine` un-sorts. One call per
    layer means that FSDP gathers sharded expert weights once in the forward and once in
    the backward, whatever the number of chunks.

    Activation checkpointing of the experts module (``parallel.ac=selective``) recomputes
    that call in the backward: the recompute reuses each chunk's received rows (kept in
    the plan, about R x D values per layer) and runs no all-to-all.
    ``moe.recompute_experts`` recomputes each chunk's SwiGLU on its own instead.

    ``chunks`` may change between calls (``moe.a2a_overlap_chunks=auto``): each call's
    plan carries its own count. ``rows_received`` counts the rows this rank's experts
    received in calls with gradients enabled (training, not validation), for the tuner's
    load bucket; whoever reads it resets it.
    """

    def __init__(self, num_experts: int, group: dist.ProcessGroup, chunks: int,
                 capacity_factor: float | None = None,
                 kernel_backend: KernelBackend = KernelBackend.auto,
                 drop_policy: DropPolicy = DropPolicy.probs,
                 capacity_rule: CapacityRule = CapacityRule.slots,
                 expert_order: list[int] | None = None):
        super().__init__(num_experts, group, capacity_factor, kernel_backend, drop_policy,
                         capacity_rule, expert_order)
        if chunks < 1:
            raise ConfigError(f"moe.a2a_overlap_chunks={chunks!r} is invalid: must be >= 1 "
                              f"(1 = no overlap)")
        self.chunks = chunks
        self.rows_received = 0

    @torch.compiler.disable  # host-side splits and async collectives: run eagerly
    def dispatch(self, x_TD, ids_TK, weights_TK, active_TK=None):
        ep, e, n, E = self.ep, self.local_experts, self.chunks, self.num_experts
        x_RD, lmeta = self.local.dispatch(x_TD, ids_TK, weights_TK, active_TK)
        C = lmeta.rows_per_expert  # capacity mode: x_RD is E blocks of C rows
        dev = lmeta.tokens_per_expert.device
        if C is None:
            block_E = lmeta.tokens_per_expert  # a block is the expert's routed rows
            lo_send = chunk_bounds(block_E, n)  # (n+1, E)
            lo_recv = chunk_bounds(self._exchange_counts(block_E), n)  # (n+1, ep, e)
            send_nS = (lo_send[1:] - lo_send[:-1]).view(n, ep, e).sum(-1)
            recv_nS = (lo_recv[1:] - lo_recv[:-1]).sum(-1)
            # One device-to-host read for every chunk's splits.
            in_splits, out_splits = torch.stack([send_nS, recv_nS]).tolist()
            chunk_rows = [None] * n
        else:  # fixed blocks of C rows: every split is known on the host
            block_E = torch.full((E,), C, dtype=torch.int64, device=dev)
            lo_send = chunk_bounds(block_E, n)
            lo_recv = chunk_bounds(block_E.view(ep, e), n)
            parts = [(i + 1) * C // n - i * C // n for i in range(n)]
            in_splits = out_splits = [[e * p] * ep for p in parts]
            chunk_rows = [ep * p for p in parts]  # rows per local expert, per chunk
        # Row j of expert g's block falls in chunk i = max{i : lo_i <= j}; its position in
        # the chunk-major send buffer is (rows of earlier chunks) + (part i of experts
        # < g) + (j - lo_i).
        R = x_RD.shape[0]
        expert_R = torch.repeat_interleave(torch.arange(E, device=dev), block_E, output_size=R)
        start_E = torch.cumsum(block_E, 0) - block_E
        j_R = torch.arange(R, device=dev) - start_E[expert_R]
        chunk_R = ((j_R + 1) * n - 1) // block_E[expert_R]
        part_nE = lo_send[1:] - lo_send[:-1]
        before_nE = torch.cumsum(part_nE, 1) - part_nE + lo_send[:-1].sum(1, keepdim=True)
        pos_R = before_nE[chunk_R, expert_R] + j_R - lo_send[chunk_R, expert_R]
        # Received rows of chunk i are [source][local expert][rows]: regroup by expert.
        part_nSe = lo_recv[1:] - lo_recv[:-1]
        local_id = torch.arange(e, device=dev).repeat(ep)
        regroup_idx, chunk_tokens = [], []
        for i in range(n):
            ids = torch.repeat_interleave(local_id, part_nSe[i].flatten(),
                                          output_size=sum(out_splits[i]))
            regroup_idx.append(torch.argsort(ids, stable=True))
            chunk_tokens.append(part_nSe[i].sum(0))
        plan = ChunkPlan(pos_R=pos_R, in_splits=in_splits, out_splits=out_splits,
                         regroup_idx=regroup_idx, chunk_tokens=chunk_tokens,
                         chunk_rows=chunk_rows)
        meta = ChunkedMeta(
            local=lmeta, plan=plan, tokens_per_expert=part_nSe.sum((0, 1)),
            num_dropped=lmeta.num_dropped, run=functools.partial(self.run_chunks, plan),
            rows_per_expert=None if C is None else sum(chunk_rows),
        )
        return x_RD, meta

    @torch.compiler.disable
    def combine(self, y_RD, meta: ChunkedMeta):
        return self.local.combine(y_RD, meta.local)

    @torch.compiler.disable  # async collectives and host-side splits: run eagerly
    def run_chunks(self, plan: ChunkPlan, x_RD: torch.Tensor, compute) -> torch.Tensor:
        """Exchange, ``compute(x_rD, tokens_per_expert_e[, rows_per_expert])`` and exchange
        back, chunk by chunk; returns the experts' output rows in ``x_RD``'s order.

        A second run of the same plan is a recompute (activation checkpointing): it reuses
        the received rows and runs no collective; the rows it returns are not used (the
        recompute only rebuilds the experts' saved activations), so the return exchange
        is skipped too.
        """
        n = len(plan.regroup_idx)  # the count at dispatch (the tuner may change chunks later)
        if len(plan.in_splits) != n or x_RD.shape[0] != plan.pos_R.shape[0]:
            raise ValueError(f"run_chunks got {x_RD.shape[0]} rows for a plan of "
                             f"{plan.pos_R.shape[0]} rows in {len(plan.in_splits)} chunks")
        replay = len(plan.received) == n
        send_SD = torch.empty_like(x_RD).index_copy(0, plan.pos_R, x_RD)
        sizes = [sum(s) for s in plan.in_splits]
        chunks = torch.split(send_SD, sizes, dim=0)

        def start(i):
            if replay:
                return None
            return _Exchange(chunks[i], plan.out_splits[i], plan.in_splits[i], self.group)

        to_experts = [None] * n
        to_experts[0] = start(0)
        back = []
        for i in range(n):
            if i + 1 < n:  # in flight while the experts compute chunk i
                to_experts[i + 1] = start(i + 1)
            if replay:  # the recompute must save what the forward saved: same grad flags
                recv = plan.received[i].detach().requires_grad_(x_RD.requires_grad)
            else:
                recv = to_experts[i].wait()
                plan.received.append(recv.detach())
            to_experts[i] = None
            idx = plan.regroup_idx[i]
            rows = () if plan.chunk_rows[i] is None else (plan.chunk_rows[i],)
            y = compute(recv.index_select(0, idx), plan.chunk_tokens[i], *rows)
            y_recv = torch.empty_like(y).index_copy(0, idx, y)
            if not replay:
                back.append(_Exchange(y_recv, plan.in_splits[i], plan.out_splits[i],
                                      self.group))
        if replay:
            y_SD = torch.empty_like(send_SD).requires_grad_(y_recv.requires_grad)
        else:
            y_SD = torch.cat([b.wait() for b in back])
            row_bytes = x_RD.shape[1] * x_RD.element_size()
            received = sum(sum(s) for s in plan.out_splits)
            self.bytes_sent += (sum(sizes) + received) * row_bytes
            if torch.is_grad_enabled():
                self.rows_received += received
        return y_SD.index_select(0, plan.pos_R)
