"""Expert MLPs: a dense SwiGLU and the stacked routed experts.

Legend: D model dim, F expert hidden, E experts, e local experts, R routed rows.

SwiGLU (Shazeer, 2020): y = (silu(x W1^T) * (x W3^T)) W2^T.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moetrain.config.schema import ConfigError, ExpertBackend, KernelBackend
from moetrain.kernels.backend import use_triton


class FeedForward(nn.Module):
    """Dense SwiGLU MLP: the FFN of dense blocks and the MoE's shared experts."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.w1.weight, mean=0.0, std=init_std)
        nn.init.normal_(self.w3.weight, mean=0.0, std=init_std)
        nn.init.normal_(self.w2.weight, mean=0.0, std=out_std)


def _local(w: torch.Tensor) -> torch.Tensor:
    """The local shard of a parameter that expert parallelism made a DTensor (duck-typed)."""
    return w.to_local() if hasattr(w, "to_local") else w


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``torch._grouped_mm``'s backward rejects expanded (stride-0) gradients such as the one
    ``out.sum().backward()`` produces.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


ExpertCompute = Callable[..., torch.Tensor]
"""``compute(x_rD, tokens_per_expert_e, rows_per_expert=None) -> y_rD``: the experts on
rows sorted by local expert (see :meth:`GroupedExperts.forward`)."""


def grouped_mm_supported(dim: int, hidden: int, dtype: torch.dtype) -> bool:
    """``torch._grouped_mm`` needs 16-byte aligned row strides: D and F multiples of 16/itemsize."""
    align = 16 // dtype.itemsize
    return hasattr(torch, "_grouped_mm") and dim % align == 0 and hidden % align == 0


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights ``w1_EFD``, ``w3_EFD`` (E, F, D), ``w2_EDF``.

    ``forward(x_RD, tokens_per_expert_e)`` takes rows already sorted by expert: the first
    ``tokens_per_expert_e[0]`` rows go to local expert 0, and so on. When every expert has
    the same number of rows (capacity mode), ``rows_per_expert`` gives it as a host int:
    the split is then known without reading the counts back from the device. Backends:

    - ``loop``: one matmul chain per expert (the reference; any device, any dtype).
    - ``grouped_mm``: ``torch._grouped_mm`` over the whole batch with cumulative offsets.
      On CUDA the GEMMs run in bf16 (as torchtitan does); on CPU in the input dtype.
      With ``kernel_backend`` selecting Triton (``moe.kernel_backend``, set by the MoE
      layer), ``silu(h1) * h3`` between the GEMMs is one fused kernel that keeps only h1
      and h3 for its backward (``moetrain.kernels.ops.swiglu``): same values and gradients,
      up to one bf16 rounding instead of two.
    - ``auto``: grouped_mm on CUDA when the shapes are aligned, else loop.

    ``recompute=True`` (``moe.recompute_experts``) keeps only the input rows and re-runs the
    SwiGLU in the backward (non-reentrant ``torch.utils.checkpoint``; Chen et al., 2016):
    its R x F intermediates (about 4 R F values) are not stored; gradients are unchanged.
    With a dispatcher's ``run`` (see :meth:`forward`) each chunk is recomputed on its own,
    and no all-to-all is re-run.

    Under expert parallelism the weights may be DTensors sharded on dim 0; the local shard
    is used and its dim 0 is the number of local experts e.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int,
                 backend: ExpertBackend = ExpertBackend.auto, recompute: bool = False) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.backend = ExpertBackend(backend)
        self.recompute = recompute
        self.kernel_backend = KernelBackend.auto  # fused SwiGLU (grouped_mm) when Triton
        self.w1_EFD = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w3_EFD = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w2_EDF = nn.Parameter(torch.empty(num_experts, dim, hidden))

    def init_weights(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.w1_EFD, mean=0.0, std=init_std)
        nn.init.normal_(self.w3_EFD, mean=0.0, std=init_std)
        nn.init.normal_(self.w2_EDF, mean=0.0, std=out_std)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, "
                f"backend={self.backend.value}")

    def resolve_backend(self, x_RD: torch.Tensor, hidden: int | None = None) -> ExpertBackend:
        """The backend that ``forward`` will use for this input; ``hidden``: the F of the
        weights at hand (a rank's slice when experts are split along F; default: all F)."""
        if self.backend != ExpertBackend.auto:
            return self.backend
        hidden = self.hidden if hidden is None else hidden
        if x_RD.is_cuda and grouped_mm_supported(self.dim, hidden, torch.bfloat16):
            return ExpertBackend.grouped_mm
        return ExpertBackend.loop

    def forward(self, x_RD: torch.Tensor, tokens_per_expert_e: torch.Tensor,
                rows_per_expert: int | None = None,
                run: Callable[[torch.Tensor, ExpertCompute], torch.Tensor] | None = None,
                ) -> torch.Tensor:
        """The experts' output rows, in ``x_RD``'s order.

        ``run``: a dispatcher that moves the rows itself (the chunked all-to-all,
        ``moe.a2a_overlap_chunks``) passes it through its meta. ``forward`` then returns
        ``run(x_RD, compute)``, where ``compute(x_rD, tokens_per_expert_e[,
        rows_per_expert])`` is this module's SwiGLU on the weights it holds during this
        call; ``run`` may call it any number of times (once per chunk), and the counts
        given here are not used. So a wrapper around the module (FSDP's all-gather of
        sharded weights, activation checkpointing) acts once per layer, not per chunk.
        """
        if run is not None:
            return self._run(x_RD, run)
        weights = (_local(self.w1_EFD), _local(self.w3_EFD), _local(self.w2_EDF))
        return self._compute(weights, x_RD, tokens_per_expert_e, rows_per_expert)

    @torch.compiler.disable  # the dispatcher's own collectives and host-side splits
    def _run(self, x_RD: torch.Tensor, run: Callable) -> torch.Tensor:
        weights = (_local(self.w1_EFD), _local(self.w3_EFD), _local(self.w2_EDF))
        return run(x_RD, functools.partial(self._compute, weights))

    def _compute(self, weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                 x_RD: torch.Tensor, tokens_per_expert_e: torch.Tensor,
                 rows_per_expert: int | None = None) -> torch.Tensor:
        w1_eFD, w3_eFD, w2_eDF = weights
        num_local = w1_eFD.shape[0]
        if tokens_per_expert_e.numel() != num_local:
            raise ValueError(
                f"tokens_per_expert has {tokens_per_expert_e.numel()} entries but the expert "
                f"weights hold {num_local} local experts: the dispatcher must count rows per LOCAL expert "
                f"(model.num_experts / parallel.ep)"
            )
        if rows_per_expert is not None and rows_per_expert * num_local != x_RD.shape[0]:
            raise ValueError(
                f"rows_per_expert={rows_per_expert} x {num_local} local experts does not "
                f"match the {x_RD.shape[0]} dispatched rows"
            )
        if self.resolve_backend(x_RD, w1_eFD.shape[1]) == ExpertBackend.grouped_mm:
            fn = self._forward_grouped_mm
        else:
            fn = self._forward_loop
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(fn, x_RD, tokens_per_expert_e, w1_eFD, w3_eFD, w2_eDF,
                              rows_per_expert, use_reentrant=False)
        return fn(x_RD, tokens_per_expert_e, w1_eFD, w3_eFD, w2_eDF, rows_per_expert)

    @staticmethod
    def _forward_loop(x_RD: torch.Tensor, counts_e: torch.Tensor, w1_eFD: torch.Tensor,
                      w3_eFD: torch.Tensor, w2_eDF: torch.Tensor,
                      rows_per_expert: int | None = None) -> torch.Tensor:
        # The split sizes are host ints: dropless reads the counts back (one sync), a
        # fixed-size layout knows them.
        sizes = (counts_e.tolist() if rows_per_expert is None
                 else [rows_per_expert] * w1_eFD.shape[0])
        outs = []
        for i, x_rD in enumerate(torch.split(x_RD, sizes, dim=0)):
            h_rF = F.silu(x_rD @ w1_eFD[i].transpose(0, 1)) * (x_rD @ w3_eFD[i].transpose(0, 1))
            outs.append(h_rF @ w2_eDF[i].transpose(0, 1))
        if not outs:  # no local experts
            return x_RD.new_zeros(x_RD.shape)
        return torch.cat(outs, dim=0)

    def _forward_grouped_mm(self, x_RD: torch.Tensor, counts_e: torch.Tensor,
                            w1_eFD: torch.Tensor, w3_eFD: torch.Tensor,
                            w2_eDF: torch.Tensor,
                            rows_per_expert: int | None = None) -> torch.Tensor:
        # The group offsets stay on the device (no host read), whatever the layout.
        dtype = torch.bfloat16 if x_RD.is_cuda else x_RD.dtype
        hidden = w1_eFD.shape[1]  # a rank's slice when experts are split along F
        if not grouped_mm_supported(self.dim, hidden, dtype):
            align = 16 // dtype.itemsize
            raise ConfigError(
                f"moe.expert_backend=grouped_mm needs model.dim={self.dim} and the expert "
                f"hidden size {hidden} (model.expert_hidden, or an entry of "
                f"model.expert_sizes, divided by the ranks that split it) to be multiples "
                f"of {align} for {dtype} "
                f"(16-byte aligned rows): pick aligned sizes or set moe.expert_backend=loop"
            )
        offs = torch.cumsum(counts_e, dim=0, dtype=torch.int32)
        x = x_RD.to(dtype).contiguous()
        h1_RF = torch._grouped_mm(x, w1_eFD.to(dtype).transpose(-2, -1), offs=offs)
        h3_RF = torch._grouped_mm(x, w3_eFD.to(dtype).transpose(-2, -1), offs=offs)
        if use_triton(self.kernel_backend, x):
            from moetrain.kernels import ops  # imports triton: only on this path

            h_RF = ops.swiglu(h1_RF, h3_RF)
        else:
            h_RF = F.silu(h1_RF) * h3_RF
        y_RD = torch._grouped_mm(h_RF, w2_eDF.to(dtype).transpose(-2, -1), offs=offs)
        return _ContiguousGrad.apply(y_RD).to(x_RD.dtype)



# ----------------------------------------------------------------------------- HMoE
def size_classes(sizes: list[int]) -> tuple[list[int], list[list[int]]]:
    """HMoE's size classes of ``model.expert_sizes``: the distinct hidden sizes, ascending,
    and each class's expert ids, ascending. Derived from the sizes alone (never from the
    layout), so the parameter of class c is the same tensor under every layout."""
    hidden = sorted(set(sizes))
    return hidden, [[e for e, f in enumerate(sizes) if f == h] for h in hidden]


def class_slot_order(sizes: list[int], ep: int = 1) -> list[int]:
    """The global expert id held by each expert slot: rank-major (ep ranks, each holding
    E/ep slots), then class-major (ascending hidden size), then expert id.

    Rank j holds rows [j n_c/ep, (j+1) n_c/ep) of every class c's stacked weights (the
    ``Shard(0)`` chunk of ``moetrain.parallel.expert.apply_ep``): the same number of
    experts of every size on every rank, so every rank holds the same expert parameters.
    ``ep`` must divide every class's expert count (``config.validate``)."""
    _, members = size_classes(sizes)
    order = []
    for j in range(ep):
        for ids in members:
            m = len(ids) // ep
            order += ids[j * m:(j + 1) * m]
    return order


def split_classes(sizes: list[int], ep: int) -> list[bool]:
    """Per size class (``size_classes`` order): whether expert parallelism splits its
    experts along F over the ep ranks instead of placing them whole. A class whose expert
    count is a multiple of ep goes whole, n_c/ep experts per rank; any other class has each
    of its experts split into ep slices of F_c/ep hidden units, one per rank (each slice a
    partial SwiGLU, the slices' outputs summed). Either way every rank holds the same
    expert parameters, and the stored tensors keep their global (n_c, F_c, D) shape."""
    _, members = size_classes(sizes)
    return [len(ids) % ep != 0 for ids in members]


def virtual_slots(sizes: list[int], ep: int) -> list[list[int]]:
    """Per expert id, the global slots that hold it: rank-major, then class-major; within
    rank j's block, a whole class's experts ``members[j*m:(j+1)*m]`` (m = n_c/ep) and every
    expert of a split class (its slice j). A whole expert has one slot, a split one ep (one
    per rank). With no split class this is ``class_slot_order`` inverted."""
    _, members = size_classes(sizes)
    split = split_classes(sizes, ep)
    slots: list[list[int]] = [[] for _ in sizes]
    at = 0
    for j in range(ep):
        for ids, is_split in zip(members, split):
            mine = ids if is_split else ids[j * (len(ids) // ep):(j + 1) * (len(ids) // ep)]
            for e in mine:
                slots[e].append(at)
                at += 1
    return slots


@functools.lru_cache(maxsize=16)
def _rank_flop_matrix(sizes: tuple[int, ...], ep: int) -> torch.Tensor:
    """``RaggedExperts.rank_flop_matrix``: from ``virtual_slots``, each expert's work spread
    evenly over the slots that hold it (read-only: shared between calls)."""
    m = torch.zeros(len(sizes), ep)
    slots = virtual_slots(list(sizes), ep)
    per_rank = sum(len(s) for s in slots) // ep
    for e, held in enumerate(slots):
        for slot in held:
            m[e, slot // per_rank] += 1.0 / len(held)
    return m


class RaggedExperts(nn.Module):
    """HMoE's heterogeneous experts (Wang et al., 2024, arXiv 2408.10681): expert e is a
    SwiGLU of hidden size ``sizes[e]``.

    Experts of one size form a size class, held as one :class:`GroupedExperts`
    ``classes.{c}`` with stacked (n_c, F_c, D) weights (``size_classes``; FQNs
    ``moe.experts.classes.{c}.w1_EFD``, layout-free). ``forward`` takes rows sorted by
    expert SLOT (``expert_order``: class-major, so each class's rows are one contiguous
    block; the layer's dispatcher sorts by slot) and runs one grouped GEMM per class: no
    expert computes more than its own F. The split of the rows between classes is read
    back once per call (a host int per class), unless ``rows_per_expert`` gives it.

    ``padded=True`` is the reference: one (E, F_max, D) stack whose columns beyond F_e
    (w1, w3) and rows (w2) start at zero. SwiGLU maps them to silu(0) * 0 = 0 and every
    gradient reaching them is exactly 0, so AdamW (zero moments, decoupled decay of a
    zero) keeps them zero: the same function at E * F_max cost. Its FQNs are
    ``moe.experts.padded.*`` (a checkpoint of one path does not load into the other).

    Under expert parallelism (``apply_ep``) ``ep`` is set and every class is sharded over
    the ep ranks (``split_classes``): on dim 0 (whole experts) when its count divides by
    ep, else on F (every expert split into ep slices). Rank j's local slots are its block of
    ``virtual_slots``; without split classes, ``expert_order[j*E/ep:(j+1)*E/ep]``.
    """

    def __init__(self, sizes: list[int], dim: int, backend: ExpertBackend = ExpertBackend.auto,
                 recompute: bool = False, padded: bool = False) -> None:
        super().__init__()
        self.sizes, self.dim, self.num_experts = list(sizes), dim, len(sizes)
        self.ep = 1
        self.class_hidden, self.class_members = size_classes(self.sizes)
        self.padded = (GroupedExperts(self.num_experts, dim, max(self.sizes), backend, recompute)
                       if padded else None)
        self.classes = nn.ModuleList(() if padded else (
            GroupedExperts(len(ids), dim, f, backend, recompute)
            for f, ids in zip(self.class_hidden, self.class_members)))

    @property
    def groups(self) -> list[GroupedExperts]:
        """The stacked-weight modules: one per size class (or the padded stack)."""
        return [self.padded] if self.padded is not None else list(self.classes)

    @property
    def kernel_backend(self) -> KernelBackend:
        return self.groups[0].kernel_backend

    @kernel_backend.setter
    def kernel_backend(self, value: KernelBackend) -> None:
        for g in self.groups:
            g.kernel_backend = value

    @property
    def expert_order(self) -> list[int]:
        """Global expert id of each slot, in the order ``forward`` expects its rows."""
        if self.padded is not None:
            return list(range(self.num_experts))
        if any(split_classes(self.sizes, self.ep)):  # slots: ``virtual_slots``
            return class_slot_order(self.sizes, 1)
        return class_slot_order(self.sizes, self.ep)

    def rank_flop_matrix(self, ep: int) -> torch.Tensor:
        """float (E, ep): the share of expert e's work on rank j under ``ep`` (1 on the rank
        of a whole expert, 1/ep on every rank for a split one). Read every step by the
        balance metrics: built once per (sizes, ep)."""
        return _rank_flop_matrix(tuple(self.sizes), ep)

    def init_weights(self, init_std: float, out_std: float) -> None:
        for g in self.groups:
            g.init_weights(init_std, out_std)
        if self.padded is None:
            return
        g = self.padded
        with torch.no_grad():
            mask_EF = self.pad_mask_EF(g.w1_EFD.device)
            g.w1_EFD.mul_(mask_EF[:, :, None])
            g.w3_EFD.mul_(mask_EF[:, :, None])
            g.w2_EDF.mul_(mask_EF[:, None, :])

    def pad_mask_EF(self, device=None) -> torch.Tensor:
        """float (E, F_max): 1 on each expert's own F_e hidden units, 0 on the padding."""
        f = torch.arange(max(self.sizes), device=device)
        return (f[None, :] < torch.tensor(self.sizes, device=device)[:, None]).float()

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, dim={self.dim}, padded={self.padded is not None}"

    def forward(self, x_RD: torch.Tensor, tokens_per_expert_e: torch.Tensor,
                rows_per_expert: int | None = None,
                run: Callable[[torch.Tensor, ExpertCompute], torch.Tensor] | None = None,
                ) -> torch.Tensor:
        """As :meth:`GroupedExperts.forward`, rows sorted by local slot."""
        if self.padded is not None:
            return self.padded(x_RD, tokens_per_expert_e, rows_per_expert, run)
        if run is not None:
            return self._run(x_RD, run)
        weights = [(_local(g.w1_EFD), _local(g.w3_EFD), _local(g.w2_EDF)) for g in self.classes]
        return self._compute(weights, x_RD, tokens_per_expert_e, rows_per_expert)

    @torch.compiler.disable  # the dispatcher's own collectives and host-side splits
    def _run(self, x_RD: torch.Tensor, run: Callable) -> torch.Tensor:
        weights = [(_local(g.w1_EFD), _local(g.w3_EFD), _local(g.w2_EDF)) for g in self.classes]
        return run(x_RD, functools.partial(self._compute, weights))

    def _compute(self, weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 x_RD: torch.Tensor, tokens_per_expert_e: torch.Tensor,
                 rows_per_expert: int | None = None) -> torch.Tensor:
        local = [w[0].shape[0] for w in weights]  # local experts per class
        if tokens_per_expert_e.numel() != sum(local):
            raise ValueError(
                f"tokens_per_expert has {tokens_per_expert_e.numel()} entries but the size "
                f"classes hold {sum(local)} local experts")
        counts = torch.split(tokens_per_expert_e, local)
        if rows_per_expert is not None:
            rows = [n * rows_per_expert for n in local]
        else:  # one host read: each class's share of the rows
            rows = torch.stack([c.sum() for c in counts]).tolist() if local else []
        outs = [g._compute(w, x_c, c, rows_per_expert)
                for g, w, x_c, c in zip(self.classes, weights, torch.split(x_RD, rows), counts)]
        return torch.cat(outs) if outs else x_RD.new_zeros(x_RD.shape)


def build_routed_experts(dim: int, model_cfg, moe_cfg) -> GroupedExperts | RaggedExperts:
    """The layer's routed experts: :class:`RaggedExperts` when ``model.expert_sizes`` is
    set, else uniform :class:`GroupedExperts` of ``model.expert_hidden``."""
    if model_cfg.expert_sizes is not None:
        experts = RaggedExperts(list(model_cfg.expert_sizes), dim, moe_cfg.expert_backend,
                                moe_cfg.recompute_experts)
    else:
        experts = GroupedExperts(model_cfg.num_experts, dim, model_cfg.expert_hidden,
                                 moe_cfg.expert_backend, moe_cfg.recompute_experts)
    experts.kernel_backend = moe_cfg.kernel_backend
    return experts
