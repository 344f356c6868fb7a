import math

import torch

from moetrain.models.moe.losses import load_balancing_loss, router_entropy, z_loss


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
