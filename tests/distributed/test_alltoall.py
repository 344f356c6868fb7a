"""The all-to-all dispatcher against the single-device reference, on 2 gloo ranks:
same outputs and gradients, exactly the routed rows on the wire (no padding), an EP
rank whose experts receive zero tokens, every capacity drop policy, and inactive slots
(variable-k routing)."""

from __future__ import annotations

import torch

from moetrain.config.schema import DropPolicy
from moetrain.testing import run_distributed

E, D, F, T, K = 4, 8, 12, 6, 2


def _problem(rank: int, inactive: bool = False):
    """Per-rank tokens and hand-made routing: every row goes to experts 0 or 1, so the
    experts of EP rank 1 (2 and 3) receive zero tokens from every rank. With ``inactive``,
    some slots are switched off (their weights are NaN: they must never be read)."""
    g = torch.Generator().manual_seed(100 + rank)
    x_TD = torch.randn(T, D, generator=g)
    ids_TK = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0], [0, 1], [0, 1]])
    if rank == 1:
        ids_TK = ids_TK.flip(0)
    weights_TK = torch.rand(T, K, generator=g)
    active_TK = None
    if inactive:
        active_TK = torch.tensor([[True, False], [True, True], [False, False], [True, True],
                                  [False, True], [True, True]]).roll(rank, 0)
        weights_TK[~active_TK] = float("nan")
    return x_TD, ids_TK, weights_TK, active_TK


def _weights():
    g = torch.Generator().manual_seed(7)
    return tuple(0.3 * torch.randn(shape, generator=g) for shape in ((E, F, D), (E, F, D), (E, D, F)))


def _ep_rank(rank: int, world: int, cases):
    """Each case (capacity, drop policy, inactive) through the all-to-all dispatcher."""
    import torch.distributed as dist

    from moetrain.config.schema import ExpertBackend
    from moetrain.models.moe.dispatcher import AllToAllDispatcher
    from moetrain.models.moe.experts import GroupedExperts

    out = []
    for capacity, policy, inactive in cases:
        x_TD, ids_TK, w_TK, active_TK = _problem(rank, inactive)
        x_TD.requires_grad_(True)
        w_TK.requires_grad_(True)
        e = E // world
        experts = GroupedExperts(e, D, F, ExpertBackend.loop)
        full = _weights()
        with torch.no_grad():
            for p, w in zip((experts.w1_EFD, experts.w3_EFD, experts.w2_EDF), full):
                p.copy_(w[rank * e:(rank + 1) * e])
        disp = AllToAllDispatcher(E, dist.group.WORLD, capacity, drop_policy=policy)
        x_RD, meta = disp.dispatch(x_TD, ids_TK, w_TK, active_TK)
        y_TD = disp.combine(experts(x_RD, meta.tokens_per_expert), meta)
        (y_TD * torch.arange(1.0, D + 1)).sum().backward()
        out.append({
            "y": y_TD.detach(), "dx": x_TD.grad, "dw": w_TK.grad,
            "dW": [p.grad for p in (experts.w1_EFD, experts.w3_EFD, experts.w2_EDF)],
            "sent": sum(meta.in_splits), "received": x_RD.shape[0],
            "tokens_per_expert": meta.tokens_per_expert.tolist(),
            "num_dropped": int(meta.num_dropped),
        })
    return out


def _reference(world: int, capacity, policy, inactive):
    from moetrain.config.schema import ExpertBackend
    from moetrain.models.moe.dispatcher import LocalDispatcher
    from moetrain.models.moe.experts import GroupedExperts

    experts = GroupedExperts(E, D, F, ExpertBackend.loop)
    with torch.no_grad():
        for p, w in zip((experts.w1_EFD, experts.w3_EFD, experts.w2_EDF), _weights()):
            p.copy_(w)
    out = []
    for rank in range(world):  # each rank's micro-batch is dispatched on its own
        x_TD, ids_TK, w_TK, active_TK = _problem(rank, inactive)
        x_TD.requires_grad_(True)
        w_TK.requires_grad_(True)
        disp = LocalDispatcher(E, capacity, drop_policy=policy)
        x_RD, meta = disp.dispatch(x_TD, ids_TK, w_TK, active_TK)
        y_TD = disp.combine(experts(x_RD, meta.tokens_per_expert), meta)
        (y_TD * torch.arange(1.0, D + 1)).sum().backward()
        out.append({"y": y_TD.detach(), "dx": x_TD.grad, "dw": w_TK.grad,
                    "num_dropped": int(meta.num_dropped)})
    return out, [p.grad for p in (experts.w1_EFD, experts.w3_EFD, experts.w2_EDF)]


def _check(cases):
    """Run every case on 2 ranks (one spawn) and hold each to the LocalDispatcher."""
    world = 2
    got_all = run_distributed(_ep_rank, world, cases)
    e = E // world
    for i, case in enumerate(cases):
        ref, ref_dW = _reference(world, *case)
        for rank in range(world):
            got = got_all[rank][i]
            assert got["num_dropped"] == ref[rank]["num_dropped"], case
            for k in ("y", "dx", "dw"):
                torch.testing.assert_close(got[k], ref[rank][k], rtol=1e-5, atol=1e-5)
            for g, r in zip(got["dW"], ref_dW):
                torch.testing.assert_close(g, r[rank * e:(rank + 1) * e], rtol=1e-5, atol=1e-5)
    return [[got_all[rank][i] for rank in range(world)] for i in range(len(cases))]


def test_dropless_matches_reference_without_padding_and_empty_rank():
    (got,) = _check([(None, DropPolicy.probs, False)])
    # Dropless: each rank sends exactly its T*K routed rows, no padding.
    assert [g["sent"] for g in got] == [T * K, T * K]
    # Rank 0 holds experts 0 and 1 and receives every row; rank 1's experts get none.
    assert got[0]["received"] == 2 * T * K and got[1]["received"] == 0
    assert got[1]["tokens_per_expert"] == [0, 0]
    assert all(float(w.abs().sum()) == 0.0 for w in got[1]["dW"])  # zero tokens, zero grads


def test_capacity_matches_reference_with_fixed_size_exchange():
    # capacity 1.0: C = ceil(6*2/4) = 3 rows per expert per source; experts 0 and 1 get 6
    # rows each from every rank, so 3 of 6 are dropped per expert.
    (got,) = _check([(1.0, DropPolicy.position, False)])
    assert [g["sent"] for g in got] == [E * 3, E * 3]  # fixed size, whatever the routing
    assert [g["num_dropped"] for g in got] == [6, 6]


def test_drop_policies_and_inactive_slots_match_reference():
    policies = list(DropPolicy)
    cases = [(1.0, p, False) for p in policies]
    cases += [(None, DropPolicy.probs, True)] + [(1.0, p, True) for p in policies]
    got = _check(cases)
    n = len(policies)
    # The policies keep different rows here, so each really reached the dispatcher.
    ys = {p: got[i][0]["y"] for i, p in enumerate(policies)}
    distinct = [DropPolicy.probs, DropPolicy.slot, DropPolicy.position]  # differ here
    for i, a in enumerate(distinct):
        for b in distinct[i + 1:]:
            assert not torch.equal(ys[a], ys[b]), (a, b)
    # Inactive slots, dropless: only the 8 active rows are sent, none dropped.
    dropless_inactive = got[n]
    assert [g["sent"] for g in dropless_inactive] == [8, 8]
    assert [g["num_dropped"] for g in dropless_inactive] == [0, 0]
    assert dropless_inactive[0]["received"] == 16
    for case in got[n:]:
        for g in case:
            assert not g["y"].isnan().any() and not g["dw"].isnan().any()
