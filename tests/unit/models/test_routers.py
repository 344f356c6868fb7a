"""Known answers for every router, the routing math and the balance losses.

Each test pins a number to a formula, a hand computation or the reference page
(/work/shared/reference/routing-and-balancing.md, cited as "ref §n").

Legend: T tokens, D model dim, E experts, K top-k, G expert groups, L layers.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from moetrain.config.schema import (
    AuxLossScope,
    BiasUpdate,
    ConfigError,
    ExpertBackend,
    GroupScore,
    ModelConfig,
    MoEConfig,
    RouterConfig,
    RouterType,
    ScoreFunc,
)
from moetrain.models.moe import losses, routing
from moetrain.models.moe.layer import MoELayer
from moetrain.models.moe.router import (
    DeepSeekV3Router,
    ExpertChoiceRouter,
    NoisyTopKRouter,
    SelectiveSinkhornRouter,
    ThresholdRouter,
    TopKRouter,
    build_router,
)

from ._ref import dense_gates, dense_moe_reference, identity_gate_router


def _router(cfg: RouterConfig, E: int = 8, K: int = 2, D: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    r = build_router(D, E, K, cfg)
    r.init_weights(0.5)
    return r






def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


# ----------------------------------------------------------------------------- group-limited
# ref §2: E=8, G=4 groups of 2, topk_groups=2, k=2.
S_GROUPS = torch.tensor([[0.9, 0.0, 0.52, 0.5, 0.6, 0.45, 0.1, 0.1]])


def test_group_limited_known_answer_top2_sum_and_topk_sum():
    # top2_sum: group scores [0.9, 1.02, 1.05, 0.2] -> groups {2, 1} -> experts {4, 2}; the
    # global maximum (expert 0) is excluded.
    ids = routing.topk_select(S_GROUPS, 2, None, 4, 2, GroupScore.top2_sum)
    assert ids[0].tolist() == [4, 2]
    # Megatron's rule, top (k / topk_groups) = top-1 = max: [0.9, 0.52, 0.6, 0.1] -> {0, 4}.
    ids = routing.topk_select(S_GROUPS, 2, None, 4, 2, GroupScore.topk_sum)
    assert ids[0].tolist() == [0, 4]
    mask = routing.group_limited_mask(S_GROUPS, 4, 2, GroupScore.top2_sum, 2)
    assert mask[0].tolist() == [False, False, True, True, True, True, False, False]


@pytest.mark.parametrize("rule,expected", [(GroupScore.top2_sum, {4, 2}),
                                           (GroupScore.topk_sum, {0, 4})])
def test_group_limited_known_answer_through_the_router(rule, expected):
    # Sigmoid router with logits = logit(s): its scores are the example's s.
    cfg = RouterConfig(score_func=ScoreFunc.sigmoid, n_groups=4, topk_groups=2, group_score=rule)
    r = identity_gate_router(cfg, 8, 2)
    out = r(torch.logit(S_GROUPS.clamp_min(1e-4)))
    assert set(out.ids_TK[0].tolist()) == expected
    s = torch.sigmoid(torch.logit(S_GROUPS.clamp_min(1e-4)))
    w = s[0, sorted(expected)]
    torch.testing.assert_close(dense_gates(out.ids_TK, out.weights_TK, 8)[0, sorted(expected)],
                               w / w.sum())


@pytest.mark.parametrize("rule", list(GroupScore))
def test_group_limited_selection_lies_in_topk_groups_and_all_groups_is_plain_topk(rule):
    g = torch.Generator().manual_seed(1)
    T, E, G, K = 64, 16, 4, 4
    s = torch.rand(T, E, generator=g)
    bias = 0.1 * torch.randn(E, generator=g)
    for topk_groups in (1, 2, 3):
        ids = routing.topk_select(s, K, bias, G, topk_groups, rule)
        groups_used = [len(set((row // (E // G)).tolist())) for row in ids]
        assert max(groups_used) <= topk_groups
        if topk_groups == 1:
            assert min(groups_used) == 1
    # topk_groups = G masks nothing: exactly the plain (biased) top-k, order included.
    assert torch.equal(routing.topk_select(s, K, bias, G, G, rule),
                       routing.topk_select(s, K, bias))
    assert torch.equal(routing.topk_select(s, K, bias, G, G, rule),
                       torch.topk(s + bias, K, dim=-1).indices)


def test_group_limited_topk_sum_with_top_k_below_topk_groups_scores_groups_by_max():
    """Regression: top_k // topk_groups = 0 (top_k lowered to 1 at run time, topk_groups=2)
    summed the top-0 scores, so every group scored 0 and a fixed pair of groups was taken
    whatever the scores (half of random tokens missed their best expert). The group score
    is now the max: with topk_groups groups allowed and k=1, the pick is the argmax."""
    g = torch.Generator().manual_seed(0)
    s = torch.rand(256, 16, generator=g)
    ids = routing.topk_select(s, 1, None, 4, 2, GroupScore.topk_sum)
    assert torch.equal(ids[:, 0], s.argmax(-1))
    cfg = RouterConfig(score_func=ScoreFunc.sigmoid, n_groups=4, topk_groups=2,
                       group_score=GroupScore.topk_sum)
    r = identity_gate_router(cfg, 16, 2)
    r.top_k = 1  # a schedule lowers top_k between steps
    out = r(torch.logit(s))
    assert torch.equal(out.ids_TK[:, 0], s.argmax(-1))


# ----------------------------------------------------------------------------- DeepSeek-V3
def _dsv3(**kw) -> DeepSeekV3Router:
    cfg = RouterConfig(name=RouterType.deepseek_v3, score_func=ScoreFunc.sigmoid,
                       renormalize=True, route_scale=2.5, **kw)
    r = _router(cfg, E=8, K=2, D=6)
    assert isinstance(r, DeepSeekV3Router)
    return r


def test_deepseek_v3_weights_are_unbiased_sigmoid_renormalised_times_route_scale():
    r = _dsv3()
    x = torch.randn(20, 6)
    out = r(x)
    s = torch.sigmoid(x @ r.gate.weight.T)
    top = s.topk(2, dim=-1)
    assert torch.equal(out.ids_TK, top.indices)
    torch.testing.assert_close(out.weights_TK, 2.5 * top.values / top.values.sum(-1, keepdim=True))
    torch.testing.assert_close(out.weights_TK.sum(-1), torch.full((20,), 2.5))
    torch.testing.assert_close(out.scores_TE, s / s.sum(-1, keepdim=True))  # s' for the losses
    with pytest.raises(ConfigError, match="score_func=sigmoid"):
        build_router(6, 8, 2, RouterConfig(name=RouterType.deepseek_v3))


def test_deepseek_v3_bias_changes_selection_not_gates():
    r = _dsv3()
    x = torch.randn(64, 6)
    base = r(x)
    dense0 = dense_gates(base.ids_TK, base.weights_TK, 8)
    # A uniform bias changes no ranking: ids and gates bit-identical.
    with torch.no_grad():
        r.expert_bias.fill_(0.37)
    same = r(x)
    assert torch.equal(same.ids_TK, base.ids_TK)
    assert torch.equal(same.weights_TK, base.weights_TK)
    # A non-uniform bias moves some tokens; where a token's set is unchanged its gates are
    # bit-identical (K=2: the renormalising sum is order independent).
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor([0.0, 0.3, 0.0, -0.2, 0.0, 0.1, 0.0, 0.0]))
    out = r(x)
    dense1 = dense_gates(out.ids_TK, out.weights_TK, 8)
    same_set = ((dense0 > 0) == (dense1 > 0)).all(-1)
    assert 0 < int(same_set.sum()) < 64
    assert torch.equal(dense1[same_set], dense0[same_set])
    # Moved tokens: the gates are still the *unbiased* scores of the new picks.
    s = torch.sigmoid(x @ r.gate.weight.T)
    w = s.gather(1, out.ids_TK)
    torch.testing.assert_close(out.weights_TK, 2.5 * w / w.sum(-1, keepdim=True))
    assert torch.equal(out.ids_TK, torch.topk(s + r.expert_bias, 2, dim=-1).indices)


# ----------------------------------------------------------------------------- bias update
@pytest.mark.parametrize("rule,counts,expected", [
    (BiasUpdate.sign, [10, 2, 6, 6], [-1.0, 1.0, 0.0, 0.0]),
    (BiasUpdate.sign_centered, [10, 2, 6, 6], [-1.0, 1.0, 0.0, 0.0]),
    (BiasUpdate.sign, [9, 1, 1, 1], [-1.0, 1.0, 1.0, 1.0]),
    (BiasUpdate.sign_centered, [9, 1, 1, 1], [-1.5, 0.5, 0.5, 0.5]),
])
def test_bias_delta_known_answers(rule, counts, expected):
    # ref §1.5: Megatron (sign, LFB Alg. 1) vs torchtitan (sign_centered, mean(delta)=0).
    c = torch.tensor([counts])
    d = routing.bias_delta(c, 1e-3, rule)
    assert d.dtype == torch.float32 and d.shape == (1, 4)
    torch.testing.assert_close(d[0], torch.tensor(expected) * 1e-3, rtol=1e-6, atol=0)
    assert torch.equal(routing.bias_delta(2 * c, 1e-3, rule), d)  # AC double count
    assert torch.equal(routing.bias_delta(c.float() * 7.5, 1e-3, rule), d)


def test_bias_delta_is_per_layer():
    d = routing.bias_delta(torch.tensor([[10, 2, 6, 6], [9, 1, 1, 1]]), 2e-3)
    torch.testing.assert_close(d, torch.tensor([[-1.0, 1, 0, 0], [-1, 1, 1, 1]]) * 2e-3)


# ----------------------------------------------------------------------------- Sinkhorn
def _sinkhorn_linear(cost: torch.Tensor, iters: int) -> torch.Tensor:
    """Megatron-core's S-BASE loop (ref §5.2) in float64, for a fixed number of iterations."""
    k = cost.double().exp()
    T, E = k.shape
    d1 = torch.ones(E, dtype=torch.float64)
    for _ in range(iters):
        d0 = (1.0 / T) / (k @ d1)
        d1 = (1.0 / E) / (d0 @ k)
    return d1 * k * d0[:, None]


@pytest.mark.parametrize("T,E", [(16, 4), (37, 8), (5, 3)])
def test_sinkhorn_plan_marginals(T, E):
    cost = 2.0 * torch.randn(T, E, generator=torch.Generator().manual_seed(T))
    plan = routing.sinkhorn_plan(cost)
    # The last update is the columns': they hold exactly; rows within the tolerance.
    torch.testing.assert_close(plan.sum(0), torch.full((E,), 1.0 / E), rtol=1e-5, atol=0)
    assert ((plan.sum(1) - 1.0 / T).abs() * T).max() < 2e-3
    torch.testing.assert_close(plan.double(), _sinkhorn_linear(cost, 200), rtol=2e-3, atol=0)


def test_sinkhorn_plan_uniform_and_large_logits():
    T, E = 12, 4
    plan = routing.sinkhorn_plan(torch.full((T, E), 3.0))
    torch.testing.assert_close(plan, torch.full((T, E), 1.0 / (T * E)), rtol=1e-6, atol=0)
    big = 1e3 * torch.randn(T, E, generator=torch.Generator().manual_seed(0))
    assert not torch.isfinite(big.exp()).all()  # the linear-domain kernel overflows
    plan = routing.sinkhorn_plan(big)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(0), torch.full((E,), 1.0 / E), rtol=1e-5, atol=0)


def test_sinkhorn_iteration_cap_is_respected():
    cost = 2.0 * torch.randn(16, 4, generator=torch.Generator().manual_seed(3))
    for iters in (1, 2, 5):
        plan = routing.sinkhorn_plan(cost, max_iters=iters, tol=1e-30)
        torch.testing.assert_close(plan.double(), _sinkhorn_linear(cost, iters),
                                   rtol=1e-5, atol=0)
    row_err = (routing.sinkhorn_plan(cost, max_iters=1).sum(1) * 16 - 1).abs().max()
    assert row_err > 0.05  # one iteration is far from balanced: it did stop
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        routing.sinkhorn_plan(torch.full((4, 2), float("nan")))


def test_sinkhorn_router_training_picks_plan_topk_gates_from_activation():
    cfg = RouterConfig(name=RouterType.sinkhorn)
    for K in (1, 2):
        r = _router(cfg, E=4, K=K, D=6)
        x = torch.randn(24, 6)
        z = x @ r.gate.weight.T
        out = r.train()(x)
        assert torch.equal(out.ids_TK, routing.sinkhorn_plan(z).topk(K, dim=-1).indices)
        act = torch.sigmoid(z) if K == 1 else torch.softmax(z, -1)
        torch.testing.assert_close(out.weights_TK, act.gather(1, out.ids_TK))
        out = r.eval()(x)
        assert torch.equal(out.ids_TK, act.topk(K, dim=-1).indices)


# ----------------------------------------------------------------------------- expert choice
def test_expert_choice_capacity_and_coverage():
    T, E = 12, 4
    cfg = RouterConfig(name=RouterType.expert_choice, ec_capacity_factor=2.0)
    r = _router(cfg, E=E, K=2, D=6)
    assert isinstance(r, ExpertChoiceRouter)
    x = torch.randn(T, 6)
    out = r(x)
    C = round(2.0 * T / E)  # 6
    assert r.capacity(T) == C
    assert out.active_TK.sum(0).tolist() == [C] * E  # every expert exactly its capacity
    assert int(out.active_TK.sum()) == E * C  # sum over tokens of experts per token
    p = torch.softmax(x @ r.gate.weight.T, -1)
    assert torch.equal(out.ids_TK, torch.arange(E).expand(T, E))
    torch.testing.assert_close(out.weights_TK, p)  # raw probabilities, not renormalised
    for e in range(E):  # expert e took its C highest-probability tokens
        chosen = set(out.active_TK[:, e].nonzero().flatten().tolist())
        assert chosen == set(p[:, e].topk(C).indices.tolist())


def test_expert_choice_unrouted_tokens_and_ties():
    # Tokens 0-3 peak on one expert each; tokens 4, 5 are uniform and no expert wants them.
    s = torch.full((6, 4), 0.1)
    for t in range(4):
        s[t, t] = 0.7
    s[4:] = 0.25
    _, active = routing.expert_choice_select(s, 1)
    assert active.tolist()[:4] == torch.eye(4, dtype=torch.bool).tolist()
    assert (~active.any(-1)).tolist() == [False] * 4 + [True, True]
    # All scores equal: each expert takes the lowest token indices.
    _, active = routing.expert_choice_select(torch.full((10, 3), 1 / 3), 4)
    assert active.tolist() == [[True] * 3] * 4 + [[False] * 3] * 6


# ----------------------------------------------------------------------------- XMoE threshold
@pytest.mark.parametrize("p,t,n", [([0.5, 0.3, 0.15, 0.05], 0.9, 3),
                                   ([0.95, 0.03, 0.01, 0.01], 0.9, 1),
                                   ([0.5, 0.3, 0.15, 0.05], 1.0, 4),
                                   ([0.5, 0.3, 0.15, 0.05], 1.5, 4),
                                   ([0.5, 0.3, 0.15, 0.05], 0.5, 1)])
def test_threshold_select_known_answers(p, t, n):
    ids, active = routing.threshold_select(torch.tensor([p]), t, max_k=4)
    assert ids[0, :n].tolist() == list(range(n)) and sorted(ids[0].tolist()) == [0, 1, 2, 3]
    assert active[0].tolist() == [True] * n + [False] * (4 - n)


def test_threshold_router_weights_are_raw_probabilities():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.95 - 1e-3, 1e-3, 0.0]]).clamp_min(1e-6)
    p = p / p.sum(-1, keepdim=True)
    cfg = RouterConfig(name=RouterType.threshold, threshold=0.9, max_k=4)
    r = identity_gate_router(cfg, 4, 2)
    assert isinstance(r, ThresholdRouter) and r.slots == 4
    out = r(p.log())
    assert out.active_TK.sum(-1).tolist() == [3, 1]
    torch.testing.assert_close(out.weights_TK, p.gather(1, out.ids_TK))
    assert set(out.ids_TK[0, :3].tolist()) == {0, 1, 2} and int(out.ids_TK[1, 0]) == 1
    r_all = identity_gate_router(RouterConfig(name=RouterType.threshold, threshold=1.0, max_k=4), 4, 2)
    assert r_all(p.log()).active_TK.all()


# ----------------------------------------------------------------------------- noisy top-k
def test_cv_squared_uses_population_variance():
    assert losses.cv_squared(torch.tensor([1.0, 0.0])).item() == pytest.approx(1.0, abs=1e-6)
    x = torch.tensor([3.0, 1.0, 2.0, 6.0])
    assert losses.cv_squared(x).item() == pytest.approx(
        float(x.var(unbiased=False) / x.mean() ** 2), rel=1e-6)
    assert losses.cv_squared(torch.tensor([5.0])).item() == 0.0


def test_prob_in_topk_hand_values_and_threshold_half():
    # noisy [2, 1, .5, -1], k=2: experts 0, 1 are in (threshold = 3rd value .5), experts 2,
    # 3 out (threshold = 2nd value 1.0).
    noisy = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    clean = torch.tensor([[1.5, 0.8, 0.9, 0.0]])
    std = torch.tensor([[1.0, 0.5, 2.0, 1.0]])
    p = losses.prob_in_topk(clean, noisy, std, 2)
    want = [_phi(1.0), _phi(0.6), _phi(-0.05), _phi(-1.0)]
    torch.testing.assert_close(p[0], torch.tensor(want), rtol=1e-6, atol=1e-7)
    at_thr = losses.prob_in_topk(torch.tensor([[0.5, 0.5, 1.0, 1.0]]), noisy, std, 2)
    torch.testing.assert_close(at_thr[0], torch.full((4,), 0.5))


def test_prob_in_topk_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(5, 6, generator=g, dtype=torch.float64)

    def f(clean, raw_std):
        std = F.softplus(raw_std) + 1e-2
        return losses.prob_in_topk(clean, clean + eps * std, std, 2)

    clean = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    raw_std = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (clean, raw_std))


def _noisy(load=1e-2, importance=1e-2, K=2) -> NoisyTopKRouter:
    # A random W_g (not the default zero init, tested in test_recipes.py), so that the
    # clean logits order the experts and the tests below can tell them from the noise.
    cfg = RouterConfig(name=RouterType.noisy_topk, load_coef=load, importance_coef=importance,
                       noisy_zero_init=False)
    r = _router(cfg, E=8, K=K, D=6)
    assert isinstance(r, NoisyTopKRouter)
    assert torch.count_nonzero(r.w_noise.weight) == 0  # zero init (paper)
    return r


def test_noisy_topk_eval_is_deterministic_clean_topk():
    r = _noisy().eval()
    x = torch.randn(10, 6)
    a, b = r(x), r(x)
    clean = x @ r.gate.weight.T
    top = clean.topk(2, dim=-1)
    assert torch.equal(a.ids_TK, top.indices) and torch.equal(a.ids_TK, b.ids_TK)
    torch.testing.assert_close(a.weights_TK, torch.softmax(top.values, -1))
    assert torch.equal(a.weights_TK, b.weights_TK) and a.router_loss is None


def test_noisy_topk_training_noise_formula_and_gates():
    r = _noisy().train()
    T, E = 10, 8
    x = torch.randn(T, 6)
    with torch.no_grad():
        r.w_noise.weight.normal_(0, 0.3)
    r.context.set_step(11, 4)
    r.layer_idx = 1
    r.context.token_keys = torch.arange(100, 100 + T)
    out = r(x)
    # H = clean + eps * (softplus(x W_noise) + noise_epsilon), eps keyed per (token, expert).
    clean = x @ r.gate.weight.T
    std = F.softplus(x @ r.w_noise.weight.T) + 1e-2
    keys = torch.arange(100, 100 + T)[:, None] * E + torch.arange(E)
    noisy = clean + routing.keyed_normal(keys, 11, 4, 1, 0x5EED) * std
    top = noisy.topk(2, dim=-1)
    assert torch.equal(out.ids_TK, top.indices)
    torch.testing.assert_close(out.weights_TK, torch.softmax(top.values, -1))
    dense = dense_gates(out.ids_TK, out.weights_TK, E)
    assert (torch.count_nonzero(dense, dim=-1) == 2).all()
    torch.testing.assert_close(dense.sum(-1), torch.ones(T))
    assert not torch.equal(out.ids_TK, clean.topk(2, dim=-1).indices)  # the noise acts
    load = losses.prob_in_topk(clean, noisy, std, 2).sum(0)
    want = 1e-2 * losses.cv_squared(dense.sum(0)) + 1e-2 * losses.cv_squared(load)
    torch.testing.assert_close(out.router_loss, want)


def test_noisy_topk_noise_is_keyed():
    """The noise of token t at expert e is keyed_normal(key_t * E + e, seed, step, layer,
    0x5EED): it follows the token's key, not its row. The draws are integer hashing, so
    the keying is checked bit for bit; the routed scores come from a matmul, whose
    rounding may depend on a row's place in the batch, so they agree within float32
    rounding."""
    r = _noisy().train()
    E = 8
    x = torch.randn(16, 6)
    keys = torch.arange(16) * 3 + 5
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))

    def run(seed, step, layer, rows=None, token_keys=None):
        r.context.set_step(seed, step)
        r.layer_idx = layer
        r.context.token_keys = keys if token_keys is None else token_keys
        return r(x if rows is None else x[rows]).scores_TE.detach()

    base = run(1, 7, 2)
    assert torch.equal(run(1, 7, 2), base)
    for other in (run(1, 8, 2), run(2, 7, 2), run(1, 7, 3)):
        assert not torch.allclose(other, base)
    # The router adds that draw, times softplus(0) + noise_epsilon (W_noise is zero).
    keys_TE = keys[:, None] * E + torch.arange(E)
    eps_TE = routing.keyed_normal(keys_TE, 1, 7, 2, 0x5EED)
    std = math.log(2.0) + 1e-2
    torch.testing.assert_close(base, torch.softmax(x @ r.gate.weight.T + eps_TE * std, -1))
    # Permuted keys draw the permuted numbers: the uniforms bit for bit, and the normals
    # (float32 log and cos of them) within rounding.
    for box_muller_salt in (1, 2):
        u_TE = routing.keyed_uniform(keys_TE, 1, 7, 2, 0x5EED, box_muller_salt)
        assert torch.equal(routing.keyed_uniform(keys_TE[perm], 1, 7, 2, 0x5EED,
                                                 box_muller_salt), u_TE[perm])
    torch.testing.assert_close(routing.keyed_normal(keys_TE[perm], 1, 7, 2, 0x5EED),
                               eps_TE[perm])
    # So permuted tokens with their keys are routed as before; with the keys left in
    # place the noise would follow the rows instead.
    torch.testing.assert_close(run(1, 7, 2, perm, keys[perm]), base[perm])
    assert not torch.allclose(run(1, 7, 2, perm, keys), base[perm], atol=1e-3)
    # The draws are standard normal.
    eps = routing.keyed_normal(torch.arange(20000), 1, 2, 3)
    assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1.0) < 0.05


def test_noisy_topk_load_loss_reaches_w_noise():
    r = _noisy(load=1.0, importance=0.0).train()
    x = torch.randn(32, 6)
    out = r(x)
    out.router_loss.backward()
    g = r.w_noise.weight.grad
    assert g is not None and g.abs().sum() > 0
    # Same loss written out on a copy of W_noise (the noise draw is the same keyed one).
    wn = torch.zeros(8, 6, requires_grad=True)
    clean = (x @ r.gate.weight.T).detach()
    std = F.softplus(x @ wn.T) + 1e-2
    keys = torch.arange(32)[:, None] * 8 + torch.arange(8)
    noisy = clean + routing.keyed_normal(keys, 0, 0, 0, 0x5EED) * std
    losses.cv_squared(losses.prob_in_topk(clean, noisy, std, 2).sum(0)).backward()
    torch.testing.assert_close(g, wn.grad)


# ----------------------------------------------------------------------------- SSR
def _ssr(p: float, **kw) -> SelectiveSinkhornRouter:
    cfg = RouterConfig(name=RouterType.selective_sinkhorn, ssr_prob=p, **kw)
    r = _router(cfg, E=4, K=2, D=6)
    assert isinstance(r, SelectiveSinkhornRouter)
    return r


def test_ssr_prob_zero_is_bit_identical_to_topk():
    ssr = _ssr(0.0).train()
    topk = _router(RouterConfig(), E=4, K=2, D=6).train()
    assert isinstance(topk, TopKRouter) and type(topk) is not type(ssr)
    topk.load_state_dict(ssr.state_dict())
    x = torch.randn(32, 6)
    for step in range(20):
        ssr.context.set_step(ssr.context.seed, step)
        a, b = ssr(x), topk(x)
        for f in ("ids_TK", "weights_TK", "scores_TE", "logits_TE"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f


@pytest.mark.parametrize("eps", [0.05, 0.5])
def test_ssr_prob_one_routes_by_the_transport_plan(eps):
    r = _ssr(1.0, ssr_epsilon=eps).train()
    T, E = 32, 4
    x = torch.randn(T, 6)
    with torch.no_grad():  # skew the gate so plain top-k is unbalanced
        r.gate.weight[0] += 1.0
    out = r(x)
    cost = (x @ r.gate.weight.T) / eps
    log_d0, log_d1 = routing.sinkhorn_log(cost, 1.0, T / E)
    plan = (cost + log_d0[:, None] + log_d1).exp()
    torch.testing.assert_close(plan.sum(0), torch.full((E,), T / E), rtol=1e-5, atol=0)
    assert (plan.sum(1) - 1).abs().max() < 2e-3
    assert torch.equal(out.ids_TK, plan.topk(2, dim=-1).indices)
    w = plan.gather(1, out.ids_TK)
    torch.testing.assert_close(out.weights_TK, w / w.sum(-1, keepdim=True))
    torch.testing.assert_close(out.weights_TK.sum(-1), torch.ones(T))
    plain = torch.softmax(x @ r.gate.weight.T, -1).topk(2, dim=-1).indices
    top1_plain = torch.bincount(plain[:, 0], minlength=E)
    top1_ot = torch.bincount(out.ids_TK[:, 0], minlength=E)
    assert top1_ot.max() < top1_plain.max()  # the plan balances the first choices
    assert torch.equal(r.eval()(x).ids_TK, plain)  # evaluation: plain top-k


def test_ssr_draw_is_keyed_and_binomial():
    r = _ssr(0.1).train()

    def draws(seed, layer):
        r.context.set_step(seed, 0)
        r.layer_idx = layer
        out = []
        for step in range(2000):
            r.context.set_step(seed, step)
            out.append(r.ot_step())
        return out

    a = draws(0, 0)
    assert draws(0, 0) == a
    assert draws(1, 0) != a and draws(0, 1) != a
    # Binomial(2000, 0.1): mean 200, sd 13.4; 4 sd.
    assert abs(sum(a) - 200) <= 54
    assert not r.eval().ot_step()


# ----------------------------------------------------------------------------- losses
def test_switch_loss_uniform_and_collapsed():
    T, E = 16, 8
    ids = torch.arange(T).remainder(E)[:, None]
    assert losses.load_balancing_loss(torch.full((T, E), 1 / E), ids, E).item() == \
        pytest.approx(1.0, abs=1e-6)
    collapsed = torch.zeros(T, E)
    collapsed[:, 3] = 1.0
    assert losses.load_balancing_loss(collapsed, torch.full((T, 1), 3), E).item() == \
        pytest.approx(float(E), abs=1e-5)


def test_z_loss_of_zero_logits_is_ln_e_squared():
    assert losses.z_loss(torch.zeros(5, 8)).item() == pytest.approx(math.log(8) ** 2, rel=1e-6)
    assert losses.z_loss(torch.zeros(5, 8)).item() == pytest.approx(4.3241, abs=1e-4)


def test_seq_loss_balanced_and_concentrated():
    B, S, E, K = 3, 8, 4, 2
    uniform = torch.full((B, S, E), 1 / E)
    balanced_counts = torch.full((B, E), S * K // E)
    assert losses.seq_load_balancing_loss(uniform, balanced_counts, K).item() == \
        pytest.approx(1.0, abs=1e-6)
    conc = torch.zeros(B, S, E)
    conc[..., 1] = conc[..., 3] = 1 / K
    counts = torch.zeros(B, E, dtype=torch.int64)
    counts[:, [1, 3]] = S
    assert losses.seq_load_balancing_loss(conc, counts, K).item() == \
        pytest.approx(E / K, abs=1e-6)


# ----------------------------------------------------------------------------- top-1 weights
D, FH = 8, 12


def _layer(K=2, E=4, router: RouterConfig | None = None, **moe) -> MoELayer:
    torch.manual_seed(0)
    mcfg = ModelConfig(dim=D, n_heads=2, num_experts=E, top_k=K, expert_hidden=FH)
    moe_cfg = MoEConfig(router=router or RouterConfig(), expert_backend=ExpertBackend.loop,
                        **moe)
    layer = MoELayer(D, mcfg, moe_cfg)
    layer.init_weights(0.5, 0.5)
    return layer


@pytest.mark.parametrize("score", list(ScoreFunc))
@pytest.mark.parametrize("runtime", [False, True])
def test_top1_renormalize_keeps_raw_probability_and_gate_gradient(score, runtime):
    cfg = RouterConfig(score_func=score, renormalize=True)
    layer = _layer(K=2 if runtime else 1, router=cfg, aux_loss_coef=0.0, z_loss_coef=0.0)
    if runtime:  # a schedule lowers top_k between steps
        layer.router.top_k = 1
    x = 0.5 * torch.randn(10, D)
    out = layer.router(x)
    raw = routing.score(x @ layer.router.gate.weight.T, score)
    assert out.ids_TK.shape == (10, 1)
    torch.testing.assert_close(out.weights_TK[:, 0], raw.max(-1).values)
    assert (out.weights_TK < 0.99).all()  # not the renormalised 1.0
    layer(x).pow(2).sum().backward()
    g = layer.router.gate.weight.grad
    assert g is not None and g.abs().sum() > 0
    # Reference: out_t = p_t(W) * SwiGLU_e(x_t), gradient w.r.t. a copy of W.
    w = layer.router.gate.weight.detach().clone().requires_grad_()
    p = routing.score(x @ w.T, score).gather(1, out.ids_TK)
    ex = layer.experts
    ref = dense_moe_reference(x, out.ids_TK, p, ex.w1_EFD.detach(), ex.w3_EFD.detach(),
                              ex.w2_EDF.detach())
    ref.pow(2).sum().backward()
    torch.testing.assert_close(g, w.grad, rtol=1e-4, atol=1e-6)


def test_expert_bias_stays_float32_through_bf16_cast():
    r = _dsv3()
    b = torch.tensor([1e-3, -2e-3, 3.3e-4, 0.1234567, -7e-5, 0.0, 5e-3, -1e-3])
    with torch.no_grad():
        r.expert_bias.copy_(b)
    r = r.to(torch.bfloat16)
    assert r.gate.weight.dtype == torch.bfloat16
    assert r.expert_bias.dtype == torch.float32 and torch.equal(r.expert_bias, b)
    r = r.half().float().to(torch.bfloat16)
    assert r.expert_bias.dtype == torch.float32 and torch.equal(r.expert_bias, b)
    assert r.state_dict()["expert_bias"].dtype == torch.float32
    layer = _layer(router=RouterConfig(score_func=ScoreFunc.sigmoid)).to(torch.bfloat16)
    assert layer.router.expert_bias.dtype == torch.float32


# ----------------------------------------------------------------------------- global batch
def test_global_batch_counts_accumulate_over_micro_batches():
    E, K, T = 4, 2, 6
    layer = _layer(K=K, E=E, aux_loss_coef=0.01, z_loss_coef=0.0,
                   aux_loss_scope=AuxLossScope.global_batch).train()
    ref = copy.deepcopy(layer)
    ref.aux_loss_coef = 0.0  # adds the aux term by hand below
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(T, D, generator=g) for _ in range(4)]
    layer.reset_step_counts()
    cum = torch.zeros(E, dtype=torch.int64)
    for j, x in enumerate(xs[:3], start=1):
        p = torch.softmax(x @ layer.router.gate.weight.T, -1)
        counts = torch.bincount(p.topk(K, -1).indices.flatten(), minlength=E)
        cum += counts
        n = T * K * j
        layer.zero_grad()
        out = layer(x)
        assert layer.step_counts.tolist() == cum.tolist() + [n]
        assert layer.last_stats.load_E.tolist() == counts.float().tolist()  # local stats
        want = E * ((cum.float() / n) * p.mean(0)).sum()
        torch.testing.assert_close(layer.last_stats.aux_loss, want.detach())
        # The trained loss is the global one: gradient = explicit LM + aux with cum counts.
        out.sum().backward()
        ref.zero_grad()
        r = ref.router(x)
        aux = losses.load_balancing_loss(r.scores_TE, r.ids_TK, E, counts_E=cum.clone(),
                                         num_routed=n)
        (ref(x).sum() + 0.01 * aux).backward()
        torch.testing.assert_close(layer.router.gate.weight.grad, ref.router.gate.weight.grad)
    saved = layer.step_counts.clone()
    x4 = xs[3]
    local = torch.bincount(torch.softmax(x4 @ layer.router.gate.weight.T, -1)
                           .topk(K, -1).indices.flatten(), minlength=E)
    p4 = torch.softmax(x4 @ layer.router.gate.weight.T, -1)
    own = E * ((local.float() / (T * K)) * p4.mean(0)).sum()
    with torch.no_grad():  # no-grad training forward (e.g. a no-grad first pass)
        layer(x4)
    assert torch.equal(layer.step_counts, saved)
    torch.testing.assert_close(layer.last_stats.aux_loss, own)
    layer.eval()
    layer(x4)  # evaluation forward under grad
    assert torch.equal(layer.step_counts, saved)
    torch.testing.assert_close(layer.last_stats.aux_loss, own)
    layer.train()
    layer.reset_step_counts()
    layer(x4)
    assert layer.step_counts.tolist() == local.tolist() + [T * K]


def test_sigmoid_loss_probabilities_cannot_be_pushed_below_balance():
    """Megatron-LM #1545: with scores divided by (sum + eps), very negative logits make the
    per-token probabilities sum to ~0 and the balance loss falls under its minimum. The
    sigmoid router's loss probabilities are softmax(logsigmoid(z)): they sum to 1 for any
    logits, equal sigmoid / sum where that is representable, and a uniform router keeps
    the Switch loss at exactly 1."""
    from moetrain.models.moe.losses import load_balancing_loss
    from moetrain.models.moe.routing import normalized, sigmoid_probs

    z = torch.randn(64, 8)
    torch.testing.assert_close(sigmoid_probs(z), normalized(torch.sigmoid(z)))
    for c in (-50.0, -120.0):
        p = sigmoid_probs(torch.full((64, 8), c))
        torch.testing.assert_close(p.sum(-1), torch.ones(64))
        ids = torch.arange(64 * 2).view(64, 2) % 8  # balanced counts
        assert load_balancing_loss(p, ids, 8).item() == pytest.approx(1.0, abs=1e-6)


def test_keyed_draws_accept_tensor_salts():
    """The noisy router keys its noise with 0-dim int64 tensors (no recompile per step):
    the same values as python-int salts."""
    from moetrain.models.moe.routing import keyed_normal, keyed_uniform

    keys = torch.arange(100)
    assert torch.equal(keyed_uniform(keys, 3, 7, 1), keyed_uniform(keys, torch.tensor(3),
                                                                    torch.tensor(7), 1))
    assert torch.equal(keyed_normal(keys, 5, torch.tensor(9)), keyed_normal(keys, 5, 9))
    u = keyed_uniform(torch.arange(200000), 1, 2)
    assert 0.0 < u.min().item() and u.max().item() < 1.0
