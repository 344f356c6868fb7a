"""Triton MoE kernels (CPU interpreter) against their torch references, forward and backward.

Legend: T tokens, D model dim, E experts, K top-k, R dispatched rows.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import oracle

oracle("triton", module_level=True)

from moetrain.kernels import moe as K
from moetrain.kernels import ops
from moetrain.kernels import reference as ref

from moetrain.config.schema import DropPolicy
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


# Drop policies by hand: T=4, K=2, E=2, C=2. Slot (t, k) -> expert (weight):
#   t0: 0 (.6)  1 (.4) | t1: 1 (.7)  0 (.3) | t2: 0 (.9)  1 (.1) | t3: 1 (.2)  0 (.8)
# Expert 0 gets n = 0, 3, 4, 7 = (0,0) (1,1) (2,0) (3,1); expert 1 gets n = 1, 2, 5, 6.
HAND_IDS = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]])
HAND_W = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.2, 0.8]])
HAND_KEPT = {
    # Token 1's second choice (1,1) beats token 2's first choice (2,0) for expert 0.
    DropPolicy.position: [[1, 1], [1, 1], [0, 0], [0, 0]],
    # First choices only: (0,0) (2,0) for expert 0, (1,0) (3,0) for expert 1.
    DropPolicy.slot: [[1, 0], [1, 0], [1, 0], [1, 0]],
    # Expert 0: .9 (2,0) and .8 (3,1); expert 1: .7 (1,0) and .4 (0,1).
    DropPolicy.probs: [[0, 1], [1, 0], [1, 0], [0, 1]],
    # First choices before second: expert 0 keeps (2,0) .9 and (0,0) .6, expert 1 (1,0) .7
    # and (3,0) .2; here every expert has exactly C first choices, so it equals slot (the
    # orders differ in tests/unit/models/test_recipes.py).
    DropPolicy.rank: [[1, 0], [1, 0], [1, 0], [1, 0]],
}
# Dispatched rows: kept flat indices, by expert, in flat order whatever the policy.
HAND_ROWS = {DropPolicy.position: [0, 3, 1, 2], DropPolicy.slot: [0, 4, 2, 6],
             DropPolicy.probs: [4, 7, 1, 2], DropPolicy.rank: [0, 4, 2, 6]}


@pytest.mark.parametrize("policy", list(DropPolicy))
def test_drop_policies_by_hand(policy):
    assert ref.capacity_keep(HAND_IDS, 2, 2, policy, HAND_W).int().tolist() == HAND_KEPT[policy]
    for fn in (ref.routing_metadata_ref, K.routing_metadata):
        got = fn(HAND_IDS, 2, 2, policy=policy, weights_TK=HAND_W.requires_grad_())
        assert got.row_index_R.tolist() == HAND_ROWS[policy]
        assert (got.pos_TK >= 0).int().tolist() == HAND_KEPT[policy]
        assert got.tokens_per_expert.tolist() == [2, 2]
        assert got.counts_E.tolist() == [4, 4]
        assert int(got.num_dropped) == 4


def test_probs_policy_breaks_weight_ties_by_flat_index():
    # Every slot to expert 0 with weight .5 except n = 5 (.9): keep n = 5, then n = 0.
    ids = torch.zeros(3, 2, dtype=torch.int64)
    w = torch.full((3, 2), 0.5)
    w[2, 1] = 0.9
    for fn in (ref.routing_metadata_ref, K.routing_metadata):
        got = fn(ids, 2, 2, policy=DropPolicy.probs, weights_TK=w)
        assert got.row_index_R.tolist() == [0, 5]
        assert got.pos_TK.tolist() == [[0, -1], [-1, -1], [-1, 1]]


def test_inactive_slots_by_hand():
    # Inactive slots (x) hold ids that would otherwise claim expert 0's capacity first.
    ids = torch.tensor([[0, 0], [0, 1], [0, 0], [1, 0]])
    active = torch.tensor([[False, True], [False, True], [True, False], [True, True]])
    # Active: (0,1)->0  (1,1)->1  (2,0)->0  (3,0)->1  (3,1)->0; capacity 2, position.
    for fn in (ref.routing_metadata_ref, K.routing_metadata):
        got = fn(ids, 2, None, active_TK=active)
        assert got.row_index_R.tolist() == [1, 4, 7, 3, 6]
        assert got.pos_TK.tolist() == [[-1, 0], [-1, 3], [1, -1], [4, 2]]
        assert got.counts_E.tolist() == [3, 2] and int(got.num_dropped) == 0
        capped = fn(ids, 2, 2, active_TK=active)
        assert capped.row_index_R.tolist() == [1, 4, 3, 6]  # (3,1) drops, no inactive slot
        assert capped.tokens_per_expert.tolist() == [2, 2] and capped.counts_E.tolist() == [3, 2]
        assert int(capped.num_dropped) == 1


def _inactive(T: int, K: int, seed: int) -> torch.Tensor:
    """About a third of the slots inactive, and at least one token with none active."""
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(T, K, generator=g) > 0.35
    active[0] = False
    return active


@pytest.mark.parametrize("T,K_,E,empty", SHAPES)
@pytest.mark.parametrize("policy", list(DropPolicy))
@pytest.mark.parametrize("with_inactive", [False, True])
def test_routing_metadata_policies_match_reference(T, K_, E, empty, policy, with_inactive):
    ids = _ids(T, K_, E, empty, seed=4)
    w = torch.rand(T, K_, generator=torch.Generator().manual_seed(5))
    w[T // 2] = w[0, 0]  # weight ties across tokens
    active = _inactive(T, K_, seed=6) if with_inactive else None
    cap = expert_capacity(T, K_, E, 0.75)
    for c in (None, cap):
        got = K.routing_metadata(ids, E, c, block=16, policy=policy, weights_TK=w,
                                 active_TK=active)
        want = ref.routing_metadata_ref(ids, E, c, policy=policy, weights_TK=w,
                                        active_TK=active)
        for field in ("row_index_R", "pos_TK", "tokens_per_expert", "counts_E", "num_dropped"):
            assert torch.equal(getattr(got, field), getattr(want, field)), (c, field)
        n_active = T * K_ if active is None else int(active.sum())
        assert int(want.counts_E.sum()) == n_active
        if active is not None:
            assert bool((want.pos_TK[~active] == -1).all())
        if empty is not None:
            assert got.tokens_per_expert[empty] == 0


@pytest.mark.parametrize("policy", list(DropPolicy))
def test_dispatch_chain_with_inactive_slots_forward_and_backward(policy):
    """routing -> permute -> unpermute+combine, kernels against the references, with NaN
    weights in the inactive slots (they must add exactly zero and get zero gradient)."""
    T, K_, E, D = 19, 3, 5, 12
    ids = _ids(T, K_, E, 2, seed=7)
    active = _inactive(T, K_, seed=8)
    w = torch.rand(T, K_, generator=torch.Generator().manual_seed(9))
    w[~active] = float("nan")
    cap = expert_capacity(T, K_, E, 0.75)
    x = torch.randn(T, D)
    outs, grads = [], []
    for meta_fn, perm, comb in (
        (K.routing_metadata, lambda x, r: ops.permute(x, r.row_index_R, r.pos_TK, K_),
         ops.unpermute_combine),
        (ref.routing_metadata_ref, lambda x, r: ref.permute_ref(x, r.row_index_R, K_),
         ref.unpermute_combine_ref),
    ):
        r = meta_fn(ids, E, cap, policy=policy, weights_TK=torch.nan_to_num(w),
                    active_TK=active)
        x_, w_ = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = perm(x_, r) * torch.arange(1.0, r.row_index_R.numel() + 1)[:, None]
        out = comb(y, w_, r.pos_TK, torch.float32)
        out.backward(torch.cos(torch.arange(T * D, dtype=torch.float32)).view(T, D))
        outs.append(out.detach())
        grads.append((x_.grad, w_.grad))
    assert not outs[0].isnan().any()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-5)
    assert bool((grads[0][1][~active] == 0).all()) and bool((outs[0][0] == 0).all())


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
