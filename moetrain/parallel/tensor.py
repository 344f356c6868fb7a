"""Tensor parallelism (Megatron-LM; Shoeybi et al., 2019) with sequence parallelism
(Korthikanti et al., 2022), placed by DTensor's ``parallelize_module`` on the dense mesh's
``tp`` axis. Step 1 of the fixed order TP -> EP -> AC -> compile -> PP split -> FSDP.

Legend: B batch, S sequence, D model dim, V vocabulary, H heads, T tokens, E experts,
K top-k, F expert hidden.

Between sublayers the residual stream is a DTensor ``Shard(1)``: each tp rank holds S/tp
positions of every sequence, so ``h.shape`` stays global and the model code is unchanged.

- Embedding: vocabulary-parallel (``RowwiseParallel``: rows = vocabulary shards), the
  partial sums reduce-scattered onto the sequence.
- Norms (attention_norm, ffn_norm, final norm): ``SequenceParallel``, on S/tp positions.
- Attention: the sequence is all-gathered; wq/wk/wv column-parallel (each rank computes
  H/tp query heads and Hkv/tp key/value heads: the attention reads its head counts from
  the local projections), wo row-parallel, reduce-scattered back onto the sequence.
- Dense MLP: w1/w3 column-parallel, w2 row-parallel, same boundaries as attention.
- Output layer: column-parallel over the vocabulary; the logits stay a DTensor
  ``Shard(-1)`` and the cross-entropy runs under ``loss_parallel``, so no rank ever holds
  the (B, S, V) logits.

MoE layers, by ``parallel.expert_tp`` (the router is replicated in both):

- ``ep``: each tp rank routes only its own T/tp tokens (sequence shard). Routed experts
  are expert-parallel over ``parallel.ep`` (EP is carved out of the dp*tp ranks, so
  ep=tp makes the ep group the tp group) and replicated over the rest; shared experts
  are replicated. No tensor-parallel communication in the layer.
- ``etp``: the sequence is all-gathered, every tp rank routes all T tokens (identical
  decisions) and computes, for every expert, the slice F/tp of its hidden dim (w1_EFD and
  w3_EFD sharded on dim 1, w2_EDF on dim 2; shared experts column/row-parallel). The
  partial outputs are reduce-scattered back onto the sequence.

Aux losses and gradients equal the 1-process run. The layer's loss is
``a * E * sum_e f_e P_e + b * z`` with f_e = c_e / (T*K) (counts, no gradient),
P_e = mean_t s_te and z = mean_t lse_t^2, over the T tokens of the micro-batch.
- ``ep``: rank r sees T/tp tokens. Its expert counts are summed over tp (the layer's
  ``count_reducer``), so f_e is the micro-batch's; its P_e^r and z^r are means over its
  own tokens. Since all shards have T/tp tokens, P_e = mean_r P_e^r and z = mean_r z^r:
  the layer's loss is the mean over tp of the ranks' losses, and its gradient the sum of
  the ranks' gradients scaled by 1/tp.
- ``etp``: every rank computes the whole loss; scaling each by 1/tp makes the sum over
  tp of their gradients the gradient once.
Hence ``aux_loss_factor = 1/tp`` in both modes, and the gradient of every parameter that
is replicated over tp while its ranks see different tokens or hold partial sums (the
router; shared experts under ``ep``; routed experts under ``ep``, on the expert mesh) must
be summed over tp: :attr:`TPWiring.replicated` lists those modules, and parallelize()
reduces them over the dp x tp ranks (sum, then divide by dp), as it does for experts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from moetrain.config.schema import ExpertTP

__all__ = ["SequenceGather", "TPWiring", "align_grad_placements", "apply_tp", "local_loss",
           "loss_context"]


@dataclass(frozen=True)
class SequenceGather:
    """For routers that route on the whole micro-batch while each tp rank holds one shard
    of every sequence (``parallel.expert_tp=ep``): ``gather`` turns this rank's
    (B * S/n) rows into the micro-batch's (B * S) rows in sequence order (autograd-aware
    with ``grad``: the backward sums the ranks' gradients), ``local`` slices this rank's
    rows back out. Handed to each router as ``router.seq_gather`` (see
    ``Router.forward_gathered``)."""

    group: object  # the tp process group
    shards: int
    rank: int

    def gather(self, t_TX: torch.Tensor, batch: int, grad: bool) -> torch.Tensor:
        import torch.distributed as dist
        import torch.distributed.nn.functional as dist_nn

        if grad:
            parts = list(dist_nn.all_gather(t_TX.contiguous(), group=self.group))
        else:
            parts = [torch.empty_like(t_TX) for _ in range(self.shards)]
            dist.all_gather(parts, t_TX.contiguous(), group=self.group)
        stacked = torch.stack(parts).view(self.shards, batch, -1, *t_TX.shape[1:])
        return stacked.transpose(0, 1).reshape(-1, *t_TX.shape[1:])

    def local(self, t: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if t is None:
            return None
        view = t.view(batch, self.shards, -1, *t.shape[1:])
        return view[:, self.rank].reshape(-1, *t.shape[1:])


@dataclass
class TPWiring:
    """What the later placement steps need from :func:`apply_tp`.

    replicated: modules whose parameters are replicated over tp although their tp ranks
        see different tokens (``ep``) or hold partial sums (``etp``): routers, and the
        shared experts under ``ep``. Their gradients must be summed over tp.
    """

    mode: ExpertTP
    degree: int
    replicated: list[nn.Module] = field(default_factory=list)

    @property
    def routes_token_shard(self) -> bool:
        """Each tp rank routes its own sequence shard: expert counts are summed over tp."""
        return self.mode == ExpertTP.ep

    @property
    def experts_replicated_over_tp(self) -> bool:
        """Routed experts see different tokens on each tp rank (reduce them like EP's edp)."""
        return self.mode == ExpertTP.ep

    @property
    def aux_loss_factor(self) -> float:
        """Scale of each rank's aux-loss gradient (see the module docstring)."""
        return 1.0 / self.degree


# ----------------------------------------------------------------------------- styles
class _AsReplicate(torch.autograd.Function):
    """A local tensor that holds the same values on every tp rank, as a ``Replicate``
    DTensor whose backward keeps the gradient a partial sum (no all-reduce).

    ``DTensor.from_local(x, [Replicate()])`` would all-reduce the gradient; inside an
    ``etp`` MoE layer the input's gradient is reduce-scattered once at the layer's
    boundary, so each consumer must hand back its partial share only.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, mesh: DeviceMesh) -> DTensor:
        ctx.size = mesh.size()
        return DTensor.from_local(x, mesh, [Replicate()], run_check=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if isinstance(grad, DTensor):
            if grad.placements[0].is_partial():
                return grad.to_local(), None
            grad = grad.redistribute(placements=[Replicate()]).to_local()
            return grad / ctx.size, None
        return grad, None


class _GatheredTokens(ParallelStyle):
    """An ``etp`` MoE layer: all-gather the sequence in, reduce-scatter the partial out.

    The layer runs on plain local tensors. Its input's local gradient is a partial sum
    (router and expert slices each see all tokens), hence ``grad_placements=Partial``.
    """

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def gather(_mod, args):
            x = args[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, [Shard(1)], run_check=False)
            full = x.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
            return (full, *args[1:])

        def scatter(_mod, _args, out):
            return DTensor.from_local(out, mesh, [Partial()], run_check=False).redistribute(
                mesh, [Shard(1)])

        module.register_forward_pre_hook(gather)
        module.register_forward_hook(scatter)
        return module


class _PartialSharedExperts(ParallelStyle):
    """Shared experts inside an ``etp`` MoE layer: their input is the layer's gathered
    local tensor (gradient kept partial, see :class:`_AsReplicate`) and their row-parallel
    output leaves as the local partial sum the layer's output adds up."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def pre(_mod, args):
            return (_AsReplicate.apply(args[0], mesh), *args[1:])

        def post(_mod, _args, out):
            # The local gradient arriving here is the full one (from the layer's output).
            return out.to_local(grad_placements=[Replicate()])

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)
        return module


class _ExpertTensorParallel(ParallelStyle):
    """Shard every routed expert's hidden dim F: w1_EFD/w3_EFD on dim 1, w2_EDF on dim 2.

    ``GroupedExperts`` computes with the local shards, (E, F/tp, D) and (E, D, F/tp), so
    each rank's output is a partial sum over its F slice (SwiGLU is elementwise in F).
    """

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        for name, dim in (("w1_EFD", 1), ("w3_EFD", 1), ("w2_EDF", 2)):
            param = getattr(module, name)
            dt = distribute_tensor(param.data, mesh, [Shard(dim)])
            module.register_parameter(name, nn.Parameter(dt, requires_grad=param.requires_grad))
        return module


# ----------------------------------------------------------------------------- plans
def _moe_plan(block: nn.Module, mode: ExpertTP) -> dict[str, ParallelStyle]:
    if mode == ExpertTP.ep:
        # Sequence shard in, sequence shard out: the layer routes its own tokens.
        return {"moe": PrepareModuleInputOutput(
            input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),), use_local_input=True,
            output_layouts=(Shard(1),), desired_output_layouts=(Shard(1),),
            use_local_output=False,
        )}
    plan: dict[str, ParallelStyle] = {"moe": _GatheredTokens(),
                                      "moe.experts": _ExpertTensorParallel()}
    if block.moe.shared_experts is not None:
        plan.update({
            "moe.shared_experts": _PartialSharedExperts(),
            "moe.shared_experts.w1": ColwiseParallel(),
            "moe.shared_experts.w3": ColwiseParallel(),
            "moe.shared_experts.w2": RowwiseParallel(output_layouts=Partial(),
                                                     use_local_output=False),
        })
    return plan


def _block_plan(block: nn.Module, mode: ExpertTP) -> dict[str, ParallelStyle]:
    plan: dict[str, ParallelStyle] = {
        "attention_norm": SequenceParallel(),
        # The attention gets the gathered sequence as a Replicate DTensor: wq/wk/wv consume
        # it directly, so their partial input gradients meet in one reduce-scatter.
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                        desired_input_layouts=(Replicate(), None, None)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "ffn_norm": SequenceParallel(),
    }
    if block.moe_enabled:
        plan.update(_moe_plan(block, mode))
    else:
        plan.update({
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),),
                                               desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        })
    return plan


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, mode: ExpertTP | str) -> TPWiring:
    """Shard ``model`` (a :class:`~moetrain.models.Transformer`) over ``tp_mesh`` in place.

    Parameters keep their fully-qualified names and global shapes (DTensors), so
    checkpoints stay layout-free.
    """
    mode = ExpertTP(mode)
    emb, out = model.tok_embeddings, model.output
    tied = emb is not None and out is not None and out.weight is emb.weight
    top: dict[str, ParallelStyle] = {}
    if emb is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(),
                                                output_layouts=Shard(1), use_local_output=False)
    if model.norm is not None:
        top["norm"] = SequenceParallel()
    if out is not None:
        top["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1),
                                        use_local_output=False)
    parallelize_module(model, tp_mesh, top)
    if tied:  # both are Shard(0) over the vocabulary: share the one DTensor again
        out.weight = emb.weight

    wiring = TPWiring(mode=mode, degree=tp_mesh.size())
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, _block_plan(block, mode))
        if block.moe_enabled:
            wiring.replicated.append(block.moe.router)
            wiring.replicated += list(block.moe.chain_routers)  # CoE's later rounds
            if mode == ExpertTP.ep and block.moe.shared_experts is not None:
                wiring.replicated.append(block.moe.shared_experts)
    return wiring


# ----------------------------------------------------------------------------- loss, grads
def loss_context(enabled: bool) -> contextlib.AbstractContextManager:
    """``loss_parallel()`` under TP: cross-entropy over vocabulary-sharded logits (forward
    and backward must both run inside it), else a no-op."""
    return loss_parallel() if enabled else contextlib.nullcontext()


def local_loss(loss: torch.Tensor) -> torch.Tensor:
    """The (replicated) loss of ``loss_parallel`` as a plain tensor (differentiable)."""
    return loss.to_local() if isinstance(loss, DTensor) else loss


@torch.no_grad()
def align_grad_placements(params: list[nn.Parameter]) -> None:
    """Give each DTensor gradient its parameter's placements.

    Sequence-parallel norms get ``Partial`` gradients (each rank saw S/tp positions) and
    the vocabulary-parallel embedding a ``Replicate`` one; FSDP redistributes them itself,
    plain data parallelism and the gradient norm need them laid out like the parameter.
    """
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and isinstance(p, DTensor) and g.placements != p.placements:
            p.grad = g.redistribute(p.device_mesh, p.placements)
