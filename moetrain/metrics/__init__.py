"""Metrics: metrics.jsonl + TensorBoard writer, expert-load heatmaps, MFU accounting."""

from moetrain.metrics.flops import (
    flops_per_token_at_k,
    mfu,
    model_flops_per_token,
    peak_flops_for_name,
    peak_flops_per_s,
)
from moetrain.metrics.heatmap import colorize, load_heatmap_CHW, load_imbalance
from moetrain.metrics.logger import MetricsLogger, read_metrics, read_recipe, tensorboard_tag

__all__ = [
    "MetricsLogger", "colorize", "flops_per_token_at_k", "load_heatmap_CHW", "load_imbalance", "mfu",
    "model_flops_per_token", "peak_flops_for_name", "peak_flops_per_s", "read_metrics",
    "read_recipe", "tensorboard_tag",
]
