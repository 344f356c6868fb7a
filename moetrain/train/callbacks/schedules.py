"""Annealing schedules as callbacks (``schedule=<name>``): router temperature, experts per
token, capacity factor and the activation dense-to-sparse gate. EvoMoE's phases are in
``dense_to_sparse.py``; the callback of a config comes from ``defaults.build_schedule``.

The values are a pure function of (config, step), defined in
``moetrain/models/moe/schedule.py`` so that ``moetrain.load`` sets them without the
trainer. Each callback here is that schedule plus the trainer's hooks: values are set
before each step's forward, and again after it for the validation and checkpoint that
follow. Each step's metrics get the values that step trained with, under ``schedule/``.
User docs: docs/schedules.md.
"""

from __future__ import annotations

from moetrain.models.moe import schedule
from moetrain.models.moe.schedule import RouterSchedule, anneal, anneal_int, schedule_steps
from moetrain.train.callbacks.base import Callback

__all__ = ["CapacitySchedule", "ScheduleCallback", "TemperatureSchedule", "TopKSchedule",
           "anneal", "anneal_int", "schedule_steps"]


class ScheduleCallback(Callback, RouterSchedule):
    """The trainer's hooks for a :class:`RouterSchedule`: a schedule callback derives from
    this class and from the schedule whose values it sets, which supplies ``values``,
    ``apply`` and the constructor. Stateless: the step is in the checkpoint.

    Under ``parallel.compile`` a router reads its temperature from a 0-dim buffer, so an
    annealed temperature never recompiles. An integer such as top_k specialises the
    compiled graphs, and each distinct value compiles once. ``on_train_start`` raises
    dynamo's recompile limit to cover the values the schedule will take.
    """

    name = "schedule"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)  # the schedule's
        self.current: dict[str, float] = {}

    def _set(self, trainer, t: int) -> None:
        self.current = self.apply(trainer.pm.moe_layers, t)

    def on_train_start(self, trainer) -> None:
        if trainer.cfg.parallel.compile and self.distinct_compiles() > 1:
            import torch._dynamo.config as dynamo_config

            limit = 8 + self.distinct_compiles()
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, limit)
        self._set(trainer, trainer.progress.step)

    def on_step_start(self, trainer, step, micro_batches) -> None:
        self._set(trainer, step)

    def on_step_end(self, trainer, step, metrics) -> None:
        metrics.update({f"schedule/{k}": v for k, v in self.current.items()})
        self._set(trainer, step)  # the next step's values, for validation and checkpoint


class TemperatureSchedule(ScheduleCallback, schedule.TemperatureSchedule):
    __doc__ = schedule.TemperatureSchedule.__doc__
    name = "schedule_temperature"


class TopKSchedule(ScheduleCallback, schedule.TopKSchedule):
    __doc__ = schedule.TopKSchedule.__doc__
    name = "schedule_topk"


class CapacitySchedule(ScheduleCallback, schedule.CapacitySchedule):
    __doc__ = schedule.CapacitySchedule.__doc__
    name = "schedule_capacity"
