"""EvoMoE's DTS gate held to the released code (codecaution/EvoMoE,
``fairseq/modules/moe/topkgate.py`` and ``fairseq_cli/train.py``): Gumbel gates
(``schedule.gumbel_gates``), the hard phase's k (``schedule.hard_k``), the WMT recipe
(``schedule=evomoe_wmt``) and the gate loss against the Switch loss.

Hand-worked example used below (E = 3, one token, tau = 1/2): logits l = (ln 2, 0, ln 4),
so p = softmax(l) = (2, 1, 4) / 7; Gumbel noise G = -ln(-ln u) with u = (e^-1/2, e^-1,
e^-2) is G = (ln 2, 0, -ln 2), so l + G = (ln 4, 0, ln 2) and the Gumbel softmax
g = softmax((l + G) / tau) = (16, 1, 4) / 21.

Legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import math

import pytest
import torch

from moetrain.config.schema import Anneal, RouterConfig, RouterType
from moetrain.models.moe import routing
from moetrain.models.moe.losses import load_balancing_loss
from moetrain.models.moe.router import DTSPhase, DTSRouter, build_router
from moetrain.models.moe.schedule import EvoMoESchedule, anneal, build_schedule
from tests.conftest import compose

LN2 = math.log(2.0)
L_HAND = torch.tensor([[LN2, 0.0, 2 * LN2]])
U_HAND = torch.tensor([[math.exp(-0.5), math.exp(-1.0), math.exp(-2.0)]])


def _official_topkgating(logits_TE, G_TE, tau, soft, use_gumbel_gates):
    """topkgating() of the released code, training branch, with its Gumbel draw given:
    F.gumbel_softmax(logits, tau) is softmax((logits + G) / tau), G ~ Gumbel(0, 1)."""
    E = logits_TE.shape[1]
    gumbel_gates = torch.softmax((logits_TE + G_TE) / tau, dim=1)
    if soft:
        chosen = torch.gt(gumbel_gates, 0.001)
    else:
        chosen = torch.nn.functional.one_hot(gumbel_gates.argmax(dim=1), E).bool()
    if use_gumbel_gates:
        gates = chosen * gumbel_gates
    else:
        gates = chosen * torch.softmax(logits_TE, dim=1)
    return gates, chosen, _gate_loss(gates, chosen)


def _gate_loss(gates_TE, chosen_TE):
    """The reference's l_aux: E^2 mean_e(me_e ce_e), me = mean_t gates, ce = mean_t chosen."""
    E = gates_TE.shape[1]
    me = torch.mean(gates_TE, dim=0)
    ce = torch.mean(chosen_TE.to(gates_TE.dtype), dim=0)
    return torch.mean(me * ce) * E * E


class _Layer:  # what a schedule's apply() touches
    def __init__(self, router) -> None:
        self.router = router


def _router(E=3, K=1, gumbel_gates=False, phase=DTSPhase.soft, tau=0.5, dim=None):
    """A DTS router whose gate is the identity (dim = E): x is the logits."""
    r = build_router(dim or E, E, K, RouterConfig(name=RouterType.dts, renormalize=False))
    assert isinstance(r, DTSRouter)
    with torch.no_grad():
        if dim is None:
            r.gate.weight.copy_(torch.eye(E))
        else:
            r.gate.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(4))
    r.phase, r.temperature, r.gumbel_gates = phase, tau, gumbel_gates
    return r


def _hand_router(**kw):
    r = _router(**kw)
    r.gumbel = lambda T, device: -torch.log(-torch.log(U_HAND))  # G = (ln 2, 0, -ln 2)
    return r


def _dense_gates(out) -> torch.Tensor:
    """(T, E) combine weights of a RouterOutput, 0 where a token does not use an expert."""
    w_TK = out.weights_TK if out.active_TK is None else out.weights_TK * out.active_TK
    T = w_TK.shape[0]
    return torch.zeros(T, out.scores_TE.shape[1]).scatter_add(1, out.ids_TK, w_TK)


# ----------------------------------------------------------------------------- hand-worked
def test_gumbel_gates_hand_worked_soft_phase():
    x = L_HAND.clone()
    gumbel = _hand_router(gumbel_gates=True)(x)
    assert gumbel.active_TK.all()  # min g = 1/21 > 0.001: every expert
    torch.testing.assert_close(_dense_gates(gumbel), torch.tensor([[16.0, 1.0, 4.0]]) / 21,
                               rtol=1e-6, atol=0)
    plain = _hand_router(gumbel_gates=False)(x)  # the reference's default: p at the picks
    torch.testing.assert_close(_dense_gates(plain), torch.tensor([[2.0, 1.0, 4.0]]) / 7,
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(gumbel.scores_TE, plain.scores_TE)  # losses see p either way
    # tau = 0.1: g ~ (4^10, 1, 2^10) / (4^10 + 1 + 2^10); 1024/1049601 = 9.76e-4 < 0.001,
    # so only expert 0 passes the threshold, with g_0 = 1048576/1049601
    r = _hand_router(gumbel_gates=True, tau=0.1)
    out = r(x)
    assert out.active_TK.tolist() == [[True, False, False]]
    torch.testing.assert_close(_dense_gates(out), torch.tensor([[1048576 / 1049601, 0, 0]]),
                               rtol=1e-6, atol=0)


def test_gumbel_gates_hand_worked_gradient():
    """With Gumbel gates the LM gradient reaches the gate through g:
    dg_0/dl = (1/tau) g_0 (e_0 - g) = 2 (16/21) (5, -1, -4)/21 = (160, -32, -128)/441."""
    x = L_HAND.clone().requires_grad_(True)
    out = _hand_router(gumbel_gates=True)(x)
    _dense_gates(out)[0, 0].backward()
    torch.testing.assert_close(x.grad, torch.tensor([[160.0, -32.0, -128.0]]) / 441,
                               rtol=1e-5, atol=1e-7)
    x.grad = None  # p instead: dp_0/dl = p_0 (e_0 - p) = (2/7)(5, -1, -4)/7
    _dense_gates(_hand_router(gumbel_gates=False)(x))[0, 0].backward()
    torch.testing.assert_close(x.grad, torch.tensor([[10.0, -2.0, -8.0]]) / 49,
                               rtol=1e-5, atol=1e-7)


def test_hard_top1_hand_worked():
    """argmax(l + G) = expert 0 although argmax(p) = expert 2: the noise picks. The weight
    is g_0 = 16/21 with Gumbel gates, p_0 = 2/7 without. Evaluation: the clean argmax
    (expert 2), weighted softmax(l / tau)_2 = 16/21 with Gumbel gates, p_2 = 4/7 without."""
    x = L_HAND.clone()
    for gates, w_train, w_eval in ((True, 16 / 21, 16 / 21), (False, 2 / 7, 4 / 7)):
        r = _hand_router(gumbel_gates=gates, phase=DTSPhase.hard)
        out = r(x)
        assert out.ids_TK.tolist() == [[0]] and out.active_TK is None
        assert out.weights_TK.item() == pytest.approx(w_train, rel=1e-6)
        r.eval()
        out = r(x)
        assert out.ids_TK.tolist() == [[2]]
        assert out.weights_TK.item() == pytest.approx(w_eval, rel=1e-6)


# ----------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("use_gumbel_gates", [False, True])
@pytest.mark.parametrize("phase", [DTSPhase.soft, DTSPhase.hard])
def test_router_matches_the_reference_topkgating(phase, use_gumbel_gates):
    """The router's combine weights are the reference's ``gates`` for the same noise; with
    k = 1 (EvoMoE's hard phase) the gate loss E^2 mean(me * ce) of both agrees."""
    T, E, tau = 64, 8, 0.3
    r = _router(E=E, K=1, gumbel_gates=use_gumbel_gates, phase=phase, tau=tau, dim=16)
    r.context.set_step(seed=5, step=12)
    r.layer_idx = 2
    x = torch.randn(T, 16, generator=torch.Generator().manual_seed(0))
    out = r(x)
    logits = x @ r.gate.weight.T
    G = r.gumbel(T, x.device)
    gates, chosen, l_aux = _official_topkgating(logits, G, tau, phase == DTSPhase.soft,
                                                use_gumbel_gates)
    got = _dense_gates(out)
    torch.testing.assert_close(got, gates, rtol=1e-6, atol=1e-7)
    got_chosen = torch.zeros(T, E, dtype=torch.bool).scatter(
        1, out.ids_TK, True if out.active_TK is None else out.active_TK)
    assert torch.equal(got_chosen, chosen)
    if phase == DTSPhase.soft:
        assert 1 < chosen.sum(dim=1).float().mean() < E  # a variable number per token
    torch.testing.assert_close(_gate_loss(got, got_chosen), l_aux, rtol=1e-6, atol=0)


def test_gumbel_noise_is_keyed_by_token_not_by_position():
    """G is keyed by (seed, step, layer, token key, expert) with routing.keyed_uniform: a
    batch routed whole or split in two (as two ranks would, each with its tokens' global
    keys) gets the same Gumbel gates."""
    E, tau = 4, 0.7
    r = _router(E=E, K=2, gumbel_gates=True, phase=DTSPhase.hard, tau=tau, dim=6)
    r.context.set_step(seed=3, step=9)
    r.layer_idx = 1
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    keys = torch.tensor([40, 41, 42, 43, 1000, 1001])
    r.context.token_keys = keys
    whole = r(x)
    u = routing.keyed_uniform(keys[:, None] * E + torch.arange(E), 3, 9, 1, 0x6B1)
    g = torch.softmax((x @ r.gate.weight.T - torch.log(-torch.log(u))) / tau, dim=-1)
    assert torch.equal(whole.ids_TK, g.topk(2, dim=-1).indices)
    torch.testing.assert_close(whole.weights_TK, g.gather(1, whole.ids_TK), rtol=1e-6, atol=0)
    parts = []
    for sl in (slice(0, 4), slice(4, 6)):
        r.context.token_keys = keys[sl]
        parts.append(r(x[sl]))
    assert torch.equal(torch.cat([p.ids_TK for p in parts]), whole.ids_TK)
    assert torch.equal(torch.cat([p.weights_TK for p in parts]), whole.weights_TK)
    r.context.set_step(seed=3, step=10)  # a new step: new noise
    r.context.token_keys = keys
    assert not torch.equal(r(x).weights_TK, whole.weights_TK)


# ----------------------------------------------------------------------------- hard_k
def test_hard_k_sets_the_hard_phase_and_evaluation_k(tiny_overrides):
    base = tiny_overrides + ["moe/router=dts", "schedule=evomoe"]
    # evomoe.yaml: the reference's top-1; null: model.top_k (2 in TINY)
    assert build_schedule(compose(base)).top_k == 1
    assert build_schedule(compose(base + ["schedule.hard_k=null"])).top_k == 2
    evo = build_schedule(compose(base + ["schedule.hard_k=3", "schedule.diversify_steps=2",
                                         "schedule.steps=3"]))
    assert [evo.values(t).get("top_k") for t in range(7)] == [1, 1, None, None, None, 3, 3]
    r = _router(E=4, K=2, phase=DTSPhase.hard, dim=6)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    layer = _Layer(r)
    for k in (1, 3):
        EvoMoESchedule(0, 0, Anneal.linear, 2.0, 0.5, 4, k, 1e-3).apply([layer], 5)
        assert r.phase == DTSPhase.hard and r.top_k == k
        ids = r(x).ids_TK
        assert ids.shape == (5, k)
        G = r.gumbel(5, x.device)
        assert torch.equal(ids, (x @ r.gate.weight.T + G).topk(k, dim=-1).indices)
        r.eval()
        assert torch.equal(r(x).ids_TK, (x @ r.gate.weight.T).topk(k, dim=-1).indices)
        r.train()


def test_hard_k_must_fit_the_experts(tiny_overrides):
    from moetrain.config.schema import ConfigError
    from moetrain.config.validate import validate

    with pytest.raises(ConfigError, match=r"schedule.hard_k=5 exceeds model.num_experts=4"):
        validate(compose(tiny_overrides + ["moe/router=dts", "schedule=evomoe",
                                           "schedule.hard_k=5"]), 1)
    with pytest.raises(Exception, match="schedule.hard_k"):
        compose(["moe/router=dts", "schedule=evomoe", "schedule.hard_k=0"])


# ----------------------------------------------------------------------------- recipes
def test_wmt_recipe_values():
    """schedule=evomoe_wmt is kdd_scripts/wmt14_en_fr_gumbel.sh: linear tau 2.0 -> 0.5 over
    5000 updates (fairseq_cli/train.py: max(2.0 - t * 1.5 / 5000, 0.5)), hard top-1 from
    update 6000, no diversify stage, softmax gate weights."""
    cfg = compose(["moe/router=dts", "schedule=evomoe_wmt", "train.steps=7000"])
    evo = build_schedule(cfg)
    assert (evo.diversify_steps, evo.steps, evo.hard_step, evo.top_k) == (0, 5000, 6000, 1)
    assert (evo.gumbel_threshold, evo.gumbel_gates) == (0.001, False)
    taus = {t: evo.values(t)["temperature"] for t in (0, 1, 2500, 4999, 5000, 6500)}
    assert taus == pytest.approx({t: max(2.0 - t * 1.5 / 5000, 0.5) for t in taus}, rel=1e-12)
    assert taus[2500] == 1.25
    assert [evo.phase(t) for t in (0, 5999, 6000)] == [DTSPhase.soft, DTSPhase.soft,
                                                       DTSPhase.hard]
    assert anneal(Anneal.linear, 2.0, 0.5, 6000, 5000) == 0.5


# ----------------------------------------------------------------------------- the losses
def test_gate_loss_is_e_times_the_switch_loss_when_every_expert_is_chosen():
    """docs/schedules.md's worked check. T = 2, E = 4, p = (.4, .3, .2, .1), (.1, .2, .3, .4).
    Every expert chosen: ce = 1, me = P = 1/4 each: the gate loss E^2 mean(me ce) = 16 / 4
    = 4 = E; the Switch loss E sum f P with f = 2/8 = 1/4 each is 4 * 4 / 16 = 1.
    Two experts each ([1, 1, 0, 0], [0, 0, 1, 1]): ce = 1/2, me = (.2, .15, .15, .2): the
    gate loss is 16 * (0.5 * 0.7 / 4) = 1.4, the Switch loss (f = P = 1/4) still 1."""
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    ids = torch.arange(4).expand(2, 4)
    # the soft gate at tau -> infinity (G = 0, tau = 1 here: g = p > 0.001) chooses all
    _, everything, _ = _official_topkgating(p.log(), torch.zeros(2, 4), 1.0, True, False)
    assert everything.all()
    for chosen, gate_loss in ((everything, 4.0),
                              (torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool),
                               1.4)):
        assert _gate_loss(chosen * p, chosen).item() == pytest.approx(gate_loss, rel=1e-6)
        counts = chosen.sum(dim=0)
        switch = load_balancing_loss(p, ids, 4, counts_E=counts, num_routed=counts.sum())
        assert switch.item() == pytest.approx(1.0, rel=1e-6)


# ----------------------------------------------------------------------------- export
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # Qwen2-MoE, no shared
def test_gumbel_gates_evaluation_exports_with_the_temperature(tmp_path):
    """With Gumbel gates, evaluation weights the clean top-1 by softmax(logits / tau); the
    Hugging Face export folds tau into the gate and gives the same logits (the plain DTS
    gate exports with tau = 1, which differs here)."""
    from moetrain.checkpoint.hf import export_model
    from moetrain.models import Transformer
    from tests.conftest import TINY, oracle

    T = oracle("transformers")
    cfg = compose(TINY + ["run.dir=/unused", "moe/router=dts", "schedule=evomoe",
                          "model.top_k=1", "schedule.gumbel_gates=true"])
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.moe, 257).eval()
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router.gate.weight.mul_(20.0)  # sharp, varied choices
    evo = build_schedule(cfg)
    evo.apply(model.moe_layers(), evo.hard_step)  # hard phase, tau = 0.5
    assert all(r.router.gumbel_gates and r.router.temperature == 0.5
               for r in model.moe_layers())
    tokens = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(tokens)
    export_model(model, cfg, tmp_path / "hf", progress=False)
    hf = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (hf(tokens).logits - ours).abs().max() < 1e-4
        for layer in model.moe_layers():
            layer.router.gumbel_gates = False
        assert (model(tokens) - ours).abs().max() > 1e-3  # tau really matters here
