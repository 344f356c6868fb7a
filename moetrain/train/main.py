"""Entry point: ``moetrain-train``, ``python -m moetrain.train``, ``torchrun -m moetrain.train``.

Hydra composes the config; it is converted once to typed dataclasses, validated against
the world size before any process group exists, then the Trainer runs.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from moetrain.config import Config, ConfigError, register_configs, validate

log = logging.getLogger("moetrain")

register_configs()


def _world_size() -> int:
    import torch.distributed as dist

    if dist.is_initialized():  # e.g. a test harness created the group
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def run(cfg: Config) -> object:
    """Validate, initialise distributed, train. Returns the trainer's Summary."""
    from moetrain.parallel.mesh import destroy_distributed, init_distributed
    from moetrain.train.trainer import Trainer

    layout = validate(cfg, _world_size())  # before any process group exists
    rank, _, device = init_distributed()
    try:
        summary = Trainer(cfg, layout, device).fit()
        if rank == 0:
            print(summary.format(), flush=True)
        return summary
    finally:
        destroy_distributed()


@hydra.main(config_path="pkg://moetrain.conf", config_name="train", version_base="1.3")
def _hydra_main(dcfg: DictConfig) -> None:
    try:
        cfg: Config = OmegaConf.to_object(dcfg)
    except ConfigError as e:  # raised by a schema __post_init__
        print(f"moetrain: invalid config: {e}", file=sys.stderr)
        sys.exit(2)
    from moetrain.checkpoint import CheckpointLoadError

    try:
        run(cfg)
    except ConfigError as e:
        print(f"moetrain: invalid config: {e}", file=sys.stderr)
        sys.exit(2)
    except CheckpointLoadError as e:  # corrupt or unreadable checkpoint: named in the message
        print(f"moetrain: checkpoint error: {e}", file=sys.stderr)
        sys.exit(3)


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("MOETRAIN_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _hydra_main()


