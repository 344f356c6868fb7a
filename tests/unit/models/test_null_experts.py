"""MoE++'s zero-computation experts (arXiv 2410.07348; SkyworkAI/MoE-plus-plus): the layer
against a dense per-token computation, the zero expert's renormalisation, the
tau-weighted balance loss by hand, the statistics (null_frac, routed rows) and the
config rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moetrain.config import ConfigError, validate
from moetrain.config.schema import ModelConfig, MoEConfig, RouterConfig
from moetrain.models.moe.layer import MoELayer
from tests.conftest import compose

D, E, K = 8, 4, 2


def _layer(zero=1, copy=1, constant=2, renormalize=True, tau=0.75, aux=0.0, seed=0):
    torch.manual_seed(seed)
    m = ModelConfig(dim=D, n_heads=2, num_experts=E, top_k=K, expert_hidden=12,
                    zero_experts=zero, copy_experts=copy, constant_experts=constant)
    moe = MoEConfig(router=RouterConfig(renormalize=renormalize), aux_loss_coef=aux,
                    z_loss_coef=0.0, expert_backend="loop", kernel_backend="torch",
                    null_expert_tau=tau)
    layer = MoELayer(D, m, moe)
    layer.init_weights(0.5, 0.3)
    layer.router.init_weights(1.5)  # routing that visits every kind of expert
    return layer


def _swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def _reference(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: softmax over the E + null experts, top-k; when renormalised, MoE++'s
    zero expert's weight set to 0 and the rest renormalised to 1; FFN experts SwiGLU, copy x,
    constant j a_1 x + a_2 v_j with a = softmax(W_j x), zero 0."""
    ex = layer.experts
    n_total = layer.num_experts
    first_copy, first_zero = E + layer.num_constant, E + layer.num_constant + layer.num_copy
    out, ids_all = [], []
    for t in range(x.shape[0]):
        p = torch.softmax(x[t] @ layer.router.gate.weight.T, dim=-1)
        w, ids = torch.topk(p, K)
        if layer.router.renormalize:  # the zero expert gets no share of the renormalised k
            w = torch.where(ids >= first_zero, torch.zeros_like(w), w)
            w = w / w.sum()
        y = torch.zeros(D)
        for wk, e in zip(w, ids.tolist()):
            if e < E:
                y = y + wk * _swiglu(x[t], ex.w1_EFD[e], ex.w3_EFD[e], ex.w2_EDF[e])
            elif e < first_copy:
                j = e - E
                a = torch.softmax(layer.constant_gate[j] @ x[t], dim=-1)
                y = y + wk * (a[0] * x[t] + a[1] * layer.constant_v[j])
            elif e < first_zero:
                y = y + wk * x[t]
        assert e < n_total
        out.append(y)
        ids_all.append(ids)
    return torch.stack(out), torch.stack(ids_all)


@pytest.mark.parametrize("renormalize", [True, False])
def test_layer_matches_the_per_token_reference(renormalize):
    layer = _layer(renormalize=renormalize)
    x = torch.randn(64, D)
    with torch.no_grad():
        got = layer(x)
        want, ids = _reference(layer, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # every kind of expert was picked, so the test covers each formula
    picked = set(ids.flatten().tolist())
    assert {E, E + 1, E + 2, E + 3} <= picked and picked & set(range(E)), picked
    s = layer.last_stats
    null = (ids >= E).sum()
    assert s.num_null == null and s.num_routed == ids.numel() - null
    assert s.load_E.shape == (E + 4,)
    assert torch.equal(s.load_E, torch.bincount(ids.flatten(), minlength=E + 4).float())


def test_a_token_on_the_zero_expert_gives_its_other_expert_the_full_weight():
    """With the router forced to pick (expert 1, zero expert), the output is FFN_1(x)
    exactly (MoE++ zeroes the zero expert's gate and renormalises)."""
    layer = _layer(zero=1, copy=0, constant=0)
    with torch.no_grad():
        gate = torch.full((E + 1, D), 0.0)
        gate[1, 0], gate[E, 0] = 5.0, 4.0  # x[:, 0] = 1: experts 1 and zero on top
        layer.router.gate.weight.copy_(gate)
    x = torch.zeros(3, D)
    x[:, 0] = 1.0
    x[:, 1:] = torch.randn(3, D - 1) * 0.1
    with torch.no_grad():
        got = layer(x)
    ex = layer.experts
    want = _swiglu(x, ex.w1_EFD[1], ex.w3_EFD[1], ex.w2_EDF[1])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_tau_weighted_balance_loss_by_hand():
    """MoE++ eq. 7 in the Switch normalisation: N * sum_e eta_e f_e P_e, eta = 1 for the FFN
    experts and tau for the zero-computation ones, f over the T*K routed slots."""
    for tau in (0.25, 1.0):
        layer = _layer(tau=tau, aux=0.01)
        x = torch.randn(32, D)
        layer(x)
        p = torch.softmax(x @ layer.router.gate.weight.T, dim=-1)
        ids = torch.topk(p, K).indices
        n = E + 4
        f = torch.bincount(ids.flatten(), minlength=n).float() / ids.numel()
        eta = torch.tensor([1.0] * E + [tau] * 4)
        want = n * (eta * f * p.mean(0)).sum()
        assert layer.last_stats.aux_loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_gradients_reach_the_constant_experts_and_the_router():
    layer = _layer()
    x = torch.randn(64, D, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert layer.constant_v.grad.abs().sum() > 0 and layer.constant_gate.grad.abs().sum() > 0
    # the router's rows of the zero-computation experts learn from the LM loss too
    assert layer.router.gate.weight.grad[E:].abs().sum() > 0


@pytest.mark.parametrize("overrides,words", [
    (["model.zero_experts=1", "moe/router=expert_choice"],
     ["model.zero_experts=1", "moe.router.name=expert_choice", "moe/router=topk"]),
    (["model.copy_experts=1", "moe.chain_iterations=2"],
     ["model.copy_experts=1", "moe.chain_iterations"]),
    (["model.zero_experts=1", "moe.null_expert_tau=2"], ["moe.null_expert_tau=2", "[0, 1]"]),
    (["model.zero_experts=-1"], ["model.zero_experts=-1", ">= 0"]),
])
def test_bad_null_expert_configs_name_the_field(overrides, words):
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides), 1)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_hugging_face_export_refuses_null_experts():
    from moetrain.checkpoint.hf import HFConversionError, choose_target
    from moetrain.models.transformer import Transformer

    cfg = compose(["model.zero_experts=1", "model.copy_experts=1"])
    validate(cfg, 1)
    model = Transformer(cfg.model, cfg.moe, 64)
    with pytest.raises(HFConversionError, match="model.zero_experts=1"):
        choose_target(model, cfg, "mixtral")
    with pytest.raises(HFConversionError, match="zero-computation"):
        choose_target(model, cfg, "auto")
