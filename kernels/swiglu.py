"""Fused SwiGLU activation of the routed experts: a Triton kernel pair and its launchers.

Legend: R dispatched rows, F expert hidden, N = R*F elements, NB blocks of the flat index.

SwiGLU (Shazeer, 2020) joins the two up-projections of an expert: h = silu(a) * b with
a = x W1^T and b = x W3^T. Eager PyTorch spends ~5 memory passes over R x F in the forward
and ~9 in the backward on it, and autograd keeps a, silu(a) and b. These kernels read a and
b and write h (forward); read g, a, b and write grad_a, grad_b, recomputing the sigmoid
(backward). Only a and b are kept for the backward. At the mixtral_like shape (R=16384,
F=14336, bf16) one pass is 470 MB, so this is ~2 ms of each layer's forward+backward.

With s = sigmoid(a):  h = a s b;  grad_a = g b s (1 + a (1 - s));  grad_b = g a s.

The bottom layer of three (kernels -> autograd ops -> modules), like :mod:`.moe`:
launchers take contiguous tensors and return new ones, and know nothing of autograd.
The math is float32; outputs take the input dtype. The flat index is int64, so N may
exceed 2^31 elements. :func:`moetrain.kernels.reference.swiglu_ref` is the torch twin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moetrain.kernels.jit import CompileSpec, lazy_jit

# Elements per program (a power of two): 8 per thread at triton's default 4 warps.
SWIGLU_BLOCK = 1024


@lazy_jit
def _swiglu_fwd_kernel(a_ptr, b_ptr, h_ptr, N, BLOCK: tl.constexpr):
    """h = silu(a) * b over one BLOCK of the flat index, in float32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    a = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-a))
    tl.store(h_ptr + offs, (a * s * b).to(h_ptr.dtype.element_ty), mask=m)


@lazy_jit
def _swiglu_bwd_kernel(g_ptr, a_ptr, b_ptr, grad_a_ptr, grad_b_ptr, N, BLOCK: tl.constexpr):
    """grad_a = g b s (1 + a (1 - s)), grad_b = g a s with s = sigmoid(a) recomputed."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-a))
    gs = g * s
    tl.store(grad_a_ptr + offs, (gs * b * (1.0 + a * (1.0 - s))).to(grad_a_ptr.dtype.element_ty),
             mask=m)
    tl.store(grad_b_ptr + offs, (gs * a).to(grad_b_ptr.dtype.element_ty), mask=m)


def _check_pair(a_RF: torch.Tensor, b_RF: torch.Tensor) -> None:
    if a_RF.shape != b_RF.shape or a_RF.dtype != b_RF.dtype or a_RF.device != b_RF.device:
        raise ValueError(
            f"swiglu needs two tensors of one shape, dtype and device; got "
            f"{tuple(a_RF.shape)} {a_RF.dtype} {a_RF.device} and "
            f"{tuple(b_RF.shape)} {b_RF.dtype} {b_RF.device}"
        )


def swiglu(a_RF: torch.Tensor, b_RF: torch.Tensor, block: int = SWIGLU_BLOCK) -> torch.Tensor:
    """h_RF = silu(a_RF) * b_RF (float32 math, a's dtype); any shape, both the same."""
    _check_pair(a_RF, b_RF)
    a_RF, b_RF = a_RF.contiguous(), b_RF.contiguous()
    h_RF = torch.empty_like(a_RF)
    n = a_RF.numel()
    if n > 0:
        _swiglu_fwd_kernel[(triton.cdiv(n, block),)](a_RF, b_RF, h_RF, n, BLOCK=block)
    return h_RF


def swiglu_backward(grad_RF: torch.Tensor, a_RF: torch.Tensor, b_RF: torch.Tensor,
                    block: int = SWIGLU_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_a_RF, grad_b_RF) in a's dtype, from the gradient of h (cast to a's dtype)."""
    _check_pair(a_RF, b_RF)
    a_RF, b_RF = a_RF.contiguous(), b_RF.contiguous()
    grad_RF = grad_RF.to(a_RF.dtype).contiguous()  # expanded (stride-0) gradients too
    grad_a, grad_b = torch.empty_like(a_RF), torch.empty_like(b_RF)
    n = a_RF.numel()
    if n > 0:
        _swiglu_bwd_kernel[(triton.cdiv(n, block),)](grad_RF, a_RF, b_RF, grad_a, grad_b, n,
                                                     BLOCK=block)
    return grad_a, grad_b


# ----------------------------------------------------------------------------- AOT specs
def _compile_specs() -> list[CompileSpec]:
    """The instantiations the launchers above make for bf16 and float32 activations
    (compiled ahead of time by tools/check_kernels.py). N is int64: R*F may pass 2^31."""
    specs = []
    for act in ("*bf16", "*fp32"):
        specs += [
            CompileSpec(_swiglu_fwd_kernel, {"a_ptr": act, "b_ptr": act, "h_ptr": act,
                                             "N": "i64"}, {"BLOCK": SWIGLU_BLOCK}),
            CompileSpec(_swiglu_bwd_kernel, {"g_ptr": act, "a_ptr": act, "b_ptr": act,
                                             "grad_a_ptr": act, "grad_b_ptr": act,
                                             "N": "i64"}, {"BLOCK": SWIGLU_BLOCK}),
        ]
    return specs


COMPILE_SPECS = _compile_specs()
