"""HMoE's ragged experts (model.expert_sizes): the size-class layer against a per-token
loop of per-expert SwiGLUs of their own sizes, the zero-padded reference (exact, and its
padding stays exactly zero under AdamW), the even per-class EP placement, the
size-weighted balance loss and the FLOP / memory accounting, on hand numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moetrain.config.schema import ConfigError, ExpertBackend
from moetrain.models.moe.dispatcher import LocalDispatcher
from moetrain.models.moe.experts import (
    RaggedExperts,
    build_routed_experts,
    class_slot_order,
    size_classes,
)
from moetrain.models.moe.losses import load_balancing_loss, size_weighted_balance_loss
from tests.conftest import TINY, compose

SIZES = [32, 16, 32, 64, 16, 16, 32, 64]  # three classes, interleaved ids
D, T, K = 16, 24, 2


def install_ragged_shim(monkeypatch=None) -> None:
    """Build ragged experts in MoELayer until layer.py does it itself (the layer patch in
    the HMoE report: ``build_routed_experts`` and a slot-ordered LocalDispatcher). A no-op
    once the layer builds RaggedExperts. With ``monkeypatch`` it is undone after the test."""
    from moetrain.models.moe import layer as L

    if getattr(L.MoELayer.__init__, "_hmoe_shim", False):
        return
    orig = L.MoELayer.__init__

    def init(self, dim, model_cfg, moe_cfg):
        orig(self, dim, model_cfg, moe_cfg)
        if model_cfg.expert_sizes is not None and not isinstance(self.experts, RaggedExperts):
            self.experts = build_routed_experts(dim, model_cfg, moe_cfg)
            d = self.dispatcher
            self.dispatcher = LocalDispatcher(d.num_experts, d.capacity_factor, d.kernel_backend,
                                              d.drop_policy, d.capacity_rule,
                                              self.experts.expert_order)

    init._hmoe_shim = True
    if monkeypatch is not None:
        monkeypatch.setattr(L.MoELayer, "__init__", init)
    else:
        L.MoELayer.__init__ = init


def _expert_weights(ex: RaggedExperts, e: int):
    c = ex.class_hidden.index(ex.sizes[e])
    s = ex.class_members[c].index(e)
    g = ex.classes[c]
    return g.w1_EFD[s], g.w3_EFD[s], g.w2_EDF[s]


def _routing(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    w, ids = torch.softmax(torch.randn(T, len(SIZES), generator=g), -1).topk(K)
    return x, ids, w


def test_size_classes_and_slot_order_hand_case():
    assert size_classes(SIZES) == ([16, 32, 64], [[1, 4, 5], [0, 2, 6], [3, 7]])
    assert class_slot_order(SIZES) == [1, 4, 5, 0, 2, 6, 3, 7]
    # Placement: 4 small then 4 large experts over ep=2. Contiguous ids would give rank 0
    # 4 x 16 and rank 1 4 x 32 hidden units; the per-class split gives each 2 + 2.
    sizes = [16, 16, 16, 16, 32, 32, 32, 32]
    order = class_slot_order(sizes, ep=2)
    assert order == [0, 1, 4, 5, 2, 3, 6, 7]
    per_rank = [sum(sizes[e] for e in order[j * 4:(j + 1) * 4]) for j in range(2)]
    assert per_rank == [96, 96]
    assert class_slot_order(sizes, ep=4) == [0, 4, 1, 5, 2, 6, 3, 7]


@pytest.mark.parametrize("backend", [ExpertBackend.loop, ExpertBackend.grouped_mm])
def test_ragged_layer_matches_per_token_loop(backend):
    """Dispatch by slot -> one grouped GEMM per size class -> combine equals
    sum_k w_tk SwiGLU_{e_tk}(x_t) with each expert's own (F_e, D) weights, forward and
    every weight gradient."""
    torch.manual_seed(0)
    ex = RaggedExperts(SIZES, D, backend)
    ex.init_weights(0.2, 0.2)
    x, ids, w = _routing()
    d = LocalDispatcher(len(SIZES), expert_order=ex.expert_order)
    x_RD, meta = d.dispatch(x, ids, w)
    y = d.combine(ex(x_RD, meta.tokens_per_expert), meta)
    ref = torch.zeros(T, D)
    for t in range(T):
        for k in range(K):
            w1, w3, w2 = _expert_weights(ex, int(ids[t, k]))
            ref[t] = ref[t] + w[t, k] * ((F.silu(x[t] @ w1.T) * (x[t] @ w3.T)) @ w2.T)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    params = list(ex.parameters())
    g_got = torch.autograd.grad(y.square().sum(), params)
    g_ref = torch.autograd.grad(ref.square().sum(), params)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # counts per slot: class 16 = experts 1, 4, 5 first
    counts_E = torch.bincount(ids.flatten(), minlength=8)
    assert meta.tokens_per_expert.tolist() == counts_E[ex.expert_order].tolist()


def test_dense_step_returns_experts_in_id_order():
    """A dense step (CompeteSMoE) runs every expert on every token; the slot-ordered
    dispatcher hands the outputs back by expert id."""
    torch.manual_seed(1)
    ex = RaggedExperts(SIZES, D)
    ex.init_weights(0.2, 0.2)
    x = torch.randn(5, D)
    o_ETD = LocalDispatcher(8, expert_order=ex.expert_order).dense(x, ex)
    for e in range(8):
        w1, w3, w2 = _expert_weights(ex, e)
        torch.testing.assert_close(o_ETD[e], (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T)


def test_zero_padding_is_exact_and_stays_zero_under_adamw():
    """The padded reference (E, F_max, D) with the ragged weights copied in computes the
    same outputs; every gradient on the padding is exactly 0 and AdamW with weight decay
    leaves the padding exactly 0."""
    torch.manual_seed(2)
    ragged = RaggedExperts(SIZES, D)
    ragged.init_weights(0.2, 0.2)
    padded = RaggedExperts(SIZES, D, padded=True)
    padded.init_weights(0.2, 0.2)
    pad = padded.padded
    mask_EF = padded.pad_mask_EF()
    assert ((pad.w1_EFD * (1 - mask_EF)[:, :, None]) == 0).all()  # zero at init
    with torch.no_grad():
        for e, f in enumerate(SIZES):
            w1, w3, w2 = _expert_weights(ragged, e)
            pad.w1_EFD[e, :f] = w1
            pad.w3_EFD[e, :f] = w3
            pad.w2_EDF[e, :, :f] = w2
    x, ids, w = _routing(3)

    def run(ex):
        d = LocalDispatcher(8, expert_order=ex.expert_order)
        x_RD, meta = d.dispatch(x, ids, w)
        return d.combine(ex(x_RD, meta.tokens_per_expert), meta)

    torch.testing.assert_close(run(padded), run(ragged), rtol=1e-6, atol=1e-7)
    opt = torch.optim.AdamW(padded.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        run(padded).square().sum().backward()
        off = (1 - mask_EF).bool()
        assert (pad.w1_EFD.grad[off] == 0).all() and (pad.w2_EDF.grad.transpose(1, 2)[off] == 0).all()
        opt.step()
    off = (1 - mask_EF).bool()
    for p in (pad.w1_EFD, pad.w3_EFD):
        assert (p.detach()[off] == 0).all()
    assert (pad.w2_EDF.detach().transpose(1, 2)[off] == 0).all()
    assert pad.w1_EFD.detach()[mask_EF.bool()].abs().min() > 0  # the real weights moved


def test_size_weighted_balance_loss_hand_numbers():
    """E=2, T=2: P = [0.5, 0.5]; f = [3, 1] / 4; sizes [1, 3] (mean 2) weight f by
    [0.5, 1.5]: loss = 2 * (0.75 * 0.5 * 0.5 + 0.25 * 1.5 * 0.5) = 0.75, and
    d loss / d p_te = E f_e F_e / mean(F) / T = [0.375, 0.375]."""
    scores = torch.tensor([[0.75, 0.25], [0.25, 0.75]], requires_grad=True)
    counts = torch.tensor([3, 1])
    loss = size_weighted_balance_loss(scores, counts, 4, [1, 3])
    assert loss.item() == pytest.approx(0.75)
    (g,) = torch.autograd.grad(loss, scores)
    torch.testing.assert_close(g, torch.full((2, 2), 0.375))
    # equal sizes: the Switch loss
    ids = torch.tensor([[0], [0]])
    sw = load_balancing_loss(scores, ids, 2, counts_E=counts, num_routed=4)
    assert size_weighted_balance_loss(scores, counts, 4, [5, 5]).item() == pytest.approx(sw.item())


def test_flop_accounting_hand_numbers():
    from moetrain.metrics.flops import (
        expert_flop_shares,
        flop_imbalance,
        flops_per_token_at_k,
        mean_expert_hidden,
        rank_flop_shares,
        routed_hidden,
    )

    load = torch.tensor([[2.0, 2.0, 4.0, 0.0]])
    sizes = [1, 3, 1, 3]
    # tokens x F = [2, 6, 4, 0] of 12
    torch.testing.assert_close(expert_flop_shares(load, sizes),
                               torch.tensor([[2, 6, 4, 0]], dtype=torch.float64) / 12)
    assert flop_imbalance(load, sizes).item() == pytest.approx(6 / 12 * 4)
    assert flop_imbalance(load, None).item() == pytest.approx(4 / 8 * 4)  # rows only
    # ranks of 2 experts, placement [0, 2 | 1, 3]: rank 0 does 6/12, rank 1 6/12
    torch.testing.assert_close(rank_flop_shares(load, sizes, [0, 2, 1, 3], 2),
                               torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    assert routed_hidden(load, sizes) == pytest.approx(12 / 8)
    assert mean_expert_hidden(7, sizes) == 2 and mean_expert_hidden(7, None) == 7
    # counted at k=2, F=2; measured: k=2 rows of F=1.5: 18 D L (2 * 1.5 - 2 * 2) less
    assert flops_per_token_at_k(1e6, 2, 2, 3, 10, 2.0, 1.5) == pytest.approx(1e6 - 18 * 10 * 3)
    assert flops_per_token_at_k(1e6, 2, 3, 3, 10, 2.0) == pytest.approx(1e6 + 18 * 10 * 3 * 2)


def _cfg(*extra):
    return compose([o for o in TINY if not o.startswith("model.num_experts")]
                   + ["model.num_experts=4", *extra])


def test_memory_estimator_counts_ragged_parameters(monkeypatch):
    """Per-rank parameters of the ragged model: 3 D sum(F) expert weights per MoE layer,
    split evenly by class over ep=2 (exact, from the real model on meta)."""
    install_ragged_shim(monkeypatch)
    from moetrain.config.validate import resolve_layout
    from moetrain.parallel.memory import model_params

    sizes = "[16,48,16,48]"
    cfg = _cfg(f"model.expert_sizes={sizes}")
    uni = _cfg("model.expert_hidden=32")
    V = 257
    ragged_ex = sum(p.numel for p in model_params(cfg, V) if p.expert)
    uni_ex = sum(p.numel for p in model_params(uni, V) if p.expert)
    L = sum(cfg.model.is_moe_layer(i) for i in range(cfg.model.n_layers))
    assert ragged_ex == L * 3 * 32 * 128 == uni_ex  # sum F = 128 = 4 x 32
    assert {p.name.split("moe.experts.")[1] for p in model_params(cfg, V) if p.expert} >= {
        "classes.0.w1_EFD", "classes.1.w2_EDF"}
    from moetrain.parallel.memory import _rank_numel
    from moetrain.parallel.mesh import ParallelDims

    lay = resolve_layout(cfg.parallel.__class__(dp=2, ep=2), 2, 4)
    dims = ParallelDims.from_layout(lay)
    experts = [p for p in model_params(cfg, V) if p.expert]
    held = set(range(-1, cfg.model.n_layers + 1))
    # ep=2, edp=1: each rank holds one 16 and one 48 expert of every layer, unsharded
    assert [_rank_numel(experts, cfg, lay, held, dims.coords(r))[0] for r in range(2)] == [
        ragged_ex // 2, ragged_ex // 2]


def test_validation_and_refusals():
    from moetrain.checkpoint.upcycle import UpcycleError, refuse_ragged
    from moetrain.config.validate import validate

    # counts 3 and 1 do not divide by ep=2: those experts are split along F, so their
    # sizes must be multiples of 2, and the dispatch dropless
    validate(_cfg("model.expert_sizes=[16,16,16,48]", "parallel.ep=2"), 2)
    with pytest.raises(ConfigError, match=r"model.expert_sizes=\[16, 16, 16, 49\] with "
                                          r"parallel.ep=2.*sizes \[49\] are not multiples of 2"):
        validate(_cfg("model.expert_sizes=[16,16,16,49]", "parallel.ep=2"), 2)
    with pytest.raises(ConfigError, match=r"splits the experts of sizes \[16, 48\].*"
                                          r"moe.dispatch=dropless"):
        validate(_cfg("model.expert_sizes=[16,16,16,48]", "parallel.ep=2",
                      "moe.dispatch=capacity"), 2)
    validate(_cfg("model.expert_sizes=[16,48,16,48]", "parallel.ep=2"), 2)
    with pytest.raises(ConfigError, match="moe.balance_loss=size_weighted with model.expert_sizes=null"):
        validate(_cfg("moe.balance_loss=size_weighted"), 1)
    with pytest.raises(UpcycleError, match="model.expert_sizes"):
        refuse_ragged(_cfg("model.expert_sizes=[16,48,16,48]").model)
