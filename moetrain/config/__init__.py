"""Config schema, Hydra registration and validation. A leaf: it imports nothing from moetrain."""

from hydra.core.config_store import ConfigStore

from moetrain.config.schema import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    ParallelConfig,
    RouterConfig,
    TrainConfig,
)
from moetrain.config.validate import Layout, resolve_layout, validate

# Schemas are stored as `base_<group>` options; each YAML starts from its schema with
# `defaults: [base_<group>]`, so a typo in a YAML key fails at composition.
_GROUPS = {
    "model": ModelConfig,
    "moe": MoEConfig,
    "moe/router": RouterConfig,
    "optim": OptimConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "parallel": ParallelConfig,
}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, node in _GROUPS.items():
        cs.store(group=group, name=f"base_{group.split('/')[-1]}", node=node)


__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "Layout",
    "LoggingConfig",
    "MoEConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RouterConfig",
    "TrainConfig",
    "register_configs",
    "resolve_layout",
    "validate",
]
