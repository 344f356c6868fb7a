"""Autograd operations over the Triton kernels (the middle of three layers).

Legend: T tokens, D model dim, E experts, K top-k, R dispatched rows, F expert hidden.

Each op is an ``autograd.Function`` whose forward and backward both launch kernels from
:mod:`moetrain.kernels.moe` or :mod:`moetrain.kernels.swiglu`; the torch twins in
:mod:`moetrain.kernels.reference` give the same values (tests hold them together). The ops
are opaque to ``torch.compile`` (``torch.compiler.disable``): the graph breaks around them
rather than tracing a launch.
"""

from __future__ import annotations

import torch
from moetrain.kernels import moe as _k
from moetrain.kernels import swiglu as _sw
from moetrain.kernels.reference import RoutingMeta

from moetrain.config.schema import DropPolicy

__all__ = ["RoutingMeta", "permute", "routing_metadata", "swiglu", "topk_router",
           "unpermute_combine"]


@torch.compiler.disable
def routing_metadata(ids_TK: torch.Tensor, num_experts: int, capacity: int | None = None, *,
                     policy: DropPolicy | str = DropPolicy.position,
                     weights_TK: torch.Tensor | None = None,
                     active_TK: torch.Tensor | None = None) -> RoutingMeta:
    """Expert-sorted order of the active slots (stable, by flat index t*K+k) and per-expert
    counts; at most ``capacity`` rows per expert, chosen by ``policy``, when given (see
    :func:`moetrain.kernels.reference.routing_metadata_ref`). Not differentiable."""
    return _k.routing_metadata(ids_TK, num_experts, capacity, policy=policy,
                               weights_TK=weights_TK, active_TK=active_TK)


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, row_index_R, pos_TK, top_k):
        ctx.save_for_backward(pos_TK)
        return _k.permute(x_TD, row_index_R, top_k)

    @staticmethod
    def backward(ctx, grad_RD):
        (pos_TK,) = ctx.saved_tensors
        return _k.permute_backward(grad_RD, pos_TK), None, None, None


@torch.compiler.disable
def permute(x_TD: torch.Tensor, row_index_R: torch.Tensor, pos_TK: torch.Tensor,
            top_k: int) -> torch.Tensor:
    """x_RD[r] = x_TD[row_index_R[r] // K]; backward sums each token's kept slots."""
    return _Permute.apply(x_TD, row_index_R, pos_TK, top_k)


class _UnpermuteCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_RD, weights_TK, pos_TK, out_dtype):
        ctx.save_for_backward(y_RD, weights_TK, pos_TK)
        return _k.unpermute_combine(y_RD, weights_TK, pos_TK, out_dtype)

    @staticmethod
    def backward(ctx, grad_TD):
        y_RD, weights_TK, pos_TK = ctx.saved_tensors
        grad_y, grad_w = _k.unpermute_combine_backward(grad_TD, y_RD, weights_TK, pos_TK)
        return grad_y, grad_w, None, None


@torch.compiler.disable
def unpermute_combine(y_RD: torch.Tensor, weights_TK: torch.Tensor, pos_TK: torch.Tensor,
                      out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out_TD[t] = sum_k w_tk * y_RD[pos_tk] (float32 sum); gradients for rows and weights.
    Slots with pos = -1 (dropped or inactive) add zero and get a zero weight gradient."""
    return _UnpermuteCombine.apply(y_RD, weights_TK, pos_TK, out_dtype or y_RD.dtype)


class _TopKRouter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, expert_bias_E, top_k, sigmoid, renormalize, temperature):
        ids, w, scores = _k.topk_router(logits_TE, expert_bias_E, top_k, sigmoid, renormalize,
                                        temperature)
        ctx.save_for_backward(logits_TE, ids)
        ctx.mark_non_differentiable(ids)
        ctx.set_materialize_grads(False)
        ctx.opts = (sigmoid, renormalize, temperature)
        return ids, w, scores

    @staticmethod
    def backward(ctx, _grad_ids, grad_w, grad_scores):
        logits_TE, ids = ctx.saved_tensors
        if grad_w is None and grad_scores is None:
            return None, None, None, None, None, None
        grad = _k.topk_router_backward(logits_TE, ids, grad_w, grad_scores, *ctx.opts)
        return grad.to(logits_TE.dtype), None, None, None, None, None


@torch.compiler.disable
def topk_router(logits_TE: torch.Tensor, expert_bias_E: torch.Tensor | None, top_k: int,
                sigmoid: bool, renormalize: bool, temperature: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused scores + biased top-k + (re)normalised weights of ``TopKRouter``.

    Returns (ids_TK int64, weights_TK float32, scores_TE float32); gradients flow to the
    logits from both the weights and the scores.
    """
    bias = expert_bias_E.detach() if expert_bias_E is not None else None
    return _TopKRouter.apply(logits_TE, bias, top_k, sigmoid, renormalize, temperature)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a_RF, b_RF):
        ctx.save_for_backward(a_RF, b_RF)  # not silu(a): the backward recomputes the sigmoid
        return _sw.swiglu(a_RF, b_RF)

    @staticmethod
    def backward(ctx, grad_RF):
        a_RF, b_RF = ctx.saved_tensors
        return _sw.swiglu_backward(grad_RF, a_RF, b_RF)


@torch.compiler.disable
def swiglu(a_RF: torch.Tensor, b_RF: torch.Tensor) -> torch.Tensor:
    """h_RF = silu(a_RF) * b_RF in one pass (float32 math, a's dtype); the backward reads
    only a, b and the incoming gradient (Shazeer, 2020, SwiGLU)."""
    return _SwiGLU.apply(a_RF, b_RF)
