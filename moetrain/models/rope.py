"""Rotary position embedding (RoPE; Su et al., 2021, "RoFormer").

Uses the rotate-half layout (GPT-NeoX / Llama-HF): the head dimension is split into two
halves ``(x1, x2)`` that rotate as ``(x1 cos - x2 sin, x2 cos + x1 sin)`` with frequency
``theta^(-2i/head_dim)`` for pair ``i``. Real-valued tables (no complex tensors) so the
same code runs under DTensor and torch.compile. Tables and the rotation are float32.

Shapes: B batch, S sequence, H heads, Hd head dim.
"""

from __future__ import annotations

import torch


def precompute_rope(
    head_dim: int, max_seq_len: int, theta: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(cos_SHd, sin_SHd)``, float32 tables of shape (max_seq_len, head_dim)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}: make model.dim / "
                         f"model.n_heads even")
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    )
    pos = torch.arange(max_seq_len, dtype=torch.float64, device=device)
    angles_SF = torch.outer(pos, inv_freq)  # (S, Hd/2)
    angles_SHd = torch.cat([angles_SF, angles_SF], dim=-1)
    return angles_SHd.cos().float(), angles_SHd.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BSHHd: torch.Tensor, cos_SHd: torch.Tensor, sin_SHd: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys (B, S, H, Hd) by position; computed in float32, returns x's dtype."""
    cos = cos_SHd.float()[None, :, None, :]
    sin = sin_SHd.float()[None, :, None, :]
    xf = x_BSHHd.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x_BSHHd.dtype)
