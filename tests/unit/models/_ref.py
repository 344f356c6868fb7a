"""Naive per-token references shared by the model tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(x_D: torch.Tensor, w1_FD: torch.Tensor, w3_FD: torch.Tensor,
           w2_DF: torch.Tensor) -> torch.Tensor:
    return w2_DF @ (F.silu(w1_FD @ x_D) * (w3_FD @ x_D))


def dense_moe_reference(x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                        w1_EFD: torch.Tensor, w3_EFD: torch.Tensor, w2_EDF: torch.Tensor,
                        kept_TK: torch.Tensor | None = None) -> torch.Tensor:
    """out_t = sum_k w_tk * SwiGLU_{e_tk}(x_t), skipping slots where kept_TK is False."""
    T, K = ids_TK.shape
    rows = []
    for t in range(T):
        acc = torch.zeros_like(x_TD[t])
        for k in range(K):
            if kept_TK is not None and not bool(kept_TK[t, k]):
                continue
            e = int(ids_TK[t, k])
            acc = acc + weights_TK[t, k] * swiglu(x_TD[t], w1_EFD[e], w3_EFD[e], w2_EDF[e])
        rows.append(acc)
    return torch.stack(rows)


def identity_gate_router(cfg, E: int, K: int):
    """A router whose logits are its input (D = E, W_g = I): tests feed logits directly."""
    from moetrain.models.moe.router import build_router

    r = build_router(E, E, K, cfg)
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(E))
    return r


def dense_gates(ids_TK: torch.Tensor, w_TK: torch.Tensor, E: int) -> torch.Tensor:
    """(T, E) gate map: w at the picked experts, 0 elsewhere."""
    return torch.zeros(ids_TK.shape[0], E, dtype=w_TK.dtype).scatter(1, ids_TK, w_TK)
