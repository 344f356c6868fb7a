import pytest
import torch

from moetrain.config.schema import ConfigError, RouterConfig, RouterType, ScoreFunc
from moetrain.models.moe.losses import z_loss
from moetrain.models.moe.router import SwitchRouter, TopKRouter, build_router


def _router(cfg: RouterConfig, top_k: int = 2, E: int = 4, D: int = 3) -> torch.nn.Module:
    r = build_router(D, E, top_k, cfg)
    with torch.no_grad():
        r.gate.weight.copy_(torch.arange(E * D, dtype=torch.float32).view(E, D).sin())
    return r


X = torch.tensor([[1.0, -0.5, 0.25], [0.3, 0.8, -1.2], [-0.7, 0.1, 0.9]])


def test_softmax_topk_renormalised():
    r = _router(RouterConfig(score_func=ScoreFunc.softmax, renormalize=True))
    out = r(X)
    logits = X @ r.gate.weight.T
    probs = torch.softmax(logits, -1)
    top = probs.topk(2, -1)
    assert torch.equal(out.ids_TK, top.indices)
    assert torch.allclose(out.weights_TK, top.values / top.values.sum(-1, keepdim=True))
    assert torch.allclose(out.scores_TE, probs)
    assert torch.allclose(out.logits_TE, logits)
    assert out.weights_TK.dtype == out.scores_TE.dtype == torch.float32


def test_softmax_topk_not_renormalised_keeps_raw_probs():
    r = _router(RouterConfig(score_func=ScoreFunc.softmax, renormalize=False))
    out = r(X)
    probs = torch.softmax(X @ r.gate.weight.T, -1)
    assert torch.allclose(out.weights_TK, probs.gather(1, out.ids_TK))


def test_sigmoid_scores_normalised_for_losses_weights_from_sigmoid():
    cfg = RouterConfig(score_func=ScoreFunc.sigmoid, renormalize=False)
    out = _router(cfg)(X)
    r = _router(cfg)
    sig = torch.sigmoid(X @ r.gate.weight.T)
    top = sig.topk(2, -1)
    assert torch.equal(out.ids_TK, top.indices)
    assert torch.allclose(out.weights_TK, top.values)
    assert torch.allclose(out.scores_TE, sig / sig.sum(-1, keepdim=True))
    out_rn = _router(RouterConfig(score_func=ScoreFunc.sigmoid, renormalize=True))(X)
    assert torch.allclose(out_rn.weights_TK, top.values / top.values.sum(-1, keepdim=True))


def test_temperature_divides_logits():
    r = _router(RouterConfig(score_func=ScoreFunc.softmax, temperature=2.0))
    out = r(X)
    logits = X @ r.gate.weight.T
    assert torch.allclose(out.scores_TE, torch.softmax(logits / 2.0, -1))
    # The z-loss is taken on the logits that enter the softmax (after the temperature).
    assert torch.allclose(out.logits_TE, logits / 2.0)
    assert torch.allclose(z_loss(out.logits_TE),
                          torch.logsumexp(logits / 2.0, -1).square().mean())


def test_expert_bias_changes_selection_not_weights():
    cfg = RouterConfig(score_func=ScoreFunc.sigmoid, renormalize=False)
    r = _router(cfg)
    base = r(X)
    with torch.no_grad():
        r.expert_bias[3] = 10.0  # forces expert 3 into every token's top-2
    out = r(X)
    sig = torch.sigmoid(X @ r.gate.weight.T)
    assert (out.ids_TK == 3).any(-1).all()
    assert torch.allclose(out.weights_TK, sig.gather(1, out.ids_TK))  # unbiased scores
    assert torch.allclose(out.scores_TE, base.scores_TE)
    assert "expert_bias" in r.state_dict()


def test_switch_router_top1_weight_is_raw_prob_even_if_renormalize_requested():
    r = _router(RouterConfig(name=RouterType.switch, renormalize=True), top_k=1)
    assert isinstance(r, SwitchRouter)
    out = r(X)
    probs = torch.softmax(X @ r.gate.weight.T, -1)
    assert torch.equal(out.ids_TK[:, 0], probs.argmax(-1))
    assert torch.allclose(out.weights_TK[:, 0], probs.max(-1).values)


def test_switch_router_rejects_top_k_above_one():
    with pytest.raises(ConfigError, match=r"model\.top_k=2.*model\.top_k=1"):
        build_router(3, 4, 2, RouterConfig(name=RouterType.switch))


def test_gate_runs_in_float32_under_autocast():
    r = _router(RouterConfig())
    assert isinstance(r, TopKRouter)
    x = torch.randn(5, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(x)
    assert out.logits_TE.dtype == torch.float32
    assert torch.allclose(out.logits_TE, x @ r.gate.weight.T, atol=1e-6)


def test_router_gradient_reaches_gate_through_weights():
    r = _router(RouterConfig(score_func=ScoreFunc.softmax, renormalize=True))
    out = r(X)
    out.weights_TK[:, 0].sum().backward()
    # Reference: the same weights written out from a separate copy of the gate.
    w = r.gate.weight.detach().clone().requires_grad_()
    top = torch.softmax(X @ w.T, -1).gather(1, out.ids_TK)
    (top[:, 0] / top.sum(-1)).sum().backward()
    assert w.grad.abs().sum() > 0
    torch.testing.assert_close(r.gate.weight.grad, w.grad)
