"""Normalisation layers.

The model uses ``torch.nn.RMSNorm`` (Zhang & Sennrich, 2019): it has no bias and no mean
subtraction, and torch ships fused kernels for it. This module keeps the one place where
that choice is made.
"""

from __future__ import annotations

from torch import nn


def build_norm(dim: int, eps: float) -> nn.RMSNorm:
    """RMSNorm over the last dimension with a learnable scale initialised to 1."""
    return nn.RMSNorm(dim, eps=eps)


def init_norm(norm: nn.Module | None) -> None:
    """Reset a norm's scale to 1 (and its bias, if any, to 0)."""
    if norm is None:
        return
    if getattr(norm, "weight", None) is not None:
        nn.init.ones_(norm.weight)
    if getattr(norm, "bias", None) is not None:
        nn.init.zeros_(norm.bias)
