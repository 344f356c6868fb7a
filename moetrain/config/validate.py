"""Cross-field rules that need the world size. They run before any process group exists."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from moetrain.config.schema import (
    AuxLossScope,
    BalanceLoss,
    Config,
    ConfigError,
    DispatchMode,
    ExpertTP,
    GroupScore,
    ParallelConfig,
    PipelineSchedule,
    RouterType,
    ScoreFunc,
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
    if num_experts is not None and num_experts % par.ep:
        valid = [d for d in range(1, num_experts + 1) if num_experts % d == 0 and (dp * par.tp) % d == 0]
        raise ConfigError(
            f"model.num_experts={num_experts} is not divisible by parallel.ep={par.ep}: "
            f"use parallel.ep in {valid}"
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


def _validate_routing(cfg: Config, layout: Layout) -> None:
    """Rules of the routers and balance losses (moetrain/models/moe/router.py)."""
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
                    RouterType.selective_sinkhorn, RouterType.threshold, RouterType.switch)
    if kind in softmax_only and ScoreFunc(r.score_func) != ScoreFunc.softmax:
        raise ConfigError(
            f"moe.router.score_func={ScoreFunc(r.score_func).value} is invalid for "
            f"moe.router.name={kind.value}, which scores with a softmax: set "
            f"moe.router.score_func=softmax, or use moe/router=sigmoid_topk or deepseek_v3")
    if kind in (RouterType.expert_choice, RouterType.sinkhorn) and moe.aux_loss_coef > 0:
        log.warning("moe.aux_loss_coef=%s with moe.router.name=%s: this router balances by "
                    "construction, so the balance loss is logged (aux_loss) but not trained "
                    "on; set moe.aux_loss_coef=0 to silence this", moe.aux_loss_coef, kind.value)
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
            "moe.balance_loss=seq with moe.aux_loss_scope=global_batch: the sequence-wise loss "
            "counts each sequence on its own; set moe.aux_loss_scope=micro_batch, or "
            "moe.balance_loss=switch")


def validate(cfg: Config, world_size: int) -> Layout:
    """All cross-field rules. Returns the resolved layout."""
    layout = resolve_layout(cfg.parallel, world_size, cfg.model.num_experts)
    t, m = cfg.train, cfg.model
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
    _validate_routing(cfg, layout)
    return layout
