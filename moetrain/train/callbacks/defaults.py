"""The callbacks a config asks for: :func:`default_callbacks` (the trainer's list) and
:func:`build_schedule` (the callback of ``schedule=<name>``). This module imports every
callback module, so that none of them needs another's factory."""

from __future__ import annotations

from moetrain.config.schema import Config, ConfigError, ScheduleName
from moetrain.models.moe import schedule
from moetrain.train.callbacks.base import CALLBACKS, Callback
from moetrain.train.callbacks.dense_to_sparse import EvoMoECallback
from moetrain.train.callbacks.routing import RoutingContextCallback
from moetrain.train.callbacks.schedules import (
    CapacitySchedule,
    ScheduleCallback,
    TemperatureSchedule,
    TopKSchedule,
)

__all__ = ["SCHEDULE_CALLBACKS", "build_schedule", "default_callbacks"]

# schedule=<name> -> its callback: the schedule of moetrain.models.moe.schedule.SCHEDULES
# with the trainer's hooks.
SCHEDULE_CALLBACKS: dict[ScheduleName, type[ScheduleCallback]] = {
    ScheduleName.temperature: TemperatureSchedule,
    ScheduleName.dts_gate: TemperatureSchedule,
    ScheduleName.topk: TopKSchedule,
    ScheduleName.capacity: CapacitySchedule,
    ScheduleName.evomoe: EvoMoECallback,
}


def build_schedule(cfg: Config) -> ScheduleCallback | None:
    """The callback of ``cfg.schedule`` (None for ``schedule=none``)."""
    return schedule.build_schedule(cfg, SCHEDULE_CALLBACKS)


def default_callbacks(cfg: Config) -> list[Callback]:
    """The callbacks the config needs, then the extra ones named in ``cfg.callbacks``."""
    out: list[Callback] = [RoutingContextCallback(cfg.seed, cfg.train.seq_len, cfg.train.steps)]
    if cfg.moe.router.bias_update_rate > 0:
        out.append(CALLBACKS["expert_bias"](cfg))
    out.append(CALLBACKS["balance_monitor"](cfg))
    sched = build_schedule(cfg)  # schedule=<name>; None for none
    if sched is not None:
        out.append(sched)
    have = {cb.name for cb in out}
    for name in cfg.callbacks:
        if name in have:
            continue
        if name not in CALLBACKS:
            raise ConfigError(f"callbacks={list(cfg.callbacks)} names {name!r}, which is not a "
                              f"registered callback: use some of {sorted(CALLBACKS)}")
        out.append(CALLBACKS[name](cfg))
        have.add(name)
    return out
