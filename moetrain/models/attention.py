"""Causal multi-head self-attention with rotary positions and grouped-query attention.

Shapes: B batch, S sequence, D model dim, H query heads, Hkv key/value heads, Hd head dim.

GQA (Ainslie et al., 2023): ``model.n_kv_heads`` key/value heads are shared by groups of
``n_heads / n_kv_heads`` query heads. Head counts are read from the projection outputs at
run time, so tensor parallelism may shard wq/wk/wv column-wise and wo row-wise.

``model.position_encoding=none`` applies no rotary positions: the causal mask alone orders
the tokens, as in Jamba (Lieber et al., 2024, arXiv 2403.19887), whose Mamba layers carry
the positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config.schema import ModelConfig, PositionEncoding
from moetrain.models.rope import apply_rope


class Attention(nn.Module):
    def __init__(self, model_cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = model_cfg.n_heads
        self.n_kv_heads = model_cfg.n_kv_heads or model_cfg.n_heads
        self.head_dim = model_cfg.dim // model_cfg.n_heads
        dim = model_cfg.dim
        bias = model_cfg.qkv_bias  # Qwen2-style q/k/v biases (model.qkv_bias)
        self.wq = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)
        self.rope = PositionEncoding(model_cfg.position_encoding) == PositionEncoding.rope

    def init_weights(self, init_std: float, out_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.normal_(lin.weight, mean=0.0, std=init_std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.wo.weight, mean=0.0, std=out_std)

    def forward(self, x_BSD: torch.Tensor, cos_SHd: torch.Tensor,
                sin_SHd: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q_BSHHd = self.wq(x_BSD).view(B, S, -1, self.head_dim)
        k_BSHHd = self.wk(x_BSD).view(B, S, -1, self.head_dim)
        v_BSHHd = self.wv(x_BSD).view(B, S, -1, self.head_dim)
        if self.rope:
            q_BSHHd = apply_rope(q_BSHHd, cos_SHd, sin_SHd)
            k_BSHHd = apply_rope(k_BSHHd, cos_SHd, sin_SHd)
        q, k, v = (t.transpose(1, 2) for t in (q_BSHHd, k_BSHHd, v_BSHHd))  # (B, H, S, Hd)
        n_rep = q.shape[1] // k.shape[1]
        if n_rep > 1:
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(o.transpose(1, 2).reshape(B, S, -1))
