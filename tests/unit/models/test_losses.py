import math

import torch

from moetrain.models.moe.losses import (
    evomoe_balance_loss,
    load_balancing_loss,
    router_entropy,
    xmoe_balance_loss,
    z_loss,
)

# T = 4 tokens, E = 3 experts: softmax probabilities p_te, written out.
P_TE = torch.tensor([[0.6, 0.3, 0.1],
                     [0.2, 0.5, 0.3],
                     [0.5, 0.4, 0.1],
                     [0.1, 0.2, 0.7]])


def test_load_balancing_loss_hand_example_top1():
    # T=2, E=2, K=1; both tokens go to expert 0.
    scores = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    ids = torch.tensor([[0], [0]])
    # f = [1, 0], P = [0.55, 0.45] -> 2 * (1 * 0.55 + 0 * 0.45) = 1.1
    assert torch.allclose(load_balancing_loss(scores, ids, 2), torch.tensor(1.1))


def test_load_balancing_loss_hand_example_top2():
    # T=2, E=3, K=2. Rows: expert 0 twice, expert 1 once, expert 2 once -> f = [2, 1, 1] / 4.
    scores = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    ids = torch.tensor([[0, 1], [2, 0]])
    p = [(0.5 + 0.1) / 2, (0.3 + 0.2) / 2, (0.2 + 0.7) / 2]
    f = [0.5, 0.25, 0.25]
    expected = 3 * sum(fi * pi for fi, pi in zip(f, p))
    assert math.isclose(load_balancing_loss(scores, ids, 3).item(), expected, rel_tol=1e-6)


def test_load_balancing_loss_is_one_at_perfect_balance():
    E, K = 4, 2
    scores = torch.full((8, E), 1.0 / E)
    ids = torch.tensor([[(t + k) % E for k in range(K)] for t in range(8)])
    assert torch.allclose(load_balancing_loss(scores, ids, E), torch.tensor(1.0))


def test_load_balancing_loss_external_counts_override_local_ones():
    scores = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    ids = torch.tensor([[0], [0]])
    # Global counts [1, 3] over 4 rows: f = [0.25, 0.75]; P stays local = [0.55, 0.45].
    got = load_balancing_loss(scores, ids, 2, counts_E=torch.tensor([1, 3]),
                              num_routed=torch.tensor(4))
    assert math.isclose(got.item(), 2 * (0.25 * 0.55 + 0.75 * 0.45), rel_tol=1e-6)


def test_load_balancing_loss_gradient_flows_through_scores_only():
    scores = torch.tensor([[0.7, 0.3], [0.4, 0.6]], requires_grad=True)
    load_balancing_loss(scores, torch.tensor([[0], [1]]), 2).backward()
    # d/dscores_te = E * f_e / T with f = [0.5, 0.5]
    assert torch.allclose(scores.grad, torch.full((2, 2), 2 * 0.5 / 2))


def test_z_loss_hand_example():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp = log 2 and log 4 = 2 log 2 -> mean of squares = 2.5 (log 2)^2
    assert math.isclose(z_loss(logits).item(), 2.5 * math.log(2.0) ** 2, rel_tol=1e-6)


def test_router_entropy_uniform_and_one_hot():
    assert math.isclose(router_entropy(torch.full((3, 4), 0.25)).item(), math.log(4), rel_tol=1e-6)
    assert router_entropy(torch.eye(4)).item() == 0.0
    p = [0.5, 0.25, 0.25]
    expected = -sum(x * math.log(x) for x in p)
    assert math.isclose(router_entropy(torch.tensor([p])).item(), expected, rel_tol=1e-6)


def test_xmoe_balance_loss_hand_example():
    """XMoE (ysngki/XMoE main_thresholdGating): l_aux = E * sum_e mean_t(p_te) *
    mean_t(top1_mask_te), the top-1 choice only, however many experts a token uses."""
    # top-1 of each token: 0, 1, 0, 2 -> mean top-1 mask ce = [2, 1, 1] / 4
    # mean_t p = [1.4, 1.4, 1.2] / 4 = [0.35, 0.35, 0.30]
    # 3 * (0.35 * 0.5 + 0.35 * 0.25 + 0.30 * 0.25) = 3 * 0.3375 = 1.0125
    got = xmoe_balance_loss(P_TE, 3)
    assert math.isclose(got.item(), 1.0125, rel_tol=1e-6)
    # The Switch loss over the threshold router's rows differs: at threshold 0.85 the
    # tokens use {0,1}, {0,1,2}, {0,1}, {1,2}: 9 rows, f = [3, 4, 2] / 9, and
    # 3 * (0.35 * 3 + 0.35 * 4 + 0.30 * 2) / 9 = 1.016667.
    ids = torch.tensor([[0, 1, 0], [1, 2, 0], [0, 1, 0], [2, 1, 0]])
    active = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    counts = torch.zeros(3).scatter_add_(0, ids[active], torch.ones(int(active.sum())))
    switch = load_balancing_loss(P_TE, ids, 3, counts_E=counts, num_routed=9)
    assert math.isclose(switch.item(), 3 * 3.05 / 9, rel_tol=1e-6)


def test_xmoe_balance_loss_global_counts_and_gradient():
    # Counts summed over ranks ([1, 2, 1] top-1 choices of T = 4) replace the local ones;
    # the gradient is d/dp_te = E * ce_e / T: 3 * [0.25, 0.5, 0.25] / 4 for every token.
    p = P_TE.clone().requires_grad_(True)
    loss = xmoe_balance_loss(p, 3, counts_E=torch.tensor([1, 2, 1]), num_tokens=4)
    assert math.isclose(loss.item(), 3 * (0.35 * 0.25 + 0.35 * 0.5 + 0.30 * 0.25), rel_tol=1e-6)
    loss.backward()
    assert torch.allclose(p.grad, torch.tensor([[0.1875, 0.375, 0.1875]] * 4))


def test_evomoe_balance_loss_hand_example():
    """EvoMoE (codecaution/EvoMoE topkgate.py): gates = chosen * p, me = mean_t gates,
    ce = mean_t chosen, l_aux = E^2 * mean_e(me_e * ce_e)."""
    chosen = torch.tensor([[1., 1., 0.], [1., 1., 1.], [1., 0., 0.], [0., 0., 1.]])
    gates = P_TE * chosen  # [.6 .3 0], [.2 .5 .3], [.5 0 0], [0 0 .7]
    # me = [1.3, 0.8, 1.0] / 4 = [0.325, 0.2, 0.25]; ce = [3, 2, 2] / 4 = [0.75, 0.5, 0.5]
    # me * ce = [0.24375, 0.1, 0.125], mean 0.15625; 9 * 0.15625 = 1.40625
    g = gates.clone().requires_grad_(True)
    loss = evomoe_balance_loss(g, chosen)
    assert math.isclose(loss.item(), 1.40625, rel_tol=1e-6)
    # The gradient flows through the gates only: d/dg_te = E * ce_e / T = 3 * ce / 4.
    loss.backward()
    assert torch.allclose(g.grad, torch.tensor([[0.5625, 0.375, 0.375]] * 4))
    # Dense: every token on every expert with gates 1/E: me = 1/E, ce = 1 -> E^2 * 1/E = E.
    uniform = torch.full((5, 3), 1 / 3)
    assert math.isclose(evomoe_balance_loss(uniform, torch.ones(5, 3)).item(), 3.0,
                        rel_tol=1e-6)
    # Top-1 at perfect balance (token t on expert t % 3) with gate 0.8: me = 0.8/3,
    # ce = 1/3 -> 9 * mean(0.8 / 9) = 0.8.
    one_hot = torch.eye(3).repeat(2, 1)
    assert math.isclose(evomoe_balance_loss(0.8 * one_hot, one_hot).item(), 0.8,
                        rel_tol=1e-6)
