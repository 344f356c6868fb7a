"""Every router trains with its paper's recipe: the balance loss, its coefficient and the
z-loss come from the router unless the config sets them (moetrain/config/recipes.py), a
user's value wins with one warning when it adds a loss the paper does not use, and the
resolved recipe is logged and written as metrics.jsonl's first line. Known answers for
XMoE's balance loss and capacity rule, EvoMoE's gate loss and zero-initialised noisy
gating are worked by hand from the official code's formulas."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from moetrain.config import validate
from moetrain.config.schema import (
    BalanceLoss,
    CapacityRule,
    DispatchMode,
    DropPolicy,
    ExpertBackend,
    ModelConfig,
    MoEConfig,
    RouterConfig,
    RouterType,
)
from moetrain.metrics import MetricsLogger, read_metrics, read_recipe
from moetrain.models.moe import routing
from moetrain.models.moe.dispatcher import expert_capacity
from moetrain.models.moe.layer import MoELayer
from moetrain.models.moe.router import build_router
from tests.conftest import TINY, compose

# ----------------------------------------------------------------------------- the table
# moe/router=<name> -> (balance loss, aux coef, z coef, drop policy, capacity rule), from
# the papers and official code (docs/routers.md#training-recipes gives the sources):
RECIPE_TABLE = {
    # Switch loss 1e-2 and z-loss 1e-3 (ST-MoE, arXiv 2202.08906: c_B, c_z)
    "topk": ("switch", 1e-2, 1e-3, "probs", "slots"),
    "sigmoid_topk": ("switch", 1e-2, 1e-3, "probs", "slots"),
    # Loss-Free Balancing (arXiv 2408.15664): the bias replaces the auxiliary loss
    "aux_free": ("switch", 0.0, 0.0, "probs", "slots"),
    # DeepSeek-V3 (arXiv 2412.19437, eqs. 17-20): sequence-wise loss, alpha = 1e-4
    "deepseek_v3": ("seq", 1e-4, 0.0, "probs", "slots"),
    # Switch Transformer (arXiv 2101.03961): alpha = 1e-2, no z-loss
    "switch": ("switch", 1e-2, 0.0, "probs", "slots"),
    # Shazeer et al. (arXiv 1701.06538) / tensor2tensor: only its own importance + load
    "noisy_topk": ("switch", 0.0, 0.0, "probs", "slots"),
    # Expert choice (flaxformer): no balance loss, the router z-loss
    "expert_choice": ("switch", 0.0, 1e-3, "probs", "slots"),
    # Megatron-core's sinkhorn: moe_aux_loss_coeff must be 0
    "sinkhorn": ("switch", 0.0, 0.0, "probs", "slots"),
    # SSR (arXiv 2511.08972): transport replaces the auxiliary loss
    "selective_sinkhorn": ("switch", 0.0, 0.0, "probs", "slots"),
    # XMoE main_thresholdGating: top-1 loss, MLC 0.01; _capacity and _top_idx
    "threshold": ("xmoe", 1e-2, 0.0, "rank", "tokens"),
    # EvoMoE topkgate.py: E^2 * mean(me * ce), 0.01 in the GPT script
    "dts": ("evomoe", 1e-2, 0.0, "probs", "slots"),
}


def _composed(router: str, extra: list[str] | None = None):
    over = [f"moe/router={router}", "run.dir=/tmp/x"] + (extra or [])
    if router == "switch":
        over.append("model.top_k=1")
    if router == "dts":
        over.append("schedule=evomoe")
    return compose(over)


@pytest.mark.parametrize("router", list(RECIPE_TABLE))
def test_every_router_resolves_to_its_paper_recipe(router, caplog):
    """The defaults no longer leak the Switch loss and the z-loss into every router."""
    cfg = _composed(router)
    assert cfg.moe.aux_loss_coef is None and cfg.moe.balance_loss is None  # "the recipe"
    with caplog.at_level(logging.WARNING, logger="moetrain.config.validate"):
        validate(cfg, 1)
    loss, aux, z, drop, rule = RECIPE_TABLE[router]
    moe = cfg.moe
    assert (moe.balance_loss, moe.aux_loss_coef, moe.z_loss_coef) == (loss, aux, z)
    assert (moe.drop_policy, moe.capacity_rule) == (drop, rule)
    assert not [r for r in caplog.records if "recipe" in r.getMessage()]  # on recipe: quiet
    # A layer built from the config (as the trainer does) trains on exactly these.
    layer = MoELayer(cfg.model.dim, cfg.model, moe)
    assert (layer.balance_loss, layer.aux_loss_coef, layer.z_loss_coef) == (loss, aux, z)
    assert (layer.dispatcher.drop_policy, layer.dispatcher.capacity_rule) == (drop, rule)


def test_xmoe_max_k_defaults_to_every_expert():
    """XMoE's code has no cap on the experts per token (max_k = E, not model.top_k)."""
    cfg = _composed("threshold")
    validate(cfg, 1)
    assert cfg.moe.router.max_k == cfg.model.num_experts == 8
    # p = [.5, .3, .15, .05] at threshold 0.9 takes 3 experts (the mass before the third
    # is 0.8 < 0.9), more than model.top_k = 2.
    r = build_router(4, 4, 2, RouterConfig(name=RouterType.threshold, threshold=0.9))
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(4))
    out = r(torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log())
    assert r.slots == 4 and out.active_TK.sum().item() == 3
    assert out.ids_TK[0, :3].tolist() == [0, 1, 2]


def test_user_override_wins_and_warns_once(caplog):
    """aux_free with moe.aux_loss_coef=0.01: the user's value, one warning (validate()
    runs again for other layouts without repeating it)."""
    cfg = _composed("aux_free", ["moe.aux_loss_coef=0.01", "moe.z_loss_coef=0.001"])
    with caplog.at_level(logging.WARNING, logger="moetrain.config.validate"):
        validate(cfg, 1)
        validate(cfg, 1)
    assert (cfg.moe.aux_loss_coef, cfg.moe.z_loss_coef) == (0.01, 0.001)
    warned = [r.getMessage() for r in caplog.records if "recipe" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "switch balance loss" in warned[0] and "no balance loss" in warned[0]
    assert "z-loss" in warned[0]
    # Dropping a loss the paper uses is not a combination the paper lacks: no warning.
    caplog.clear()
    cfg = _composed("topk", ["moe.z_loss_coef=0"])
    with caplog.at_level(logging.WARNING, logger="moetrain.config.validate"):
        validate(cfg, 1)
    assert cfg.moe.z_loss_coef == 0.0 and cfg.moe.aux_loss_coef == 0.01
    assert not [r for r in caplog.records if "recipe" in r.getMessage()]
    # Another balance loss than the paper's is named.
    caplog.clear()
    cfg = _composed("threshold", ["moe.balance_loss=switch"])
    with caplog.at_level(logging.WARNING, logger="moetrain.config.validate"):
        validate(cfg, 1)
    (msg,) = [r.getMessage() for r in caplog.records if "recipe" in r.getMessage()]
    assert "switch balance loss" in msg and "xmoe" in msg


D, FH = 3, 4  # identity-gate layers (dim = E): the router input is the logits


def _layer(router: RouterConfig, E: int = 3, K: int = 2, **moe) -> MoELayer:
    torch.manual_seed(0)
    m = ModelConfig(num_experts=E, top_k=K, expert_hidden=FH)
    layer = MoELayer(E, m, MoEConfig(router=router, expert_backend=ExpertBackend.loop, **moe))
    layer.init_weights(0.5, 0.5)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.eye(E))
    return layer


@pytest.mark.parametrize("router,trains", [
    (RouterConfig(), True),  # topk: Switch loss + z-loss
    (RouterConfig(score_func="sigmoid", bias_update_rate=1e-3), False),  # aux_free
    (RouterConfig(name=RouterType.selective_sinkhorn, ssr_prob=0.0), False),
    (RouterConfig(name=RouterType.sinkhorn), False),
    (RouterConfig(name=RouterType.deepseek_v3, score_func="sigmoid"), True),  # seq loss
    (RouterConfig(name=RouterType.threshold), True),  # xmoe loss
])
def test_recipe_decides_which_auxiliary_gradient_reaches_the_gate(router, trains):
    """With the LM signal cut (out * 0), the gate's gradient is the auxiliary losses'
    alone: none for the routers whose papers train without them (the defect: aux_free,
    SSR and Sinkhorn got the Switch loss and the z-loss)."""
    layer = _layer(router).train()
    x = torch.randn(2, 6, D)
    (layer(x) * 0).sum().backward()
    g = layer.router.gate.weight.grad
    assert (g is not None and g.abs().sum() > 0) == trains


# ----------------------------------------------------------------------------- XMoE
# T = 4 tokens, E = 3 experts, softmax probabilities written out (as test_losses.py).
P_TE = torch.tensor([[0.6, 0.3, 0.1],
                     [0.2, 0.5, 0.3],
                     [0.5, 0.4, 0.1],
                     [0.1, 0.2, 0.7]])


def test_threshold_recipe_trains_on_xmoe_loss_known_answer():
    """The layer's balance loss under the threshold recipe is XMoE's top-1 loss:
    top-1 choices 0, 1, 0, 2 -> ce = [.5, .25, .25]; mean p = [.35, .35, .30];
    3 * (.35 * .5 + .35 * .25 + .30 * .25) = 1.0125. (The Switch loss over the 9 routed
    rows at threshold 0.85 would be 3 * 3.05 / 9 = 1.016667.)"""
    layer = _layer(RouterConfig(name=RouterType.threshold, threshold=0.85))
    layer(P_TE.log().view(1, 4, 3))
    assert math.isclose(layer.last_stats.aux_loss.item(), 1.0125, rel_tol=1e-5)
    # 1 to E experts per token: {0,1}, {0,1,2}, {0,1}, {1,2} -> 9 rows (max_k = E = 3).
    assert layer.last_stats.num_routed.item() == 9


def test_xmoe_capacity_rule_known_values():
    """DeepSpeed/XMoE _capacity: ceil(T / E * cf), at least min_capacity 4, whatever K."""
    tokens = CapacityRule.tokens
    assert expert_capacity(24, 3, 3, 1.25, tokens) == 10  # 24 / 3 * 1.25 = 10
    assert expert_capacity(10, 3, 3, 1.0, tokens) == 4  # ceil(3.33) = 4
    assert expert_capacity(6, 3, 3, 1.0, tokens) == 4  # ceil(2) = 2 -> min 4
    assert expert_capacity(100, 8, 8, 1.0, tokens) == 13  # ceil(12.5)
    # Reference values: T = 1024, E = 8, cf = 1.25 -> 160 (tokens), 320 (slots, K = 2).
    assert expert_capacity(1024, 2, 8, 1.25, tokens) == 160
    assert expert_capacity(1024, 2, 8, 1.25, CapacityRule.slots) == 320


# T = 8, E = 3, every expert active (threshold 1.0): each token's probabilities, best first.
XMOE_DROP = [  # (expert, p) by choice rank
    [(0, .36), (1, .34), (2, .30)],
    [(1, .50), (0, .45), (2, .05)],
    [(0, .60), (1, .25), (2, .15)],
    [(1, .60), (2, .30), (0, .10)],
    [(0, .38), (2, .33), (1, .29)],
    [(2, .40), (0, .32), (1, .28)],
    [(0, .90), (1, .06), (2, .04)],
    [(0, .95), (2, .03), (1, .02)],
]


def test_xmoe_capacity_drops_by_choice_rank_known_answer():
    """moe.dispatch=capacity under the threshold recipe: C = max(ceil(8 / 3 * 1.0), 4) = 4
    rows per expert, kept by choice rank, then probability (XMoE's _top_idx on the
    priority rank + p). By hand:
    - expert 0 has 5 first choices (t7 .95, t6 .90, t2 .60, t4 .38, t0 .36): keeps the 4
      highest, drops t0's first choice and every later choice (t1 .45, t5 .32, t3 .10);
    - expert 1: first choices t3 .60, t1 .50, then second choices t0 .34, t2 .25; drops
      t6 .06 and the third choices;
    - expert 2: first choice t5 .40, second choices t4 .33, t3 .30, t7 .03; drops the
      third choices.
    The probs policy would keep t1's second choice (.45) over t4's first (.38), the slot
    policy t0's first choice over t7's; the slots rule (C = 8) would drop nothing."""
    logits = torch.zeros(8, 3)
    for t, row in enumerate(XMOE_DROP):
        for e, p in row:
            logits[t, e] = math.log(p)
    layer = _layer(RouterConfig(name=RouterType.threshold, threshold=1.0), K=2,
                   dispatch=DispatchMode.capacity, capacity_factor=1.0)
    assert layer.router.slots == 3
    routed = layer.router(logits)
    assert routed.active_TK.all()
    assert [[e for e, _ in row] for row in XMOE_DROP] == routed.ids_TK.tolist()
    _, meta = layer.dispatcher.dispatch(logits, routed.ids_TK, routed.weights_TK,
                                        routed.active_TK)
    assert meta.rows_per_expert == 4
    kept = [[1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0],
            [1, 1, 0]]
    kept[0] = [0, 1, 0]  # t0: its first choice (expert 0, .36) is the one dropped
    assert meta.kept_TK.int().tolist() == kept
    assert meta.num_dropped.item() == 24 - 12
    # The recipe's parts, one by one: probs and slot keep other rows.
    for policy in (DropPolicy.probs, DropPolicy.slot):
        other = _layer(RouterConfig(name=RouterType.threshold, threshold=1.0), K=2,
                       dispatch=DispatchMode.capacity, capacity_factor=1.0,
                       drop_policy=policy)
        _, m = other.dispatcher.dispatch(logits, routed.ids_TK, routed.weights_TK,
                                         routed.active_TK)
        assert m.kept_TK.int().tolist() != kept, policy


# ----------------------------------------------------------------------------- EvoMoE
def test_dts_recipe_trains_on_evomoe_loss_known_answer():
    """EvoMoE's gate loss E^2 * mean(me * ce) under the dts recipe, on its evaluation
    routing (hard phase, top-1 of the clean logits, gate p at the pick):
    top-1 gates .6 (e0), .5 (e1), .5 (e0), .7 (e2) -> me = [1.1, .5, .7] / 4,
    ce = [.5, .25, .25]; 3 * (.1375 + .03125 + .04375) = 0.6375."""
    layer = _layer(RouterConfig(name=RouterType.dts, renormalize=False), K=1).eval()
    assert layer.balance_loss == BalanceLoss.evomoe and layer.aux_loss_coef == 0.01
    layer(P_TE.log().view(1, 4, 3))
    assert math.isclose(layer.last_stats.aux_loss.item(), 0.6375, rel_tol=1e-5)


def test_evomoe_loss_on_variable_k_routing_known_answer():
    """moe.balance_loss=evomoe on the threshold router at 0.85 (experts {0,1}, {0,1,2},
    {0,1}, {1,2}; gates = p there): me = [1.3, 1.4, 1.0] / 4, ce = [3, 4, 2] / 4;
    3 * (.325 * .75 + .35 * 1 + .25 * .5) = 2.15625."""
    layer = _layer(RouterConfig(name=RouterType.threshold, threshold=0.85),
                   balance_loss=BalanceLoss.evomoe)
    layer(P_TE.log().view(1, 4, 3))
    assert math.isclose(layer.last_stats.aux_loss.item(), 2.15625, rel_tol=1e-5)


# ----------------------------------------------------------------------------- noisy top-k
def test_noisy_topk_zero_init_routes_by_the_noise_alone():
    """tensor2tensor's noisy_top_k_gating starts W_g and W_noise at zero: the clean
    logits are 0 and the noise std is softplus(0) + noise_epsilon = ln 2 + 0.01 for every
    token, so training routes by the keyed noise alone and evaluation weights the k
    picks 1/k each."""
    assert _composed("noisy_topk").moe.router.noisy_zero_init is True  # the recipe default
    T, E, K, Dm = 6, 4, 2, 5
    r = build_router(Dm, E, K, RouterConfig(name=RouterType.noisy_topk))
    r.init_weights(0.02)
    assert torch.count_nonzero(r.gate.weight) == 0 and torch.count_nonzero(r.w_noise.weight) == 0
    x = torch.randn(T, Dm)
    r.context.set_step(seed=3, step=5)
    out = r.train()(x)
    assert torch.equal(out.logits_TE, torch.zeros(T, E))
    sigma = math.log(2.0) + 0.01
    keys = torch.arange(T)[:, None] * E + torch.arange(E)
    noisy = routing.keyed_normal(keys, 3, 5, 0, 0x5EED) * sigma
    top = noisy.topk(K, dim=-1)
    assert torch.equal(out.ids_TK, top.indices)
    torch.testing.assert_close(out.weights_TK, torch.softmax(top.values, -1))
    ev = r.eval()(x)
    assert torch.equal(ev.weights_TK, torch.full((T, K), 0.5))
    # The gate still learns from the LM side: the weights depend on W_g's logits.
    r.train()
    (r(x).weights_TK[:, 0] * torch.arange(T)).sum().backward()
    assert r.gate.weight.grad.abs().sum() > 0
    # noisy_zero_init=false keeps the N(0, init_std^2) gate.
    torch.manual_seed(0)
    r2 = build_router(Dm, E, K, RouterConfig(name=RouterType.noisy_topk,
                                             noisy_zero_init=False))
    r2.init_weights(0.02)
    assert 0.005 < r2.gate.weight.std().item() < 0.05


# ----------------------------------------------------------------------------- logging
def test_metrics_jsonl_starts_with_the_recipe(tmp_path, data_cache, caplog):
    """A run logs its resolved recipe once and writes it as metrics.jsonl's first line;
    read_metrics skips it, read_recipe returns it."""
    from moetrain.train.main import run

    run_dir = tmp_path / "run"
    over = TINY + [f"run.dir={run_dir}", f"data.cache_dir={data_cache}", "train.steps=2",
                   "eval.every=0", "moe/router=threshold"]
    with caplog.at_level(logging.INFO, logger="moetrain.train.trainer"):
        run(compose(over))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert list(first) == ["recipe"]
    rec = first["recipe"]
    assert (rec["router"], rec["balance_loss"], rec["aux_loss_coef"], rec["z_loss_coef"]) == (
        "threshold", "xmoe", 0.01, 0.0)
    assert rec["balance_loss_trained"] and rec["router_settings"]["max_k"] == 4  # E
    assert "arXiv 2403.18926" in rec["source"] and rec["overrides"] == {}
    assert read_recipe(run_dir / "metrics.jsonl") == rec
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    logged = [r.getMessage() for r in caplog.records if "training recipe" in r.getMessage()]
    assert len(logged) == 1 and "xmoe balance loss x 0.01" in logged[0]


def test_resumed_log_keeps_one_recipe_line_first(tmp_path):
    from moetrain.config import LoggingConfig

    log = MetricsLogger(tmp_path, LoggingConfig(tensorboard=False), enabled=True)
    log.set_recipe({"router": "topk"})
    for s in (1, 2, 3):
        log.log_step(s, {"loss": float(s)})
    log.close()
    resumed = MetricsLogger(tmp_path, LoggingConfig(tensorboard=False), enabled=True)
    resumed.set_recipe({"router": "topk", "aux_loss_coef": 0.0})
    assert resumed.truncate_after(2) == 1  # step 3
    resumed.log_step(3, {"loss": 0.5})
    resumed.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"recipe": {"router": "topk", "aux_loss_coef": 0.0}}
    assert [r.get("step") for r in lines[1:]] == [1, 2, 3] and lines[3]["loss"] == 0.5
    # Files written before the recipe line: no recipe, every row read.
    old = tmp_path / "old.jsonl"
    old.write_text('{"step": 1, "loss": 1.0}\n')
    assert read_recipe(old) is None and read_metrics(old) == [{"step": 1, "loss": 1.0}]
