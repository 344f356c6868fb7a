"""Triton MoE kernels (CPU interpreter) against their torch references, forward and backward.

Legend: T tokens, D model dim, E experts, K top-k, R dispatched rows.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from moetrain.kernels import moe as K
from moetrain.kernels import ops
from moetrain.kernels import reference as ref

from moetrain.models.moe.dispatcher import expert_capacity

pytestmark = pytest.mark.usefixtures("interpret")

# (T, K, E, empty expert or None). T*K is never a multiple of the routing block used below.
SHAPES = [(37, 3, 5, 2), (1, 1, 4, None), (50, 2, 8, 7)]


def _ids(T: int, K: int, E: int, empty: int | None, seed: int = 0) -> torch.Tensor:
    """Distinct experts per token (as top-k gives), skewed so capacity drops rows."""
    g = torch.Generator().manual_seed(seed)
    experts = [e for e in range(E) if e != empty]
    w = torch.linspace(3.0, 1.0, len(experts))
    rows = [torch.tensor(experts)[torch.multinomial(w, K, generator=g)] for _ in range(T)]
    return torch.stack(rows)


@pytest.mark.parametrize("T,K_,E,empty", SHAPES)
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_routing_metadata_matches_reference(T, K_, E, empty, capacity_factor):
    ids = _ids(T, K_, E, empty)
    cap = None if capacity_factor is None else expert_capacity(T, K_, E, capacity_factor)
    got = K.routing_metadata(ids, E, cap, block=16)  # several blocks, a partial last one
    want = ref.routing_metadata_ref(ids, E, cap)
    for field in ("row_index_R", "pos_TK", "tokens_per_expert", "counts_E"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    if empty is not None:
        assert got.counts_E[empty] == 0
    # LocalDispatcher's torch path IS the reference; test_dispatcher checks it by hand.


def test_routing_metadata_by_hand():
    # Flat slots n -> expert: 0:0 1:1 | 2:0 3:2 | 4:1 5:0 | 6:0 7:1 | 8:2 9:0 | 10:1 11:2
    ids = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1], [2, 0], [1, 2]])
    got = K.routing_metadata(ids, 3, None, block=4)
    assert got.row_index_R.tolist() == [0, 2, 5, 6, 9, 1, 4, 7, 10, 3, 8, 11]
    assert got.tokens_per_expert.tolist() == [5, 4, 3]
    capped = K.routing_metadata(ids, 3, 2, block=4)
    assert capped.row_index_R.tolist() == [0, 2, 1, 4, 3, 8]
    assert capped.pos_TK.tolist() == [[0, 2], [1, 4], [3, -1], [-1, -1], [5, -1], [-1, -1]]
    assert int(capped.num_dropped) == 6


@pytest.mark.parametrize("T,K_,E,empty", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_forward_and_backward(T, K_, E, empty, dtype):
    D = 40  # not a power of two
    ids = _ids(T, K_, E, empty, seed=1)
    route = ref.routing_metadata_ref(ids, E, expert_capacity(T, K_, E, 0.75))
    x = torch.randn(T, D).to(dtype)
    x_ref = x.clone().requires_grad_()
    x_k = x.clone().requires_grad_()
    y_ref = ref.permute_ref(x_ref, route.row_index_R, K_)
    y = ops.permute(x_k, route.row_index_R, route.pos_TK, K_)
    assert torch.equal(y, y_ref)  # a pure gather
    g = torch.randn(y.shape).to(dtype)
    y_ref.backward(g)
    y.backward(g)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x_k.grad, x_ref.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("T,K_,E,empty", SHAPES)
@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16])
def test_unpermute_combine_forward_and_backward(T, K_, E, empty, y_dtype):
    D = 24
    ids = _ids(T, K_, E, empty, seed=2)
    route = ref.routing_metadata_ref(ids, E, expert_capacity(T, K_, E, 0.75))
    R = route.row_index_R.numel()
    y = torch.randn(R, D).to(y_dtype)
    w = torch.rand(T, K_)
    y_ref, w_ref = y.clone().requires_grad_(), w.clone().requires_grad_()
    y_k, w_k = y.clone().requires_grad_(), w.clone().requires_grad_()
    out_ref = ref.unpermute_combine_ref(y_ref, w_ref, route.pos_TK, torch.float32)
    out = ops.unpermute_combine(y_k, w_k, route.pos_TK, torch.float32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, out_ref, rtol=1e-6, atol=1e-6)
    g = torch.randn(T, D)
    out_ref.backward(g)
    out.backward(g)
    if y_dtype == torch.float32:
        assert torch.equal(y_k.grad, y_ref.grad)  # w_tk * g_t, one product per row
    else:  # triton's interpreter truncates float32 -> bfloat16 (GPUs round to nearest)
        torch.testing.assert_close(y_k.grad, y_ref.grad, rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(w_k.grad, w_ref.grad, rtol=1e-5, atol=1e-5)
    dropped = route.pos_TK < 0
    assert torch.all(w_k.grad[dropped] == 0)


@pytest.mark.parametrize("sigmoid", [False, True])
@pytest.mark.parametrize("renormalize", [False, True])
def test_fused_router_matches_reference(sigmoid, renormalize):
    T, E, top_k = 21, 6, 3  # T not a multiple of the block, E not a power of two
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(T, E, generator=g)
    bias = 0.3 * torch.randn(E, generator=g)
    l_ref, l_k = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ids_r, w_r, s_r = ref.topk_router_ref(l_ref, bias, top_k, sigmoid, renormalize, 2.0)
    ids, w, s = ops.topk_router(l_k, bias, top_k, sigmoid, renormalize, 2.0)
    assert torch.equal(ids, ids_r)
    torch.testing.assert_close(w, w_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s, s_r, rtol=1e-6, atol=1e-6)
    gw, gs = torch.randn(T, top_k, generator=g), torch.randn(T, E, generator=g)
    torch.autograd.backward([w_r, s_r], [gw, gs])
    torch.autograd.backward([w, s], [gw, gs])
    torch.testing.assert_close(l_k.grad, l_ref.grad, rtol=1e-5, atol=1e-6)


def test_fused_router_weights_only_gradient_and_no_bias():
    T, E, top_k = 5, 4, 2
    logits = torch.randn(T, E)
    l_ref, l_k = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    _, w_r, _ = ref.topk_router_ref(l_ref, None, top_k, False, True)
    _, w, _ = ops.topk_router(l_k, None, top_k, False, True)
    (w_r * torch.arange(top_k)).sum().backward()
    (w * torch.arange(top_k)).sum().backward()
    torch.testing.assert_close(l_k.grad, l_ref.grad, rtol=1e-5, atol=1e-7)


def test_interpreted_launch_leaves_triton_untouched():
    from triton.runtime.jit import JITFunction

    before = JITFunction.__call__
    K.permute(torch.randn(3, 4), torch.tensor([0, 1, 2]), 1)
    assert JITFunction.__call__ is before
