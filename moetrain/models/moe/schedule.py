"""What ``schedule=<name>`` sets on the MoE layers at a global step: router temperature,
experts per token, capacity factor, the activation dense-to-sparse gate and EvoMoE's
phases.

Every value is a pure function of the config and the global step t, the number of
optimizer steps done before the step being trained. So a resume at any step sets exactly
the values of the uninterrupted run, and ``moetrain.load`` sets the values a checkpoint's
step trained with. The trainer's callbacks (``moetrain/train/callbacks/schedules.py``,
``dense_to_sparse.py``) call :meth:`RouterSchedule.apply` around every step. User docs:
docs/schedules.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from moetrain.config.schema import (
    Anneal,
    Config,
    ConfigError,
    GateActivation,
    ScheduleConfig,
    ScheduleName,
)
from moetrain.models.moe.router import DTSPhase

__all__ = ["PHASE_CODES", "SCHEDULES", "CapacitySchedule", "EvoMoESchedule", "RouterSchedule",
           "TemperatureSchedule", "TopKSchedule", "anneal", "anneal_int", "build_schedule",
           "schedule_steps"]

# schedule/phase in metrics.jsonl and TensorBoard (a number: metrics are scalars).
PHASE_CODES = {DTSPhase.diversify: 0, DTSPhase.soft: 1, DTSPhase.hard: 2}


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


# ----------------------------------------------------------------------------- schedules
class RouterSchedule:
    """One schedule: :meth:`values` (t -> the values of step t) and :meth:`apply` (set
    them on MoE layers). Stateless: the step says everything."""

    def values(self, t: int) -> dict[str, float]:
        raise NotImplementedError

    def apply(self, layers: list, t: int) -> dict[str, float]:
        """Set step t's values on ``layers`` (MoE layers); return them."""
        raise NotImplementedError

    def distinct_compiles(self) -> int:
        """How many distinct compile-time values (e.g. top_k) the schedule takes."""
        return 1

    @classmethod
    def from_config(cls, cfg: Config, **extra: Any) -> RouterSchedule:
        """The schedule of ``cfg.schedule``; ``extra`` goes to the constructor as is."""
        raise NotImplementedError


class TemperatureSchedule(RouterSchedule):
    """Router temperature tau(t) = anneal(start -> end over N steps): every router divides
    its logits by tau (softmax(logits / tau); sigmoid routers likewise). With
    ``activation`` it is the activation dense-to-sparse gate of Nguyen et al. 2024 (arXiv
    2401.13875): softmax(sigma(logits) / tau), sigma in {tanh, sigmoid, gelu}."""

    def __init__(self, kind: Anneal, start: float, end: float, steps: int,
                 activation: GateActivation = GateActivation.none) -> None:
        self.kind, self.start, self.end, self.steps = Anneal(kind), start, end, steps
        self.activation = GateActivation(activation)

    @classmethod
    def from_config(cls, cfg: Config, **extra: Any) -> TemperatureSchedule:
        s = cfg.schedule
        act = s.activation if ScheduleName(s.name) == ScheduleName.dts_gate else GateActivation.none
        return cls(s.anneal, s.temperature_start, s.temperature_end,
                   schedule_steps(s, cfg.train.steps), act, **extra)

    def values(self, t: int) -> dict[str, float]:
        return {"temperature": anneal(self.kind, self.start, self.end, t, self.steps)}

    def apply(self, layers, t):
        v = self.values(t)
        for router in _routers(layers):
            router.temperature = v["temperature"]
            router.score_activation = self.activation
        return v


class TopKSchedule(RouterSchedule):
    """Experts per token k(t) = :func:`anneal_int` (k_start -> k_end over N steps). The
    routers' ``top_k`` changes between steps, and MFU follows the routed experts per
    token (``active_k``)."""

    def __init__(self, kind: Anneal, start: int, end: int, steps: int) -> None:
        self.kind, self.start, self.end, self.steps = Anneal(kind), start, end, steps

    @classmethod
    def from_config(cls, cfg: Config, **extra: Any) -> TopKSchedule:
        s, m = cfg.schedule, cfg.model
        k0 = s.k_start if s.k_start is not None else m.num_experts
        k1 = s.k_end if s.k_end is not None else m.top_k
        return cls(s.anneal, k0, k1, schedule_steps(s, cfg.train.steps), **extra)

    def values(self, t: int) -> dict[str, float]:
        return {"top_k": anneal_int(self.kind, self.start, self.end, t, self.steps)}

    def distinct_compiles(self) -> int:
        return abs(self.start - self.end) + 1

    def apply(self, layers, t):
        v = self.values(t)
        for router in _routers(layers):
            router.top_k = v["top_k"]
        return v


class CapacitySchedule(RouterSchedule):
    """Capacity factor c(t) = anneal(start -> end over N steps) of each layer's dispatcher
    (``moe.dispatch=capacity``). The expert-parallel dispatcher sizes its exchange and
    its local sort with the same factor."""

    def __init__(self, kind: Anneal, start: float, end: float, steps: int) -> None:
        self.kind, self.start, self.end, self.steps = Anneal(kind), start, end, steps

    @classmethod
    def from_config(cls, cfg: Config, **extra: Any) -> CapacitySchedule:
        s = cfg.schedule
        end = s.capacity_end if s.capacity_end is not None else cfg.moe.capacity_factor
        return cls(s.anneal, s.capacity_start, end, schedule_steps(s, cfg.train.steps),
                   **extra)

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


class EvoMoESchedule(RouterSchedule):
    """EvoMoE's phases (Nie et al. 2021, arXiv 2112.14397) on every DTS router, by global
    step t:

    - t < diversify_steps: diversify, every token to expert 0 with weight 1;
    - diversify_steps <= t < hard_step: the Dense-to-Sparse gate (soft phase), with the
      Gumbel-softmax temperature tau(t) = anneal(tau_start -> tau_end, t -
      diversify_steps, steps);
    - t >= hard_step: hard top-k of the Gumbel-perturbed logits, k = ``top_k``
      (``schedule.hard_k``, null = model.top_k; EvoMoE's is 1). Evaluation routes on the
      top k of the clean logits.

    ``gumbel_gates`` combines with the Gumbel-softmax values instead of softmax(logits)
    (EvoMoE's ``--use-gumbel-gates``). The spawn of the experts at t = diversify_steps
    changes weights and optimizer state, not router values: it is the trainer callback's
    (``dense_to_sparse.py``).
    """

    def __init__(self, diversify_steps: int, hard_step: int, kind: Anneal, tau_start: float,
                 tau_end: float, steps: int, top_k: int, gumbel_threshold: float,
                 gumbel_gates: bool = False) -> None:
        self.diversify_steps, self.hard_step = diversify_steps, hard_step
        self.kind, self.tau_start, self.tau_end, self.steps = Anneal(kind), tau_start, tau_end, steps
        self.top_k, self.gumbel_threshold = top_k, gumbel_threshold
        self.gumbel_gates = bool(gumbel_gates)

    @classmethod
    def from_config(cls, cfg: Config, **extra: Any) -> EvoMoESchedule:
        s = cfg.schedule
        steps = schedule_steps(s, cfg.train.steps, offset=s.diversify_steps)
        hard = s.hard_step if s.hard_step is not None else s.diversify_steps + steps
        k = s.hard_k if s.hard_k is not None else cfg.model.top_k
        return cls(s.diversify_steps, hard, s.anneal, s.temperature_start, s.temperature_end,
                   steps, k, s.gumbel_threshold, gumbel_gates=s.gumbel_gates, **extra)

    def phase(self, t: int) -> DTSPhase:
        if t < self.diversify_steps:
            return DTSPhase.diversify
        return DTSPhase.soft if t < self.hard_step else DTSPhase.hard

    def values(self, t: int) -> dict[str, float]:
        phase = self.phase(t)
        tau = anneal(self.kind, self.tau_start, self.tau_end, t - self.diversify_steps,
                     self.steps)
        out = {"phase": PHASE_CODES[phase], "temperature": tau}
        if phase != DTSPhase.soft:  # the soft phase's k varies per token: see active_k
            out["top_k"] = 1 if phase == DTSPhase.diversify else self.top_k
        return out

    def distinct_compiles(self) -> int:
        return len(PHASE_CODES)

    def apply(self, layers, t):
        v = self.values(t)
        for layer in layers:
            r = layer.router
            r.phase = self.phase(t)
            r.temperature = v["temperature"]
            r.top_k = self.top_k
            r.gumbel_threshold = self.gumbel_threshold
            r.gumbel_gates = self.gumbel_gates
        return v


def _routers(layers) -> list:
    """Every router of ``layers``: each chain round's (moe.chain_iterations) included."""
    return [r for layer in layers for r in getattr(layer, "routers", [layer.router])]


# schedule=<name> -> its schedule (temperature and dts_gate differ in the gate activation).
SCHEDULES: dict[ScheduleName, type[RouterSchedule]] = {
    ScheduleName.temperature: TemperatureSchedule,
    ScheduleName.dts_gate: TemperatureSchedule,
    ScheduleName.topk: TopKSchedule,
    ScheduleName.capacity: CapacitySchedule,
    ScheduleName.evomoe: EvoMoESchedule,
}


def build_schedule(cfg: Config, classes: Mapping[ScheduleName, type[RouterSchedule]] = SCHEDULES
                   ) -> RouterSchedule | None:
    """The schedule of ``cfg.schedule`` (None for ``schedule=none``), an instance of
    ``classes[name]``: the trainer passes its callback subclasses here."""
    name = ScheduleName(cfg.schedule.name)
    if name == ScheduleName.none:
        return None
    if name not in classes:
        raise ConfigError(f"schedule.name={cfg.schedule.name!r} has no schedule: use one of "
                          f"{[n.value for n in ScheduleName]}")
    return classes[name].from_config(cfg)
