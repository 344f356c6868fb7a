"""Cross-field rules that need the world size. They run before any process group exists."""

from __future__ import annotations

from dataclasses import dataclass

from moetrain.config.schema import Config, ConfigError, ParallelConfig


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
    if m.n_layers % layout.pp:
        raise ConfigError(
            f"model.n_layers={m.n_layers} is not divisible by parallel.pp={layout.pp}: "
            f"use a pp that divides {m.n_layers}"
        )
    return layout
