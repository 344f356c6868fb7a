"""Tutel's adaptive capacity (``moe.capacity_factor`` <= 0) on one process.

- The known-answer case of Tutel's ``extract_critical`` (T=8, E=4, k=2): the capacity
  for factors 0 and < 0, the rows kept (Tutel's slot locations below C, with GShard's
  ``slot`` policy, the order Tutel uses) and the rows dropped, worked by hand.
- Factor 0 gives exactly the dropless layer (output and gradients), with C the largest
  expert load; a factor -c gives the fixed-capacity layer with C = min(load, nominal)
  computed by hand.
- It costs one host read per call; the config refuses it where it means nothing; the
  memory estimator's worst case C = T is what the dispatcher reaches.
"""

from __future__ import annotations

import math

import pytest
import torch

from moetrain.config import ConfigError, validate
from moetrain.config.schema import (
    CapacityRule,
    DispatchMode,
    DropPolicy,
    ExpertBackend,
    KernelBackend,
    ModelConfig,
    MoEConfig,
    RouterConfig,
    RouterType,
    ScoreFunc,
)
from moetrain.models.moe.dispatcher import LocalDispatcher, expert_capacity
from moetrain.models.moe.layer import MoELayer
from tests._host_reads import HostReads
from tests.conftest import TINY, compose, needs

# ----------------------------------------------------------------------------- known answer
# Tutel's reference case: token t's first choice TOP1[t], second choice TOP2[t].
TOP1 = [0, 0, 0, 1, 0, 2, 0, 1]
TOP2 = [1, 2, 1, 0, 3, 0, 2, 3]
IDS_TK = torch.tensor([TOP1, TOP2]).T.contiguous()  # (T=8, K=2)
# Tutel's slot locations: first choices count up per expert over the tokens; second
# choices start after the expert's first choices. Per-expert load [7, 4, 3, 2].
LOC1 = [0, 1, 2, 0, 3, 0, 4, 1]
LOC2 = [2, 1, 3, 5, 0, 6, 2, 1]
LOAD = [7, 4, 3, 2]

# factor -> (C, rows dropped). Ours: nominal = ceil(c * T * K / E) = ceil(4 c);
# Tutel's: k * int(c * ceil(T / E)) = 2 * int(2 c). Both give 2, 4 and 8 at c = 0.5, 1
# and 2; at c = 0.75 ours is ceil(3) = 3 and Tutel's 2 * int(1.5) = 2.
#   0     -> C = max load = 7, nothing dropped
#   -0.5  -> min(7, 2) = 2: drops 7-2 + 4-2 + 3-2 + 0 = 8 (Tutel: 3 first + 5 second)
#   -0.75 -> min(7, 3) = 3: drops 4 + 1 + 0 + 0 = 5
#   -1    -> min(7, 4) = 4: drops 3 + 0 + 0 + 0 = 3 (Tutel's cf=1.0: 1 first + 2 second)
#   -2    -> min(7, 8) = 7: nothing dropped
SLOTS_CASES = {0.0: (7, 0), -0.5: (2, 8), -0.75: (3, 5), -1.0: (4, 3), -2.0: (7, 0)}
# capacity_rule=tokens: nominal = max(ceil(c * T / E), 4) = max(ceil(2 c), 4) = 4 here.
TOKENS_CASES = {0.0: (7, 0), -0.5: (4, 3), -2.0: (4, 3), -3.0: (6, 1)}


@pytest.mark.parametrize("cf", list(SLOTS_CASES))
def test_tutel_known_answer_capacity_and_kept_slots(cf):
    C, dropped = SLOTS_CASES[cf]
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    w = torch.rand(8, 2, generator=torch.Generator().manual_seed(1))
    d = LocalDispatcher(4, cf, drop_policy=DropPolicy.slot)
    x_RD, meta = d.dispatch(x, IDS_TK, w)
    assert meta.rows_per_expert == C and x_RD.shape == (4 * C, 4)
    assert int(meta.num_dropped) == dropped
    # Kept exactly where Tutel's location is below the capacity.
    want_TK = torch.tensor([LOC1, LOC2]).T < C
    assert torch.equal(meta.kept_TK, want_TK)
    assert meta.kept_per_expert.tolist() == [min(n, C) for n in LOAD]


def test_nominal_capacities_by_hand():
    """Our nominal capacity (the cap of a negative factor) against the hand values above,
    and where Tutel's k * int(c * ceil(T / E)) differs."""
    assert [expert_capacity(8, 2, 4, c) for c in (0.5, 0.75, 1.0, 2.0)] == [2, 3, 4, 8]
    assert [2 * int(c * math.ceil(8 / 4)) for c in (0.5, 0.75, 1.0, 2.0)] == [2, 2, 4, 8]
    assert [expert_capacity(8, 2, 4, c, CapacityRule.tokens) for c in (0.5, 2.0, 3.0)] == [
        4, 4, 6]


@pytest.mark.parametrize("cf", list(TOKENS_CASES))
def test_tokens_rule_caps_with_its_own_nominal_capacity(cf):
    C, dropped = TOKENS_CASES[cf]
    d = LocalDispatcher(4, cf, drop_policy=DropPolicy.slot, capacity_rule=CapacityRule.tokens)
    _, meta = d.dispatch(torch.randn(8, 4), IDS_TK, torch.rand(8, 2))
    assert (meta.rows_per_expert, int(meta.num_dropped)) == (C, dropped)


def test_inactive_slots_are_not_load():
    """Variable-k routing: an inactive slot is never routed, so it adds no load."""
    active_TK = torch.ones(8, 2, dtype=torch.bool)
    active_TK[[0, 1, 2, 4], 0] = False  # four of expert 0's seven rows: load [3, 4, 3, 2]
    d = LocalDispatcher(4, 0.0)
    _, meta = d.dispatch(torch.randn(8, 4), IDS_TK, torch.rand(8, 2), active_TK)
    assert meta.rows_per_expert == 4 and int(meta.num_dropped) == 0
    assert meta.kept_per_expert.tolist() == [3, 4, 3, 2]


# ----------------------------------------------------------------------------- MoE layer
D, F, E, K, T = 16, 32, 4, 2, 32


def _layer(dispatch: DispatchMode, cf: float, router=RouterType.topk,
           policy=DropPolicy.probs, kernel=KernelBackend.torch) -> MoELayer:
    torch.manual_seed(0)
    mcfg = ModelConfig(dim=D, n_heads=2, num_experts=E, top_k=K, expert_hidden=F)
    rcfg = RouterConfig(name=router, score_func=ScoreFunc.softmax, threshold=0.6)
    moe_cfg = MoEConfig(router=rcfg, dispatch=dispatch, capacity_factor=cf,
                        expert_backend=ExpertBackend.loop, drop_policy=policy,
                        kernel_backend=kernel, aux_loss_coef=0.01, z_loss_coef=0.001)
    layer = MoELayer(D, mcfg, moe_cfg)
    layer.init_weights(0.5, 0.5)
    return layer


def _x(skew: float = 0.0, n: int = 12) -> torch.Tensor:
    """(2, T/2, D); ``skew`` pushes the first ``n`` tokens toward expert 0."""
    x = torch.randn(2, T // 2, D, generator=torch.Generator().manual_seed(1))
    if skew:
        w0 = _layer(DispatchMode.dropless, 1.0).router.gate.weight[0].detach()
        x.view(T, D)[:n] += skew * w0 / w0.norm()
    return x


def _run(layer: MoELayer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_()
    out = layer(x)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view(out.shape))
    grads = {"out": out.detach(), "x": x.grad}
    grads.update({n: p.grad for n, p in layer.named_parameters()})
    return grads


def _loads(layer: MoELayer, x: torch.Tensor) -> list[int]:
    """Active rows routed to each expert, counted here with bincount."""
    with torch.no_grad():
        r = layer.router(x.reshape(-1, D))
    ids = r.ids_TK if r.active_TK is None else r.ids_TK[r.active_TK]
    return torch.bincount(ids.reshape(-1), minlength=E).tolist()


def _capacity_used(layer: MoELayer) -> list[int]:
    """Record the C of every adaptive dispatch of ``layer`` (a wrapper on its method)."""
    seen, inner = [], layer.dispatcher.adaptive_capacity

    def record(*args, **kwargs):
        seen.append(inner(*args, **kwargs))
        return seen[-1]

    layer.dispatcher.adaptive_capacity = record
    return seen


def _max_rel(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    return max(float((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-30))
               for k in want)


@pytest.mark.parametrize("router,policy,kernel", [
    (RouterType.topk, DropPolicy.probs, KernelBackend.torch),
    (RouterType.threshold, DropPolicy.slot, KernelBackend.torch),  # inactive slots
    pytest.param(RouterType.topk, DropPolicy.probs, KernelBackend.triton,
                 marks=[needs("triton")]),  # the routing kernels, interpreted on the CPU
])
def test_factor_zero_is_the_dropless_layer(router, policy, kernel, monkeypatch):
    """cf=0: C = the largest expert load, nothing dropped, and the layer's output and
    gradients are the dropless layer's (within 1e-6; measured max 0 on CPU float32)."""
    if kernel == KernelBackend.triton:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = _x(skew=3.0)
    layer = _layer(DispatchMode.capacity, 0.0, router, policy, kernel)
    seen = _capacity_used(layer)
    got = _run(layer, x)
    want = _run(_layer(DispatchMode.dropless, 1.25, router, policy), x)
    loads = _loads(layer, x)
    assert seen == [max(loads)] and max(loads) > T * K // E  # skewed: C above the mean
    assert int(layer.last_stats.num_dropped) == 0
    err = _max_rel(got, want)
    print(f"cf=0 vs dropless ({router.value}, {kernel.value}): max rel diff {err:.1e}")
    assert err <= 1e-6


def test_negative_factor_is_the_fixed_capacity_with_the_hand_capacity():
    """cf=-c: C = min(largest load L, ceil(c * T * K / E)). With c = 1.5 the cap (24) is
    above the skewed L (C = L, every row kept); with c = 0.75 it is below (C = 12, rows
    dropped). Either way the layer equals the fixed-capacity layer whose factor gives
    that C."""
    x = _x(skew=3.0)
    loads = _loads(_layer(DispatchMode.dropless, 1.0), x)
    L = max(loads)
    assert sum(loads) == T * K and 12 < L < 24  # the two caps fall on either side of L
    for c, C in ((1.5, L), (0.75, 12)):
        assert C == min(L, math.ceil(c * T * K / E))
        layer = _layer(DispatchMode.capacity, -c)
        seen = _capacity_used(layer)
        got = _run(layer, x)
        fixed = _layer(DispatchMode.capacity, C * E / (T * K))  # ceil(C - 1e-9) = C
        want = _run(fixed, x)
        assert seen == [C]
        assert int(layer.last_stats.num_dropped) == sum(max(0, n - C) for n in loads)
        assert int(layer.last_stats.num_dropped) == int(fixed.last_stats.num_dropped)
        for name in want:  # the same C, the same code path: bit for bit
            assert torch.equal(got[name], want[name]), (c, name)


def test_adaptive_capacity_reads_c_once_per_call():
    """cf>0 reads nothing (tests/unit/models/test_no_host_sync.py); cf<=0 reads C once
    per layer call, in the forward, and nothing in the backward."""
    for cf in (0.0, -1.0):
        layer = _layer(DispatchMode.capacity, cf)
        x = _x().requires_grad_()
        with HostReads() as fwd:
            out = layer(x)
        with HostReads() as bwd:
            out.sum().backward()
        assert fwd.reads == ["aten._local_scalar_dense.default"], (cf, fwd.reads)
        assert bwd.reads == [], (cf, bwd.reads)


# ----------------------------------------------------------------------------- config
def test_config_accepts_adaptive_factors_only_with_capacity_dispatch():
    for cf in (0.0, -1.5):
        cfg = compose(TINY + ["moe.dispatch=capacity", f"moe.capacity_factor={cf}"])
        validate(cfg, 1)
        assert cfg.moe.capacity_factor == cf
    with pytest.raises(ConfigError, match=r"moe\.capacity_factor=0\.0 is invalid: .*"
                                          r"moe\.dispatch=capacity"):
        compose(["moe.dispatch=dropless", "moe.capacity_factor=0"])
    with pytest.raises(ConfigError, match=r"moe\.capacity_factor=nan is invalid: must be "
                                          r"a finite number"):
        MoEConfig(dispatch=DispatchMode.capacity, capacity_factor=float("nan"))
    with pytest.raises(ConfigError, match=r"moe\.capacity_factor=inf"):
        LocalDispatcher(4, float("inf"))


def test_capacity_schedule_refuses_an_adaptive_factor():
    cfg = compose(TINY + ["moe.dispatch=capacity", "moe.capacity_factor=0",
                          "schedule=capacity"])
    with pytest.raises(ConfigError, match=r"schedule=capacity with "
                                          r"moe\.capacity_factor=0\.0: .* schedule=none"):
        validate(cfg, 1)
    cfg = compose(TINY + ["moe.dispatch=capacity", "moe.capacity_factor=1.0",
                          "schedule=capacity"])
    validate(cfg, 1)  # a positive end value anneals as before


# ----------------------------------------------------------------------------- memory
def test_memory_estimate_takes_the_worst_case_the_dispatcher_reaches():
    """The estimator's rows for cf=0 are E x T (C = T: every token's K experts are
    distinct, so one expert gets at most T rows), for cf=-c E x min(T, nominal); the
    dispatcher reaches E x T when every token picks expert 0."""
    from moetrain.parallel.memory import _layer_acts

    base = TINY + ["moe.dispatch=capacity"]
    Tm, Dm, Em, Km = 2 * 32, 32, 4, 2  # micro-batch 2 x seq 32; TINY's dim, E, top-k
    rows = {}
    for cf in ("0", "-0.5", "-4"):
        cfg = compose(base + [f"moe.capacity_factor={cf}"])
        acts, rows[cf] = _layer_acts(cfg, validate(cfg, 1), 0, Tm, "cpu", 1.0)
        assert acts["experts_in"] == 4 * rows[cf] * Dm  # float32 rows
    assert rows == {"0": Em * Tm, "-0.5": Em * math.ceil(0.5 * Tm * Km / Em),
                    "-4": Em * Tm}  # -4: nominal 128 > T, so T
    ids_TK = torch.stack([torch.zeros(Tm, dtype=torch.long),
                          torch.arange(Tm) % (Em - 1) + 1], dim=1)  # expert 0 + another
    x_RD, meta = LocalDispatcher(Em, 0.0).dispatch(torch.randn(Tm, Dm), ids_TK,
                                                   torch.rand(Tm, Km))
    assert meta.rows_per_expert == Tm and x_RD.shape[0] == rows["0"]


def test_compiled_layer_breaks_once_and_does_not_recompile_per_capacity():
    """``parallel.compile`` compiles blocks without ``fullgraph``: the capacity read is a
    graph break (``torch.compiler.disable``), and after the first change of C dynamo
    treats it as a dynamic size, so new capacities reuse the graphs. The compiled layer
    gives the eager layer's output and gradients."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    layer = _layer(DispatchMode.capacity, 0.0)
    eager = _layer(DispatchMode.capacity, 0.0)
    layer.compile(backend="eager")
    seen = []
    graphs = []
    for n in (0, 12, 20, 8, 16, 28):
        x = _x(6.0, n)
        got, want = _run(layer, x), _run(eager, x)
        assert _max_rel(got, want) <= 1e-6
        seen.append(max(_loads(eager, x)))
        graphs.append(counters["stats"]["unique_graphs"])
    print(f"capacities {seen}, graphs after each call {graphs}")
    assert len(set(seen)) >= 4, seen  # the capacity changed from call to call
    assert graphs[-1] == graphs[1], (seen, graphs)  # no graph after the first change of C
    assert counters["graph_break"], "the capacity read is a graph break"
    torch._dynamo.reset()
