"""Known answers for the MoE designs of commit e5b6347: Chain-of-Experts rounds (CoE), RMoE's
layerwise recurrent router and CompeteSMoE's competition and schedule.

Each test pins numbers to the reference sheet (/work/shared/reference/architectures.md,
cited as "sheet §n") or to an independent per-token reference written here with plain
torch ops, never to the library's own helpers.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, C chain rounds,
H recurrent router state.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moetrain.config import ConfigError, validate
from moetrain.config.schema import (
    BalanceLoss,
    ChainResidual,
    ChainRouter,
    ExpertBackend,
    ModelConfig,
    MoEConfig,
    RNNCell,
    RouterConfig,
    RouterType,
)
from moetrain.models.moe import routing
from moetrain.models.moe.layer import MoELayer
from moetrain.models.moe.router import CompeteRouter, RecurrentRouter, build_rnn_cell, build_router
from moetrain.models.transformer import Transformer
from tests.conftest import TINY, compose

from ._ref import swiglu

LOOP = ExpertBackend.loop


def _close(actual, expected, atol=1e-5, rtol=0.0):
    torch.testing.assert_close(torch.as_tensor(actual).float(),
                               torch.as_tensor(expected, dtype=torch.float32),
                               atol=atol, rtol=rtol)


# ============================================================================ CoE (sheet §1)
# Sheet §1 writes E_i(x) = (silu(x Wg_i) * (x Wu_i)) Wd_i with Wg, Wu (E, D, F) and Wd (E, F, D);
# our stacked weights act as x W^T, so w1_EFD = Wg^T, w3_EFD = Wu^T, w2_EDF = Wd^T per expert.
WG = torch.tensor([[[1., 0], [0, 1]], [[.5, -.5], [1, 0]], [[0., 1], [1, 1]]])
WU = torch.tensor([[[1., 1], [0, 1]], [[1., 0], [0, 1]], [[-1., 0], [0, 1]]])
WD = torch.tensor([[[1., 0], [0, 1]], [[0., 1], [1, 0]], [[1., 1], [0, -1]]])
R1 = torch.tensor([[1., 0], [0, 1], [1, 1]])
R2 = torch.tensor([[0., 1], [1, 0], [-1, 0]])
X0 = torch.tensor([[1., -0.5]])


def _coe_layer(C=2, chain_router=ChainRouter.per_iteration, residual=None) -> MoELayer:
    mcfg = ModelConfig(dim=2, n_heads=1, num_experts=3, top_k=1, expert_hidden=2)
    moe = MoEConfig(router=RouterConfig(renormalize=False), aux_loss_coef=0.0, z_loss_coef=0.0,
                    chain_iterations=C, chain_router=chain_router, chain_residual=residual,
                    expert_backend=LOOP)
    layer = MoELayer(2, mcfg, moe)
    with torch.no_grad():
        layer.experts.w1_EFD.copy_(WG.transpose(1, 2))
        layer.experts.w3_EFD.copy_(WU.transpose(1, 2))
        layer.experts.w2_EDF.copy_(WD.transpose(1, 2))
        layer.router.gate.weight.copy_(R1)
        for r in layer.chain_routers:
            r.gate.weight.copy_(R2)
    return layer


def _capture(router, store: list):
    return router.register_forward_hook(lambda m, args, out: store.append(out))


def test_coe_single_round_is_the_sheets_first_iteration():
    # C = 1: the default residual is outer (the standard block), so the layer returns the
    # round's MoE output; an explicit inner residual returns x_1 = x_0 + MoE.
    layer = _coe_layer(C=1)
    assert layer.chain_residual == ChainResidual.outer and layer.adds_block_residual
    _close(layer(X0), [[0.399560, -0.051586]])
    _close(_coe_layer(C=1, residual=ChainResidual.inner)(X0), [[1.399560, -0.551586]])


@pytest.mark.parametrize("chain_router,residual,expected,loads", [
    # default flags (residual null -> inner for C > 1): x_2 of the sheet
    (ChainRouter.per_iteration, None, [1.506041, -0.459005], [[1, 0, 0], [0, 1, 0]]),
    (ChainRouter.per_iteration, ChainResidual.inner, [1.506041, -0.459005],
     [[1, 0, 0], [0, 1, 0]]),
    # the sheet's outer value [1.002224, -0.484762] is x_0 + x_2; the layer returns x_2
    (ChainRouter.per_iteration, ChainResidual.outer, [0.002224, 0.015238], None),
    # both: the inner rounds; the block adds h (see the block test)
    (ChainRouter.per_iteration, ChainResidual.both, [1.506041, -0.459005],
     [[1, 0, 0], [0, 1, 0]]),
    # use_igate = false: R_1 scores both rounds
    (ChainRouter.shared, ChainResidual.inner, [2.314007, -0.651085], [[1, 0, 0], [1, 0, 0]]),
])
def test_coe_known_answer(chain_router, residual, expected, loads):
    layer = _coe_layer(chain_router=chain_router, residual=residual)
    assert len(layer.chain_routers) == (1 if chain_router == ChainRouter.per_iteration else 0)
    assert layer.adds_block_residual == (residual in (ChainResidual.outer, ChainResidual.both))
    out = layer(X0)
    _close(out, [expected])
    stats = layer.last_round_stats
    assert len(stats) == 2
    if loads is not None:
        assert [s.load_E.tolist() for s in stats] == loads
    _close(layer.last_stats.load_E, stats[0].load_E + stats[1].load_E, atol=0)
    assert layer.last_stats.num_routed.item() == 2  # C * K rows per token
    assert layer.last_stats.num_tokens.item() == 1


def test_coe_known_answer_per_round_gates():
    # iter1: p = [0.546549, 0.121952, 0.331499] -> expert 0 at g = p_0 (no renormalisation);
    # iter2 (R_2 on x_1): p = [0.118133, 0.831273, 0.050594] -> expert 1 at 0.831273.
    layer = _coe_layer()
    r0, r1 = [], []
    _capture(layer.router, r0)
    _capture(layer.chain_routers[0], r1)
    layer(X0)
    assert len(r0) == 1 and len(r1) == 1
    _close(r0[0].scores_TE, [[0.546549, 0.121952, 0.331499]])
    assert r0[0].ids_TK.tolist() == [[0]]
    _close(r0[0].weights_TK, [[0.546549]])
    _close(r1[0].scores_TE, [[0.118133, 0.831273, 0.050594]])
    assert r1[0].ids_TK.tolist() == [[1]]
    _close(r1[0].weights_TK, [[0.831273]])


# ---------------------------------------------------------------- CoE: dense per-token reference
def _chain_reference(x_TD, gates, w1, w3, w2, K, shared=None, inner=True, renorm=True):
    """Per token, round by round: softmax top-k on x_{t-1} (renormalised), the routed SwiGLU
    experts plus the shared expert, then x_t = [x_{t-1} +] y. ``gates``: one (E, D) weight
    per round. Returns (x_C (T, D), per round (p_TE, ids_TK))."""
    T = x_TD.shape[0]
    rows, rounds = [], [([], []) for _ in gates]
    for t in range(T):
        x = x_TD[t]
        for c, W in enumerate(gates):
            p = torch.softmax(W @ x, dim=-1)
            top = torch.topk(p, K)
            w = top.values / top.values.sum() if (renorm and K > 1) else top.values
            y = torch.zeros_like(x)
            for k, e in enumerate(top.indices.tolist()):
                y = y + w[k] * swiglu(x, w1[e], w3[e], w2[e])
            if shared is not None:
                y = y + swiglu(x, *shared)
            rounds[c][0].append(p)
            rounds[c][1].append(top.indices)
            x = x + y if inner else y
        rows.append(x)
    return torch.stack(rows), [(torch.stack(p), torch.stack(i)) for p, i in rounds]


def _chain_layer(C=3, chain_router=ChainRouter.per_iteration, residual=None, shared=1, aux=0.0,
                 z=0.0, E=4, K=2, D=8, Fh=12, seed=0, balance="switch") -> MoELayer:
    torch.manual_seed(seed)
    mcfg = ModelConfig(dim=D, n_heads=2, num_experts=E, top_k=K, expert_hidden=Fh,
                       n_shared_experts=shared)
    moe = MoEConfig(aux_loss_coef=aux, z_loss_coef=z, chain_iterations=C,
                    chain_router=chain_router, chain_residual=residual, expert_backend=LOOP,
                    balance_loss=balance)
    layer = MoELayer(D, mcfg, moe)
    layer.init_weights(0.4, 0.25)  # experts small enough that C rounds stay moderate
    for r in layer.routers:
        r.init_weights(0.7)  # routing that depends on the inputs
    return layer


def _round_gates(layer: MoELayer, C: int) -> list[torch.Tensor]:
    return [layer.round_router(t).gate.weight for t in range(C)]


@pytest.mark.parametrize("chain_router", list(ChainRouter))
@pytest.mark.parametrize("residual", [ChainResidual.inner, ChainResidual.outer])
def test_coe_layer_equals_dense_per_token_reference(chain_router, residual):
    C = 3
    layer = _chain_layer(C=C, chain_router=chain_router, residual=residual)
    if chain_router == ChainRouter.per_iteration:  # C distinct routers
        gates = _round_gates(layer, C)
        assert len({id(g) for g in gates}) == C
        assert not torch.equal(gates[0], gates[1])
    else:
        assert len(layer.chain_routers) == 0
    x = torch.randn(2, 5, 8)
    out = layer(x)
    ex, sh = layer.experts, layer.shared_experts
    with torch.no_grad():
        ref, rounds = _chain_reference(
            x.reshape(-1, 8), _round_gates(layer, C), ex.w1_EFD, ex.w3_EFD, ex.w2_EDF, 2,
            shared=(sh.w1.weight, sh.w3.weight, sh.w2.weight),
            inner=residual == ChainResidual.inner)
    assert out.shape == x.shape
    _close(out.reshape(-1, 8), ref, atol=1e-5, rtol=1e-5)
    assert len(layer.last_round_stats) == C
    for s, (_, ids) in zip(layer.last_round_stats, rounds):
        assert s.load_E.tolist() == torch.bincount(ids.flatten(), minlength=4).float().tolist()
    total = sum(s.load_E for s in layer.last_round_stats)
    assert torch.equal(layer.last_stats.load_E, total)
    assert layer.last_stats.num_routed.item() == 10 * 2 * C


@pytest.mark.parametrize("chain_router", list(ChainRouter))
def test_coe_every_rounds_balance_loss_is_in_the_injected_aux_gradient(chain_router):
    """With aux_loss_coef = c and a zero output gradient, the parameter gradients are those
    of c * sum_t L_t, L_t the Switch loss of round t (E * sum_e f_e P_e, f over T * K rows):
    round 1's loss reaches round 0's router and the experts through x_1."""
    C, E, K, coef = 2, 4, 2, 0.1
    layer = _chain_layer(C=C, chain_router=chain_router, shared=0, aux=coef)
    x = torch.randn(6, 8)
    out = layer(x)
    out.backward(torch.zeros_like(out))  # the LM loss gives nothing: only the aux term

    # the dense reference, on copies of the weights
    gates = [g.detach().clone().requires_grad_() for g in _round_gates(layer, C)[:len(
        layer.routers)]]
    round_gates = gates if chain_router == ChainRouter.per_iteration else gates * C
    ex = layer.experts
    w = [p.detach().clone().requires_grad_() for p in (ex.w1_EFD, ex.w3_EFD, ex.w2_EDF)]
    _, rounds = _chain_reference(x, round_gates, *w, K)
    losses = []
    for p_TE, ids_TK in rounds:
        f_E = torch.bincount(ids_TK.flatten(), minlength=E).float() / ids_TK.numel()
        losses.append(E * (f_E * p_TE.mean(dim=0)).sum())
    ref_grads = torch.autograd.grad(coef * sum(losses), gates + w, retain_graph=True)

    for s, L in zip(layer.last_round_stats, losses):
        _close(s.aux_loss, L.detach(), atol=1e-6)
    # the layer's logged balance loss is the rounds' mean (1.0 = balanced)
    _close(layer.last_stats.aux_loss, sum(losses).detach() / C, atol=1e-6)
    got = [r.gate.weight.grad for r in layer.routers] + [ex.w1_EFD.grad, ex.w3_EFD.grad,
                                                        ex.w2_EDF.grad]
    for g, r in zip(got, ref_grads):
        _close(g, r, atol=1e-6)
    if chain_router == ChainRouter.per_iteration:
        # the round-1 router sees only its own round's loss, and it is not zero
        g1 = layer.chain_routers[0].gate.weight.grad
        assert g1.abs().max() > 1e-4
        only = torch.autograd.grad(coef * losses[1], gates[1], retain_graph=True)[0]
        _close(g1, only, atol=1e-6)
        # round 0's router also gets round 1's loss through x_1 (not only its own)
        own = torch.autograd.grad(coef * losses[0], gates[0])[0]
        assert (layer.router.gate.weight.grad - own).abs().max() > 1e-6


# ---------------------------------------------------------------- CoE: the block's residual
def _block_model(residual, C=2, seed=0) -> Transformer:
    torch.manual_seed(seed)
    mcfg = ModelConfig(dim=16, n_layers=1, n_heads=2, ffn_hidden=32, max_seq_len=8,
                       num_experts=4, top_k=2, expert_hidden=8, n_shared_experts=1)
    moe = MoEConfig(aux_loss_coef=0.0, z_loss_coef=0.0, chain_iterations=C,
                    chain_residual=residual, expert_backend=LOOP)
    m = Transformer(mcfg, moe, 20)
    m.layers["0"].moe.init_weights(0.4, 0.25)
    for r in m.layers["0"].moe.routers:
        r.init_weights(0.7)  # routing that depends on the inputs
    return m


@pytest.mark.parametrize("residual,adds_h,inner", [
    (None, False, True),  # C > 1 defaults to CoE's flags: out = x_C
    (ChainResidual.inner, False, True),
    (ChainResidual.outer, True, False),
    (ChainResidual.both, True, True),
])
def test_coe_block_output_is_x_C_or_h_plus_x_C(residual, adds_h, inner):
    m = _block_model(residual)
    block = m.layers["0"]
    assert block.moe.adds_block_residual == adds_h
    x = torch.randn(2, 4, 16)
    cos, sin = m.rope_cos[:4], m.rope_sin[:4]
    with torch.no_grad():
        out = block(x, cos, sin)
        h = x + block.attention(block.attention_norm(x), cos, sin)
        u = block.ffn_norm(h)  # x_0: the normalised input
        moe, sh = block.moe, block.moe.shared_experts
        xC, _ = _chain_reference(u.reshape(-1, 16), _round_gates(moe, 2), moe.experts.w1_EFD,
                                 moe.experts.w3_EFD, moe.experts.w2_EDF, 2,
                                 shared=(sh.w1.weight, sh.w3.weight, sh.w2.weight), inner=inner)
    xC = xC.view(2, 4, 16)
    expected = h + xC if adds_h else xC
    _close(out, expected, atol=1e-5, rtol=1e-5)
    other = xC if adds_h else h + xC  # the two are far apart: the check discriminates
    assert (out - other).abs().max() > 0.1


# ============================================================================ RMoE (sheet §2)
def _gru_cell(H=2, cell=RNNCell.gru):
    return build_rnn_cell(RouterConfig(name=RouterType.recurrent, rnn_hidden=H, rnn_cell=cell))


def _sheet_cell():
    """Sheet §2's GRU: W_ir = I, W_hr = I/2, W_iz = [[0,1],[1,0]], W_hz = 0,
    W_in = [[1,1],[0,1]], W_hn = I, biases 0 (torch order r, z, n)."""
    cell = _gru_cell()
    eye = torch.eye(2)
    with torch.no_grad():
        cell.weight_ih.copy_(torch.cat([eye, torch.tensor([[0., 1], [1, 0]]),
                                        torch.tensor([[1., 1], [0, 1]])]))
        cell.weight_hh.copy_(torch.cat([0.5 * eye, torch.zeros(2, 2), eye]))
        cell.bias_ih.zero_()
        cell.bias_hh.zero_()
    return cell


W1_0, W2_0 = torch.tensor([[1., 0, 0], [0, 1, 0]]), torch.tensor([[1., 0], [0, 1], [1, -1]])
W1_1, W2_1 = torch.tensor([[0., 0, 1], [1, 0, 0]]), torch.tensor([[1., 1], [-1, 0], [0, 1]])
U0, U1 = torch.tensor([[1., -1, 0.5]]), torch.tensor([[0.2, 0, -1]])


def _sheet_routers():
    cfg = RouterConfig(name=RouterType.recurrent, rnn_hidden=2, renormalize=True)
    cell = _sheet_cell()
    routers = []
    for W1, W2 in ((W1_0, W2_0), (W1_1, W2_1)):
        r = build_router(3, 3, 2, cfg)
        assert isinstance(r, RecurrentRouter) and not hasattr(r, "gate")
        r.bind_cell(cell)
        with torch.no_grad():
            r.proj.weight.copy_(W1)
            r.head.weight.copy_(W2)
        routers.append(r)
    return routers


def test_rmoe_known_answer_two_layers():
    r0, r1 = _sheet_routers()
    o0 = r0(U0)  # h_{-1} = 0
    _close(o0.state_TH, [[0.0, -0.204824]])
    _close(o0.logits_TE, [[0.0, -0.204824, 0.204824]])
    _close(o0.scores_TE, [[0.32872, 0.267838, 0.403441]])
    assert o0.ids_TK.tolist() == [[2, 0]]
    _close(o0.weights_TK, [[0.551028, 0.448972]])
    o1 = r1(U1, o0.state_TH)
    _close(o1.state_TH, [[-0.298927, 0.012414]])
    _close(o1.logits_TE, [[-0.286513, 0.298927, 0.012414]])
    assert o1.ids_TK.tolist() == [[1, 2]]
    _close(o1.weights_TK, [[0.571142, 0.428858]])
    # without the recurrence (h_prev = 0) layer 1 scores differently
    _close(r1(U1).logits_TE, [[-0.154634, 0.298927, 0.144293]])
    _close(r1(U1, torch.zeros(1, 2)).logits_TE, [[-0.154634, 0.298927, 0.144293]])


def test_rmoe_logits_of_layer_1_depend_on_W1_of_layer_0():
    r0, r1 = _sheet_routers()
    logits1 = r1(U1, r0(U0).state_TH).logits_TE[0]
    jac = torch.stack([torch.autograd.grad(logits1[e], r0.proj.weight, retain_graph=True)[0]
                       for e in range(3)])  # (E, H, D)
    assert jac.abs().max() > 1e-2
    # the autograd entries agree with central differences on W1_0 (float32 router)
    eps = 1e-3
    for h, d in ((0, 0), (1, 1), (1, 0)):
        fd = []
        for sign in (1, -1):
            with torch.no_grad():
                r0.proj.weight[h, d] += sign * eps
                fd.append(r1(U1, r0(U0).state_TH).logits_TE[0])
                r0.proj.weight[h, d] -= sign * eps
        _close(jac[:, h, d], (fd[0] - fd[1]) / (2 * eps), atol=2e-3)


def test_rmoe_moe_layers_hand_the_state_on_and_route_like_the_sheet():
    mcfg = ModelConfig(dim=4, n_heads=2, num_experts=3, top_k=2, expert_hidden=4)
    moe = MoEConfig(router=RouterConfig(name=RouterType.recurrent, rnn_hidden=2),
                    aux_loss_coef=0.0, z_loss_coef=0.0, expert_backend=LOOP)
    torch.manual_seed(0)
    layers = [MoELayer(3, mcfg, moe) for _ in range(2)]
    cell = _sheet_cell()
    for layer, (W1, W2) in zip(layers, ((W1_0, W2_0), (W1_1, W2_1))):
        layer.init_weights(0.5, 0.5)
        layer.router.bind_cell(cell)
        with torch.no_grad():
            layer.router.proj.weight.copy_(W1)
            layer.router.head.weight.copy_(W2)
    layers[0](U0)
    assert layers[0].last_stats.load_E.tolist() == [1.0, 0.0, 1.0]  # top2 = [2, 0]
    state = layers[0].state_out
    _close(state, [[0.0, -0.204824]])
    out1 = layers[1](U1, router_state=state)
    assert layers[1].last_stats.load_E.tolist() == [0.0, 1.0, 1.0]  # top2 = [1, 2]
    _close(layers[1].state_out, [[-0.298927, 0.012414]])
    ex = layers[1].experts
    ref = sum(w * swiglu(U1[0], ex.w1_EFD[e], ex.w3_EFD[e], ex.w2_EDF[e])
              for w, e in ((0.571142, 1), (0.428858, 2)))
    _close(out1[0], ref.detach())


# ---------------------------------------------------------------- RMoE in a Transformer
def _rmoe_model(cell: RNNCell, seed=0) -> Transformer:
    torch.manual_seed(seed)
    # layers 0 and 2 are MoE, layer 1 dense: the state must cross the dense block
    mcfg = ModelConfig(dim=16, n_layers=3, n_heads=2, ffn_hidden=32, max_seq_len=8,
                       num_experts=4, top_k=2, expert_hidden=8, moe_every=2)
    moe = MoEConfig(router=RouterConfig(name=RouterType.recurrent, rnn_hidden=6, rnn_cell=cell),
                    expert_backend=LOOP)
    m = Transformer(mcfg, moe, 20)
    for layer in m.moe_layers():
        layer.router.init_weights(0.5)  # routing that visibly depends on the state
    return m


def _hand_cell(cell: RNNCell, W_ih, W_hh, b_ih, b_hh, x, h):
    if cell == RNNCell.rnn:
        return torch.tanh(x @ W_ih.T + b_ih + h @ W_hh.T + b_hh)
    (W_ir, W_iz, W_in), (W_hr, W_hz, W_hn) = W_ih.chunk(3), W_hh.chunk(3)
    (b_ir, b_iz, b_in), (b_hr, b_hz, b_hn) = b_ih.chunk(3), b_hh.chunk(3)
    r = torch.sigmoid(x @ W_ir.T + b_ir + h @ W_hr.T + b_hr)
    z = torch.sigmoid(x @ W_iz.T + b_iz + h @ W_hz.T + b_hz)
    n = torch.tanh(x @ W_in.T + b_in + r * (h @ W_hn.T + b_hn))
    return (1 - z) * n + z * h


@pytest.mark.parametrize("cell", list(RNNCell))
def test_rmoe_transformer_matches_a_hand_recurrence(cell):
    m = _rmoe_model(cell)
    assert m.layers["0"].moe_enabled and not m.layers["1"].moe_enabled
    assert m.layers["2"].moe_enabled
    moes = m.moe_layers()
    assert isinstance(m.router_rnn, torch.nn.GRUCell if cell == RNNCell.gru
                      else torch.nn.RNNCell)
    if cell == RNNCell.rnn:
        assert m.router_rnn.nonlinearity == "tanh"
    calls = []
    for layer in moes:
        layer.router.register_forward_hook(lambda mod, args, out: calls.append((mod, args, out)))
    m.train()
    logits = m(torch.randint(0, 20, (2, 5)))
    assert [c[0] for c in calls] == [layer.router for layer in moes]
    rnn = m.router_rnn
    h = torch.zeros(10, 6)
    for i, (router, args, out) in enumerate(calls):
        x_TD, state_TH = args
        if i == 0:
            assert state_TH is None  # h_0 = 0 at the first MoE layer
        else:  # the previous MoE layer's state, unchanged through the dense block
            assert state_TH is calls[i - 1][2].state_TH
        with torch.no_grad():
            h = _hand_cell(cell, rnn.weight_ih, rnn.weight_hh, rnn.bias_ih, rnn.bias_hh,
                           x_TD @ router.proj.weight.T, h)
            _close(out.state_TH, h, atol=1e-6)
            _close(out.logits_TE, h @ router.head.weight.T, atol=1e-6)
    # the last MoE layer's logits depend on the first MoE layer's projection W1
    last = calls[-1][2].logits_TE
    v = torch.randn_like(last)
    g = torch.autograd.grad((last * v).sum(), moes[0].router.proj.weight, retain_graph=True)[0]
    assert g.abs().max() > 1e-4
    # and a plain LM loss trains the shared cell
    logits.float().logsumexp(-1).mean().backward()
    assert rnn.weight_hh.grad is not None and rnn.weight_hh.grad.abs().max() > 0


def test_rmoe_routers_share_one_cell_saved_once():
    m = _rmoe_model(RNNCell.gru)
    moes = m.moe_layers()
    assert len(moes) == 2
    assert all(layer.router.cell is m.router_rnn for layer in moes)
    sd = m.state_dict()
    rnn_keys = sorted(k for k in sd if "router_rnn" in k)
    assert rnn_keys == ["router_rnn.bias_hh", "router_rnn.bias_ih", "router_rnn.weight_hh",
                        "router_rnn.weight_ih"]
    assert not [k for k in sd if "cell" in k]  # the routers do not register the cell
    ids = [id(p) for p in m.parameters()]
    assert ids.count(id(m.router_rnn.weight_ih)) == 1
    # per-layer parts: W1 (H, D) and W2 (E, H), no D -> E gate
    assert sd["layers.0.moe.router.proj.weight"].shape == (6, 16)
    assert sd["layers.2.moe.router.head.weight"].shape == (4, 6)
    assert "layers.0.moe.router.gate.weight" not in sd
    assert m.boundary_dim == 16 + 6


def test_rmoe_state_crosses_a_pipeline_stage_boundary():
    """split_model: stage 0 (layers 0, 1) hands (hidden, state) as one (B, S, D + H) tensor;
    stage 1 (layer 2) picks the state up. The chain equals the whole model, each stage binds
    its own copy of the cell, and the last layer's logits still reach layer 0's W1."""
    from moetrain.parallel.pipeline import split_model

    m = _rmoe_model(RNNCell.gru)
    tokens = torch.randint(0, 20, (2, 5))
    ref = m(tokens)
    first, last = split_model(m, [0, 2], [0, 1])
    for part in (first, last):
        assert part.router_rnn is not None
        assert all(layer.router.cell is part.router_rnn for layer in part.moe_layers())
    torch.testing.assert_close(first.router_rnn.weight_hh, last.router_rnn.weight_hh)
    mid = first(tokens)
    assert mid.shape == (2, 5, 16 + 6)
    seen = []
    last.layers["2"].moe.router.register_forward_hook(lambda mod, args, out: seen.append(args))
    out = last(mid)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # the state layer 2 received is the state columns of the boundary tensor
    torch.testing.assert_close(seen[0][1], mid[..., 16:].reshape(10, 6), rtol=0, atol=0)
    assert seen[0][1].abs().max() > 0
    g = torch.autograd.grad(out.float().logsumexp(-1).sum(),
                            first.layers["0"].moe.router.proj.weight)[0]
    assert g.abs().max() > 0


# ============================================================================ CompeteSMoE (sheet §4)
def _compete_layer(E=4, K=2, D=8, Fh=12, shared=0, seed=0, **router_kw):
    """A moe/router=compete layer in train mode that competes on every forward (force)."""
    torch.manual_seed(seed)
    mcfg = ModelConfig(dim=D, n_heads=1, num_experts=E, top_k=K, expert_hidden=Fh,
                       n_shared_experts=shared)
    rcfg = RouterConfig(name=RouterType.compete, **router_kw)
    layer = MoELayer(D, mcfg, MoEConfig(router=rcfg, expert_backend=LOOP))
    layer.init_weights(0.5, 0.5)
    assert isinstance(layer.router, CompeteRouter)
    layer.router.force = True
    layer.train()
    return layer


# sheet §4: one token, E = 3, k = 2, expert outputs O given directly, logits l = [0, 1, 0.5]
O_SHEET = torch.tensor([[1., -1], [2, 0], [-1, -2]])
GATE_SHEET = torch.tensor([[0., 0], [1, 0], [0.5, 0]])  # x = [1, 0] -> l = [0, 1, 0.5]
X_SHEET = torch.tensor([[1., 0]])


def _sheet_compete_layer(**router_kw):
    layer = _compete_layer(E=3, K=2, D=2, Fh=2, **router_kw)
    with torch.no_grad():
        layer.router.gate.weight.copy_(GATE_SHEET)
    # the experts' outputs of the sheet, (E, T, D), in place of the dense expert pass
    layer.dispatcher.dense = lambda x_TD, experts: O_SHEET[:, None, :] + 0 * x_TD.sum()
    return layer


def test_compete_known_answer_from_the_sheet():
    layer = _sheet_compete_layer()
    out = layer(X_SHEET)
    assert layer.competed
    # a = [0.813262, 1.410038, 0.220095] -> S = [1, 0], w = [0.634210, 0.365790]
    _close(out, [[1.634210, -0.365790]])
    lc = layer.last_compete
    _close(lc["router_loss"], 0.011259223, atol=1e-7)
    _close(lc["diversity_loss"], 0.353553, atol=1e-6)
    # L_bc = E * sum_e mean_t softmax(a)_te * frac(top1 == e): top-1 is expert 1
    _close(lc["balance_loss"], 3 * 0.539135, atol=1e-5)
    assert layer.last_stats.load_E.tolist() == [1.0, 1.0, 0.0]
    # hybrid: plus theta * the MSE at the picks (0.006639992)
    hyb = _sheet_compete_layer(compete_hybrid=True, compete_theta=0.1)
    hyb(X_SHEET)
    _close(hyb.last_compete["router_loss"], 0.011259223 + 0.1 * 0.006639992, atol=1e-7)
    # the router step on the same logits: S = [1, 2], w = [0.622459, 0.377541]
    r = layer.router(X_SHEET)
    assert r.ids_TK.tolist() == [[1, 2]]
    _close(r.weights_TK, [[0.622459, 0.377541]])
    _close(r.weights_TK[0] @ O_SHEET[[1, 2]], [0.867378, -0.755081])


def _compete_reference(x_TD, Wg, w1, w3, w2, K, shared=None, hybrid=False, theta=0.1):
    """Independent CompeteSMoE competition step: every expert on every token, neural
    response a_te = mean_d softplus(o_te), top-k by a weighted a_S / sum a_S; the router MSE,
    the diversity (signed cosine, diagonal zero, mean over T*K*K) and the top-1 balance loss
    on softmax(a)."""
    T = x_TD.shape[0]
    E = w1.shape[0]
    o_TED = torch.stack([torch.stack([swiglu(x_TD[t], w1[e], w3[e], w2[e]) for e in range(E)])
                         for t in range(T)])
    a_TE = F.softplus(o_TED).mean(dim=-1)
    top, ids = torch.topk(a_TE, K, dim=-1)
    w_TK = top / top.sum(dim=-1, keepdim=True)
    y = torch.stack([sum(w_TK[t, k] * o_TED[t, ids[t, k]] for k in range(K)) for t in range(T)])
    if shared is not None:
        y = y + torch.stack([swiglu(x_TD[t], *shared) for t in range(T)])
    gate_TE = torch.softmax(x_TD @ Wg.T, dim=-1)
    target_TE = torch.softmax(a_TE, dim=-1).detach()
    router = ((gate_TE - target_TE) ** 2).mean()
    if hybrid:
        router = router + theta * ((gate_TE.gather(1, ids) - target_TE.gather(1, ids)) ** 2).mean()
    div = 0.0
    for t in range(T):
        for i in range(K):
            for j in range(K):
                if i != j:
                    div = div + F.cosine_similarity(o_TED[t, ids[t, i]], o_TED[t, ids[t, j]],
                                                    dim=0)
    div = div / (T * K * K)
    aff_TE = torch.softmax(a_TE, dim=-1)
    frac_E = torch.bincount(ids[:, 0], minlength=E).float() / T
    balance = E * (aff_TE.mean(dim=0) * frac_E).sum()
    return y, ids, router, div, balance


COEFS = {"compete_router_coef": 0.3, "compete_diversity_coef": 0.2, "compete_balance_coef": 0.1}


@pytest.mark.parametrize("hybrid", [False, True])
def test_compete_step_matches_independent_reference_forward_and_backward(hybrid):
    layer = _compete_layer(shared=1, compete_hybrid=hybrid, compete_theta=0.25, **COEFS)
    assert layer.aux_loss_coef > 0 and layer.z_loss_coef > 0  # recipe: not used on this step
    x = torch.randn(2, 3, 8, requires_grad=True)
    out = layer(x)
    assert layer.competed
    ex, sh, gate = layer.experts, layer.shared_experts, layer.router.gate
    params = [gate.weight, ex.w1_EFD, ex.w3_EFD, ex.w2_EDF, sh.w1.weight, sh.w3.weight,
              sh.w2.weight]
    copies = [p.detach().clone().requires_grad_() for p in params]
    x_ref = x.detach().clone().requires_grad_()
    y, ids, router, div, bal = _compete_reference(x_ref.reshape(-1, 8), copies[0], *copies[1:4],
                                                  2, shared=tuple(copies[4:]), hybrid=hybrid,
                                                  theta=0.25)
    _close(out.reshape(-1, 8), y.detach())
    lc = layer.last_compete
    _close(lc["router_loss"], router.detach(), atol=1e-7)
    _close(lc["diversity_loss"], div.detach(), atol=1e-6)
    _close(lc["balance_loss"], bal.detach(), atol=1e-6)
    assert layer.last_stats.load_E.tolist() == torch.bincount(
        ids.flatten(), minlength=4).float().tolist()
    assert layer.last_stats.num_routed.item() == 6 * 4  # every expert ran on every token
    # backward: the LM loss plus the injected c_r * L_router + c_d * L_div + c_b * L_bc
    g = torch.randn_like(out)
    (out * g).sum().backward()
    total = ((y * g.reshape(-1, 8)).sum() + COEFS["compete_router_coef"] * router
             + COEFS["compete_diversity_coef"] * div + COEFS["compete_balance_coef"] * bal)
    total.backward()
    for p, c in zip(params, copies):
        _close(p.grad, c.grad, atol=1e-5)
    _close(x.grad, x_ref.grad, atol=1e-5)


def test_compete_gate_gets_gradient_only_from_the_router_mse():
    layer = _compete_layer(**COEFS)
    x = torch.randn(6, 8)
    out = layer(x)
    assert layer.competed
    out.pow(2).sum().backward()  # an LM loss, plus the injected aux
    W = layer.router.gate.weight.detach().clone().requires_grad_()
    with torch.no_grad():
        ex = layer.experts
        o_ETD = torch.stack([torch.stack([swiglu(x[t], ex.w1_EFD[e], ex.w3_EFD[e],
                                                 ex.w2_EDF[e]) for t in range(6)])
                             for e in range(4)])
        target = torch.softmax(F.softplus(o_ETD).mean(-1).T, dim=-1)
    mse = ((torch.softmax(x @ W.T, dim=-1) - target) ** 2).mean()
    (expected,) = torch.autograd.grad(COEFS["compete_router_coef"] * mse, W)
    assert expected.abs().max() > 1e-6
    _close(layer.router.gate.weight.grad, expected, atol=1e-7)
    # with c_r = 0 the gate learns nothing on a competition step
    silent = _compete_layer(**{**COEFS, "compete_router_coef": 0.0})
    silent(x).pow(2).sum().backward()
    gw = silent.router.gate.weight.grad
    assert gw is None or torch.count_nonzero(gw) == 0


def _top1_total(layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    """[top-1 counts by neural response (E), T] of ``x_TD``, by hand."""
    ex = layer.experts
    with torch.no_grad():
        a_TE = torch.stack([torch.stack([F.softplus(swiglu(x, ex.w1_EFD[e], ex.w3_EFD[e],
                                                           ex.w2_EDF[e])).mean()
                                         for e in range(layer.num_experts)]) for x in x_TD])
    top1 = torch.bincount(a_TE.argmax(-1), minlength=layer.num_experts)
    return torch.cat([top1, top1.new_full((1,), x_TD.shape[0])])


def test_compete_step_sequence_shards_mean_to_the_whole_micro_batch():
    """Under parallel.tp=2 with expert_tp=ep each rank competes on its sequence shard, and
    the layer's loss is the mean of the ranks' (moetrain/parallel/tensor.py). The router MSE
    and the diversity are per-token means: equal shards average to the whole batch."""
    layer = _compete_layer(**COEFS)
    x = torch.randn(8, 8)
    layer(x)
    whole = dict(layer.last_compete)
    ranks = []
    for s in x.chunk(2):
        layer(s)
        ranks.append(dict(layer.last_compete))
    for name in ("router_loss", "diversity_loss"):
        _close((ranks[0][name] + ranks[1][name]) / 2, whole[name], atol=1e-6)


def test_compete_balance_loss_uses_the_count_reducer_over_sequence_shards():
    """Under tp sequence shards the competition balance term counts the micro-batch's
    top-1 picks (the layer's count_reducer), so the mean of the shards' losses is the
    whole micro-batch's."""
    layer = _compete_layer(**COEFS)
    x = torch.randn(8, 8)
    layer(x)
    whole = layer.last_compete["balance_loss"]
    shards = x.chunk(2)
    totals = [_top1_total(layer, s) for s in shards]
    per_rank = []
    for r, s in enumerate(shards):
        other = totals[1 - r]  # the tp sum of [counts, T], as count_all_reducer gives it
        layer.count_reducer = lambda total, other=other: total + other
        layer(s)
        per_rank.append(layer.last_compete["balance_loss"])
    _close((per_rank[0] + per_rank[1]) / 2, whole, atol=1e-6)


def _topk_twin(layer: MoELayer) -> MoELayer:
    """A moe/router=topk layer with the compete layer's weights and training losses."""
    mcfg = ModelConfig(dim=8, n_heads=1, num_experts=4, top_k=2, expert_hidden=12)
    moe = MoEConfig(router=RouterConfig(name=RouterType.topk), expert_backend=LOOP,
                    aux_loss_coef=layer.aux_loss_coef, z_loss_coef=layer.z_loss_coef,
                    balance_loss=layer.balance_loss)
    twin = MoELayer(8, mcfg, moe)
    twin.load_state_dict(layer.state_dict(), strict=True)
    twin.train()
    return twin


def test_compete_router_steps_equal_a_topk_layer():
    layer = _compete_layer()
    layer.router.force = False
    assert layer.balance_loss == BalanceLoss.xmoe  # the recipe's top-1 loss
    twin = _topk_twin(layer)
    x = torch.randn(2, 5, 8)
    out, ref = layer(x), twin(x)
    assert not layer.competed
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    _close(layer.last_stats.aux_loss, twin.last_stats.aux_loss, atol=0)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    for (name, p), q in zip(layer.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-7, rtol=0, msg=name)
    # the router step's balance is XMoE's top-1 loss: E * sum_e mean_t p_te * frac(top1 = e)
    p_TE = torch.softmax(x.reshape(-1, 8) @ layer.router.gate.weight.detach().T, dim=-1)
    frac = torch.bincount(p_TE.argmax(-1), minlength=4).float() / 10
    _close(layer.last_stats.aux_loss, 4 * (p_TE.mean(0) * frac).sum(), atol=1e-6)


def test_compete_never_competes_in_eval_or_without_grad():
    layer = _compete_layer()  # force=True
    twin = _topk_twin(layer)
    x = torch.randn(6, 8)
    layer.eval()
    twin.eval()
    torch.testing.assert_close(layer(x), twin(x), atol=0, rtol=0)
    assert not layer.competed and not layer.router.competes()
    layer.train()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), twin(x), atol=0, rtol=0)
        assert not layer.competed
    layer(x)
    assert layer.competed  # the same layer, training with grad: it competes


def test_compete_follows_the_schedule_through_the_routing_context():
    """force=None: the router competes at the schedule's (step, layer) pairs. rate 1 with
    warm-up 0.2 of 10 steps and one layer per step: layer 0 competes on steps 2..9, layer 1
    never."""
    torch.manual_seed(0)
    mcfg = ModelConfig(dim=8, n_layers=2, n_heads=2, ffn_hidden=16, max_seq_len=8,
                       num_experts=4, top_k=2, expert_hidden=8)
    rcfg = RouterConfig(name=RouterType.compete, compete_rate=1.0, compete_warmup=0.2,
                        max_compete_layers=1)
    m = Transformer(mcfg, MoEConfig(router=rcfg, expert_backend=LOOP), 20)
    m.train()
    moes = m.moe_layers()
    assert [layer.router.moe_layer_ids for layer in moes] == [(0, 1), (0, 1)]
    tokens = torch.randint(0, 20, (1, 4))
    seen = {}
    for step in range(10):
        for layer in moes:
            layer.router.context.set_step(0, step)
            layer.router.context.total_steps = 10
        m(tokens)
        seen[step] = [layer.competed for layer in moes]
    assert seen == {s: [s >= 2, False] for s in range(10)}


# ---------------------------------------------------------------- compete_schedule
SCHEDULE = routing.compete_schedule.__wrapped__  # uncached: draws patched below


def _patch_draws(monkeypatch, flags: dict[int, set[int]], start: int = 0):
    """keyed_uniform for the schedule: 0 at the steps each layer flags, 0.99 elsewhere."""
    seen = []

    def fake(steps, seed, layer, salt):
        seen.append((steps.tolist(), layer))
        u = torch.full(steps.shape, 0.99)
        for s in flags.get(layer, ()):
            u[s - start] = 0.0
        return u

    monkeypatch.setattr(routing, "keyed_uniform", fake)
    return seen


@pytest.mark.parametrize("flags,max_layers,expected", [
    # layer 1's flag at 2 (full) moves left to 1; at 3 (full) left past its own 1 to 0;
    # at 5 it fits. Left first, though 4 is free on the right.
    ({0: {2, 3}, 1: {2, 3, 5}}, 1, {0: {2, 3}, 1: {0, 1, 5}}),
    # no room on the left: to the right, skipping a step it already took
    ({0: {0, 1, 2, 3}, 1: {0, 3}}, 1, {0: {0, 1, 2, 3}, 1: {4, 5}}),
    # no room anywhere: dropped
    ({0: {0, 1, 2, 3, 4, 5}, 1: {3}}, 1, {0: {0, 1, 2, 3, 4, 5}, 1: set()}),
    # max 2: layer 2's flag at 0 moves right to 1, then its own draw at 1 lands there
    # directly (the reference does not check its moved flags on a direct placement): one
    ({0: {0}, 1: {0}, 2: {0, 1}}, 2, {0: {0}, 1: {0}, 2: {1}}),
])
def test_compete_schedule_cap_and_shift_hand_worked(monkeypatch, flags, max_layers, expected):
    _patch_draws(monkeypatch, flags)
    layers = tuple(sorted(flags))
    pairs = SCHEDULE(7, 6, layers, 0.5, 0.0, max_layers)
    got = {layer: {s for s, lay in pairs if lay == layer} for layer in layers}
    assert got == expected
    per_step = [sum(1 for s, _ in pairs if s == step) for step in range(6)]
    assert max(per_step) <= max_layers


def test_compete_schedule_warmup_steps_never_compete_and_bound_the_left_shift(monkeypatch):
    # total 10, warm-up 0.3: steps 0..2 never compete and are not even drawn; layer 1's
    # flag at step 3 (full) cannot move left into the warm-up: it goes right to 4.
    seen = _patch_draws(monkeypatch, {0: {3, 5}, 1: {3}}, start=3)
    pairs = SCHEDULE(0, 10, (0, 1), 0.5, 0.3, 1)
    assert pairs == frozenset({(3, 0), (5, 0), (4, 1)})
    assert seen == [(list(range(3, 10)), 0), (list(range(3, 10)), 1)]


def test_compete_schedule_with_rate_one_fills_the_cap():
    # rate 1: every step flags for every layer; layers 0 and 1 take steps 2..9, and layer 2
    # finds no free step.
    pairs = routing.compete_schedule(0, 10, (0, 1, 2), 1.0, 0.2, 2)
    assert pairs == frozenset((s, lay) for s in range(2, 10) for lay in (0, 1))
    pairs = routing.compete_schedule(3, 10, (0, 1), 1.0, 0.0, 1)
    assert pairs == frozenset((s, 0) for s in range(10))
    # warm-up covering the run, or rate 0: nothing
    assert routing.compete_schedule(0, 10, (0, 1), 1.0, 1.0, 2) == frozenset()
    assert routing.compete_schedule(0, 10, (0, 1), 0.0, 0.0, 2) == frozenset()


def test_compete_schedule_rate_and_purity():
    n = 4000
    pairs = routing.compete_schedule(11, n, (0, 1), 0.3, 0.0, 2)  # cap 2: nothing moves
    for layer in (0, 1):
        freq = sum(1 for _, lay in pairs if lay == layer) / n
        assert abs(freq - 0.3) < 0.03, (layer, freq)
    # pure in its arguments: the same set uncached, and another seed draws other steps
    assert SCHEDULE(11, n, (0, 1), 0.3, 0.0, 2) == pairs
    other = routing.compete_schedule(12, n, (0, 1), 0.3, 0.0, 2)
    assert other != pairs
    # the draws of layer 0 do not depend on which other layers exist
    alone = routing.compete_schedule(11, n, (0,), 0.3, 0.0, 2)
    assert alone == frozenset(p for p in pairs if p[1] == 0)


# ============================================================================ validation
@pytest.mark.parametrize("overrides,world,words", [
    (["moe.chain_iterations=0"], 1, ["moe.chain_iterations=0", ">= 1"]),
    (["moe.chain_iterations=2", "moe/router=recurrent"], 1,
     ["moe.chain_iterations=2", "moe.router.name=recurrent", "moe.chain_iterations=1"]),
    (["moe/router=compete", "moe.router.compete_rate=1.5"], 1,
     ["moe.router.compete_rate=1.5", "[0, 1]"]),
    (["parallel.tp=2", "parallel.expert_tp=etp", "moe/router=recurrent"], 2,
     ["moe.router.name=recurrent", "parallel.expert_tp=etp", "parallel.expert_tp=ep"]),
    (["parallel.tp=2", "parallel.expert_tp=etp", "moe.chain_iterations=2"], 2,
     ["moe.chain_iterations=2", "parallel.expert_tp=etp", "parallel.expert_tp=ep"]),
    (["moe/router=compete", "moe.router.score_func=sigmoid"], 1,
     ["moe.router.score_func=sigmoid", "moe.router.name=compete", "softmax"]),
    (["moe.chain_iterations=2", "moe/router=aux_free"], 1,
     ["moe.chain_iterations=2", "moe.router.bias_update_rate", "bias_update_rate=0"]),
])
def test_bad_architecture_configs_name_the_field(overrides, world, words):
    with pytest.raises(ConfigError) as e:
        validate(compose(TINY + overrides + ["run.dir=/tmp/x"]), world)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("overrides", [
    ["moe.chain_iterations=2"],
    ["moe/router=recurrent", "moe.router.rnn_cell=rnn"],
    ["moe/router=compete"],
])
def test_good_architecture_configs_validate(overrides):
    cfg = compose(TINY + overrides + ["run.dir=/tmp/x"])
    assert validate(cfg, 1).tp == 1


def test_coe_takes_its_recipe_in_a_chain():
    """A top-k router in a chain trains on CoE's recipe (the per-sequence balance loss at
    1e-3 in every round, no z-loss) unless the config sets the losses; one round is
    plain top-k's recipe."""
    from moetrain.config.recipes import recipe_name, recipe_values

    chain = MoEConfig(chain_iterations=2)
    assert recipe_name(chain.router, chain.chain_iterations) == "coe"
    v = recipe_values(chain)
    assert (v["balance_loss"], v["aux_loss_coef"], v["z_loss_coef"]) == ("seq", 1e-3, 0.0)
    assert recipe_values(MoEConfig())["balance_loss"] == "switch"
    layer = MoELayer(8, ModelConfig(dim=8, n_heads=2, num_experts=4, top_k=2,
                                    expert_hidden=12), chain)
    assert (layer.balance_loss, layer.aux_loss_coef, layer.z_loss_coef) == ("seq", 1e-3, 0.0)


def test_the_step_logs_the_competition_terms_averaged_over_competing_forwards():
    """metrics.jsonl's compete/router_mse, compete/diversity and compete/balance: the raw
    terms of the step's competing forwards, averaged; competed_layers counts the layers."""
    from moetrain.train.moe_stats import MoEStatsTracker

    layer = _compete_layer(**COEFS)
    tracker = MoEStatsTracker([layer], torch.device("cpu"), num_experts=4, compete=True)
    seen = []
    for seed in (1, 2):  # two micro-batches of one step
        layer(torch.randn(8, 8, generator=torch.Generator().manual_seed(seed)))
        seen.append(dict(layer.last_compete))
        tracker.accumulate()
    out = tracker.reduce(None, 1)
    assert out["competed_layers"] == 1.0
    for key, name in (("compete/router_mse", "router_loss"), ("compete/diversity",
                                                             "diversity_loss"),
                      ("compete/balance", "balance_loss")):
        want = (seen[0][name] + seen[1][name]).item() / 2
        assert out[key] == pytest.approx(want, rel=1e-6)
    layer.router.force = False  # a routed step: nothing competed, the terms are 0
    layer(torch.randn(8, 8))
    tracker.accumulate()
    out = tracker.reduce(None, 1)
    assert out["competed_layers"] == 0 and out["compete/router_mse"] == 0
