"""Annealing and dense-to-sparse schedules (moetrain/train/callbacks/schedules.py,
dense_to_sparse.py; the DTS router in moetrain/models/moe/router.py).

Known answers come from the reference page (docs: /work/shared/reference section 7-8)
and EvoMoE's own schedule formulas (fairseq_cli/train.py). Resume runs hold every
schedule to the uninterrupted per-step losses and values.

Legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from moetrain.checkpoint.state import _fill_fresh_state
from moetrain.config.schema import (
    Anneal,
    ConfigError,
    ExpertBackend,
    GateActivation,
    ModelConfig,
    MoEConfig,
    RouterConfig,
    RouterType,
    ScoreFunc,
    SpawnOptimizer,
)
from moetrain.metrics import flops_per_token_at_k, read_metrics
from moetrain.models.moe.layer import MoELayer
from moetrain.models.moe.router import DTSPhase, DTSRouter, build_router
from moetrain.models.moe.routing import keyed_uniform
from moetrain.train.callbacks import (
    EvoMoECallback,
    TemperatureSchedule,
    TopKSchedule,
    default_callbacks,
    spawn_experts,
)
from moetrain.train.callbacks.schedules import anneal, anneal_int
from moetrain.train.main import run
from moetrain.train.trainer import Trainer
from tests.conftest import compose


# ----------------------------------------------------------------------------- known answers
def _evomoe_linear(t, hi, lo, D):  # fairseq_cli/train.py, linear decay
    return max(hi - t * (hi - lo) / D, lo)


def _evomoe_exp(t, hi, lo, D):  # fairseq_cli/train.py, exponential decay
    return max(hi * math.exp(t * math.log(lo / hi) / D), lo)


def test_linear_temperature_known_answers():
    assert anneal(Anneal.linear, 2.0, 0.5, 0, 5000) == 2.0
    assert anneal(Anneal.linear, 2.0, 0.5, 2500, 5000) == 1.25
    assert anneal(Anneal.linear, 2.0, 0.5, 5000, 5000) == 0.5
    assert anneal(Anneal.linear, 2.0, 0.5, 7000, 5000) == 0.5
    for t in range(0, 6001, 250):
        assert anneal(Anneal.linear, 2.0, 0.5, t, 5000) == pytest.approx(
            _evomoe_linear(t, 2.0, 0.5, 5000), rel=1e-12)


def test_exp_temperature_known_answers():
    for hi, lo, D in ((2.0, 0.5, 5000), (10.0, 0.01, 50_000)):
        assert anneal(Anneal.exp, hi, lo, D, D) == lo  # exactly the end value
        assert anneal(Anneal.exp, hi, lo, D // 2, D) == pytest.approx(math.sqrt(hi * lo),
                                                                      rel=1e-12)
        for t in range(0, D + 1, D // 20):
            assert anneal(Anneal.exp, hi, lo, t, D) == pytest.approx(
                _evomoe_exp(t, hi, lo, D), rel=1e-12)
    assert anneal(Anneal.exp, 2.0, 0.5, 2500, 5000) == pytest.approx(1.0, rel=1e-12)


def test_cosine_known_answers():
    assert anneal(Anneal.cosine, 2.0, 0.5, 0, 100) == 2.0
    assert anneal(Anneal.cosine, 2.0, 0.5, 50, 100) == pytest.approx(1.25, rel=1e-12)
    # (1 + cos(pi/4)) / 2 of the way from end to start at a quarter
    assert anneal(Anneal.cosine, 2.0, 0.5, 25, 100) == pytest.approx(
        0.5 + 1.5 * (1 + math.sqrt(0.5)) / 2, rel=1e-12)
    assert anneal(Anneal.cosine, 2.0, 0.5, 100, 100) == 0.5


def test_integer_k_rounds_toward_the_start():
    # linear 8 -> 2 over 12 steps: k(t) = ceil(8 - t/2)
    assert [anneal_int(Anneal.linear, 8, 2, t, 12) for t in range(14)] == [
        math.ceil(8 - t / 2) for t in range(12)] + [2, 2]
    # increasing: floor; end value exactly from step N on
    assert [anneal_int(Anneal.linear, 1, 4, t, 6) for t in range(8)] == [1, 1, 2, 2, 3, 3, 4, 4]
    # exp 64 -> 8 over 3 steps: 64 * (1/8)^(t/3) = 64, 32, 16, 8 (exact powers)
    assert [anneal_int(Anneal.exp, 64, 8, t, 3) for t in range(4)] == [64, 32, 16, 8]


def test_flops_follow_the_active_k():
    # 6 * 3 D F per routed expert, MoE layer and token: D=8, F=4, 2 MoE layers
    assert flops_per_token_at_k(1000.0, 2, 5, 2, 8, 4) == 1000.0 + 6 * 3 * 8 * 4 * 2 * 3
    assert flops_per_token_at_k(1000.0, 2, 2, 2, 8, 4) == 1000.0
    assert flops_per_token_at_k(1000.0, 2, 1.5, 2, 8, 4) == 1000.0 - 6 * 3 * 8 * 4 * 2 * 0.5


# ----------------------------------------------------------------------------- gates
X = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))


def _router(cfg: RouterConfig, E: int = 4, K: int = 2):
    torch.manual_seed(1)
    r = build_router(X.shape[1], E, K, cfg)
    r.init_weights(1.0)
    return r


@pytest.mark.parametrize("tau", [2.0, 0.7, 1.0 / 3.0])
def test_dts_gate_without_activation_is_the_plain_temperature_softmax(tau):
    r = _router(RouterConfig(score_func=ScoreFunc.softmax))
    TemperatureSchedule(Anneal.linear, tau, tau, 1).apply([_Layer(r)], 0)
    out = r(X)
    logits = X @ r.gate.weight.T
    assert torch.equal(out.logits_TE, logits / tau)  # bit for bit, python-float division
    assert torch.equal(out.scores_TE, torch.softmax(logits / tau, dim=-1))


@pytest.mark.parametrize("act,fn", [(GateActivation.tanh, torch.tanh),
                                    (GateActivation.sigmoid, torch.sigmoid),
                                    (GateActivation.gelu, torch.nn.functional.gelu)])
def test_dts_gate_activation_before_the_temperature(act, fn):
    r = _router(RouterConfig(score_func=ScoreFunc.softmax, renormalize=False))
    TemperatureSchedule(Anneal.linear, 0.5, 0.5, 1, act).apply([_Layer(r)], 0)
    out = r(X)
    probs = torch.softmax(fn(X @ r.gate.weight.T) / 0.5, dim=-1)
    torch.testing.assert_close(out.scores_TE, probs, rtol=1e-6, atol=0)
    top = probs.topk(2, dim=-1)
    assert torch.equal(out.ids_TK, top.indices)
    torch.testing.assert_close(out.weights_TK, top.values, rtol=1e-6, atol=0)


class _Layer:  # what a schedule's apply() touches: the router (and the dispatcher)
    def __init__(self, router) -> None:
        self.router = router


def _dts(E=4, K=2, phase=DTSPhase.soft, tau=1.0):
    r = _router(RouterConfig(name=RouterType.dts, renormalize=False), E, K)
    assert isinstance(r, DTSRouter)
    r.phase, r.temperature = phase, tau
    r.context.set_step(seed=3, step=7)
    r.layer_idx = 1
    return r


def test_dts_soft_phase_selects_by_gumbel_threshold():
    r = _dts(tau=0.3)
    out = r(X)
    logits = X @ r.gate.weight.T
    E = 4
    keys = torch.arange(6)[:, None] * E + torch.arange(E)
    g = -torch.log(-torch.log(keyed_uniform(keys, 3, 7, 1, 0x6B1)))
    chosen = torch.softmax((logits + g) / 0.3, dim=-1) > 1e-3
    assert torch.equal(out.active_TK, chosen)
    assert chosen.sum(dim=1).min() >= 1 and not chosen.all()  # variable k, at least 1
    assert torch.equal(out.ids_TK, torch.arange(E).expand(6, E))
    probs = torch.softmax(logits, dim=-1)
    assert torch.equal(out.weights_TK, probs)  # softmax(logits) . chosen, not renormalised
    # a huge temperature flattens the Gumbel softmax to ~1/E > 1e-3: every expert
    r.temperature = 1e6
    assert r(X).active_TK.all()


def test_dts_hard_phase_routes_exactly_k_experts():
    for K in (1, 2, 3):
        r = _dts(E=4, K=K, phase=DTSPhase.hard)
        out = r(X)
        assert out.active_TK is None and out.ids_TK.shape == (6, K)
        assert all(len(set(row)) == K for row in out.ids_TK.tolist())
        logits = X @ r.gate.weight.T
        g = -torch.log(-torch.log(keyed_uniform(
            torch.arange(6)[:, None] * 4 + torch.arange(4), 3, 7, 1, 0x6B1)))
        assert torch.equal(out.ids_TK, (logits + g).topk(K, dim=-1).indices)
        r.eval()  # evaluation: top-k of the clean logits in every gate phase
        for phase in (DTSPhase.soft, DTSPhase.hard):
            r.phase = phase
            assert torch.equal(r(X).ids_TK, logits.topk(K, dim=-1).indices)


def test_dts_diversify_phase_routes_to_expert_0():
    r = _dts(phase=DTSPhase.diversify)
    out = r(X)
    assert torch.equal(out.ids_TK, torch.zeros(6, 1, dtype=torch.int64))
    assert torch.equal(out.weights_TK, torch.ones(6, 1))


# ----------------------------------------------------------------------------- spawn
def _moe_layer(E=4, K=2, seed=0) -> MoELayer:
    torch.manual_seed(seed)
    m = ModelConfig(dim=8, n_heads=2, num_experts=E, top_k=K, expert_hidden=6)
    layer = MoELayer(8, m, MoEConfig(router=RouterConfig(name=RouterType.dts, renormalize=True),
                                     expert_backend=ExpertBackend.loop))
    layer.init_weights(0.5, 0.5)
    return layer


def _weights(layer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in layer.experts.named_parameters()}


def test_spawn_with_mask_ratio_0_reproduces_the_base_expert():
    layer = _moe_layer()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(2))
    layer.router.phase = DTSPhase.diversify
    base = layer(x).detach()
    spawn_experts([layer], [], 0.0, seed=0)
    for name, w in _weights(layer).items():
        for e in range(4):
            assert torch.equal(w[e], w[0]), (name, e)
    # every expert's output is the base expert's, bit for bit: all 10 rows on expert e
    rows = x.reshape(-1, 8)
    for e in range(4):
        counts = torch.zeros(4, dtype=torch.int64)
        counts[e] = rows.shape[0]
        assert torch.equal(layer.experts(rows, counts), base.reshape(-1, 8)), e
    # soft phase, huge tau: every expert, weights softmax(logits) summing to 1
    layer.router.phase, layer.router.temperature = DTSPhase.soft, 1e6
    torch.testing.assert_close(layer(x), base, rtol=1e-6, atol=1e-7)
    layer.eval()  # top-2, weights renormalised: they sum to 1 as well
    torch.testing.assert_close(layer(x), base, rtol=1e-6, atol=1e-7)


def test_spawn_masks_are_keyed_and_drop_the_mask_ratio():
    layer, again = _moe_layer(), _moe_layer()
    w0 = _weights(layer)
    spawn_experts([layer], [], 0.5, seed=11)
    spawn_experts([again], [], 0.5, seed=11)
    got = _weights(layer)
    for name, w in got.items():
        assert torch.equal(w, _weights(again)[name])  # same keys, same masks
        kept = w != 0
        assert torch.equal(w[kept], w0[name][0].expand_as(w)[kept])  # masked copies of 0
        assert abs(kept.float().mean().item() - 0.5) < 0.15  # 192 entries: 4 sigma
        assert not torch.equal(kept[0], kept[1])  # one mask per expert
        # the mask is keyed by (seed, layer, matrix, global entry index)
        S = w[0].numel()
        u = keyed_uniform(torch.arange(4 * S).view_as(w), 11, 0,
                          {"w1_EFD": 0xE1, "w3_EFD": 0xE3, "w2_EDF": 0xE2}[name])
        assert torch.equal(kept, (u >= 0.5) & (w0[name][0] != 0).expand_as(w))
    other = _moe_layer()
    other.router.layer_idx = 1
    spawn_experts([other], [], 0.5, seed=11)
    assert not torch.equal(_weights(other)["w1_EFD"] != 0, got["w1_EFD"] != 0)


@pytest.mark.parametrize("mode", list(SpawnOptimizer))
def test_spawn_copies_or_resets_the_optimizer_state(mode):
    layer = _moe_layer()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    for i in range(2):
        x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(10 + i))
        layer(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    w1 = layer.experts.w1_EFD
    m0 = opt.state[w1]["exp_avg"][0].clone()
    v0 = opt.state[w1]["exp_avg_sq"][0].clone()
    step = opt.state[w1]["step"].clone()
    spawn_experts([layer], [opt], 0.5, seed=5, optimizer_mode=mode)
    st = opt.state[w1]
    assert torch.equal(st["step"], step)
    if mode == SpawnOptimizer.reset:
        assert not st["exp_avg"].any() and not st["exp_avg_sq"].any()
        return
    keep = keyed_uniform(torch.arange(w1.numel()).view_as(w1), 5, 0, 0xE1) >= 0.5
    assert torch.equal(st["exp_avg"], torch.where(keep, m0.expand_as(w1), 0.0))
    assert torch.equal(st["exp_avg_sq"], v0.expand_as(w1))


def test_fresh_optimizer_state_is_adamws_own_first_state():
    """A gate with no gradient before the spawn gets AdamW's fresh state (step 0, zero
    moments) when a checkpoint is taken; every later update is bit-identical to AdamW
    creating it lazily, and no other weight or state changes."""
    def model_and_opt():
        torch.manual_seed(0)
        m = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 2), "gate": torch.nn.Linear(3, 2)})
        return m, torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.1)

    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    runs = []
    for early in (False, True):
        m, opt = model_and_opt()
        m["a"](x).square().sum().backward()  # step 0: the gate unused (no gradient)
        opt.step()
        a_state = {k: v.clone() for k, v in opt.state[m["a"].weight].items()}
        before = {k: v.clone() for k, v in m.state_dict().items()}
        if early:
            opt.zero_grad()
            _fill_fresh_state(opt)
            for p in (m["gate"].weight, m["gate"].bias):
                st = opt.state[p]
                assert st["step"].item() == 0 and not st["exp_avg"].any()
                assert not st["exp_avg_sq"].any()
            assert all(torch.equal(v, a_state[k])
                       for k, v in opt.state[m["a"].weight].items())  # had state: untouched
            assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
            assert all(p.grad is None for p in m.parameters())
            assert opt.param_groups[0]["lr"] == 0.1
        for _ in range(3):  # then the gate trains
            opt.zero_grad()
            (m["a"](x) * m["gate"](x)).sum().backward()
            opt.step()
        runs.append({k: v.clone() for k, v in m.state_dict().items()})
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


# ----------------------------------------------------------------------------- compile
def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compile_does_not_recompile_for_temperature_and_once_per_k():
    torch.manual_seed(0)
    m = ModelConfig(dim=16, n_heads=2, num_experts=4, top_k=2, expert_hidden=8)
    layer = MoELayer(16, m, MoEConfig(expert_backend=ExpertBackend.loop))
    layer.init_weights(0.02, 0.02)
    layer.compile(backend="eager")
    x = torch.randn(2, 8, 16)
    torch._dynamo.reset()
    counters.clear()
    tau = TemperatureSchedule(Anneal.cosine, 2.0, 0.5, 8, GateActivation.tanh)
    tau.apply([layer], 0)
    layer(x)
    one = _graphs()
    assert one > 0
    for t in range(1, 10):  # a new temperature every step
        assert tau.apply([layer], t)["temperature"] == anneal(Anneal.cosine, 2.0, 0.5, t, 8)
        layer(x)
    assert _graphs() == one  # the temperature is a tensor read in forward
    ks = TopKSchedule(Anneal.linear, 4, 1, 9)  # k = 4, 4, 4, 3, 3, 3, 2, 2, 2, 1
    seen = set()
    for t in range(10):
        seen.add(ks.apply([layer], t)["top_k"])
        layer(x)
    assert seen == {1, 2, 3, 4}
    # k = 2 was compiled already; each of 4, 3, 1 compiles the graphs once
    assert one < _graphs() <= one * len(seen)


def test_compile_evomoe_recompiles_only_at_phase_changes():
    torch.manual_seed(0)
    m = ModelConfig(dim=16, n_heads=2, num_experts=4, top_k=2, expert_hidden=8)
    layer = MoELayer(16, m, MoEConfig(router=RouterConfig(name=RouterType.dts),
                                      expert_backend=ExpertBackend.loop))
    layer.init_weights(0.02, 0.02)
    layer.compile(backend="eager")
    x = torch.randn(2, 8, 16)
    evo = EvoMoECallback(2, 6, Anneal.linear, 2.0, 0.5, 4, 2, 1e-3, 0.5, 0)
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for t in range(9):  # diversify 0-1, soft 2-5 (a new tau each step), hard 6-8
        evo.apply([layer], t)
        layer.router.context.set_step(0, t)
        layer(x)
        graphs.append(_graphs())
    assert graphs[0] == graphs[1] < graphs[2]
    assert graphs[2] == graphs[3] == graphs[4] == graphs[5] < graphs[6]
    assert graphs[6] == graphs[7] == graphs[8]


# ----------------------------------------------------------------------------- resume
SCHEDULES = {
    "temperature": ["schedule=temperature", "schedule.anneal=exp", "schedule.steps=5"],
    "topk": ["schedule=topk", "schedule.steps=4"],  # k = ceil(4 - t/2): 4, 4, 3, 3, 2, 2
    "capacity": ["schedule=capacity", "moe.dispatch=capacity", "schedule.capacity_start=1.5",
                 "schedule.capacity_end=0.5", "schedule.steps=5"],
    "dts_gate": ["schedule=dts_gate", "schedule.activation=sigmoid", "schedule.steps=5"],
    # diversify t = 0, 1; spawn; soft t = 2, 3, 4 (tau 2.0, 1.5, 1.0); hard top-1 t = 5
    "evomoe": ["moe/router=dts", "schedule=evomoe", "schedule.diversify_steps=2",
               "schedule.steps=3", "schedule.mask_ratio=0.3"],
    # the same phases with Gumbel-softmax combine weights and a hard top-2
    "evomoe_gumbel": ["moe/router=dts", "schedule=evomoe", "schedule.diversify_steps=2",
                      "schedule.steps=3", "schedule.mask_ratio=0.3",
                      "schedule.gumbel_gates=true", "schedule.hard_k=2"],
}


def _steps(run_dir: Path) -> list[dict]:
    return [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]


def _close(ref: list[dict], got: list[dict], keys=("loss", "grad_norm", "aux_loss")) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got):
        for k in keys:
            assert abs(a[k] - b[k]) <= 1e-5 * abs(a[k]), (a["step"], k, a[k], b[k])
        assert {k: v for k, v in a.items() if k.startswith("schedule/")} == {
            k: v for k, v in b.items() if k.startswith("schedule/")}, a["step"]


@pytest.fixture(scope="module")
def resume_root(tmp_path_factory):
    return tmp_path_factory.mktemp("schedule_runs")


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_schedule_resumes_mid_phase(schedule, tiny_overrides, resume_root, monkeypatch):
    trainers: list[Trainer] = []
    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self: (trainers.append(self), fit(self))[1])
    base = [o for o in tiny_overrides if not o.startswith("run.dir")] + SCHEDULES[schedule] + [
        "checkpoint.every=1", "checkpoint.keep=0", "eval.every=0"]
    ref_dir = resume_root / f"{schedule}_ref"
    run(compose(base + [f"run.dir={ref_dir}"]))
    ref = _steps(ref_dir)
    starts = (1, 3) if schedule == "evomoe" else (3,)  # before the spawn; soft phase
    for start in starts:
        res_dir = resume_root / f"{schedule}_from{start}"
        shutil.copytree(ref_dir, res_dir)
        for later in range(start + 1, 7):
            shutil.rmtree(res_dir / "checkpoints" / f"step_{later:07d}")
        run(compose(base + [f"run.dir={res_dir}"]))
        _close(ref, _steps(res_dir))
    schedule_values = [{k: v for k, v in r.items() if k.startswith("schedule/")} for r in ref]
    if schedule == "temperature":  # exp 2.0 -> 0.5 over 5: tau(t) = 2 * 4^(-t/5)
        assert [v["schedule/temperature"] for v in schedule_values] == pytest.approx(
            [2.0 * 4 ** (-t / 5) for t in range(5)] + [0.5], rel=1e-12)
    if schedule == "topk":
        assert [v["schedule/top_k"] for v in schedule_values] == [4, 4, 3, 3, 2, 2]
        assert [r["active_k"] for r in ref] == [4, 4, 3, 3, 2, 2]
        # MFU's FLOPs follow the last step's k (2 = model.top_k: the top-k count)
        tr = trainers[0]
        assert tr.flops_per_token == tr.flops_per_token_top_k
    if schedule == "capacity":
        assert [v["schedule/capacity_factor"] for v in schedule_values] == pytest.approx(
            [1.5, 1.3, 1.1, 0.9, 0.7, 0.5], rel=1e-12)
        assert ref[0]["dropped_frac"] < ref[-1]["dropped_frac"]
    if schedule.startswith("evomoe"):
        assert [v["schedule/phase"] for v in schedule_values] == [0, 0, 1, 1, 1, 2]
        assert [v["schedule/temperature"] for v in schedule_values][2:5] == pytest.approx(
            [2.0, 1.5, 1.0])
        hard_k = 2.0 if schedule == "evomoe_gumbel" else 1.0  # evomoe.yaml: hard_k 1
        assert [r["active_k"] for r in ref][:2] == [1.0, 1.0]
        assert ref[-1]["active_k"] == hard_k == schedule_values[-1]["schedule/top_k"]
        cb = next(c for c in trainers[-1].callbacks if isinstance(c, EvoMoECallback))
        assert cb.spawned
        assert cb.state_dict() == {"spawned": 1}


def test_topk_flops_follow_k(tiny_overrides, monkeypatch):
    """k ends at 3 (not model.top_k = 2): MFU's FLOPs per token count 3 routed experts."""
    trainers: list[Trainer] = []
    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self: (trainers.append(self), fit(self))[1])
    cfg = compose(tiny_overrides + ["schedule=topk", "schedule.k_end=3", "schedule.steps=1",
                                    "train.steps=2", "eval.every=0"])
    run(cfg)
    tr, m = trainers[0], cfg.model
    assert tr.flops_per_token == tr.flops_per_token_top_k + 6 * 3 * m.dim * m.expert_hidden * 2


# ----------------------------------------------------------------------------- config
def test_default_callbacks_add_the_schedule(tiny_overrides):
    names = [cb.name for cb in default_callbacks(compose(tiny_overrides + ["schedule=topk"]))]
    assert names == ["routing_context", "balance_monitor", "schedule_topk"]
    cbs = default_callbacks(compose(tiny_overrides + ["moe/router=dts", "schedule=evomoe"]))
    evo = cbs[-1]
    assert isinstance(evo, EvoMoECallback)
    # evomoe.yaml: diversify 30, tau over 200 steps, hard top-1 at 230 (= 30 + 200)
    assert (evo.diversify_steps, evo.steps, evo.hard_step, evo.top_k) == (30, 200, 230, 1)
    assert evo.gumbel_gates is False
    assert [evo.phase(t) for t in (29, 30, 229, 230)] == [
        DTSPhase.diversify, DTSPhase.soft, DTSPhase.soft, DTSPhase.hard]


def _config_error(overrides: list[str]) -> str:
    from moetrain.config.validate import validate

    with pytest.raises(ConfigError) as info:
        validate(compose(overrides), 1)
    return str(info.value)


@pytest.mark.parametrize("overrides,needle", [
    (["schedule=capacity"], "moe.dispatch"),
    (["schedule=topk", "moe/router=threshold"], "moe.router.name=threshold"),
    (["schedule=topk", "moe/router=expert_choice"], "moe.router.name=expert_choice"),
    (["schedule=topk", "schedule.k_start=9"], "schedule.k_start=9"),
    (["schedule=topk", "moe/router=deepseek_v3", "moe.router.n_groups=2",
      "model.num_experts=4"], "moe.router.topk_groups"),
    (["schedule=evomoe"], "moe/router=dts"),
    (["moe/router=dts"], "schedule=evomoe"),
    (["moe/router=dts", "schedule=evomoe", "moe.dispatch=capacity"], "moe.dispatch"),
    (["moe/router=dts", "schedule=evomoe", "schedule.gumbel_threshold=0.3"],
     "schedule.gumbel_threshold=0.3"),
    (["moe/router=dts", "schedule=evomoe", "schedule.hard_step=10"], "schedule.hard_step=10"),
    (["moe/router=dts", "schedule=evomoe", "schedule.hard_k=9"], "schedule.hard_k=9"),
    (["moe/router=dts", "schedule=evomoe", "schedule.steps=null", "train.steps=30"],
     "schedule.diversify_steps=30"),
    (["schedule=temperature", "schedule.activation=tanh"], "schedule.activation=tanh"),
    (["schedule=dts_gate", "moe/router=sigmoid_topk"], "moe.router.score_func=sigmoid"),
])
def test_bad_schedule_config_fails_in_validation(overrides, needle):
    msg = _config_error(["model.num_experts=8"] + overrides)
    assert needle in msg, msg


@pytest.mark.parametrize("override,field", [
    ("schedule.steps=0", "schedule.steps"),
    ("schedule.temperature_end=0", "schedule.temperature_end"),
    ("schedule.mask_ratio=1.0", "schedule.mask_ratio"),
    ("schedule.k_end=0", "schedule.k_end"),
    ("schedule.hard_k=0", "schedule.hard_k"),
    ("schedule.name=annealing", "schedule.name"),
])
def test_bad_schedule_values_fail_at_composition(override, field):
    with pytest.raises(Exception) as info:
        compose(["schedule=temperature", override])
    assert field in str(info.value), str(info.value)
