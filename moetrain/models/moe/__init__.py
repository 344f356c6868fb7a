"""Mixture-of-Experts building blocks: router, dispatcher, experts, losses and the layer."""

from moetrain.models.moe.dispatcher import (
    Dispatcher,
    DispatchMeta,
    LocalDispatcher,
    combine_rows,
    expert_capacity,
)
from moetrain.models.moe.experts import FeedForward, GroupedExperts, grouped_mm_supported
from moetrain.models.moe.layer import AuxLossInjector, MoELayer, MoEStats
from moetrain.models.moe.losses import load_balancing_loss, router_entropy, z_loss
from moetrain.models.moe.router import (
    ROUTERS,
    RouterOutput,
    SwitchRouter,
    TopKRouter,
    build_router,
    register_router,
)

__all__ = [
    "ROUTERS",
    "AuxLossInjector",
    "DispatchMeta",
    "Dispatcher",
    "FeedForward",
    "GroupedExperts",
    "LocalDispatcher",
    "MoELayer",
    "MoEStats",
    "RouterOutput",
    "SwitchRouter",
    "TopKRouter",
    "build_router",
    "combine_rows",
    "expert_capacity",
    "grouped_mm_supported",
    "load_balancing_loss",
    "register_router",
    "router_entropy",
    "z_loss",
]
