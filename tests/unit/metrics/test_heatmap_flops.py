"""Heatmap colours and layout; FLOPs/MFU arithmetic on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moetrain.metrics import (
    colorize,
    load_heatmap_CHW,
    load_imbalance,
    mfu,
    model_flops_per_token,
    peak_flops_for_name,
    peak_flops_per_s,
)

DARK, MID, BRIGHT = (68, 1, 84), (33, 145, 140), (253, 231, 37)


def test_colorize_stops_and_midpoint():
    rgb = colorize(np.array([0.0, 0.25, 0.5, 1.0, 2.0, -1.0, 0.125]))
    assert rgb.dtype == np.uint8 and rgb.shape == (7, 3)
    assert [tuple(c) for c in rgb[:6]] == [DARK, (59, 82, 139), MID, BRIGHT, BRIGHT, DARK]
    # Halfway between the first two stops: (68+59)/2, (1+82)/2, (84+139)/2, rounded to even.
    assert tuple(rgb[6]) == (64, 42, 112)


def test_heatmap_shape_scale_and_cells():
    # 2 MoE layers x 4 experts; balanced share is 1/4, the scale tops out at 2/4.
    load_LE = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.7, 0.3, 0.0, 0.0]])
    img = load_heatmap_CHW(load_LE, cell=3)
    assert img.dtype == np.uint8 and img.shape == (3, 2 * 3, 4 * 3)
    cell = lambda r, c: tuple(int(v) for v in img[:, 3 * r + 1, 3 * c + 1])
    assert cell(0, 0) == MID  # balanced -> middle of the scale
    assert cell(1, 0) == BRIGHT  # overloaded (>= 2x balanced) -> brightest
    assert cell(1, 2) == DARK  # idle expert -> darkest
    assert cell(1, 0) != cell(1, 2)
    assert cell(1, 1) == tuple(colorize(np.array(0.3 / 0.5)))
    # Nearest upscaling: each cell is a constant 3x3 block.
    block = img[:, 3:6, 0:3]
    assert (block == block[:, :1, :1]).all()


def test_load_imbalance():
    assert load_imbalance(np.array([[0.25] * 4, [0.7, 0.3, 0.0, 0.0]])) == pytest.approx(2.8)


def test_flops_per_token_hand_computed():
    # 6 * 1000 + 12 * 2 layers * 8 dim * 16 seq = 6000 + 3072
    assert model_flops_per_token(1000, n_layers=2, dim=8, seq_len=16) == 9072.0
    assert mfu(100.0, 9072.0, 1e6) == pytest.approx(0.9072)
    assert mfu(100.0, 9072.0, None) is None
    assert mfu(100.0, 9072.0, 0.0) is None


def test_peak_lookup():
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for_name("NVIDIA H100 NVL") == 835e12
    assert peak_flops_for_name("NVIDIA H200") == 989e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for_name("NVIDIA GeForce RTX 4090") is None
    assert peak_flops_per_s(torch.device("cpu"), 0.0) is None
    assert peak_flops_per_s(torch.device("cpu"), 123.0) == 123e12
