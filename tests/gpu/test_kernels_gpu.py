"""Triton MoE kernels on CUDA against their torch references, at realistic sizes.

Legend: T tokens, D model dim, E experts, K top-k, R dispatched rows.
Skips without a CUDA device or without triton. triton is imported inside the tests, so
collecting this file never imports it.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from moetrain.config.schema import (
    DispatchMode,
    ExpertBackend,
    KernelBackend,
    ModelConfig,
    MoEConfig,
    RouterConfig,
    ScoreFunc,
)

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
]

T, K, E, D = 4096, 6, 64, 2048


def _ids(seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(T, E, device="cuda", generator=g)
    logits[:, 5] = -1e4  # expert 5 gets no tokens
    logits[:, :8] += 1.0  # skewed load, so capacity drops rows
    return logits.topk(K, dim=-1).indices


@pytest.fixture(autouse=True)
def _compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("capacity", [None, 300])
def test_routing_metadata_exact(capacity):
    from moetrain.kernels import moe, reference

    ids = _ids()
    got = moe.routing_metadata(ids, E, capacity)
    want = reference.routing_metadata_ref(ids, E, capacity)
    for field in ("row_index_R", "pos_TK", "tokens_per_expert", "counts_E"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    assert got.counts_E[5] == 0


def test_permute_and_combine_bf16_forward_backward():
    from moetrain.kernels import ops, reference

    route = reference.routing_metadata_ref(_ids(1), E, 400)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    xr, xk = x.clone().requires_grad_(), x.clone().requires_grad_()
    rows_ref = reference.permute_ref(xr, route.row_index_R, K)
    rows = ops.permute(xk, route.row_index_R, route.pos_TK, K)
    assert torch.equal(rows, rows_ref)
    g_rows = torch.randn_like(rows)
    rows_ref.backward(g_rows)
    rows.backward(g_rows)
    torch.testing.assert_close(xk.grad, xr.grad, rtol=1.6e-2, atol=1e-2)

    w = torch.rand(T, K, device="cuda")
    y = torch.randn(rows.shape, device="cuda", dtype=torch.bfloat16)
    yr, wr = y.clone().requires_grad_(), w.clone().requires_grad_()
    yk, wk = y.clone().requires_grad_(), w.clone().requires_grad_()
    out_ref = reference.unpermute_combine_ref(yr, wr, route.pos_TK, torch.bfloat16)
    out = ops.unpermute_combine(yk, wk, route.pos_TK, torch.bfloat16)
    torch.testing.assert_close(out, out_ref, rtol=1.6e-2, atol=1e-2)
    g = torch.randn_like(out)
    out_ref.backward(g)
    out.backward(g)
    assert torch.equal(yk.grad, yr.grad)  # w * g rounded once to bf16 on both paths
    torch.testing.assert_close(wk.grad, wr.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("sigmoid", [False, True])
def test_fused_router(sigmoid):
    from moetrain.kernels import ops, reference

    logits = torch.randn(T, E, device="cuda")
    bias = 0.01 * torch.randn(E, device="cuda")
    lr, lk = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ids_r, w_r, s_r = reference.topk_router_ref(lr, bias, K, sigmoid, True, 1.0)
    ids, w, s = ops.topk_router(lk, bias, K, sigmoid, True, 1.0)
    assert (ids == ids_r).all(-1).float().mean() > 0.999  # rounding may swap near-ties
    same = (ids == ids_r).all(-1)
    torch.testing.assert_close(w[same], w_r[same], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s, s_r, rtol=1e-5, atol=1e-6)
    gw, gs = torch.randn_like(w), torch.randn_like(s)
    torch.autograd.backward([w_r, s_r], [gw, gs])
    torch.autograd.backward([w, s], [gw, gs])
    torch.testing.assert_close(lk.grad[same], lr.grad[same], rtol=1e-4, atol=1e-5)


def test_selftest_passes_and_auto_selects_the_kernels_on_cuda():
    """``moe.kernel_backend=auto`` runs the kernels on a GPU where they agree with their
    references (``moetrain.kernels.selftest``)."""
    from moetrain.kernels import selftest
    from moetrain.kernels.backend import use_triton

    assert selftest.run_selftest(torch.device("cuda")) == []
    selftest.VERDICTS.clear()
    assert use_triton(KernelBackend.auto, torch.device("cuda"))
    assert not use_triton(KernelBackend.torch, torch.device("cuda"))


@pytest.mark.parametrize("dispatch", [DispatchMode.dropless, DispatchMode.capacity])
def test_moe_layer_triton_matches_torch_under_autocast(dispatch):
    from moetrain.models.moe.layer import MoELayer

    mcfg = ModelConfig(dim=256, n_heads=4, num_experts=16, top_k=4, expert_hidden=512)
    torch.manual_seed(0)
    ref = MoELayer(256, mcfg, MoEConfig(
        router=RouterConfig(score_func=ScoreFunc.sigmoid), dispatch=dispatch,
        expert_backend=ExpertBackend.grouped_mm, kernel_backend=KernelBackend.torch)).cuda()
    ref.init_weights(0.05, 0.05)
    fast = copy.deepcopy(ref)
    fast.router.kernel_backend = KernelBackend.triton
    fast.dispatcher.kernel_backend = KernelBackend.triton
    fast.experts.kernel_backend = KernelBackend.triton  # fused SwiGLU
    x = torch.randn(4, 512, 256, device="cuda")
    outs = []
    for layer in (ref, fast):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(xi)
        y.float().square().mean().backward()
        outs.append((y.float(), xi.grad, layer.experts.w1_EFD.grad, layer.router.gate.weight.grad))
    # fp32 routing on both paths; rounding may swap a rare near-tie.
    assert (ref.last_stats.load_E - fast.last_stats.load_E).abs().sum() <= 4
    for a, b in zip(outs[0], outs[1]):
        assert ((a - b).norm() / b.norm()).item() < 2e-2


def test_fused_swiglu_bf16_forward_backward():
    """The grouped_mm experts' fused SwiGLU at a fine-grained shape (R rows x F hidden)."""
    from moetrain.kernels import ops, reference

    R, F = 8192, 1408
    a, b, g = (3 * torch.randn(R, F, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ar, br = a.float().requires_grad_(), b.float().requires_grad_()
    ak, bk = a.clone().requires_grad_(), b.clone().requires_grad_()
    h_ref = reference.swiglu_ref(ar, br)  # float32 math on the same bf16 inputs
    h = ops.swiglu(ak, bk)
    assert h.dtype == torch.bfloat16
    torch.testing.assert_close(h.float(), h_ref, rtol=8e-3, atol=1e-2)
    h_ref.backward(g.float())
    h.backward(g)
    torch.testing.assert_close(ak.grad.float(), ar.grad, rtol=8e-3, atol=1e-2)
    torch.testing.assert_close(bk.grad.float(), br.grad, rtol=8e-3, atol=1e-2)
