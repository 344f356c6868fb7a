"""Trainer callbacks: the protocol (``base``), the routing ones (``routing``), the
annealing and dense-to-sparse schedules (``schedules``, ``dense_to_sparse``) and the list
a config asks for (``defaults``)."""

from moetrain.train.callbacks.base import CALLBACKS, Callback, CallbackList, register_callback
from moetrain.train.callbacks.defaults import build_schedule, default_callbacks
from moetrain.train.callbacks.dense_to_sparse import EvoMoECallback, spawn_experts
from moetrain.train.callbacks.routing import (
    BalanceMonitorCallback,
    ExpertBiasCallback,
    RoutingContextCallback,
)
from moetrain.train.callbacks.schedules import (
    CapacitySchedule,
    ScheduleCallback,
    TemperatureSchedule,
    TopKSchedule,
)

__all__ = ["CALLBACKS", "BalanceMonitorCallback", "Callback", "CallbackList",
           "CapacitySchedule", "EvoMoECallback", "ExpertBiasCallback",
           "RoutingContextCallback", "ScheduleCallback", "TemperatureSchedule",
           "TopKSchedule", "build_schedule", "default_callbacks", "register_callback",
           "spawn_experts"]
