"""Each router's training recipe: the balance loss, its coefficient, the router z-loss and
the capacity rule that its paper (or official code) trains with.

``moe.aux_loss_coef``, ``moe.z_loss_coef``, ``moe.balance_loss``, ``moe.drop_policy`` and
``moe.capacity_rule`` default to null, meaning "the router's recipe".
:func:`resolve_recipe` (called by ``validate()``) fills them in, so every consumer after
validation sees concrete values; a value the user sets wins. :func:`recipe_values` gives the
same values without changing the config (for code that builds layers without
``validate()``). The table below is the one place that holds the numbers, each with its
source; docs/routers.md#training-recipes mirrors it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moetrain.config.schema import (
    AuxLossScope,
    BalanceLoss,
    CapacityRule,
    Config,
    DispatchMode,
    DropPolicy,
    MoEConfig,
    RouterConfig,
    RouterType,
    ScheduleName,
)


@dataclass(frozen=True)
class Recipe:
    """What a router trains with. ``aux_loss_coef`` 0: the balance loss is computed and
    logged (``aux_loss``) but not trained on."""

    balance_loss: BalanceLoss
    aux_loss_coef: float
    z_loss_coef: float
    source: str
    drop_policy: DropPolicy = DropPolicy.probs
    capacity_rule: CapacityRule = CapacityRule.slots


RECIPES: dict[str, Recipe] = {
    # Mixtral (arXiv 2401.04088) gives no coefficients: the Switch loss at 1e-2 and the
    # z-loss at 1e-3 are ST-MoE's (c_B = 1e-2, c_z = 1e-3).
    "topk": Recipe(BalanceLoss.switch, 1e-2, 1e-3,
                   "Switch loss (Fedus et al., arXiv 2101.03961) and router z-loss (ST-MoE, "
                   "Zoph et al., arXiv 2202.08906: c_B = 1e-2, c_z = 1e-3)"),
    # A top-k router whose expert bias moves (moe.router.bias_update_rate > 0): the bias
    # replaces the auxiliary loss (Alg. 1; the rate 1e-3 is in conf/moe/router/aux_free.yaml).
    "aux_free": Recipe(BalanceLoss.switch, 0.0, 0.0,
                       "Loss-Free Balancing (Wang et al., arXiv 2408.15664, Alg. 1): no "
                       "auxiliary loss, expert bias rate 1e-3"),
    # The z-loss came a year later (ST-MoE); Switch trains with alpha = 1e-2 alone.
    "switch": Recipe(BalanceLoss.switch, 1e-2, 0.0,
                     "Switch Transformer (Fedus et al., arXiv 2101.03961, sec. 2.2): "
                     "alpha = 1e-2, no z-loss"),
    # Sequence-wise complementary loss, alpha = 1e-4, beside the bias (gamma = 1e-3).
    "deepseek_v3": Recipe(BalanceLoss.seq, 1e-4, 0.0,
                          "DeepSeek-V3 (arXiv 2412.19437, sec. 2.1.2, eqs. 17-20): "
                          "sequence-wise loss alpha = 1e-4 with the expert bias, no z-loss"),
    # Its own CV^2(importance) + CV^2(load) losses (moe.router.importance_coef, load_coef:
    # tensor2tensor's loss_coef 1e-2; the paper's 0.1 is UNVERIFIED), W_g = W_noise = 0.
    "noisy_topk": Recipe(BalanceLoss.switch, 0.0, 0.0,
                         "Shazeer et al. (arXiv 1701.06538, App. A); tensor2tensor "
                         "utils/expert_utils.py noisy_top_k_gating: importance and load "
                         "losses at 1e-2, zero-initialised gates, no Switch loss, no z-loss"),
    # Balanced by construction; flaxformer's Router adds the z-loss to every router
    # (the EC paper's own coefficient is UNVERIFIED: ST-MoE's 1e-3).
    "expert_choice": Recipe(BalanceLoss.switch, 0.0, 1e-3,
                            "Zhou et al. (arXiv 2202.09368); flaxformer routing.py "
                            "ExpertsChooseMaskedRouter: no balance loss; router z-loss 1e-3 "
                            "(ST-MoE's value, UNVERIFIED for EC)"),
    # Megatron-core's sinkhorn requires moe_aux_loss_coeff == 0; its z-loss defaults to off.
    "sinkhorn": Recipe(BalanceLoss.switch, 0.0, 0.0,
                       "S-BASE (Clark et al., arXiv 2202.01169) as Megatron-core's sinkhorn "
                       "(router.py sinkhorn_load_balancing): no balance loss, no z-loss "
                       "(S-BASE's own z-loss: UNVERIFIED)"),
    # Transport on a fraction of steps replaces the auxiliary loss (paper body UNVERIFIED).
    "selective_sinkhorn": Recipe(BalanceLoss.switch, 0.0, 0.0,
                                 "SSR (arXiv 2511.08972, abstract): optimal transport "
                                 "replaces the auxiliary loss; no z-loss (UNVERIFIED)"),
    # main_thresholdGating: l_aux = E * sum(mean(gates) * mean(top-1 mask)), MLC 0.01 in
    # examples_deepspeed/MoE/lastest_run.sh; _capacity: ceil(T / E * cf), min_capacity 4;
    # overflow kept by _top_idx on (choice rank + probability).
    "threshold": Recipe(BalanceLoss.xmoe, 1e-2, 0.0,
                        "XMoE (Yang et al., arXiv 2403.18926); ysngki/XMoE deepspeed_moe/"
                        "sharded_moe.py main_thresholdGating: top-1 balance loss 1e-2, no "
                        "z-loss, no cap on experts per token, capacity max(ceil(cf*T/E), 4) "
                        "kept by choice rank",
                        drop_policy=DropPolicy.rank, capacity_rule=CapacityRule.tokens),
    # topkgate.py: l_aux = E^2 * mean(me * ce); weight 0.01 in
    # scripts/pretrain_gpt_small_gumbel_MoE_balanced.sh (0 in the WMT script).
    "dts": Recipe(BalanceLoss.evomoe, 1e-2, 0.0,
                  "EvoMoE (Nie et al., arXiv 2112.14397); codecaution/EvoMoE fairseq/modules/"
                  "moe/topkgate.py: gate loss E^2 * mean(me * ce) at 1e-2 (GPT script), no "
                  "z-loss"),
    # A top-k router in a chain of experts (moe.chain_iterations > 1): CoE's config.json
    # (seq_aux true, aux_loss_alpha 0.001, no z-loss), each round's loss summed.
    "coe": Recipe(BalanceLoss.seq, 1e-3, 0.0,
                  "Chain-of-Experts (Wang et al., arXiv 2506.18945); ZihanWang314/CoE "
                  "config/models/coe_deepseekv2/config.json: per-sequence balance loss "
                  "(seq_aux) alpha 1e-3 in every round, no z-loss"),
    # configuration_llama_moe_rnn.py: router_aux_loss_coef 0.001, Mixtral's
    # load_balancing_loss_func (no z-loss). Mixtral's loss pools every layer's tokens and
    # counts each of the K choices over T tokens: per layer that is K times the Switch
    # loss here, which is summed over layers (docs/architectures.md#rmoe).
    "recurrent": Recipe(BalanceLoss.switch, 1e-3, 0.0,
                        "RMoE (Qiu et al., arXiv 2408.06793); qiuzh20/RMoE llama_moe_rnn/"
                        "configuration_llama_moe_rnn.py: router_aux_loss_coef 1e-3 on "
                        "Mixtral's balance loss, no z-loss"),
    # moe_pretrain_model/tasks/transformer_lm_mixin.py: balance 0.01 on the top-1 choice,
    # z 0.001; the competition's own losses are moe.router.compete_*_coef.
    "compete": Recipe(BalanceLoss.xmoe, 1e-2, 1e-3,
                      "CompeteSMoE (Nguyen et al., arXiv 2505.13380); Fsoft-AIC/CompeteSMoE "
                      "moe_pretrain_model (LM pretraining): router steps train on the "
                      "top-1 balance loss 1e-2 and z-loss 1e-3"),
}

# Routers that balance by construction: a balance loss is logged, never trained on.
NO_BALANCE_LOSS = (RouterType.expert_choice, RouterType.sinkhorn)

FIELDS = ("balance_loss", "aux_loss_coef", "z_loss_coef", "drop_policy", "capacity_rule")
_OVERRIDES = "_recipe_overrides"  # set on a MoEConfig by resolve_recipe


def recipe_name(router: RouterConfig, chain_iterations: int = 1) -> str:
    """The recipe of a router config: its name's, except a top-k router with a moving
    expert bias, which is auxiliary-loss-free balancing (``moe/router=aux_free``), and a
    top-k router run in a chain of experts (``moe.chain_iterations`` > 1: CoE's)."""
    kind = RouterType(router.name)
    if kind == RouterType.topk and router.bias_update_rate > 0:
        return "aux_free"
    if kind == RouterType.topk and chain_iterations > 1:
        return "coe"
    return kind.value


def recipe_for(router: RouterConfig, chain_iterations: int = 1) -> Recipe:
    return RECIPES[recipe_name(router, chain_iterations)]


def recipe_values(moe: MoEConfig) -> dict[str, Any]:
    """{field: value} of the recipe fields: the user's value where set, else the recipe's."""
    rec = recipe_for(moe.router, moe.chain_iterations)
    out = {}
    for name in FIELDS:
        value = getattr(moe, name)
        out[name] = getattr(rec, name) if value is None else value
    out["balance_loss"] = BalanceLoss(out["balance_loss"])
    out["drop_policy"] = DropPolicy(out["drop_policy"])
    out["capacity_rule"] = CapacityRule(out["capacity_rule"])
    out["aux_loss_coef"] = float(out["aux_loss_coef"])
    out["z_loss_coef"] = float(out["z_loss_coef"])
    return out


def resolve_recipe(moe: MoEConfig) -> dict[str, Any]:
    """Fill the null recipe fields of ``moe`` in place. Returns {field: value} of the
    fields the user set to something other than the recipe (also kept on ``moe``, so
    validating the same config again reports the same overrides)."""
    if hasattr(moe, _OVERRIDES):
        overrides = getattr(moe, _OVERRIDES)
    else:
        rec = recipe_for(moe.router, moe.chain_iterations)
        overrides = {name: getattr(moe, name) for name in FIELDS
                     if getattr(moe, name) is not None
                     and getattr(moe, name) != getattr(rec, name)}
    for name, value in recipe_values(moe).items():
        setattr(moe, name, value)
    setattr(moe, _OVERRIDES, overrides)
    return overrides


def off_recipe_losses(moe: MoEConfig) -> list[str]:
    """Losses a resolved ``moe`` trains on that its router's paper does not use (one
    phrase each; empty when the run follows the recipe, or only drops a loss)."""
    rec, kind = recipe_for(moe.router, moe.chain_iterations), RouterType(moe.router.name)
    v = recipe_values(moe)
    out = []
    if v["aux_loss_coef"] > 0:
        loss = BalanceLoss(v["balance_loss"]).value
        if kind in NO_BALANCE_LOSS:
            out.append(f"moe.aux_loss_coef={v['aux_loss_coef']:g} asks for the {loss} balance "
                       f"loss, but this router balances by construction: it is logged "
                       f"(aux_loss), not trained on")
        elif rec.aux_loss_coef == 0 or BalanceLoss(v["balance_loss"]) != rec.balance_loss:
            paper = ("no balance loss" if rec.aux_loss_coef == 0
                     else f"the {rec.balance_loss.value} balance loss")
            out.append(f"it trains on the {loss} balance loss (moe.aux_loss_coef="
                       f"{v['aux_loss_coef']:g}) where its paper uses {paper}")
    if v["z_loss_coef"] > 0 and rec.z_loss_coef == 0:
        out.append(f"it trains on the router z-loss (moe.z_loss_coef={v['z_loss_coef']:g}), "
                   f"which its paper does not use")
    return out


def _router_settings(cfg: Config) -> dict[str, Any]:
    """The router's own knobs that shape its training, by router."""
    r, kind = cfg.moe.router, RouterType(cfg.moe.router.name)
    keys: tuple[str, ...] = ("score_func", "renormalize", "temperature", "route_scale")
    if kind in (RouterType.topk, RouterType.deepseek_v3, RouterType.switch,
                RouterType.selective_sinkhorn):
        keys += ("bias_update_rate", "bias_update", "bias_update_tokens")
        if r.n_groups > 1:
            keys += ("n_groups", "topk_groups", "group_score")
    if kind == RouterType.noisy_topk:
        keys += ("importance_coef", "load_coef", "noise_epsilon", "noisy_zero_init")
    elif kind == RouterType.expert_choice:
        keys += ("ec_capacity_factor",)
    elif kind == RouterType.sinkhorn:
        keys += ("sinkhorn_iters", "sinkhorn_tol")
    elif kind == RouterType.selective_sinkhorn:
        keys += ("ssr_prob", "ssr_epsilon", "sinkhorn_iters", "sinkhorn_tol")
    elif kind == RouterType.threshold:
        keys += ("threshold", "max_k")
    out = {k: getattr(r, k) for k in keys}
    if kind == RouterType.threshold and out["max_k"] is None:
        out["max_k"] = cfg.model.num_experts
    return {k: (v.value if hasattr(v, "value") else v) for k, v in out.items()}


def recipe_record(cfg: Config) -> dict[str, Any]:
    """The resolved recipe of a validated config, as plain JSON values: rank 0 logs it at
    the start and writes it as metrics.jsonl's first line (``{"recipe": {...}}``)."""
    moe = cfg.moe
    v = recipe_values(moe)
    kind = RouterType(moe.router.name)
    name = recipe_name(moe.router, moe.chain_iterations)
    trains = v["aux_loss_coef"] > 0 and kind not in NO_BALANCE_LOSS
    rec: dict[str, Any] = {
        "router": kind.value,
        "recipe": name,
        "source": RECIPES[name].source,
        "top_k": cfg.model.top_k,
        "num_experts": cfg.model.num_experts,
        "balance_loss": v["balance_loss"].value,
        "aux_loss_coef": v["aux_loss_coef"],
        "balance_loss_trained": trains,
        "aux_loss_scope": AuxLossScope(moe.aux_loss_scope).value,
        "z_loss_coef": v["z_loss_coef"],
        "router_settings": _router_settings(cfg),
        "dispatch": DispatchMode(moe.dispatch).value,
        "schedule": ScheduleName(cfg.schedule.name).value,
    }
    if DispatchMode(moe.dispatch) == DispatchMode.capacity:
        rec.update(capacity_factor=moe.capacity_factor,
                   capacity_rule=v["capacity_rule"].value,
                   drop_policy=v["drop_policy"].value)
    overrides = getattr(moe, _OVERRIDES, {})
    rec["overrides"] = {k: (x.value if hasattr(x, "value") else x) for k, x in overrides.items()}
    return rec


def format_recipe(rec: dict[str, Any]) -> str:
    """One log line for :func:`recipe_record`'s dict."""
    loss = (f"{rec['balance_loss']} balance loss x {rec['aux_loss_coef']:g}"
            if rec["balance_loss_trained"]
            else f"no balance loss trained ({rec['balance_loss']} logged)")
    z = f"z-loss x {rec['z_loss_coef']:g}" if rec["z_loss_coef"] > 0 else "no z-loss"
    own = ", ".join(f"{k}={v}" for k, v in rec["router_settings"].items())
    line = (f"training recipe of moe/router={rec['router']} (recipe {rec['recipe']}: "
            f"{rec['source']}): {loss}, {z}; {own}")
    if "capacity_rule" in rec:
        line += (f"; capacity {rec['capacity_rule']} x {rec['capacity_factor']:g}, drop "
                 f"policy {rec['drop_policy']}")
    if rec["overrides"]:
        line += "; set by the user: " + ", ".join(f"moe.{k}={v}"
                                                   for k, v in rec["overrides"].items())
    return line
