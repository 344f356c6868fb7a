"""Trainer callbacks: the protocol (``base``) and the built-in ones (``routing``)."""

from moetrain.train.callbacks.base import CALLBACKS, Callback, CallbackList, register_callback
from moetrain.train.callbacks.routing import (
    BalanceMonitorCallback,
    ExpertBiasCallback,
    RoutingContextCallback,
    default_callbacks,
)

__all__ = ["CALLBACKS", "BalanceMonitorCallback", "Callback", "CallbackList",
           "ExpertBiasCallback", "RoutingContextCallback", "default_callbacks",
           "register_callback"]
