"""Checkpointing: atomic DCP saves of Stateful training state, resharded on load;
``load`` (one-process model from any layout) and Hugging Face import/export (``hf``)."""

from moetrain.checkpoint.load import CONFIG_FILE, load, read_config
from moetrain.checkpoint.manager import (
    MANIFEST,
    MARKER,
    CheckpointCorruptError,
    CheckpointLoadError,
    CheckpointManager,
    is_committed,
    step_dir_name,
)
from moetrain.checkpoint.state import ModelOptimizerState, ObjectState, RNGState

__all__ = [
    "CONFIG_FILE", "MANIFEST", "MARKER", "CheckpointCorruptError", "CheckpointLoadError",
    "CheckpointManager", "ModelOptimizerState", "ObjectState",
    "RNGState", "is_committed", "load", "read_config", "step_dir_name",
]
