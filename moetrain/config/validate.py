"""Cross-field rules that need the world size. They run before any process group exists."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from moetrain.config.recipes import _OVERRIDES, off_recipe_losses, recipe_name, resolve_recipe
from moetrain.config.schema import (
    AUTO,
    AllToAllMode,
    AuxLossScope,
    BalanceLoss,
    Config,
    ConfigError,
    DataParallelMode,
    DispatchMode,
    ExpertTP,
    FSDPGradSync,
    GateActivation,
    GroupScore,
    ParallelConfig,
    PipelineSchedule,
    RouterType,
    ScheduleName,
    ScoreFunc,
    TrainConfig,
)

log = logging.getLogger(__name__)

# Routers that select on scores + expert_bias (auxiliary-loss-free balancing).
BIAS_ROUTERS = (RouterType.topk, RouterType.switch, RouterType.deepseek_v3,
                RouterType.selective_sinkhorn)


@dataclass(frozen=True)
class Layout:
    """The resolved parallel degrees. world = pp * dp * tp; ep divides dp * tp."""

    world_size: int
    pp: int
    dp: int
    tp: int
    ep: int

    @property
    def edp(self) -> int:
        """Expert-data-parallel degree: replicas of each expert shard."""
        return self.dp * self.tp // self.ep


def resolve_layout(par: ParallelConfig, world_size: int, num_experts: int | None = None) -> Layout:
    """Infer dp and check that the degrees factor the world size."""
    denom = par.pp * par.tp
    if par.dp == -1:
        if world_size % denom:
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.pp*parallel.tp="
                f"{par.pp}*{par.tp}={denom}: pick pp and tp whose product divides {world_size}"
            )
        dp = world_size // denom
    else:
        dp = par.dp
        if dp * denom != world_size:
            raise ConfigError(
                f"parallel.pp*parallel.dp*parallel.tp={par.pp}*{dp}*{par.tp}={dp * denom} "
                f"but the world size is {world_size}: set parallel.dp=-1 to infer it, or "
                f"launch {dp * denom} processes"
            )
    if (dp * par.tp) % par.ep:
        raise ConfigError(
            f"parallel.ep={par.ep} must divide parallel.dp*parallel.tp={dp}*{par.tp}={dp * par.tp} "
            f"(EP is carved out of the data- and tensor-parallel ranks): use an ep that divides "
            f"{dp * par.tp}"
        )
    # ep > num_experts (a multiple of it): each expert is split over ep / num_experts ranks
    # (Tutel's sharded experts, moetrain/parallel/adaptive.py; _validate_sharded_experts).
    if num_experts is not None and num_experts % par.ep and par.ep % num_experts:
        valid = [d for d in range(1, dp * par.tp + 1) if (dp * par.tp) % d == 0
                 and (num_experts % d == 0 or d % num_experts == 0)]
        raise ConfigError(
            f"model.num_experts={num_experts} and parallel.ep={par.ep}: ep must divide the "
            f"experts (each rank holds num_experts/ep of them) or be a multiple of them "
            f"(each expert split over ep/num_experts ranks): use parallel.ep in {valid}"
        )
    return Layout(world_size=world_size, pp=par.pp, dp=dp, tp=par.tp, ep=par.ep)


def _validate_tp(cfg: Config, layout: Layout) -> None:
    """Rules of tensor parallelism (moetrain/parallel/tensor.py); head counts are checked
    in validate()."""
    tp, m, par = layout.tp, cfg.model, cfg.parallel
    if tp == 1:
        return
    if cfg.train.seq_len % tp:
        raise ConfigError(
            f"train.seq_len={cfg.train.seq_len} is not divisible by parallel.tp={tp} "
            f"(sequence parallelism splits each sequence over the tp ranks): use a "
            f"train.seq_len that is a multiple of {tp}"
        )
    if any(not m.is_moe_layer(i) for i in range(m.n_layers)) and m.ffn_hidden % tp:
        raise ConfigError(
            f"model.ffn_hidden={m.ffn_hidden} is not divisible by parallel.tp={tp} (dense "
            f"MLPs are split over tp): use a model.ffn_hidden that is a multiple of {tp}"
        )
    if ExpertTP(par.expert_tp) == ExpertTP.etp:
        if par.ep > 1:
            raise ConfigError(
                f"parallel.ep={par.ep} with parallel.expert_tp=etp: expert-tensor-parallelism "
                f"already splits every expert over the tp ranks, and EP groups are made of "
                f"consecutive tp ranks: set parallel.ep=1, or parallel.expert_tp=ep"
            )
        if m.expert_hidden % tp:
            raise ConfigError(
                f"model.expert_hidden={m.expert_hidden} is not divisible by parallel.tp={tp} "
                f"(parallel.expert_tp=etp splits each expert's hidden dim over tp): use a "
                f"model.expert_hidden that is a multiple of {tp}, or parallel.expert_tp=ep"
            )
    elif DispatchMode(cfg.moe.dispatch) == DispatchMode.capacity:
        raise ConfigError(
            f"moe.dispatch=capacity with parallel.tp={tp} and parallel.expert_tp=ep: each tp "
            f"rank routes a sequence shard, so per-rank capacities would drop other tokens "
            f"than the 1-process run: set parallel.expert_tp=etp (routes the whole "
            f"micro-batch) or moe.dispatch=dropless"
        )


def _pp_schedule_fits(name: str, pp: int, n_mb: int) -> bool:
    """Whether pipeline schedule ``name`` on ``pp`` stages runs ``n_mb`` micro-batches per
    step: 1F1B needs at least pp; the multi-stage schedules run rounds of pp micro-batches
    and need a whole number of them."""
    if name == "1f1b":
        return n_mb >= pp
    if name in ("interleaved_1f1b", "zero_bubble"):
        return n_mb % max(1, n_mb // pp) == 0
    return True


# Set on a TrainConfig whose micro_batch_size validate() chose for micro_batch_size=auto, so
# that validating the same config again for another layout (moetrain/parallel/memory.py
# tries many) chooses again rather than taking the earlier choice for an explicit value.
_AUTO_CHOICE = "_auto_micro_batch_size"


def resolve_micro_batch_size(train: TrainConfig, par: ParallelConfig, layout: Layout) -> int:
    """``train.micro_batch_size=auto``: the largest m <= ``train.max_micro_batch_size`` that
    divides each data-parallel rank's share s = global_batch_size / dp.

    Only the dp ranks split the batch: tensor-parallel ranks share a micro-batch (each
    takes a sequence shard), pipeline stages pass it on, and ep is carved out of dp * tp.
    With parallel.pp > 1 the s / m micro-batches are the pipeline schedule's, so m must
    give a count the schedule accepts, and a count >= pp is preferred (fewer leave stages
    idle under any schedule): e.g. s = 8, pp = 2 gives m = 4, not 8."""
    G, dp, pp = train.global_batch_size, layout.dp, layout.pp
    if G % dp:
        lower = f" or {G // dp * dp}" if G > dp else ""
        raise ConfigError(
            f"train.global_batch_size={G} is not divisible by the data-parallel size dp={dp} "
            f"(world size {layout.world_size} / (parallel.pp*parallel.tp={pp}*{layout.tp})); "
            f"each dp rank takes an equal share: set train.global_batch_size to a multiple of "
            f"{dp}, e.g. {(G // dp + 1) * dp}{lower}")
    share, cap = G // dp, train.max_micro_batch_size
    name = PipelineSchedule(par.pp_schedule).value
    sizes = [m for m in range(min(cap, share), 0, -1) if share % m == 0]
    fits = [m for m in sizes if pp == 1 or _pp_schedule_fits(name, pp, share // m)]
    if not fits:
        good = dp * pp * -(-share // pp)
        need = f">= {pp}" if name == "1f1b" else f"whole rounds of {pp}"
        raise ConfigError(
            f"train.micro_batch_size=auto: parallel.pp_schedule={name} on parallel.pp={pp} "
            f"stages needs {need} micro-batches per step, but no micro-batch size splits the "
            f"train.global_batch_size/dp = {G}/{dp} = {share} sequences of each data-parallel "
            f"rank so: set train.global_batch_size to {good} (a multiple of dp*pp = {dp * pp})")
    return ([m for m in fits if share // m >= pp] or fits)[0]


def _validate_pp(cfg: Config, layout: Layout) -> None:
    """Rules of pipeline parallelism (moetrain/parallel/pipeline.py): the split, the
    schedule and its micro-batches (the accumulation micro-batches of one step)."""
    par, m, pp = cfg.parallel, cfg.model, layout.pp
    v, name = par.pp_virtual_stages, PipelineSchedule(par.pp_schedule).value
    if pp == 1:
        if v > 1 or par.pp_split is not None:
            field, value = (("parallel.pp_virtual_stages", v) if v > 1
                            else ("parallel.pp_split", list(par.pp_split)))
            raise ConfigError(f"{field}={value} only applies to pipeline parallelism but "
                              f"parallel.pp=1: set parallel.pp > 1 or drop {field}")
        return
    n_stages = pp * v
    if m.tie_embeddings:
        raise ConfigError(
            f"model.tie_embeddings=true with parallel.pp={pp}: the embedding (first stage) "
            f"and the output projection (last stage) live on different ranks: set "
            f"model.tie_embeddings=false or parallel.pp=1")
    if par.pp_split is None:
        if m.n_layers % n_stages:
            raise ConfigError(
                f"model.n_layers={m.n_layers} is not divisible by parallel.pp={pp} * "
                f"parallel.pp_virtual_stages={v} = {n_stages} stages: use a pp that divides "
                f"{m.n_layers}, or set parallel.pp_split to the first layer of each stage")
    else:
        split = list(par.pp_split)
        if len(split) != n_stages or split[-1] >= m.n_layers:
            raise ConfigError(
                f"parallel.pp_split={split} must give the first layer of each of the "
                f"parallel.pp * parallel.pp_virtual_stages = {n_stages} stages, each below "
                f"model.n_layers={m.n_layers}: e.g. parallel.pp_split="
                f"{[i * m.n_layers // n_stages for i in range(n_stages)]}")
    if name in ("gpipe", "1f1b") and v > 1:
        raise ConfigError(
            f"parallel.pp_virtual_stages={v} needs a multi-stage schedule: set "
            f"parallel.pp_schedule=interleaved_1f1b or zero_bubble, or "
            f"parallel.pp_virtual_stages=1")
    if name == "interleaved_1f1b" and v < 2:
        raise ConfigError(
            "parallel.pp_schedule=interleaved_1f1b with parallel.pp_virtual_stages=1: set "
            "parallel.pp_virtual_stages >= 2 (stages per rank), or parallel.pp_schedule=1f1b")
    t = cfg.train
    n_mb = t.global_batch_size // (t.micro_batch_size * layout.dp)
    if _pp_schedule_fits(name, pp, n_mb):
        return
    where = (f"train.global_batch_size / (train.micro_batch_size * dp) = {t.global_batch_size}"
             f" / ({t.micro_batch_size} * {layout.dp}) = {n_mb} micro-batches per step")
    if name == "1f1b" and n_mb < pp:
        raise ConfigError(
            f"parallel.pp_schedule=1f1b needs at least parallel.pp={pp} micro-batches per "
            f"step, but {where}: raise train.global_batch_size to "
            f"{pp * t.micro_batch_size * layout.dp} or lower train.micro_batch_size")
    rounds = max(1, n_mb // pp)
    if name in ("interleaved_1f1b", "zero_bubble") and n_mb % rounds:
        raise ConfigError(
            f"parallel.pp_schedule={name} runs rounds of parallel.pp={pp} micro-batches and "
            f"needs their number to be a multiple of {rounds} rounds, but {where}: use a "
            f"multiple of {pp} micro-batches (train.global_batch_size = "
            f"{rounds * pp * t.micro_batch_size * layout.dp})")


def _resolve_recipe(cfg: Config) -> None:
    """Fill the null training-recipe fields from the router's recipe
    (moetrain/config/recipes.py) and XMoE's uncapped max_k; warn once when the run trains
    on a loss the router's paper does not use (research may mix them on purpose)."""
    moe, r = cfg.moe, cfg.moe.router
    first = not hasattr(moe, _OVERRIDES)
    resolve_recipe(moe)
    if RouterType(r.name) == RouterType.threshold and r.max_k is None:
        r.max_k = cfg.model.num_experts  # XMoE: every expert may be chosen
    extra = off_recipe_losses(moe)
    if first and extra:
        log.warning("moe.router.name=%s (recipe %s) leaves its paper's recipe: %s. Allowed "
                    "(research mixes them); to follow the paper, set the coefficient to 0 or "
                    "null for the recipe (docs/routers.md#training-recipes)",
                    RouterType(r.name).value, recipe_name(r, moe.chain_iterations),
                    "; ".join(extra))


def _validate_routing(cfg: Config, layout: Layout) -> None:
    """Rules of the routers and balance losses (moetrain/models/moe/router.py)."""
    _resolve_recipe(cfg)
    r, m, moe = cfg.moe.router, cfg.model, cfg.moe
    kind = RouterType(r.name)
    E, K = m.num_experts, m.top_k
    if K == 1 and r.renormalize and kind not in (RouterType.switch, RouterType.threshold,
                                                  RouterType.expert_choice):
        log.warning("model.top_k=1 with moe.router.renormalize=true: a single weight is never "
                    "renormalised (it would be 1.0 and the router would get no gradient from "
                    "the LM loss); the raw score is used. Set moe.router.renormalize=false "
                    "to silence this.")
    if r.n_groups > 1:
        if E % r.n_groups:
            raise ConfigError(
                f"moe.router.n_groups={r.n_groups} must divide model.num_experts={E}: use a "
                f"divisor of {E}, or moe.router.n_groups=1 to route without groups")
        per_group = E // r.n_groups
        if K > r.topk_groups * per_group:
            raise ConfigError(
                f"model.top_k={K} exceeds the {r.topk_groups} groups of {per_group} experts a "
                f"token may use (moe.router.topk_groups={r.topk_groups}): raise "
                f"moe.router.topk_groups or lower model.top_k")
        if GroupScore(r.group_score) == GroupScore.topk_sum and K % r.topk_groups:
            raise ConfigError(
                f"moe.router.group_score=topk_sum scores a group by its top "
                f"model.top_k/moe.router.topk_groups experts, but {K}/{r.topk_groups} is not "
                f"whole: use a moe.router.topk_groups that divides {K}, or group_score=top2_sum")
        if GroupScore(r.group_score) == GroupScore.top2_sum and per_group < 2:
            raise ConfigError(
                f"moe.router.group_score=top2_sum needs >= 2 experts per group, got "
                f"model.num_experts/moe.router.n_groups={per_group}: lower moe.router.n_groups")
        if kind not in (RouterType.topk, RouterType.deepseek_v3, RouterType.selective_sinkhorn):
            raise ConfigError(
                f"moe.router.n_groups={r.n_groups} (group-limited routing) is not supported by "
                f"moe.router.name={kind.value}: use moe/router=deepseek_v3 or topk, or "
                f"moe.router.n_groups=1")
    if kind == RouterType.deepseek_v3 and ScoreFunc(r.score_func) != ScoreFunc.sigmoid:
        raise ConfigError(
            f"moe.router.score_func={ScoreFunc(r.score_func).value} is invalid for "
            f"moe.router.name=deepseek_v3, which scores with a sigmoid: set "
            f"moe.router.score_func=sigmoid, or use moe/router=topk")
    softmax_only = (RouterType.noisy_topk, RouterType.expert_choice, RouterType.sinkhorn,
                    RouterType.selective_sinkhorn, RouterType.threshold, RouterType.switch,
                    RouterType.compete)  # compete: its router learns softmax(responses)
    if kind in softmax_only and ScoreFunc(r.score_func) != ScoreFunc.softmax:
        raise ConfigError(
            f"moe.router.score_func={ScoreFunc(r.score_func).value} is invalid for "
            f"moe.router.name={kind.value}, which scores with a softmax: set "
            f"moe.router.score_func=softmax, or use moe/router=sigmoid_topk or deepseek_v3")
    if r.bias_update_rate > 0 and kind not in BIAS_ROUTERS:
        raise ConfigError(
            f"moe.router.bias_update_rate={r.bias_update_rate} with moe.router.name={kind.value}:"
            f" that router does not select on scores + expert bias; use one of "
            f"{[k.value for k in BIAS_ROUTERS]}, or moe.router.bias_update_rate=0")
    if kind == RouterType.expert_choice and DispatchMode(moe.dispatch) == DispatchMode.capacity:
        raise ConfigError(
            "moe.dispatch=capacity with moe.router.name=expert_choice: expert-choice already "
            "gives every expert exactly its capacity (moe.router.ec_capacity_factor); set "
            "moe.dispatch=dropless")
    if kind == RouterType.noisy_topk and K >= E:
        raise ConfigError(
            f"model.top_k={K} with moe.router.name=noisy_topk and model.num_experts={E}: the "
            f"load loss needs top_k < num_experts; lower model.top_k")
    if kind == RouterType.threshold and r.max_k is not None and r.max_k > E:
        raise ConfigError(f"moe.router.max_k={r.max_k} exceeds model.num_experts={E}: lower it")
    seq = BalanceLoss(moe.balance_loss) == BalanceLoss.seq
    if seq and AuxLossScope(moe.aux_loss_scope) == AuxLossScope.global_batch:
        raise ConfigError(
            f"moe.balance_loss=seq (moe.router.name={kind.value}'s recipe unless set) with "
            f"moe.aux_loss_scope=global_batch: the sequence-wise loss counts each sequence on "
            f"its own; set moe.aux_loss_scope=micro_batch, or moe.balance_loss=switch")


# Routers whose experts per token are ``top_k`` (schedule=topk anneals it).
TOPK_SCHEDULE_ROUTERS = (RouterType.topk, RouterType.deepseek_v3, RouterType.noisy_topk,
                         RouterType.sinkhorn, RouterType.selective_sinkhorn,
                         RouterType.recurrent, RouterType.compete)


def _validate_schedule(cfg: Config, layout: Layout) -> None:
    """Rules of the schedules (moetrain/train/callbacks/schedules.py, dense_to_sparse.py)."""
    s, r, m, moe = cfg.schedule, cfg.moe.router, cfg.model, cfg.moe
    name, kind = ScheduleName(s.name), RouterType(r.name)
    E = m.num_experts
    if GateActivation(s.activation) != GateActivation.none and name != ScheduleName.dts_gate:
        raise ConfigError(
            f"schedule.activation={GateActivation(s.activation).value} only applies to "
            f"schedule=dts_gate (got schedule={name.value}): use schedule=dts_gate, or "
            f"schedule.activation=none")
    if (kind == RouterType.dts) != (name == ScheduleName.evomoe):
        raise ConfigError(
            f"moe.router.name={kind.value} with schedule={name.value}: the DTS router takes "
            f"its phases from EvoMoE's schedule and EvoMoE needs the DTS router: use "
            f"moe/router=dts with schedule=evomoe together")
    if name == ScheduleName.dts_gate and ScoreFunc(r.score_func) != ScoreFunc.softmax:
        raise ConfigError(
            f"moe.router.score_func={ScoreFunc(r.score_func).value} with schedule=dts_gate: "
            f"the dense-to-sparse gate is softmax(activation(logits) / tau): set "
            f"moe.router.score_func=softmax (moe/router=topk), or use schedule=temperature")
    if name == ScheduleName.topk:
        if kind not in TOPK_SCHEDULE_ROUTERS:
            raise ConfigError(
                f"schedule=topk with moe.router.name={kind.value}: that router does not route "
                f"a fixed top_k experts per token; use one of "
                f"{[k.value for k in TOPK_SCHEDULE_ROUTERS]}, or another schedule")
        for field_name, k in (("schedule.k_start", s.k_start), ("schedule.k_end", s.k_end)):
            if k is not None and k > E:
                raise ConfigError(f"{field_name}={k} exceeds model.num_experts={E}: use a k "
                                  f"in [1, {E}] (null: k_start = {E}, k_end = model.top_k)")
        k_max = max(s.k_start if s.k_start is not None else E,
                    s.k_end if s.k_end is not None else m.top_k)
        if r.n_groups > 1:
            if GroupScore(r.group_score) == GroupScore.topk_sum:
                raise ConfigError(
                    "schedule=topk with moe.router.group_score=topk_sum: that group score "
                    "needs top_k to be a multiple of moe.router.topk_groups at every step; "
                    "set moe.router.group_score=top2_sum, or moe.router.n_groups=1")
            allowed = r.topk_groups * (E // r.n_groups)
            if k_max > allowed:
                raise ConfigError(
                    f"schedule=topk reaches k={k_max}, more than the {allowed} experts of the "
                    f"moe.router.topk_groups={r.topk_groups} groups a token may use: lower "
                    f"schedule.k_start, or raise moe.router.topk_groups")
    if name == ScheduleName.capacity and DispatchMode(moe.dispatch) != DispatchMode.capacity:
        raise ConfigError(
            f"schedule=capacity with moe.dispatch={DispatchMode(moe.dispatch).value}: there is "
            f"no capacity factor to anneal: set moe.dispatch=capacity, or another schedule")
    if name == ScheduleName.capacity and moe.capacity_factor <= 0:
        raise ConfigError(
            f"schedule=capacity with moe.capacity_factor={moe.capacity_factor}: a factor <= 0 "
            f"is the adaptive capacity (the step's largest expert load), not a factor to "
            f"anneal to: set moe.capacity_factor > 0 (the schedule's end value), or "
            f"schedule=none")
    if name == ScheduleName.evomoe:
        if DispatchMode(moe.dispatch) != DispatchMode.dropless:
            raise ConfigError(
                "moe.dispatch=capacity with schedule=evomoe: its diversify phase sends every "
                "token to expert 0 and its soft phase a variable number of experts per "
                "token, which a capacity would drop: set moe.dispatch=dropless")
        if ScoreFunc(r.score_func) != ScoreFunc.softmax:
            raise ConfigError(
                f"moe.router.score_func={ScoreFunc(r.score_func).value} with moe.router.name="
                f"dts: EvoMoE's gate weights are softmax(logits): set "
                f"moe.router.score_func=softmax")
        if s.gumbel_threshold >= 1.0 / E:
            raise ConfigError(
                f"schedule.gumbel_threshold={s.gumbel_threshold} is not below 1/"
                f"model.num_experts = {1.0 / E:.4g}: some token could keep no expert (its "
                f"Gumbel-softmax values sum to 1); use a threshold below {1.0 / E:.4g} "
                f"(EvoMoE: 0.001)")
        if s.hard_k is not None and s.hard_k > E:
            raise ConfigError(
                f"schedule.hard_k={s.hard_k} exceeds model.num_experts={E}: use a k in "
                f"[1, {E}] (EvoMoE: 1), or null for model.top_k")
        if s.hard_step is not None and s.hard_step < s.diversify_steps:
            raise ConfigError(
                f"schedule.hard_step={s.hard_step} comes before the spawn at "
                f"schedule.diversify_steps={s.diversify_steps}: use a hard_step >= "
                f"{s.diversify_steps}, or null for diversify_steps + steps")
        if s.steps is None and s.diversify_steps >= cfg.train.steps:
            raise ConfigError(
                f"schedule.diversify_steps={s.diversify_steps} leaves no step of the "
                f"train.steps={cfg.train.steps} run for the DTS gate: lower diversify_steps, "
                f"or set schedule.steps")


def _validate_architectures(cfg: Config, layout: Layout) -> None:
    """Chain-of-Experts (moe.chain_iterations), RMoE (moe/router=recurrent) and
    CompeteSMoE (moe/router=compete): the combinations the MoE layer carries."""
    moe, r, par = cfg.moe, cfg.moe.router, cfg.parallel
    kind = RouterType(r.name)
    C = moe.chain_iterations
    etp = layout.tp > 1 and ExpertTP(par.expert_tp) == ExpertTP.etp
    residual = moe.chain_residual
    if C > 1 and kind in (RouterType.recurrent, RouterType.compete, RouterType.dts):
        raise ConfigError(
            f"moe.chain_iterations={C} with moe.router.name={kind.value}: a chain of experts "
            f"runs a plain router per round; set moe.chain_iterations=1, or use moe/router="
            f"topk (CoE's router)")
    if C > 1 and r.bias_update_rate > 0:
        raise ConfigError(
            f"moe.chain_iterations={C} with moe.router.bias_update_rate={r.bias_update_rate}: "
            f"the expert-bias update counts one routing per layer; set "
            f"moe.router.bias_update_rate=0 or moe.chain_iterations=1")
    if etp and (C > 1 or (residual is not None and residual != "outer")):
        raise ConfigError(
            f"moe.chain_iterations={C} (moe.chain_residual={residual}) with "
            f"parallel.expert_tp=etp: each round would need the previous round's output "
            f"all-reduced over tp; set parallel.expert_tp=ep")
    if etp and kind in (RouterType.recurrent, RouterType.compete):
        raise ConfigError(
            f"moe.router.name={kind.value} with parallel.expert_tp=etp and parallel.tp="
            f"{layout.tp}: the router state (recurrent) and the experts' full outputs "
            f"(compete) are per token on the rank's own sequence shard; set "
            f"parallel.expert_tp=ep")
    if (kind == RouterType.compete and r.compete_rate > 0
            and int(r.compete_warmup * cfg.train.steps) >= cfg.train.steps):
        log.warning("moe.router.compete_warmup=%s of train.steps=%d leaves no "
                    "competition step", r.compete_warmup, cfg.train.steps)


def _validate_null_experts(cfg: Config, layout: Layout) -> None:
    """MoE++'s zero-computation experts (model.zero_experts, copy_experts,
    constant_experts): the routers and designs they are built for."""
    m, moe = cfg.model, cfg.moe
    if not m.null_experts:
        return
    what = (f"model.zero_experts={m.zero_experts}, model.copy_experts={m.copy_experts}, "
            f"model.constant_experts={m.constant_experts}")
    kind = RouterType(moe.router.name)
    if kind not in (RouterType.topk, RouterType.switch, RouterType.deepseek_v3):
        raise ConfigError(
            f"{what} with moe.router.name={kind.value}: zero-computation experts are scored "
            f"by a top-k router (MoE++); use moe/router=topk, switch or deepseek_v3, or set "
            f"the three counts to 0")
    if moe.chain_iterations > 1 or m.expert_sizes is not None:
        field = ("moe.chain_iterations" if moe.chain_iterations > 1 else "model.expert_sizes")
        raise ConfigError(
            f"{what} with {field} set: zero-computation experts are not combined with it; "
            f"set the three counts to 0 or drop {field}")
    if cfg.init.from_dense:
        raise ConfigError(
            f"{what} with init.from_dense: upcycling fills FFN experts from the dense MLP and "
            f"has no meaning for zero-computation experts; set the counts to 0 to upcycle")
    if not 0 <= moe.null_expert_tau <= 1:
        raise ConfigError(
            f"moe.null_expert_tau={moe.null_expert_tau} is invalid: must be in [0, 1] (MoE++ "
            f"sweeps 0.1 to 1; 1 weights them like FFN experts)")


def _validate_mixer(cfg: Config, layout: Layout) -> None:
    """The sequence mixer (model.mixer: attention, mamba or Jamba's hybrid): the layouts
    and features a Mamba layer (moetrain/models/mamba.py) carries."""
    from moetrain.config.schema import Mixer  # (kept beside its only use in this file)

    m = cfg.model
    mamba = [i for i in range(m.n_layers) if not m.uses_attention(i)]
    mixer = Mixer(m.mixer).value
    if mixer == "hybrid" and len(mamba) in (0, m.n_layers):
        kind = "no Mamba layer" if not mamba else "no attention layer"
        raise ConfigError(
            f"model.mixer=hybrid with model.attention_period={m.attention_period}, "
            f"model.attention_offset={m.attention_offset} and model.n_layers={m.n_layers} "
            f"leaves {kind} (layer i attends iff i % period == offset): use model.mixer="
            f"{'attention' if not mamba else 'mamba'}, or an attention_offset below "
            f"{min(m.n_layers, m.attention_period)}")
    if not mamba:
        return
    if layout.tp > 1:
        raise ConfigError(
            f"parallel.tp={layout.tp} with model.mixer={mixer} ({len(mamba)} Mamba layers): "
            f"tensor parallelism has no plan for the Mamba mixer yet (in_proj's x and z "
            f"halves would each need their own column shard); set parallel.tp=1 and scale "
            f"with parallel.dp/ep/pp (FSDP shards the Mamba weights), or model.mixer="
            f"attention")
    if cfg.init.from_dense:
        raise ConfigError(
            f"init.from_dense with model.mixer={mixer}: upcycling copies a dense model's "
            f"attention into every layer, and layers {mamba[:4]}{'...' if len(mamba) > 4 else ''}"
            f" have a Mamba mixer it has no weights for; set model.mixer=attention to "
            f"upcycle, or drop init.from_dense")


def _validate_expert_sizes(cfg: Config, layout: Layout) -> None:
    """HMoE's ragged experts (model.expert_sizes; moetrain/models/moe/experts.py
    RaggedExperts): the layouts and features that hold them, and the size-weighted loss."""
    from moetrain.config.recipes import recipe_values

    m, moe, par = cfg.model, cfg.moe, cfg.parallel
    sized = BalanceLoss(recipe_values(moe)["balance_loss"]) == BalanceLoss.size_weighted
    if m.expert_sizes is None:
        if sized:
            raise ConfigError(
                "moe.balance_loss=size_weighted with model.expert_sizes=null: the loss weights "
                "each expert by its hidden size; set model.expert_sizes, or use "
                "moe.balance_loss=switch (the same loss for equal sizes)")
        return
    sizes = list(m.expert_sizes)
    what = f"model.expert_sizes={sizes}"
    if layout.ep > 1:
        # A size class whose count divides by ep goes whole (n_c/ep experts per rank); any
        # other has each expert split along F into ep slices (moetrain/models/moe/
        # experts.py split_classes): every rank holds the same parameters either way.
        counts = {f: sizes.count(f) for f in sorted(set(sizes))}
        split = {f: n for f, n in counts.items() if n % layout.ep}
        bad = [f for f in split if f % layout.ep]
        if bad:
            raise ConfigError(
                f"{what} with parallel.ep={layout.ep}: the size classes {split} (size: "
                f"experts) do not divide over the ep ranks, so each of their experts is "
                f"split along its hidden size into {layout.ep} slices, and sizes {bad} are "
                f"not multiples of {layout.ep}; use sizes that are multiples of "
                f"{layout.ep}, expert counts per size that divide by it, or another "
                f"parallel.ep")
        if split:
            for bad_setting, fix in (
                (DispatchMode(moe.dispatch) == DispatchMode.capacity,
                 "moe.dispatch=dropless (a capacity would count each slice's copy)"),
                (moe.a2a_overlap_chunks != 1, "moe.a2a_overlap_chunks=1"),
                (RouterType(moe.router.name) == RouterType.compete,
                 "a router other than moe/router=compete (dense steps need whole experts)"),
            ):
                if bad_setting:
                    raise ConfigError(
                        f"{what} with parallel.ep={layout.ep} splits the experts of sizes "
                        f"{sorted(split)} over the ep ranks (their counts {split} do not "
                        f"divide by {layout.ep}); that needs {fix}, or expert counts per "
                        f"size that divide by parallel.ep")
    if layout.tp > 1 and ExpertTP(par.expert_tp) == ExpertTP.etp:
        raise ConfigError(
            f"{what} with parallel.tp={layout.tp} and parallel.expert_tp=etp: tensor "
            f"parallelism inside ragged experts is not supported; use parallel.expert_tp=ep")
    if ScheduleName(cfg.schedule.name) == ScheduleName.evomoe:
        raise ConfigError(
            f"{what} with schedule=evomoe: EvoMoE spawns every expert from expert 0, which "
            f"needs experts of one size; set model.expert_sizes=null")
    if cfg.init.from_dense:
        raise ConfigError(
            f"{what} with init.from_dense: upcycling copies the dense MLP into experts of "
            f"its own hidden size (model.expert_hidden); set model.expert_sizes=null to "
            f"upcycle")


def _validate_init(cfg: Config) -> None:
    """Upcycling (init.from_dense) needs an MoE layer to upcycle into; the dense model's
    own checks (path, shapes) run when it is read (moetrain/checkpoint/upcycle.py)."""
    m, init = cfg.model, cfg.init
    if not init.from_dense:
        for name, unset in (("drop_ratio", 0.0), ("reuse_optimizer", False)):
            if getattr(init, name) != unset:
                raise ConfigError(
                    f"init.{name}={str(getattr(init, name)).lower()} only applies when "
                    f"upcycling: set "
                    f"init.from_dense=PATH, or drop init.{name}")
        return
    if not any(m.is_moe_layer(i) for i in range(m.n_layers)):
        raise ConfigError(
            f"init.from_dense is set but model.first_dense_layers={m.first_dense_layers} "
            f"with model.n_layers={m.n_layers} leaves no MoE layer to upcycle into: set "
            f"model.first_dense_layers below model.n_layers")


def _validate_grad_sync(par: ParallelConfig, layout: Layout) -> None:
    """``parallel.fsdp_grad_sync=every_microbatch`` needs FSDP to drive the gradient sync
    (moetrain/parallel/fsdp.py::grad_sync_mode)."""
    if FSDPGradSync(par.fsdp_grad_sync) != FSDPGradSync.every_microbatch:
        return
    if layout.pp > 1:
        raise ConfigError(
            f"parallel.fsdp_grad_sync=every_microbatch with parallel.pp={layout.pp}: the "
            f"pipeline schedule (torch.distributed.pipelining) reduce-scatters each FSDP "
            f"stage's gradients once, after the last micro-batch: set "
            f"parallel.fsdp_grad_sync=auto (or last_microbatch), or parallel.pp=1")
    if DataParallelMode(par.dp_mode) == DataParallelMode.replicate:
        raise ConfigError(
            "parallel.fsdp_grad_sync=every_microbatch with parallel.dp_mode=replicate: "
            "replicated data parallelism keeps full gradients and all-reduces them once per "
            "step, so a sync per micro-batch would add communication and save no memory: set "
            "parallel.fsdp_grad_sync=auto, or parallel.dp_mode=fsdp")


def _validate_a2a(cfg: Config, layout: Layout) -> None:
    """``parallel.a2a=hierarchical`` (moetrain/parallel/hierarchical.py): nodes are blocks
    of ``parallel.a2a_local_size`` consecutive ranks and EP groups blocks of ep consecutive
    ranks, so an EP group must span whole nodes (local size divides ep) or sit inside one
    (ep divides the local size: the flat all-to-all then runs, all of it inside the node).
    A null local size (torchrun's LOCAL_WORLD_SIZE) is checked the same way when the
    exchange is built."""
    par, ep = cfg.parallel, layout.ep
    if AllToAllMode(par.a2a) != AllToAllMode.hierarchical or ep == 1:
        return
    chunks = cfg.moe.a2a_overlap_chunks
    if chunks != 1:
        raise ConfigError(
            f"parallel.a2a=hierarchical with moe.a2a_overlap_chunks={chunks}: the chunked, "
            f"overlapped exchange runs flat all-to-alls of its own: set "
            f"moe.a2a_overlap_chunks=1, or parallel.a2a=flat")
    G = par.a2a_local_size
    if G is None:
        return
    if layout.world_size % G:
        raise ConfigError(
            f"parallel.a2a_local_size={G} does not divide the world size "
            f"{layout.world_size} (every node holds the same number of ranks): use a "
            f"divisor of {layout.world_size}, or null for torchrun's LOCAL_WORLD_SIZE")
    if ep % G and G % ep:
        raise ConfigError(
            f"parallel.a2a_local_size={G} with parallel.ep={ep}: an EP group of {ep} "
            f"consecutive ranks must span whole nodes of {G} ranks (local size divides ep) "
            f"or sit inside one (ep divides the local size): use a parallel.ep that is a "
            f"multiple or a divisor of {G}, or parallel.a2a=flat")


def _validate_sharded_experts(cfg: Config, layout: Layout) -> None:
    """Tutel's sharded experts (parallel.ep > model.num_experts; moetrain/parallel/
    adaptive.py): the modes that exist for the layout, and what the layout composes with."""
    m, moe, par = cfg.model, cfg.moe, cfg.parallel
    E, ep, r = m.num_experts, layout.ep, par.expert_r
    # HMoE's size classes split over ep themselves (_validate_expert_sizes): no modes
    if E == 0 or ep <= E or m.expert_sizes is not None:
        if r is not None and r != 1:
            raise ConfigError(
                f"parallel.expert_r={r} with model.num_experts={E} and parallel.ep={ep}: "
                f"every rank holds whole experts, so the only mode is r=1 (expert-parallel); "
                f"modes 0 and >1 need fewer experts than parallel.ep ranks (e.g. parallel.ep="
                f"{2 * E if E else 2}); set parallel.expert_r=null")
        return
    s = ep // E
    what = f"parallel.ep={ep} with model.num_experts={E} (each expert split over {s} ranks)"
    rs = [0] + [d for d in range(1, s + 1) if s % d == 0]
    if r is not None and r not in rs:
        raise ConfigError(
            f"parallel.expert_r={r} with {what}: the valid modes are r in {rs} (0 gathered, "
            f"1 expert-parallel, {s} expert-tensor-parallel); pick one, or null")
    if m.expert_hidden % s:
        raise ConfigError(
            f"model.expert_hidden={m.expert_hidden} with {what}: each rank holds 1/{s} of "
            f"every expert's hidden units; use a model.expert_hidden that is a multiple of {s}")
    refusals = [
        (bool(m.null_experts), "zero-computation experts (model.zero/copy/constant_experts)",
         "set them to 0"),
        (layout.tp > 1, f"parallel.tp={layout.tp}", "use parallel.tp=1"),
        (moe.a2a_overlap_chunks != 1, f"moe.a2a_overlap_chunks={moe.a2a_overlap_chunks}",
         "set moe.a2a_overlap_chunks=1"),
        (AllToAllMode(par.a2a) != AllToAllMode.flat, f"parallel.a2a={AllToAllMode(par.a2a).value}",
         "use parallel.a2a=flat"),
        (RouterType(moe.router.name) == RouterType.compete,
         "moe/router=compete (its dense steps run every expert)", "use another router"),
    ]
    for bad, name, fix in refusals:
        if bad:
            raise ConfigError(f"{name} with {what}: not supported with sharded experts; {fix}, "
                              f"or use a parallel.ep that divides model.num_experts")
    edp = layout.dp * layout.tp // ep
    if edp > 1 and layout.dp > 1 and DataParallelMode(par.dp_mode) == DataParallelMode.fsdp:
        raise ConfigError(
            f"{what} and {edp} replicas of each expert shard (dp*tp/ep) under "
            f"parallel.dp_mode=fsdp: FSDP cannot shard the experts' 2-D layout over the "
            f"replicas; use parallel.dp_mode=replicate, or parallel.ep={layout.dp * layout.tp}")


def validate(cfg: Config, world_size: int) -> Layout:
    """All cross-field rules. Returns the resolved layout, and resolves
    ``train.micro_batch_size=auto`` in ``cfg`` to an int (:func:`resolve_micro_batch_size`)."""
    # HMoE's size classes place themselves (whole, or split over ep: _validate_expert_sizes)
    layout = resolve_layout(cfg.parallel, world_size,
                            None if cfg.model.expert_sizes is not None else cfg.model.num_experts)
    t, m = cfg.train, cfg.model
    if t.micro_batch_size == AUTO or t.micro_batch_size == getattr(t, _AUTO_CHOICE, None):
        t.micro_batch_size = resolve_micro_batch_size(t, cfg.parallel, layout)
        setattr(t, _AUTO_CHOICE, t.micro_batch_size)
    per_step = t.micro_batch_size * layout.dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} must be a multiple of "
            f"train.micro_batch_size*dp={t.micro_batch_size}*{layout.dp}={per_step}: "
            f"set train.global_batch_size to {max(per_step, t.global_batch_size // per_step * per_step)} "
            f"or change train.micro_batch_size"
        )
    if t.seq_len > m.max_seq_len:
        raise ConfigError(
            f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}: "
            f"lower train.seq_len or raise model.max_seq_len"
        )
    if m.n_heads % layout.tp:
        raise ConfigError(
            f"model.n_heads={m.n_heads} is not divisible by parallel.tp={layout.tp}: "
            f"use a tp that divides {m.n_heads}"
        )
    kv = m.n_kv_heads or m.n_heads
    if kv % layout.tp:
        raise ConfigError(
            f"model.n_kv_heads={kv} is not divisible by parallel.tp={layout.tp}: "
            f"use a tp that divides {kv}"
        )
    _validate_tp(cfg, layout)
    _validate_pp(cfg, layout)
    _validate_grad_sync(cfg.parallel, layout)
    _validate_a2a(cfg, layout)
    _validate_routing(cfg, layout)
    _validate_architectures(cfg, layout)
    _validate_expert_sizes(cfg, layout)
    _validate_sharded_experts(cfg, layout)
    _validate_mixer(cfg, layout)
    _validate_null_experts(cfg, layout)
    _validate_schedule(cfg, layout)
    _validate_init(cfg)
    return layout
