"""Checkpointing: atomic DCP saves of Stateful training state, resharded on load."""

from moetrain.checkpoint.manager import MARKER, CheckpointManager, is_committed, step_dir_name
from moetrain.checkpoint.state import ModelOptimizerState, ObjectState, RNGState

__all__ = [
    "MARKER", "CheckpointManager", "ModelOptimizerState", "ObjectState", "RNGState",
    "is_committed", "step_dir_name",
]
