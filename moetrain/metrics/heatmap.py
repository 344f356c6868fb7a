"""Expert-load heatmap as an image tensor, with a viridis-like colormap built in numpy.

Rows are MoE layers, columns experts; a cell is the fraction of a layer's routed tokens that
went to that expert (a row sums to 1). Legend: L MoE layers, E experts.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["colorize", "load_heatmap_CHW", "load_imbalance"]

# Five stops sampled from matplotlib's viridis (t = 0, .25, .5, .75, 1), RGB 0-255.
_VIRIDIS_5 = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
    dtype=np.float64,
)


def colorize(v: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (clipped) to RGB uint8 by linear interpolation between the stops.

    Returns an array of shape ``v.shape + (3,)``.
    """
    t = np.clip(np.nan_to_num(np.asarray(v, dtype=np.float64), nan=0.0), 0.0, 1.0)
    pos = t * (len(_VIRIDIS_5) - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), len(_VIRIDIS_5) - 2)
    frac = (pos - lo)[..., None]
    rgb = _VIRIDIS_5[lo] * (1.0 - frac) + _VIRIDIS_5[lo + 1] * frac
    return np.rint(rgb).astype(np.uint8)


def as_float64(load_LE: torch.Tensor | np.ndarray) -> np.ndarray:
    """A load table (tensor on any device, or array) as a float64 numpy array."""
    if isinstance(load_LE, torch.Tensor):
        load_LE = load_LE.detach().float().cpu().numpy()
    return np.asarray(load_LE, dtype=np.float64)


def load_heatmap_CHW(
    load_LE: torch.Tensor | np.ndarray, cell: int = 8, vmax: float | None = None
) -> np.ndarray:
    """A ``(3, L*cell, E*cell)`` uint8 image of the load fractions ``load_LE``.

    The colour scale is fixed so images of different steps compare: 0 -> darkest, ``vmax`` and
    above -> brightest, with ``vmax`` defaulting to ``2 / E`` (twice the balanced share), so a
    balanced layer is the middle colour. Each cell is repeated ``cell`` times (nearest) in both
    directions to be legible in TensorBoard.
    """
    load_LE = as_float64(load_LE)
    if load_LE.ndim != 2:
        raise ValueError(f"load_LE must be 2-D (MoE layers, experts), got shape {load_LE.shape}")
    n_experts = load_LE.shape[1]
    scale = vmax if vmax is not None else 2.0 / n_experts
    rgb_LE3 = colorize(load_LE / scale)
    rgb = np.repeat(np.repeat(rgb_LE3, cell, axis=0), cell, axis=1)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def load_imbalance(load_LE: torch.Tensor | np.ndarray) -> float:
    """Worst layer's max load relative to balanced: ``max_l max_e load[l, e] * E`` (1 = even).

    A compact scalar for metrics.jsonl in place of the full per-expert table.
    """
    load_LE = as_float64(load_LE)
    return float(load_LE.max() * load_LE.shape[1])
