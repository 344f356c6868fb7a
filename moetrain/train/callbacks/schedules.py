"""Annealing schedules as callbacks (``schedule=<name>``): router temperature, experts per
token, capacity factor and the activation dense-to-sparse gate. EvoMoE's phases are in
``dense_to_sparse.py``.

Every value is a function of the global step t, the number of optimizer steps done before
the step being trained. So a resume at any step sets exactly the values of the
uninterrupted run. The callbacks keep no state; the step is in the checkpoint. Values are
set before each step's forward, and again after it for the validation and checkpoint that
follow. Each step's metrics get the values that step trained with, under ``schedule/``.
User docs: docs/schedules.md.
"""

from __future__ import annotations

import math

from moetrain.config.schema import (
    Anneal,
    Config,
    ConfigError,
    GateActivation,
    ScheduleConfig,
    ScheduleName,
)
from moetrain.train.callbacks.base import Callback

__all__ = ["CapacitySchedule", "ScheduleCallback", "TemperatureSchedule", "TopKSchedule",
           "anneal", "anneal_int", "build_schedule", "schedule_steps"]


# ----------------------------------------------------------------------------- values
def anneal(kind: Anneal, start: float, end: float, t: int, steps: int) -> float:
    """The annealed value at step t: ``start`` for t <= 0, ``end`` for t >= ``steps``
    (exactly, whatever the shape), and in between, with f = t / steps:

    - linear: start + (end - start) f  (EvoMoE's linear decay, which clamps at end)
    - exp: start (end / start)^f = start exp(f ln(end / start))  (EvoMoE's exponential
      decay; the geometric mean sqrt(start end) at f = 1/2)
    - cosine: end + (start - end) (1 + cos(pi f)) / 2
    """
    if t <= 0:
        return float(start)
    if t >= steps:
        return float(end)
    f = t / steps
    kind = Anneal(kind)
    if kind == Anneal.linear:
        return start + (end - start) * f
    if kind == Anneal.exp:
        return start * math.exp(f * math.log(end / start))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * f))


def anneal_int(kind: Anneal, start: int, end: int, t: int, steps: int) -> int:
    """An integer schedule: the real value of :func:`anneal` rounded toward ``start``
    (up when decreasing, down when increasing). k therefore reaches each integer between
    start and end in turn, holds each until the real value has passed it, and is ``end``
    from step ``steps`` on. Example: linear 8 -> 2 over 12 steps gives 8, 8, 7, 7, ..., 3,
    3, 2 (k(t) = ceil(8 - t/2))."""
    v = anneal(kind, start, end, t, steps)
    k = math.ceil(v - 1e-9) if start >= end else math.floor(v + 1e-9)
    return int(min(max(k, min(start, end)), max(start, end)))


def schedule_steps(cfg: ScheduleConfig, train_steps: int, offset: int = 0) -> int:
    """The schedule's N: ``schedule.steps``, or the rest of the run after ``offset`` less
    one step, so that the last trained step (t = train.steps - 1) already runs at the end
    value that validation, checkpoints and exports use."""
    return cfg.steps if cfg.steps is not None else max(1, train_steps - 1 - offset)


# ----------------------------------------------------------------------------- callbacks
class ScheduleCallback(Callback):
    """Base of the schedules: :meth:`values` (t -> the values of step t) and :meth:`apply`
    (set them on this rank's MoE layers). Stateless: the step is in the checkpoint.

    Under ``parallel.compile`` a router reads its temperature from a 0-dim buffer, so an
    annealed temperature never recompiles. An integer such as top_k specialises the
    compiled graphs, and each distinct value compiles once. ``on_train_start`` raises
    dynamo's recompile limit to cover the values the schedule will take.
    """

    name = "schedule"

    def __init__(self) -> None:
        self.current: dict[str, float] = {}

    def values(self, t: int) -> dict[str, float]:
        raise NotImplementedError

    def apply(self, layers: list, t: int) -> dict[str, float]:
        """Set step t's values on ``layers`` (MoE layers); return them."""
        raise NotImplementedError

    def distinct_compiles(self) -> int:
        """How many distinct compile-time values (e.g. top_k) the schedule takes."""
        return 1

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


class TemperatureSchedule(ScheduleCallback):
    """Router temperature tau(t) = anneal(start -> end over N steps): every router divides
    its logits by tau (softmax(logits / tau); sigmoid routers likewise). With
    ``activation`` it is the activation dense-to-sparse gate of Nguyen et al. 2024 (arXiv
    2401.13875): softmax(sigma(logits) / tau), sigma in {tanh, sigmoid, gelu}."""

    name = "schedule_temperature"

    def __init__(self, kind: Anneal, start: float, end: float, steps: int,
                 activation: GateActivation = GateActivation.none) -> None:
        super().__init__()
        self.kind, self.start, self.end, self.steps = Anneal(kind), start, end, steps
        self.activation = GateActivation(activation)

    def values(self, t: int) -> dict[str, float]:
        return {"temperature": anneal(self.kind, self.start, self.end, t, self.steps)}

    def apply(self, layers, t):
        v = self.values(t)
        for layer in layers:
            layer.router.temperature = v["temperature"]
            layer.router.score_activation = self.activation
        return v


class TopKSchedule(ScheduleCallback):
    """Experts per token k(t) = :func:`anneal_int` (k_start -> k_end over N steps). The
    routers' ``top_k`` changes between steps, and MFU follows the routed experts per
    token (``active_k``)."""

    name = "schedule_topk"

    def __init__(self, kind: Anneal, start: int, end: int, steps: int) -> None:
        super().__init__()
        self.kind, self.start, self.end, self.steps = Anneal(kind), start, end, steps

    def values(self, t: int) -> dict[str, float]:
        return {"top_k": anneal_int(self.kind, self.start, self.end, t, self.steps)}

    def distinct_compiles(self) -> int:
        return abs(self.start - self.end) + 1

    def apply(self, layers, t):
        v = self.values(t)
        for layer in layers:
            layer.router.top_k = v["top_k"]
        return v


class CapacitySchedule(ScheduleCallback):
    """Capacity factor c(t) = anneal(start -> end over N steps) of each layer's dispatcher
    (``moe.dispatch=capacity``). The expert-parallel dispatcher sizes its exchange and
    its local sort with the same factor."""

    name = "schedule_capacity"

    def __init__(self, kind: Anneal, start: float, end: float, steps: int) -> None:
        super().__init__()
        self.kind, self.start, self.end, self.steps = Anneal(kind), start, end, steps

    def values(self, t: int) -> dict[str, float]:
        return {"capacity_factor": anneal(self.kind, self.start, self.end, t, self.steps)}

    def apply(self, layers, t):
        v = self.values(t)
        for layer in layers:
            d = layer.dispatcher
            d.capacity_factor = v["capacity_factor"]
            if getattr(d, "local", None) is not None:  # AllToAllDispatcher's local sort
                d.local.capacity_factor = v["capacity_factor"]
        return v


def build_schedule(cfg: Config) -> ScheduleCallback | None:
    """The callback of ``cfg.schedule`` (None for ``schedule=none``)."""
    s, m = cfg.schedule, cfg.model
    name = ScheduleName(s.name)
    if name == ScheduleName.none:
        return None
    if name in (ScheduleName.temperature, ScheduleName.dts_gate):
        act = s.activation if name == ScheduleName.dts_gate else GateActivation.none
        return TemperatureSchedule(s.anneal, s.temperature_start, s.temperature_end,
                                   schedule_steps(s, cfg.train.steps), act)
    if name == ScheduleName.topk:
        k0 = s.k_start if s.k_start is not None else m.num_experts
        k1 = s.k_end if s.k_end is not None else m.top_k
        return TopKSchedule(s.anneal, k0, k1, schedule_steps(s, cfg.train.steps))
    if name == ScheduleName.capacity:
        end = s.capacity_end if s.capacity_end is not None else cfg.moe.capacity_factor
        return CapacitySchedule(s.anneal, s.capacity_start, end,
                                schedule_steps(s, cfg.train.steps))
    if name == ScheduleName.evomoe:
        from moetrain.train.callbacks.dense_to_sparse import EvoMoECallback

        return EvoMoECallback.from_config(cfg)
    raise ConfigError(f"schedule.name={s.name!r} has no callback: use one of "
                      f"{[n.value for n in ScheduleName]}")

