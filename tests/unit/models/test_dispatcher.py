import pytest
import torch

from moetrain.config.schema import ConfigError
from moetrain.models.moe.dispatcher import Dispatcher, LocalDispatcher, expert_capacity

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
    assert x_RD.shape == (6, 4)  # no padding rows
    assert x_RD[:, 0].tolist() == [0, 1, 0, 2, 1, 4]
    out = d.combine(x_RD + 1.0, meta)
    # Identity "experts" (+1): kept slots contribute x_t + 1, dropped ones zero.
    expected = [2 * 1.0, 2 * 2.0, 3.0, 0.0, 5.0, 0.0]  # tokens 3 and 5 fully dropped
    assert out[:, 0].tolist() == expected


def test_capacity_large_enough_drops_nothing():
    d = LocalDispatcher(3, capacity_factor=5.0)
    _, meta = d.dispatch(torch.randn(6, 4), IDS_TK, torch.rand(6, 2))
    assert int(meta.num_dropped) == 0
    assert meta.tokens_per_expert.tolist() == [5, 4, 3]


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
        LocalDispatcher(3, capacity_factor=0.0)
