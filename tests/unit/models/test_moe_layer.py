import copy
import math

import pytest
import torch
from torch import nn

from moetrain.config.schema import (
    DispatchMode,
    DropPolicy,
    ExpertBackend,
    ModelConfig,
    MoEConfig,
    RouterConfig,
    ScoreFunc,
)
from moetrain.models.moe.dispatcher import LocalDispatcher
from moetrain.models.moe.layer import AuxLossInjector, MoELayer
from moetrain.models.moe.losses import load_balancing_loss, z_loss
from moetrain.models.moe.router import RouterOutput

from ._ref import dense_moe_reference, swiglu

D, F = 8, 12


def _layer(E=4, K=2, shared=0, backend=ExpertBackend.loop, dispatch=DispatchMode.dropless,
           capacity_factor=1.25, aux=0.01, z=0.001, score=ScoreFunc.softmax, seed=0,
           drop_policy=DropPolicy.probs) -> MoELayer:
    torch.manual_seed(seed)
    mcfg = ModelConfig(dim=D, n_heads=2, num_experts=E, top_k=K, expert_hidden=F,
                       n_shared_experts=shared)
    moe_cfg = MoEConfig(router=RouterConfig(score_func=score), dispatch=dispatch,
                        capacity_factor=capacity_factor, expert_backend=backend,
                        aux_loss_coef=aux, z_loss_coef=z, drop_policy=drop_policy)
    layer = MoELayer(D, mcfg, moe_cfg)
    layer.init_weights(0.5, 0.5)
    return layer


class _FixedRouter(nn.Module):
    """Routes by hand-written ids and weights; scores/logits come from a real gate."""

    def __init__(self, ids_TK: torch.Tensor, weights_TK: torch.Tensor, E: int) -> None:
        super().__init__()
        self.ids_TK, self.weights_TK = ids_TK, weights_TK
        self.gate = nn.Linear(D, E, bias=False)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        logits = self.gate(x_TD).float()
        return RouterOutput(self.ids_TK, self.weights_TK, torch.softmax(logits, -1), logits)


@pytest.mark.parametrize("backend", [ExpertBackend.loop, ExpertBackend.grouped_mm])
@pytest.mark.parametrize("score", [ScoreFunc.softmax, ScoreFunc.sigmoid])
def test_dropless_layer_equals_dense_per_token_reference(backend, score):
    layer = _layer(backend=backend, score=score, shared=1)
    x = torch.randn(2, 5, D)
    out = layer(x)
    x_TD = x.reshape(-1, D)
    r = layer.router(x_TD)
    ex = layer.experts
    ref = dense_moe_reference(x_TD, r.ids_TK, r.weights_TK, ex.w1_EFD, ex.w3_EFD, ex.w2_EDF)
    sh = layer.shared_experts
    ref = ref + torch.stack([swiglu(x_TD[t], sh.w1.weight, sh.w3.weight, sh.w2.weight)
                             for t in range(10)])
    assert out.shape == x.shape
    assert torch.allclose(out.reshape(-1, D), ref, atol=1e-5)
    assert layer.last_stats.num_dropped.item() == 0
    assert layer.last_stats.num_routed.item() == 20
    assert torch.equal(layer.last_stats.load_E,
                       torch.bincount(r.ids_TK.reshape(-1), minlength=4).float())


def test_shared_experts_hidden_size():
    layer = _layer(shared=2)
    assert layer.shared_experts.w1.weight.shape == (2 * F, D)
    assert _layer(shared=0).shared_experts is None


# E=3, T=6, K=2, capacity = ceil(0.5 * 12 / 3) = 2; see test_dispatcher for the row map.
IDS_TK = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1], [2, 0], [1, 2]])
DROPPED = {(2, 1), (3, 0), (3, 1), (4, 1), (5, 0), (5, 1)}


def test_capacity_layer_drops_overflow_and_matches_reference_without_those_rows():
    layer = _layer(E=3, dispatch=DispatchMode.capacity, capacity_factor=0.5,
                   drop_policy=DropPolicy.position)
    w = torch.rand(6, 2)
    layer.router = _FixedRouter(IDS_TK, w, 3)
    x = torch.randn(6, D)
    out = layer(x)
    kept = torch.tensor([[(t, k) not in DROPPED for k in range(2)] for t in range(6)])
    ex = layer.experts
    ref = dense_moe_reference(x, IDS_TK, w, ex.w1_EFD, ex.w3_EFD, ex.w2_EDF, kept_TK=kept)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.count_nonzero(out[3]) == 0 and torch.count_nonzero(out[5]) == 0
    full = dense_moe_reference(x, IDS_TK, w, ex.w1_EFD, ex.w3_EFD, ex.w2_EDF)
    assert torch.allclose(out[1], full[1], atol=1e-5)  # token 1 lost nothing
    assert layer.last_stats.num_dropped.item() == 6
    assert layer.last_stats.load_E.tolist() == [5.0, 4.0, 3.0]  # routed, before dropping


@pytest.mark.parametrize("backend", [ExpertBackend.loop, ExpertBackend.grouped_mm])
def test_expert_with_zero_tokens_forward_and_backward(backend):
    layer = _layer(E=3, backend=backend, aux=0.0, z=0.0)
    ids = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]])  # expert 2 never chosen
    w = torch.rand(4, 2)
    layer.router = _FixedRouter(ids, w, 3)
    x = torch.randn(4, D)
    out = layer(x)
    ex = layer.experts
    params = [p.detach().clone().requires_grad_() for p in (ex.w1_EFD, ex.w3_EFD, ex.w2_EDF)]
    ref = dense_moe_reference(x, ids, w, *params)
    assert torch.allclose(out, ref, atol=1e-5)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    for p, q in zip((ex.w1_EFD, ex.w3_EFD, ex.w2_EDF), params):
        assert torch.count_nonzero(p.grad[2]) == 0
        assert torch.allclose(p.grad, q.grad, atol=1e-5)


def test_aux_loss_injector_unit():
    out = torch.randn(3, requires_grad=True)
    a = torch.randn(2, requires_grad=True)
    aux = (a ** 2).sum()
    y = AuxLossInjector.apply(out, aux, 0.25)
    assert torch.equal(y, out)
    y.sum().backward()
    assert torch.allclose(out.grad, torch.ones(3))
    assert torch.allclose(a.grad, 0.25 * 2 * a.detach())


def test_injected_aux_gradients_equal_explicit_loss():
    aux_coef, z_coef, scale = 0.3, 0.05, 0.5
    layer = _layer(aux=aux_coef, z=z_coef)
    layer.aux_loss_scale = scale
    explicit = copy.deepcopy(layer)
    explicit.aux_loss_coef = explicit.z_loss_coef = 0.0  # no injection: add aux by hand
    x = torch.randn(6, D)

    out = layer(x)
    assert out.grad_fn.name().startswith("AuxLossInjector")
    out.sum().backward()

    out2 = explicit(x)
    assert not out2.grad_fn.name().startswith("AuxLossInjector")
    r = explicit.router(x)
    aux = aux_coef * load_balancing_loss(r.scores_TE, r.ids_TK, 4) + z_coef * z_loss(r.logits_TE)
    (out2.sum() + scale * aux).backward()

    for (n, p), (_, q) in zip(layer.named_parameters(), explicit.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n
    # The aux terms really contribute to the gate's gradient.
    plain = copy.deepcopy(explicit)
    plain.zero_grad()
    plain(x).sum().backward()
    assert not torch.allclose(plain.router.gate.weight.grad, layer.router.gate.weight.grad)


def test_no_injection_without_grad():
    layer = _layer()
    with torch.no_grad():
        out = layer(torch.randn(4, D))
    assert out.grad_fn is None
    assert layer.last_stats.aux_loss.requires_grad is False


def test_stats_hold_raw_losses():
    layer = _layer(aux=0.7, z=0.2)
    x = torch.randn(6, D)
    layer(x)
    r = layer.router(x)
    s = layer.last_stats
    assert torch.allclose(s.aux_loss, load_balancing_loss(r.scores_TE, r.ids_TK, 4))
    assert torch.allclose(s.z_loss, z_loss(r.logits_TE))
    p = r.scores_TE
    assert torch.allclose(s.entropy, -(p * p.log()).sum(-1).mean())


def test_count_reducer_feeds_global_counts_to_balance_loss():
    layer = _layer(E=2, K=1)
    other_rank = torch.tensor([3, 1, 4])  # counts of a second rank, then its routed rows
    calls = []

    def reducer(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.clone())
        return t + other_rank

    layer.count_reducer = reducer
    x = torch.randn(4, D)
    layer(x)
    r = layer.router(x)
    local = torch.bincount(r.ids_TK.reshape(-1), minlength=2)
    assert len(calls) == 1 and calls[0].tolist() == local.tolist() + [4]
    f = [(local[e].item() + other_rank[e].item()) / 8 for e in range(2)]
    P = r.scores_TE.mean(0).tolist()
    expected = 2 * (f[0] * P[0] + f[1] * P[1])
    assert math.isclose(layer.last_stats.aux_loss.item(), expected, rel_tol=1e-5)


def test_set_dispatcher_replaces_the_data_movement():
    class CountingDispatcher(LocalDispatcher):
        calls = 0

        def dispatch(self, x_TD, ids_TK, weights_TK):
            CountingDispatcher.calls += 1
            return super().dispatch(x_TD, ids_TK, weights_TK)

    layer = _layer()
    x = torch.randn(5, D)
    ref = layer(x)
    layer.set_dispatcher(CountingDispatcher(4))
    assert torch.allclose(layer(x), ref)
    assert CountingDispatcher.calls == 1
