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
    ScheduleConfig,
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
    "schedule": ScheduleConfig,
}


def compose_config(overrides: list[str] | None = None, *, typed: bool = True):
    """conf/train.yaml (shipped as ``moetrain.conf``) with Hydra overrides, as
    ``moetrain-train`` composes it: the typed :class:`Config`, or the DictConfig."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    register_configs()
    with initialize_config_module(config_module="moetrain.conf", version_base="1.3"):
        dcfg = compose("train", overrides=list(overrides or []))
    return OmegaConf.to_object(dcfg) if typed else dcfg


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
