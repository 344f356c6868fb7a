"""A trained model in one process, from a checkpoint of any layout: ``moetrain.load``.

A committed checkpoint (``step_N/``) holds DCP shards, written by however many ranks and
whatever layout trained it (ep, tp, pp, FSDP), and ``config.yaml``, the run's resolved
config (:data:`CONFIG_FILE`, written by the trainer into every checkpoint). DCP reshards
on read, so loading the model part into a plain single-process :class:`Transformer` needs
no process group: every parameter arrives whole.

``load(path)`` accepts a ``step_N`` directory, a checkpoints directory (its latest step)
or a run directory (``<run.dir>/checkpoints``, latest step).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf

from moetrain.checkpoint.manager import MARKER, CheckpointManager, _committed_in, is_committed
from moetrain.config.schema import Config, ConfigError
from moetrain.models import Transformer
from moetrain.models.moe.schedule import build_schedule

__all__ = ["CONFIG_FILE", "CheckpointNotFoundError", "apply_schedule", "config_from_file",
           "config_to_yaml", "load", "load_model_state", "read_config",
           "resolve_checkpoint"]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
_MODEL_PREFIX = "model_optim.model."  # ModelOptimizerState's model entries, flattened by DCP


class CheckpointNotFoundError(FileNotFoundError):
    """The path is not, and does not hold, a committed moetrain checkpoint."""


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what :func:`read_config` reads back)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_file(path: str | Path) -> Config:
    """A :class:`Config` from a YAML file: a checkpoint's config.yaml or a run's
    ``.hydra/config.yaml`` (missing keys take their defaults)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    loaded = OmegaConf.load(path)
    loaded.pop("hydra", None)  # Hydra's own node in .hydra/config.yaml is not part of Config
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), loaded))


def resolve_checkpoint(path: str | Path) -> Path:
    """The committed ``step_N`` directory that ``path`` names or holds (latest step)."""
    p = Path(path).expanduser()
    if is_committed(p):
        return p
    if not p.exists():
        raise CheckpointNotFoundError(f"checkpoint {str(p)!r} does not exist: pass a committed "
                                      f"step_N directory, a checkpoints directory or a run.dir")
    for candidate in (p, p / "checkpoints"):
        found = _committed_in(candidate)
        if found:
            return found[-1]
    hint = (f"it has no {MARKER} marker, so its save did not finish"
            if p.name.startswith("step_") else "it holds no committed step_N directory")
    raise CheckpointNotFoundError(
        f"{str(p)!r} is not a moetrain checkpoint: {hint}. Pass a step_N directory holding "
        f"{MARKER}, a checkpoints directory or a run.dir")


def read_config(ckpt: str | Path) -> Config:
    """The config that trained checkpoint ``ckpt``: its ``config.yaml``, else the run's
    ``.hydra/config.yaml`` (Hydra's composed config, for checkpoints saved before the
    trainer wrote ``config.yaml``)."""
    ckpt = resolve_checkpoint(ckpt)
    candidates = [ckpt / CONFIG_FILE] + [d / ".hydra" / "config.yaml"
                                         for d in (ckpt.parent.parent, ckpt.parent)]
    for c in candidates:
        if c.is_file():
            try:
                return config_from_file(c)
            except Exception as e:  # re-raised with the file named
                raise ConfigError(f"{c}: not a moetrain config ({type(e).__name__}: {e})") from e
    raise ConfigError(
        f"checkpoint {str(ckpt)!r} has no {CONFIG_FILE} (and its run dir no "
        f".hydra/config.yaml): pass the run's config explicitly (config=Config(...), or "
        f"--config PATH.yaml on the command line)")


def _saved_model_shapes(ckpt: Path) -> dict[str, torch.Size]:
    """Model entries of the checkpoint: FQN -> global shape (from DCP's metadata)."""
    meta = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    return {k[len(_MODEL_PREFIX):]: v.size for k, v in meta.items()
            if k.startswith(_MODEL_PREFIX) and hasattr(v, "size")}


def checkpoint_vocab_size(ckpt: str | Path) -> int:
    """Rows of the checkpoint's embedding (or output) matrix: the model's vocabulary."""
    shapes = _saved_model_shapes(resolve_checkpoint(ckpt))
    for key in ("tok_embeddings.weight", "output.weight"):
        if key in shapes:
            return int(shapes[key][0])
    raise ConfigError(f"checkpoint {str(ckpt)!r} holds no tok_embeddings.weight or "
                      f"output.weight: it is not a moetrain model checkpoint")


@torch.no_grad()
def load_model_state(ckpt: str | Path, model: Transformer) -> None:
    """Fill ``model`` (a whole, single-process Transformer) from checkpoint ``ckpt`` in place.

    Every persistent parameter and buffer must be in the checkpoint with the same global
    shape; the message names the first that is not (the config and the weights disagree).
    """
    ckpt = resolve_checkpoint(ckpt)
    saved = _saved_model_shapes(ckpt)
    own = model.state_dict()
    missing = [k for k in own if k not in saved]
    if missing:
        raise ConfigError(
            f"checkpoint {str(ckpt)!r} has no {missing[0]!r} ({len(missing)} model entries "
            f"missing): the config does not describe these weights")
    for k, t in own.items():
        if tuple(saved[k]) != tuple(t.shape):
            raise ConfigError(
                f"checkpoint {str(ckpt)!r}: {k!r} has shape {tuple(saved[k])} but the config "
                f"builds {tuple(t.shape)}: the config does not describe these weights")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load({"model_optim": {"model": own}}, checkpoint_id=str(ckpt), no_dist=True)


def load(path: str | Path, device: str | torch.device = "cpu", *,
         config: Config | None = None) -> tuple[Transformer, Config]:
    """The trained model of checkpoint ``path`` in one process, in eval mode, and its config.

    ``path``: a committed ``step_N`` directory, a checkpoints directory or a run.dir (the
    latest step). The checkpoint may come from any world size and layout. ``config``
    overrides the checkpoint's own ``config.yaml``. The model is float32 on ``device``, its
    routers set to the values ``schedule=<name>`` had at the checkpoint's step (as trained
    and validated there). The global RNG is left as it was.
    """
    ckpt = resolve_checkpoint(path)
    cfg = config if config is not None else read_config(ckpt)
    vocab = checkpoint_vocab_size(ckpt)
    device = torch.device(device)
    rng_devices = [] if device.type in ("cpu", "meta") else [device.index or 0]
    with torch.random.fork_rng(devices=rng_devices, device_type=device.type), device:
        model = Transformer(cfg.model, cfg.moe, vocab)
    load_model_state(ckpt, model)
    apply_schedule(model, cfg, CheckpointManager.step_of(ckpt))
    return model.eval(), cfg


def apply_schedule(model: Transformer, cfg: Config, step: int) -> None:
    """Set the routers to what ``schedule=<name>`` had set at ``step`` (top_k, temperature,
    gate activation, capacity, EvoMoE phase), as the trainer did before saving that step.
    The values are a pure function of (config, step): ``moetrain.models.moe.schedule``,
    the same code the trainer's schedule callbacks run."""
    schedule = build_schedule(cfg)
    if schedule is not None and model.moe_layers():
        schedule.apply(model.moe_layers(), step)
