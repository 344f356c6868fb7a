"""Decoder-only language model with dense or MoE feed-forward blocks.

Shapes: B batch, S sequence, D model dim, V vocabulary.

Layers live in an ``nn.ModuleDict`` keyed "0", "1", ...: a pipeline stage deletes the
layers it does not own (and sets ``tok_embeddings``/``norm``/``output`` to None) while
every remaining parameter keeps its fully-qualified name, so checkpoints stay
layout-independent.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from moetrain.config.schema import ModelConfig, MoEConfig
from moetrain.models.attention import Attention
from moetrain.models.moe.experts import FeedForward
from moetrain.models.moe.layer import MoELayer
from moetrain.models.norms import build_norm, init_norm
from moetrain.models.rope import precompute_rope


def _fork_default_rng() -> contextlib.AbstractContextManager:
    """Fork the RNG of the default device (CPU, or the current accelerator if it is default)."""
    device = torch.get_default_device()
    if device.type in ("cpu", "meta"):
        return torch.random.fork_rng(devices=[])
    index = device.index if device.index is not None else 0
    return torch.random.fork_rng(devices=[index], device_type=device.type)


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h)).

    The FFN is ``self.moe`` (a :class:`MoELayer`) when ``model_cfg.is_moe_layer(layer_idx)``,
    else ``self.feed_forward`` (a dense SwiGLU); ``moe_enabled`` says which.
    """

    def __init__(self, layer_idx: int, model_cfg: ModelConfig, moe_cfg: MoEConfig) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attention_norm = build_norm(model_cfg.dim, model_cfg.norm_eps)
        self.attention = Attention(model_cfg)
        self.ffn_norm = build_norm(model_cfg.dim, model_cfg.norm_eps)
        self.moe_enabled = model_cfg.is_moe_layer(layer_idx)
        if self.moe_enabled:
            self.moe = MoELayer(model_cfg.dim, model_cfg, moe_cfg)
            self.moe.router.layer_idx = layer_idx  # keys the router's random draws
        else:
            self.feed_forward = FeedForward(model_cfg.dim, model_cfg.ffn_hidden)

    def init_weights(self, init_std: float, out_std: float) -> None:
        init_norm(self.attention_norm)
        init_norm(self.ffn_norm)
        self.attention.init_weights(init_std, out_std)
        ffn = self.moe if self.moe_enabled else self.feed_forward
        ffn.init_weights(init_std, out_std)

    def forward(self, x_BSD: torch.Tensor, cos_SHd: torch.Tensor,
                sin_SHd: torch.Tensor) -> torch.Tensor:
        h = x_BSD + self.attention(self.attention_norm(x_BSD), cos_SHd, sin_SHd)
        ffn = self.moe if self.moe_enabled else self.feed_forward
        return h + ffn(self.ffn_norm(h))


class Transformer(nn.Module):
    """Token embedding -> blocks -> final RMSNorm -> output projection (logits).

    ``forward(tokens_BS) -> logits_BSV``. On a pipeline stage without embeddings the input
    is already hidden states (B, S, D); without an output projection the hidden states are
    returned. MoE aux losses are injected into the backward (see ``moe.layer``), not returned.
    """

    def __init__(self, model_cfg: ModelConfig, moe_cfg: MoEConfig, vocab_size: int) -> None:
        super().__init__()
        self.model_cfg = model_cfg
        self.vocab_size = vocab_size
        self.head_dim = model_cfg.dim // model_cfg.n_heads
        # torch's default per-module inits would advance the RNG; fork it so that
        # init_weights() is the only consumer: building here with seed s equals building on
        # the meta device, materialising, then seeding s and calling init_weights().
        with _fork_default_rng():
            self._build(model_cfg, moe_cfg, vocab_size)
        self.init_weights()

    def _build(self, model_cfg: ModelConfig, moe_cfg: MoEConfig, vocab_size: int) -> None:
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(vocab_size, model_cfg.dim)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(i, model_cfg, moe_cfg) for i in range(model_cfg.n_layers)}
        )
        self.norm: nn.RMSNorm | None = build_norm(model_cfg.dim, model_cfg.norm_eps)
        self.output: nn.Linear | None = nn.Linear(model_cfg.dim, vocab_size, bias=False)
        if model_cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # RoPE tables are derived state: non-persistent, rebuilt by init_weights().
        cos, sin = precompute_rope(self.head_dim, model_cfg.max_seq_len, model_cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter from torch's RNG, in a fixed order.

        normal(0, init_std) for embeddings, linears, router gates and experts; output
        projections of each residual branch (wo, w2) use init_std / sqrt(2 * n_layers)
        (GPT-2, Radford et al., 2019); norms are 1; the router expert bias is 0. Also
        rebuilds the RoPE tables, so a model materialised from the meta device is complete.
        """
        cfg = self.model_cfg
        std = cfg.init_std
        out_std = std / math.sqrt(2 * cfg.n_layers)
        device = self.rope_cos.device
        if device.type != "meta":
            cos, sin = precompute_rope(self.head_dim, cfg.max_seq_len, cfg.rope_theta, device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=std)
        for block in self.layers.values():
            block.init_weights(std, out_std)
        init_norm(self.norm)
        # A tied output on a stage without the embedding still needs its own init.
        if self.output is not None and (not cfg.tie_embeddings or self.tok_embeddings is None):
            nn.init.normal_(self.output.weight, mean=0.0, std=std)

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens_BS) if self.tok_embeddings is not None else tokens_BS
        S = h.shape[1]
        if S > self.rope_cos.shape[0]:
            raise ValueError(
                f"sequence length {S} exceeds model.max_seq_len={self.rope_cos.shape[0]}: "
                f"lower train.seq_len or raise model.max_seq_len"
            )
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        for block in self.layers.values():
            h = block(h, cos, sin)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers still present on this module, in layer order."""
        return [b.moe for b in self.layers.values() if b.moe_enabled]

    def num_params(self, active_only: bool = False) -> int:
        """Parameters held by this module (unique tensors; DTensors count their global size).

        ``active_only`` counts only the top_k / num_experts share of routed-expert weights.
        """
        seen: set[int] = set()
        total = 0
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            if active_only and ".moe.experts." in f".{name}":
                n = n * self.model_cfg.top_k // self.model_cfg.num_experts
            total += n
        return total


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of a model config.

    total: every parameter. active: parameters one token uses (routed experts counted
    top_k of num_experts). embedding: the input embedding table (a lookup, no FLOPs);
    ``active - embedding`` is the matmul parameter count for 6*N*tokens FLOP estimates.
    """

    total: int
    active: int
    embedding: int


def count_params(model_cfg: ModelConfig, vocab_size: int) -> ParamCount:
    """Closed-form parameter counts of ``Transformer(model_cfg, _, vocab_size)``."""
    D, L = model_cfg.dim, model_cfg.n_layers
    hd = D // model_cfg.n_heads
    kv = model_cfg.n_kv_heads or model_cfg.n_heads
    attn = D * model_cfg.n_heads * hd * 2 + D * kv * hd * 2 + 2 * D  # q, o, k, v, two norms
    if model_cfg.qkv_bias:
        attn += (model_cfg.n_heads + 2 * kv) * hd
    dense_ffn = 3 * D * model_cfg.ffn_hidden
    E, K, F = model_cfg.num_experts, model_cfg.top_k, model_cfg.expert_hidden
    expert = 3 * D * F
    shared = model_cfg.n_shared_experts * expert
    router = E * D
    total = active = 0
    for i in range(L):
        if model_cfg.is_moe_layer(i):
            total += attn + router + shared + E * expert
            active += attn + router + shared + K * expert
        else:
            total += attn + dense_ffn
            active += attn + dense_ffn
    embedding = vocab_size * D
    head = D + (0 if model_cfg.tie_embeddings else vocab_size * D)  # final norm + output
    return ParamCount(total=total + embedding + head, active=active + embedding + head,
                      embedding=embedding)
