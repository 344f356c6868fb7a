import pytest
import torch

from moetrain.config.schema import ConfigError, DropPolicy, KernelBackend
from moetrain.models.moe.dispatcher import Dispatcher, LocalDispatcher, expert_capacity
from tests.conftest import oracle

# E=3, T=6, K=2. Flat rows t*K+k -> expert:
#   0:0 1:1 | 2:0 3:2 | 4:1 5:0 | 6:0 7:1 | 8:2 9:0 | 10:1 11:2
IDS_TK = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1], [2, 0], [1, 2]])


def test_expert_capacity_values():
    assert expert_capacity(6, 2, 3, 0.5) == 2
    assert expert_capacity(8, 2, 4, 1.25) == 5
    assert expert_capacity(7, 2, 4, 1.0) == 4  # ceil(3.5)
    assert expert_capacity(10, 1, 1, 1.1) == 11  # 1.1 * 10 is 11.000000000000002 in float


def test_dropless_dispatch_sorts_rows_by_expert_stably():
    x = torch.arange(6, dtype=torch.float32)[:, None].repeat(1, 4)  # row t holds t
    w = torch.rand(6, 2)
    d = LocalDispatcher(3, None)
    assert isinstance(d, Dispatcher)
    x_RD, meta = d.dispatch(x, IDS_TK, w)
    assert meta.row_index_R.tolist() == [0, 2, 5, 6, 9, 1, 4, 7, 10, 3, 8, 11]
    assert meta.tokens_per_expert.tolist() == [5, 4, 3]
    assert x_RD[:, 0].tolist() == [0, 1, 2, 3, 4, 0, 2, 3, 5, 1, 4, 5]  # token = row // K
    assert int(meta.num_dropped) == 0 and bool(meta.kept_TK.all())


def test_dropless_combine_is_weighted_sum_of_slots():
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    w = torch.rand(6, 2)
    d = LocalDispatcher(3, None)
    x_RD, meta = d.dispatch(x, IDS_TK, w)
    scale_E = torch.tensor([1.0, -2.0, 3.0])
    y_RD = x_RD * torch.repeat_interleave(scale_E, meta.tokens_per_expert)[:, None]
    out = d.combine(y_RD, meta)
    ref = torch.stack([sum(w[t, k] * scale_E[IDS_TK[t, k]] * x[t] for k in range(2))
                       for t in range(6)])
    assert torch.allclose(out, ref, atol=1e-6)


def test_capacity_drops_exactly_the_overflow_rows():
    x = torch.arange(6, dtype=torch.float32)[:, None].repeat(1, 4)
    w = torch.ones(6, 2)
    d = LocalDispatcher(3, capacity_factor=0.5)  # capacity = ceil(0.5 * 12 / 3) = 2
    x_RD, meta = d.dispatch(x, IDS_TK, w)
    # Expert 0 rows 0,2,5,6,9 keep 0,2; expert 1 rows 1,4,7,10 keep 1,4; expert 2 keeps 3,8.
    assert meta.row_index_R.tolist() == [0, 2, 1, 4, 3, 8]
    assert meta.tokens_per_expert.tolist() == [2, 2, 2]
    assert int(meta.num_dropped) == 6
    dropped = {(t, k) for t in range(6) for k in range(2) if not meta.kept_TK[t, k]}
    assert dropped == {(2, 1), (3, 0), (3, 1), (4, 1), (5, 0), (5, 1)}
    assert x_RD.shape == (6, 4)  # E x C = 3 x 2 rows, every one filled here
    assert x_RD[:, 0].tolist() == [0, 1, 0, 2, 1, 4]
    out = d.combine(x_RD + 1.0, meta)
    # Identity "experts" (+1): kept slots contribute x_t + 1, dropped ones zero.
    expected = [2 * 1.0, 2 * 2.0, 3.0, 0.0, 5.0, 0.0]  # tokens 3 and 5 fully dropped
    assert out[:, 0].tolist() == expected


def test_capacity_large_enough_drops_nothing():
    d = LocalDispatcher(3, capacity_factor=5.0)
    _, meta = d.dispatch(torch.randn(6, 4), IDS_TK, torch.rand(6, 2))
    assert int(meta.num_dropped) == 0
    assert meta.kept_per_expert.tolist() == [5, 4, 3]
    # The fixed E x C layout: C = ceil(5 * 12 / 3) = 20 rows per expert, zero-filled.
    assert meta.tokens_per_expert.tolist() == [20, 20, 20] and meta.rows_per_expert == 20


def test_combine_backward_reaches_rows_and_weights():
    x = torch.randn(6, 4, requires_grad=True)
    w = torch.rand(6, 2, requires_grad=True)
    d = LocalDispatcher(3, capacity_factor=0.5)
    x_RD, meta = d.dispatch(x, IDS_TK, w)
    d.combine(x_RD, meta).sum().backward()
    # d out_t / d x_t = sum of kept weights of token t; dropped slots get zero weight grads.
    kept = meta.kept_TK.float()
    assert torch.allclose(x.grad, (w * kept).sum(-1, keepdim=True).expand(6, 4).detach())
    assert torch.allclose(w.grad, kept * x.sum(-1, keepdim=True).detach())


def test_bad_capacity_factor_names_the_field():
    with pytest.raises(ConfigError, match="moe.capacity_factor"):
        LocalDispatcher(3, capacity_factor=float("nan"))


# ----------------------------------------------------------------------------- drop policies
# T=4, K=2, E=2, capacity ceil(0.5 * 8 / 2) = 2. Slot (t, k) -> expert (weight):
#   t0: 0 (.6)  1 (.4) | t1: 1 (.7)  0 (.3) | t2: 0 (.9)  1 (.1) | t3: 1 (.2)  0 (.8)
POLICY_IDS = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]])
POLICY_W = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.2, 0.8]])


@pytest.mark.parametrize("policy,kept", [
    # Token 1's second choice beats token 2's first choice for expert 0 only by position.
    (DropPolicy.position, [[1, 1], [1, 1], [0, 0], [0, 0]]),
    (DropPolicy.slot, [[1, 0], [1, 0], [1, 0], [1, 0]]),
    (DropPolicy.probs, [[0, 1], [1, 0], [1, 0], [0, 1]]),
])
def test_drop_policy_chooses_the_kept_rows(policy, kept):
    x = torch.arange(4, dtype=torch.float32)[:, None].repeat(1, 3)  # row t holds t
    d = LocalDispatcher(2, capacity_factor=0.5, drop_policy=policy)
    x_RD, meta = d.dispatch(x, POLICY_IDS, POLICY_W)
    assert meta.kept_TK.int().tolist() == kept
    assert int(meta.num_dropped) == 4 and meta.tokens_per_expert.tolist() == [2, 2]
    # Each expert's kept rows go out in token order whatever the policy.
    tokens = [t for e in range(2) for t in range(4) for k in range(2)
              if POLICY_IDS[t, k] == e and kept[t][k]]
    assert x_RD[:, 0].tolist() == tokens


def test_default_drop_policy_is_probs():
    assert LocalDispatcher(2, 0.5).drop_policy == DropPolicy.probs


def _kept_by_loop(ids, w, active, E, C, policy):
    """The kept (t, k) set, one expert at a time, straight from the policy's definition."""
    T, K = ids.shape
    key = {DropPolicy.position: lambda tk: tk[0] * K + tk[1],
           DropPolicy.slot: lambda tk: (tk[1], tk[0]),
           DropPolicy.probs: lambda tk: (-float(w[tk]), tk[0] * K + tk[1]),
           DropPolicy.rank: lambda tk: (tk[1], -float(w[tk]), tk[0])}[policy]
    kept = set()
    for e in range(E):
        slots = [(t, k) for t in range(T) for k in range(K) if active[t, k] and ids[t, k] == e]
        kept |= set(sorted(slots, key=key)[:C] if C is not None else slots)
    return kept


def _experts(x_RD, tokens_per_expert, W_EDD):
    chunks = x_RD.split(tokens_per_expert.tolist())
    return torch.cat([torch.tanh(c @ W_EDD[e]) for e, c in enumerate(chunks)])


@pytest.mark.parametrize("backend", [KernelBackend.torch, KernelBackend.triton])
@pytest.mark.parametrize("policy", list(DropPolicy))
@pytest.mark.parametrize("capacity_factor", [None, 0.5])  # C = 4: the policies differ
def test_combine_with_inactive_slots_matches_dense_loop(backend, policy, capacity_factor,
                                                        monkeypatch):
    if backend == KernelBackend.triton:
        oracle("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    T, K, E, D = 9, 3, 4, 5
    g = torch.Generator().manual_seed(11)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[ids == 3] = 0  # expert 3 gets no rows; expert 0 overflows
    active = torch.rand(T, K, generator=g) > 0.3
    active[1] = False  # a token with no active slot
    w = torch.rand(T, K, generator=g)
    w[~active] = float("nan")  # never read: inactive slots add exactly zero
    W_EDD = torch.randn(E, D, D, generator=g)
    x = torch.randn(T, D, generator=g)
    cap = None if capacity_factor is None else expert_capacity(T, K, E, capacity_factor)
    kept = _kept_by_loop(ids, w, active, E, cap, policy)

    d = LocalDispatcher(E, capacity_factor, backend, drop_policy=policy)
    x_k, w_k = x.clone().requires_grad_(), w.clone().requires_grad_()
    x_RD, meta = d.dispatch(x_k, ids, w_k, active)
    out = d.combine(_experts(x_RD, meta.tokens_per_expert, W_EDD), meta)

    x_r, w_r = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = torch.stack([sum((w_r[t, k] * torch.tanh(x_r[t] @ W_EDD[ids[t, k]])
                            for k in range(K) if (t, k) in kept), torch.zeros(D))
                       for t in range(T)])
    assert {(t, k) for t in range(T) for k in range(K) if meta.kept_TK[t, k]} == kept
    assert int(meta.num_dropped) == int(active.sum()) - len(kept)
    assert meta.kept_per_expert.tolist() == [sum(ids[tk] == e for tk in kept)
                                             for e in range(E)]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    gout = torch.randn(T, D, generator=g)
    out.backward(gout)
    ref.backward(gout)
    torch.testing.assert_close(x_k.grad, x_r.grad, rtol=1e-5, atol=1e-6)
    w_ref_grad = torch.nan_to_num(w_r.grad) if w_r.grad is not None else torch.zeros(T, K)
    torch.testing.assert_close(w_k.grad, w_ref_grad, rtol=1e-5, atol=1e-6)
    assert bool((w_k.grad[~active] == 0).all())


def test_all_active_is_the_same_as_no_active_mask():
    torch.manual_seed(1)
    x, w = torch.randn(6, 4), torch.rand(6, 2)
    for cf in (None, 0.5):
        d = LocalDispatcher(3, cf)
        a_RD, a = d.dispatch(x, IDS_TK, w)
        b_RD, b = d.dispatch(x, IDS_TK, w, torch.ones(6, 2, dtype=torch.bool))
        assert torch.equal(a_RD, b_RD) and torch.equal(a.row_index_R, b.row_index_R)
        assert torch.equal(d.combine(a_RD, a), d.combine(b_RD, b))
