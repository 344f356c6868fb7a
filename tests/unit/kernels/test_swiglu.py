"""Fused SwiGLU kernel (CPU interpreter) against its float32 torch reference, and the
grouped_mm experts with it against the same experts on the torch path.

Legend: R rows, D model dim, F expert hidden, E experts.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import oracle

oracle("triton", module_level=True)

from moetrain.kernels import ops
from moetrain.kernels import reference as ref
from moetrain.kernels import swiglu as sw

from moetrain.config.schema import ExpertBackend, KernelBackend
from moetrain.models.moe.experts import GroupedExperts

pytestmark = pytest.mark.usefixtures("interpret")


def _pair(R: int, F: int, dtype: torch.dtype, seed: int = 0):
    """a, b and an upstream gradient; |a| up to ~10, where silu bends and saturates."""
    g = torch.Generator().manual_seed(seed)
    a, b, grad = (torch.randn(R, F, generator=g) * 3 for _ in range(3))
    return a.to(dtype), b.to(dtype), grad.to(dtype)


def _ref_and_fused(a, b, grad):
    """(h, grad_a, grad_b) of the float32 reference (autograd) and of ops.swiglu."""
    outs = []
    for fn, cast in ((ref.swiglu_ref, torch.float32), (ops.swiglu, a.dtype)):
        ai = a.to(cast).clone().requires_grad_()
        bi = b.to(cast).clone().requires_grad_()
        h = fn(ai, bi)
        h.backward(grad.to(cast))
        outs.append((h, ai.grad, bi.grad))
    return outs


# 37 x 19 fits one block; 41 x 53 = 2173 is three blocks, the last one partial.
@pytest.mark.parametrize("R,F", [(37, 19), (41, 53)])
def test_float32_forward_and_backward_match_the_reference(R, F):
    (h_r, ga_r, gb_r), (h, ga, gb) = _ref_and_fused(*_pair(R, F, torch.float32))
    for got, want in ((h, h_r), (ga, ga_r), (gb, gb_r)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_bfloat16_is_within_one_rounding_of_the_float32_reference():
    a, b, grad = _pair(37, 19, torch.bfloat16, seed=1)
    (h_r, ga_r, gb_r), (h, ga, gb) = _ref_and_fused(a, b, grad)
    assert h.dtype == ga.dtype == gb.dtype == torch.bfloat16
    # Same bf16 inputs, float32 math on both sides: the fused outputs are rounded once.
    for got, want in ((h, h_r), (ga, ga_r), (gb, gb_r)):
        torch.testing.assert_close(got.float(), want, rtol=8e-3, atol=1e-2)


def test_small_blocks_and_a_non_contiguous_input():
    a, b, grad = _pair(9, 24, torch.float32, seed=2)
    a_t = a.t().contiguous().t()  # same values, column-major
    h = sw.swiglu(a_t, b, block=16)  # 14 blocks, the last partial
    torch.testing.assert_close(h, ref.swiglu_ref(a, b), rtol=1e-6, atol=1e-6)
    ga, gb = sw.swiglu_backward(grad.expand(9, 24), a_t, b, block=16)
    ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
    ref.swiglu_ref(ar, br).backward(grad)
    torch.testing.assert_close(ga, ar.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gb, br.grad, rtol=1e-6, atol=1e-6)


def test_empty_rows_forward_and_backward():
    a = torch.empty(0, 16, requires_grad=True)
    b = torch.empty(0, 16, requires_grad=True)
    h = ops.swiglu(a, b)
    assert h.shape == (0, 16)
    h.sum().backward()
    assert a.grad.shape == b.grad.shape == (0, 16)


def test_mismatched_inputs_are_rejected():
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        sw.swiglu(torch.zeros(2, 3), torch.zeros(3, 2))


def test_compile_specs_name_every_argument():
    assert len(sw.COMPILE_SPECS) == 4
    for spec in sw.COMPILE_SPECS:
        args = spec.kernel.fn.__code__.co_varnames[: spec.kernel.fn.__code__.co_argcount]
        assert set(args) == set(spec.types) | set(spec.constexprs), spec.name
        assert spec.types["N"] == "i64"


@pytest.mark.parametrize("recompute", [False, True])
def test_grouped_mm_experts_with_the_fused_swiglu_match_the_torch_path(recompute):
    E, D, F = 3, 8, 12  # float32 rows: D, F multiples of 4 for grouped_mm
    counts = torch.tensor([5, 0, 6])  # expert 1 receives nothing
    torch.manual_seed(0)
    plain = GroupedExperts(E, D, F, ExpertBackend.grouped_mm, recompute=recompute)
    plain.init_weights(0.5, 0.5)
    plain.kernel_backend = KernelBackend.torch
    fused = copy.deepcopy(plain)
    fused.kernel_backend = KernelBackend.triton
    x = torch.randn(int(counts.sum()), D)
    g = torch.randn(int(counts.sum()), D)
    outs = []
    for ex in (plain, fused):
        xi = x.clone().requires_grad_()
        y = ex(xi, counts)
        y.backward(g)
        outs.append((y, xi.grad, ex.w1_EFD.grad, ex.w3_EFD.grad, ex.w2_EDF.grad))
    for want, got in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_grouped_mm_experts_call_the_fused_kernel(monkeypatch):
    calls = []
    real = ops.swiglu
    monkeypatch.setattr(ops, "swiglu", lambda a, b: calls.append(a.shape) or real(a, b))
    ex = GroupedExperts(2, 8, 12, ExpertBackend.grouped_mm)
    ex.init_weights(0.5, 0.5)
    ex(torch.randn(4, 8), torch.tensor([1, 3]))
    assert calls == []  # kernel_backend=auto keeps the torch path
    ex.kernel_backend = KernelBackend.triton
    ex(torch.randn(4, 8), torch.tensor([1, 3]))
    assert calls == [(4, 12)]
