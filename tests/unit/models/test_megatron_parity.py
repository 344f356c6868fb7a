"""moetrain's routing math against Megatron-core's ``moe_utils`` (an independent
implementation) on the same random logits, and the places where moetrain differs on
purpose, each shown with a case that tells the two apart.

Megatron conventions kept in mind: ``topk_routing_with_score_function`` returns dense
[T, E] probabilities and a bool routing map; with softmax and ``use_pre_softmax=False`` it
takes the top-k of the *logits* and a softmax over those k (= moetrain's renormalised
softmax top-k); with ``use_pre_softmax=True`` the raw softmax probabilities of the picks
(= moetrain's ``renormalize=false``); sigmoid weights are always renormalised when k > 1;
the expert bias is used only on the sigmoid path.

Legend: T tokens, E experts, K top-k, G expert groups, L layers, B batch, S sequence.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from moetrain.config.schema import (
    BiasUpdate,
    DropPolicy,
    ExpertBackend,
    GroupScore,
    ModelConfig,
    MoEConfig,
    RouterConfig,
    RouterType,
    ScoreFunc,
)
from moetrain.models.moe import losses, routing
from moetrain.models.moe.dispatcher import LocalDispatcher, expert_capacity
from moetrain.models.moe.layer import MoELayer
from tests.conftest import oracle

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
    parallel_state = oracle("megatron.core.parallel_state", module_level=True)
    moe_utils = oracle("megatron.core.transformer.moe.moe_utils", module_level=True)



from ._ref import dense_gates, identity_gate_router

SHAPES = [(0, 16, 8), (1, 33, 16), (2, 7, 4)]  # (seed, T, E)


def _logits(seed: int, T: int, E: int) -> torch.Tensor:
    return 2.0 * torch.randn(T, E, generator=torch.Generator().manual_seed(seed))






def _map(ids_TK: torch.Tensor, E: int) -> torch.Tensor:
    return torch.zeros(ids_TK.shape[0], E, dtype=torch.bool).scatter(1, ids_TK, True)


def _assert_same_routing(out, probs_TE: torch.Tensor, map_TE: torch.Tensor, E: int) -> None:
    assert torch.equal(_map(out.ids_TK, E), map_TE)  # same experts per token, as sets
    torch.testing.assert_close(dense_gates(out.ids_TK, out.weights_TK, E), probs_TE.float(),
                               rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- top-k routing
@pytest.mark.parametrize("seed,T,E", SHAPES)
@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("scale", [None, 2.5])
def test_softmax_topk_matches_megatron(seed, T, E, K, scale):
    z = _logits(seed, T, E)
    route_scale = scale or 1.0
    # renormalize=true <-> use_pre_softmax=False (softmax over the k picked logits).
    probs, rmap = moe_utils.topk_routing_with_score_function(
        z, K, use_pre_softmax=False, scaling_factor=scale, score_function="softmax")
    if K > 1:
        out = identity_gate_router(RouterConfig(renormalize=True, route_scale=route_scale), E, K)(z)
        _assert_same_routing(out, probs, rmap, E)
    # renormalize=false <-> use_pre_softmax=True (raw probabilities of the picks).
    probs, rmap = moe_utils.topk_routing_with_score_function(
        z, K, use_pre_softmax=True, scaling_factor=scale, score_function="softmax")
    out = identity_gate_router(RouterConfig(renormalize=False, route_scale=route_scale), E, K)(z)
    _assert_same_routing(out, probs, rmap, E)


def test_top1_renormalize_differs_from_megatron_on_purpose():
    """With K = 1 and use_pre_softmax=False Megatron's weight is softmax over one logit =
    1.0 (no gradient to the gate from the LM loss); moetrain keeps the raw probability
    even with renormalize=true, which is Megatron's use_pre_softmax=True."""
    z = _logits(0, 16, 8)
    out = identity_gate_router(RouterConfig(renormalize=True), 8, 1)(z)
    probs, rmap = moe_utils.topk_routing_with_score_function(z, 1, use_pre_softmax=False)
    assert torch.equal(_map(out.ids_TK, 8), rmap)
    assert torch.equal(probs[rmap], torch.ones(16))
    assert (out.weights_TK < 1).all()
    probs, rmap = moe_utils.topk_routing_with_score_function(z, 1, use_pre_softmax=True)
    _assert_same_routing(out, probs, rmap, 8)


@pytest.mark.parametrize("seed,T,E", SHAPES)
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("scale", [None, 2.5])
def test_sigmoid_topk_matches_megatron(seed, T, E, K, with_bias, scale):
    z = _logits(seed, T, E)
    bias = 0.2 * torch.randn(E, generator=torch.Generator().manual_seed(seed + 100))
    r = identity_gate_router(RouterConfig(score_func=ScoreFunc.sigmoid, renormalize=True,
                             route_scale=scale or 1.0), E, K)
    if with_bias:
        with torch.no_grad():
            r.expert_bias.copy_(bias)
    out = r(z)
    probs, rmap = moe_utils.topk_routing_with_score_function(
        z, K, scaling_factor=scale, score_function="sigmoid",
        expert_bias=bias if with_bias else None)
    _assert_same_routing(out, probs, rmap, E)
    if with_bias and T >= 16:  # the bias really changed some selections
        plain = moe_utils.topk_routing_with_score_function(z, K, score_function="sigmoid")[1]
        assert not torch.equal(plain, rmap)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("G,topk_groups,K", [(4, 2, 2), (4, 2, 4), (8, 4, 8), (4, 1, 3),
                                             (4, 4, 4)])
# Megatron applies the expert bias on the sigmoid path only.
@pytest.mark.parametrize("score,with_bias", [("softmax", False), ("sigmoid", False),
                                             ("sigmoid", True)])
def test_group_limited_topk_sum_matches_megatron(seed, G, topk_groups, K, score, with_bias):
    T, E = 24, 16
    z = _logits(seed, T, E)
    bias = 0.3 * torch.randn(E, generator=torch.Generator().manual_seed(seed + 7))
    cfg = RouterConfig(score_func=ScoreFunc(score), renormalize=score == "sigmoid",
                       n_groups=G, topk_groups=topk_groups, group_score=GroupScore.topk_sum,
                       route_scale=2.5)
    r = identity_gate_router(cfg, E, K)
    if with_bias:
        with torch.no_grad():
            r.expert_bias.copy_(bias)
    out = r(z)
    # Softmax: Megatron's groups are scored on the probabilities only with use_pre_softmax.
    probs, rmap = moe_utils.topk_routing_with_score_function(
        z, K, use_pre_softmax=score == "softmax", num_groups=G, group_topk=topk_groups,
        scaling_factor=2.5, score_function=score, expert_bias=bias if with_bias else None)
    _assert_same_routing(out, probs, rmap, E)


def test_group_score_top2_sum_differs_from_megatron_topk_sum():
    """Named difference (ref §2, Megatron #1441): Megatron scores a group by the sum of its
    top (k / topk_groups) scores; moetrain's default ``top2_sum`` (DeepSeek-V3's code,
    torchtitan) by its top 2. With k / topk_groups = 1 they pick different experts."""
    s = torch.tensor([[0.9, 0.0, 0.52, 0.5, 0.6, 0.45, 0.1, 0.1]])
    z = torch.logit(s.clamp_min(1e-4))  # sigmoid(z) = s
    _, meg = moe_utils.topk_routing_with_score_function(
        z, 2, num_groups=4, group_topk=2, score_function="sigmoid")
    assert meg[0].nonzero().flatten().tolist() == [0, 4]
    top2 = identity_gate_router(RouterConfig(score_func=ScoreFunc.sigmoid, n_groups=4, topk_groups=2,
                                group_score=GroupScore.top2_sum), 8, 2)(z)
    topk = identity_gate_router(RouterConfig(score_func=ScoreFunc.sigmoid, n_groups=4, topk_groups=2,
                                group_score=GroupScore.topk_sum), 8, 2)(z)
    assert torch.equal(_map(topk.ids_TK, 8), meg)
    assert sorted(top2.ids_TK[0].tolist()) == [2, 4]
    # With k / topk_groups = 2 (DeepSeek-V3's 8 / 4) the rules coincide.
    z = _logits(3, 32, 16)
    _, meg = moe_utils.topk_routing_with_score_function(
        z, 4, num_groups=4, group_topk=2, score_function="sigmoid")
    top2 = identity_gate_router(RouterConfig(score_func=ScoreFunc.sigmoid, n_groups=4, topk_groups=2,
                                group_score=GroupScore.top2_sum), 16, 4)(z)
    assert torch.equal(_map(top2.ids_TK, 16), meg)


def test_softmax_groups_without_pre_softmax_score_logits_in_megatron():
    """Named difference: Megatron's softmax path without use_pre_softmax ranks groups by
    sums of raw *logits*; moetrain always ranks them by sums of probabilities (Megatron
    with use_pre_softmax). Group 0 = logits [5, -5] (sum 0, but probability mass e^5),
    group 1 = [1, 1] (sum 2)."""
    z = torch.tensor([[5.0, -5.0, 1.0, 1.0, -1.0, -1.0, -2.0, -2.0]])
    _, meg_logits = moe_utils.topk_routing_with_score_function(
        z, 2, use_pre_softmax=False, num_groups=4, group_topk=1)
    _, meg_probs = moe_utils.topk_routing_with_score_function(
        z, 2, use_pre_softmax=True, num_groups=4, group_topk=1)
    out = identity_gate_router(RouterConfig(n_groups=4, topk_groups=1, group_score=GroupScore.topk_sum),
                  8, 2)(z)
    assert meg_logits[0].nonzero().flatten().tolist() == [2, 3]
    assert meg_probs[0].nonzero().flatten().tolist() == [0, 1]
    assert torch.equal(_map(out.ids_TK, 8), meg_probs)


# ----------------------------------------------------------------------------- Sinkhorn
@pytest.mark.parametrize("seed,T,E", SHAPES)
def test_sinkhorn_plan_matches_megatron(seed, T, E):
    z = _logits(seed, T, E)
    torch.testing.assert_close(routing.sinkhorn_plan(z), moe_utils.sinkhorn(z.clone()),
                               rtol=1e-4, atol=1e-9)
    for tol in (1e-2, 1e-6):  # the same stopping rule on d1
        torch.testing.assert_close(routing.sinkhorn_plan(z, max_iters=10_000, tol=tol),
                                   moe_utils.sinkhorn(z.clone(), tol=tol), rtol=1e-4, atol=1e-9)


def test_sinkhorn_large_logits_megatron_overflows_moetrain_does_not():
    """Named difference: Megatron's linear-domain sinkhorn overflows exp(logits) and
    returns NaN; moetrain iterates in the log domain (ref §5.2 pathology guard)."""
    z = 1e3 * _logits(0, 8, 4)
    assert not torch.isfinite(moe_utils.sinkhorn(z.clone())).all()
    assert torch.isfinite(routing.sinkhorn_plan(z)).all()


def _megatron_sinkhorn_load_balancing(logits: torch.Tensor, topk: int, training: bool):
    """Megatron-core ``TopKRouter.sinkhorn_load_balancing`` (router.py) restated on
    ``moe_utils.sinkhorn``: (scores [T, E], routing map)."""
    def act(x):
        return torch.sigmoid(x) if topk == 1 else torch.softmax(x, dim=-1, dtype=torch.float32)

    if training:
        with torch.no_grad():
            _, indices = torch.topk(moe_utils.sinkhorn(logits.float()), k=topk, dim=1)
        logits = act(logits)
    else:
        logits = act(logits)
        _, indices = torch.topk(logits, k=topk, dim=1)
    rmap = torch.zeros_like(logits).int().scatter(1, indices, 1).bool()
    return logits * rmap, rmap


@pytest.mark.parametrize("seed,T,E", SHAPES)
@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("training", [True, False])
def test_sinkhorn_router_matches_megatron_sinkhorn_load_balancing(seed, T, E, K, training):
    z = _logits(seed, T, E)
    r = identity_gate_router(RouterConfig(name=RouterType.sinkhorn), E, K).train(training)
    out = r(z)
    scores, rmap = _megatron_sinkhorn_load_balancing(z, K, training)
    _assert_same_routing(out, scores, rmap, E)


# ----------------------------------------------------------------------------- losses
@pytest.mark.parametrize("seed,T,E", SHAPES)
@pytest.mark.parametrize("K", [1, 2])
def test_switch_loss_matches_megatron(seed, T, E, K):
    z = _logits(seed, T, E)
    p = torch.softmax(z, -1)
    ids = p.topk(K, -1).indices
    counts = torch.bincount(ids.flatten(), minlength=E)
    meg = moe_utils.switch_load_balancing_loss_func(
        probs=p, tokens_per_expert=counts, total_num_tokens=T, topk=K, num_experts=E,
        moe_aux_loss_coeff=1.0)
    torch.testing.assert_close(losses.load_balancing_loss(p, ids, E), meg)
    # Externally supplied (e.g. reduced) counts: the same formula with those counts.
    other = torch.randint(0, 5, (E,), generator=torch.Generator().manual_seed(seed))
    meg = moe_utils.switch_load_balancing_loss_func(p, counts + other, T, K, E, 0.01)
    mine = losses.load_balancing_loss(p, ids, E, counts_E=counts + other, num_routed=T * K)
    torch.testing.assert_close(0.01 * mine, meg)


def test_global_batch_aux_loss_matches_megatron_running_counts():
    """moetrain's global-batch loss of micro-batch j (counts of micro-batches 1..j over
    their routed rows) equals Megatron's ``global_aux_loss`` (running *mean* of the counts
    over ``ga_steps`` micro-batches, over one micro-batch's tokens) on one rank."""
    from moetrain.config.schema import AuxLossScope

    E, K, T, D = 8, 2, 12, 8
    torch.manual_seed(0)
    layer = MoELayer(D, ModelConfig(dim=D, n_heads=2, num_experts=E, top_k=K, expert_hidden=8),
                     MoEConfig(aux_loss_scope=AuxLossScope.global_batch,
                               expert_backend=ExpertBackend.loop))
    layer.init_weights(0.5, 0.5)
    layer.train().reset_step_counts()
    running = torch.zeros(E)
    for j in range(1, 4):
        x = torch.randn(T, D)
        layer(x)
        z = x @ layer.router.gate.weight.T
        _, rmap = moe_utils.topk_routing_with_score_function(z, K, use_pre_softmax=False)
        rmap_aux, scores = moe_utils.compute_routing_scores_for_aux_loss(z, K, "softmax")
        assert torch.equal(rmap_aux, rmap)  # no bias: the aux map is the routing map
        running += rmap.sum(0)
        meg = moe_utils.switch_load_balancing_loss_func(scores, running / j, T, K, E, 1.0)
        torch.testing.assert_close(layer.last_stats.aux_loss, meg.detach())


@pytest.mark.parametrize("seed,T,E", SHAPES)
def test_z_loss_matches_megatron(seed, T, E):
    z = _logits(seed, T, E)
    torch.testing.assert_close(1e-3 * losses.z_loss(z), moe_utils.z_loss_func(z, 1e-3))


@pytest.mark.parametrize("B,S,E,K", [(2, 8, 8, 2), (3, 5, 4, 1)])
def test_seq_loss_matches_megatron_seq_aux_loss(B, S, E, K):
    """The MoE layer's DeepSeek-V3 sequence loss vs Megatron's ``_apply_seq_aux_loss``
    restated: unbiased top-k map and s' from ``compute_routing_scores_for_aux_loss``, the
    [S, B*E] reshape, the switch loss and the division by B. Megatron's tokens are
    sequence-major ([S, B]); moetrain's batch-major ([B, S])."""
    from moetrain.config.schema import BalanceLoss

    D = 8
    torch.manual_seed(1)
    layer = MoELayer(D, ModelConfig(dim=D, n_heads=2, num_experts=E, top_k=K, expert_hidden=8),
                     MoEConfig(router=RouterConfig(score_func=ScoreFunc.sigmoid),
                               balance_loss=BalanceLoss.seq, expert_backend=ExpertBackend.loop))
    layer.init_weights(0.5, 0.5)
    with torch.no_grad():  # a bias must not enter f (Megatron-LM #1513: unbiased top-k)
        layer.router.expert_bias.copy_(torch.linspace(-0.5, 0.5, E))
    x_BSD = torch.randn(B, S, D)
    layer(x_BSD)
    z_SBE = (x_BSD @ layer.router.gate.weight.T).transpose(0, 1).reshape(S * B, E)
    rmap, scores = moe_utils.compute_routing_scores_for_aux_loss(z_SBE, K, "sigmoid")
    meg = moe_utils.switch_load_balancing_loss_func(
        scores.reshape(S, B * E), rmap.reshape(S, B * E).sum(0), S, K, E, 1.0) / B
    torch.testing.assert_close(layer.last_stats.aux_loss, meg, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- expert bias
@pytest.fixture
def single_rank_allreduce(monkeypatch):
    """``get_updated_expert_bias`` all-reduces over Megatron's global TPxDPxCP group; on
    one rank that is the identity."""
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: None)
    monkeypatch.setattr(parallel_state, "get_tensor_and_data_parallel_group",
                        lambda *a, **k: None)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bias_update_sign_matches_megatron(single_rank_allreduce, seed):
    g = torch.Generator().manual_seed(seed)
    L, E = 3, 8
    counts = torch.randint(0, 40, (L, E), generator=g).float()
    counts[0] = torch.tensor([10.0, 2, 6, 6, 6, 6, 6, 6])  # exactly-mean entries: sign 0
    bias = 1e-3 * torch.randint(-5, 6, (L, E), generator=g).float()
    meg = moe_utils.get_updated_expert_bias(counts.clone(), bias, 1e-3)
    mine = bias + routing.bias_delta(counts, 1e-3, BiasUpdate.sign)
    assert torch.equal(mine, meg)


def test_bias_update_sign_centered_differs_from_megatron_on_purpose(single_rank_allreduce):
    """Named difference (ref §1.5, torchtitan #1506): ``sign_centered`` (torchtitan)
    subtracts the step's mean so the bias keeps mean 0; Megatron (LFB Alg. 1) does not.
    They agree when the signs already have mean 0 ([10, 2, 6, 6]) and differ otherwise."""
    zero = torch.zeros(1, 4)
    for counts, same in (([10.0, 2, 6, 6], True), ([9.0, 1, 1, 1], False)):
        c = torch.tensor([counts])
        meg = moe_utils.get_updated_expert_bias(c.clone(), zero, 1e-3)
        centered = routing.bias_delta(c, 1e-3, BiasUpdate.sign_centered)
        assert torch.allclose(centered, meg, rtol=0, atol=1e-9) == same
    torch.testing.assert_close(centered, torch.tensor([[-1.5e-3, 5e-4, 5e-4, 5e-4]]))
    torch.testing.assert_close(meg, torch.tensor([[-1e-3, 1e-3, 1e-3, 1e-3]]))


# ----------------------------------------------------------------------------- capacity drop
@pytest.mark.parametrize("seed,T,E", SHAPES)
@pytest.mark.parametrize("K,cf", [(1, 1.0), (2, 0.5), (2, 1.25)])
def test_capacity_drop_probs_matches_megatron(seed, T, E, K, cf):
    z = _logits(seed, T, E)
    probs, rmap = moe_utils.topk_routing_with_score_function(z, K, use_pre_softmax=True)
    out = identity_gate_router(RouterConfig(renormalize=False), E, K)(z)
    assert expert_capacity(T, K, E, cf) == moe_utils.get_capacity(T * K, E, cf)
    d = LocalDispatcher(E, cf, drop_policy=DropPolicy.probs)
    _, meta = d.dispatch(torch.randn(T, 4), out.ids_TK, out.weights_TK)
    _, meg_map = moe_utils.apply_router_token_dropping(probs, rmap, K, cf, drop_policy="probs")
    rows = meta.kept_TK.nonzero()
    kept = torch.zeros(T, E, dtype=torch.bool)
    kept[rows[:, 0], out.ids_TK[rows[:, 0], rows[:, 1]]] = True
    assert torch.equal(kept, meg_map)


def test_capacity_drop_position_and_rounding_differ_from_megatron_on_purpose():
    """Named differences of the drop policy:
    - ``position``: moetrain keeps each expert's earliest tokens; Megatron takes
      ``torch.topk`` of the 0/1 routing map over tokens, whose tie-break among the routed
      tokens is not by position (on CPU it is not the earliest). Both keep C rows.
    - moetrain's capacity is ceil(cf * T*K/E - 1e-9): a product that rounding pushes just
      above an integer (100 / 2 * 1.1 = 55.00000000000001) does not add a row; Megatron's
      ceil gives 56.
    - ``slot`` (GShard: first choices before second choices) has no Megatron counterpart.
    """
    T, E, K = 10, 3, 1
    ids = torch.tensor([0, 1, 0, 2, 0, 0, 2, 0, 1, 0])[:, None]  # expert 0: tokens 0,2,4,5,7,9
    w = torch.linspace(0.2, 0.9, T)[:, None]
    cf = 0.9  # capacity ceil(0.9 * 10 / 3) = 3
    C = expert_capacity(T, K, E, cf)
    assert C == moe_utils.get_capacity(T * K, E, cf) == 3
    _, meta = LocalDispatcher(E, cf, drop_policy=DropPolicy.position).dispatch(
        torch.randn(T, 4), ids, w)
    kept0 = [t for t in range(T) if meta.kept_TK[t, 0] and int(ids[t, 0]) == 0]
    assert kept0 == [0, 2, 4]
    rmap = _map(ids, E)
    _, meg_map = moe_utils.apply_router_token_dropping(w * rmap, rmap, K, cf, "position")
    assert int(meg_map[:, 0].sum()) == C and bool((meg_map <= rmap).all())
    assert expert_capacity(100, 1, 2, 1.1) == 55 and moe_utils.get_capacity(100, 2, 1.1) == 56
