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

from moetrain.config.schema import ModelConfig, MoEConfig, RouterType
from moetrain.models.attention import Attention
from moetrain.models.mamba import build_mamba, mamba_params
from moetrain.models.moe.experts import FeedForward
from moetrain.models.moe.layer import MoELayer
from moetrain.models.moe.router import CompeteRouter, build_rnn_cell
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
    """Pre-norm block: h = x + mixer(norm(x)); out = h + ffn(norm(h)).

    The sequence mixer is ``self.attention`` when ``model_cfg.uses_attention(layer_idx)``,
    else ``self.mamba`` (a Mamba-1 :class:`~moetrain.models.mamba.MambaMixer`);
    ``uses_attention`` says which (``model.mixer``: attention, mamba or Jamba's hybrid).
    Its pre-norm is ``attention_norm`` in both kinds of block, so attention models keep
    their parameter names. The FFN is ``self.moe`` (a :class:`MoELayer`) when
    ``model_cfg.is_moe_layer(layer_idx)``, else ``self.feed_forward`` (a dense SwiGLU);
    ``moe_enabled`` says which.
    """

    def __init__(self, layer_idx: int, model_cfg: ModelConfig, moe_cfg: MoEConfig) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attention_norm = build_norm(model_cfg.dim, model_cfg.norm_eps)
        self.uses_attention = model_cfg.uses_attention(layer_idx)
        if self.uses_attention:
            self.attention = Attention(model_cfg)
        else:
            self.mamba = build_mamba(model_cfg)
        self.ffn_norm = build_norm(model_cfg.dim, model_cfg.norm_eps)
        self.moe_enabled = model_cfg.is_moe_layer(layer_idx)
        # RMoE: a router state crosses every block (dense ones pass it through).
        self.recurrent = RouterType(moe_cfg.router.name) == RouterType.recurrent
        if self.moe_enabled:
            self.moe = MoELayer(model_cfg.dim, model_cfg, moe_cfg)
            self.moe.set_layer_idx(layer_idx)  # keys the routers' random draws
            if isinstance(self.moe.router, CompeteRouter):  # its per-step cap spans layers
                self.moe.router.moe_layer_ids = tuple(
                    i for i in range(model_cfg.n_layers) if model_cfg.is_moe_layer(i))
        else:
            self.feed_forward = FeedForward(model_cfg.dim, model_cfg.ffn_hidden)

    def init_weights(self, init_std: float, out_std: float) -> None:
        init_norm(self.attention_norm)
        init_norm(self.ffn_norm)
        self.mixer.init_weights(init_std, out_std)
        ffn = self.moe if self.moe_enabled else self.feed_forward
        ffn.init_weights(init_std, out_std)

    @property
    def mixer(self) -> nn.Module:
        """The sequence mixer: ``attention`` or ``mamba``."""
        return self.attention if self.uses_attention else self.mamba

    def forward(self, x_BSD: torch.Tensor, cos_SHd: torch.Tensor, sin_SHd: torch.Tensor,
                router_state: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """The block's output; with a recurrent router (``self.recurrent``) the pair
        (output, router state after this block). The state is an input of the block, so
        an activation-checkpoint recompute sees the same state."""
        if self.uses_attention:
            h = x_BSD + self.attention(self.attention_norm(x_BSD), cos_SHd, sin_SHd)
        else:  # Mamba: causal through its scan and conv, no positions (arXiv 2312.00752)
            h = x_BSD + self.mamba(self.attention_norm(x_BSD))
        if not self.moe_enabled:
            out = h + self.feed_forward(self.ffn_norm(h))
            return (out, router_state) if self.recurrent else out
        if self.recurrent:
            y = self.moe(self.ffn_norm(h), router_state=router_state)
            router_state, self.moe.state_out = self.moe.state_out, None
        else:
            y = self.moe(self.ffn_norm(h))
        # Chain-of-Experts' inner residual (its default): the output is x_C alone.
        out = h + y if self.moe.adds_block_residual else y
        return (out, router_state) if self.recurrent else out


class Transformer(nn.Module):
    """Token embedding -> blocks -> final RMSNorm -> output projection (logits).

    ``forward(tokens_BS) -> logits_BSV``. On a pipeline stage without embeddings the input
    is already hidden states (B, S, D); without an output projection the hidden states are
    returned. MoE aux losses are injected into the backward (see ``moe.layer``), not returned.
    """

    def __init__(self, model_cfg: ModelConfig, moe_cfg: MoEConfig, vocab_size: int) -> None:
        super().__init__()
        self.model_cfg = model_cfg
        self.moe_cfg = moe_cfg
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
        # RMoE: the one cell every MoE layer's recurrent router shares (saved once, as
        # ``router_rnn.*``; a pipeline stage holds a copy, its gradients summed over stages).
        self.router_state_dim = 0
        if RouterType(moe_cfg.router.name) == RouterType.recurrent:
            self.router_rnn: nn.Module | None = build_rnn_cell(moe_cfg.router)
            self.router_state_dim = moe_cfg.router.rnn_hidden
        else:
            self.router_rnn = None
        self.bind_router_cells()
        # RoPE tables are derived state: non-persistent, rebuilt by init_weights().
        cos, sin = precompute_rope(self.head_dim, model_cfg.max_seq_len, model_cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter from torch's RNG, in a fixed order.

        normal(0, init_std) for embeddings, linears, router gates and experts; output
        projections of each residual branch (wo, w2, Mamba's out_proj) use init_std /
        sqrt(2 * n_layers) (GPT-2, Radford et al., 2019; mamba_ssm's _init_weights divides
        out_proj by the same sqrt(2 * n_layers)); Mamba's conv and SSM parameters follow
        mamba_simple.py (``MambaMixer.init_weights``); norms are 1; the router expert bias
        is 0. Also
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
        if self.router_rnn is not None:
            # RMoE's cell init is UNVERIFIED (its config leaves init_method undefined):
            # torch's GRUCell/RNNCell default, U(-1/sqrt(H), 1/sqrt(H)) for every tensor.
            bound = 1.0 / math.sqrt(self.router_state_dim)
            for p in self.router_rnn.parameters():
                nn.init.uniform_(p, -bound, bound)
        init_norm(self.norm)
        # A tied output on a stage without the embedding still needs its own init.
        if self.output is not None and (not cfg.tie_embeddings or self.tok_embeddings is None):
            nn.init.normal_(self.output.weight, mean=0.0, std=std)

    def bind_router_cells(self) -> None:
        """Hand this module's ``router_rnn`` to the recurrent routers of its layers (after
        a pipeline split, each stage's own copy)."""
        if self.router_rnn is None:
            return
        for layer in self.moe_layers():
            layer.router.bind_cell(self.router_rnn)

    @property
    def boundary_dim(self) -> int:
        """Width of the hidden states between pipeline stages: D, plus the recurrent
        router's state H (RMoE), carried beside them (see :meth:`forward`)."""
        return self.model_cfg.dim + self.router_state_dim

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        state = None
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(tokens_BS)
        elif self.router_state_dim:  # a later pipeline stage: hidden states and state
            h, state = _split_state(tokens_BS, self.model_cfg.dim)
        else:
            h = tokens_BS
        S = h.shape[1]
        if S > self.rope_cos.shape[0]:
            raise ValueError(
                f"sequence length {S} exceeds model.max_seq_len={self.rope_cos.shape[0]}: "
                f"lower train.seq_len or raise model.max_seq_len"
            )
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        for block in self.layers.values():
            if self.router_state_dim:
                h, state = block(h, cos, sin, state)
            else:
                h = block(h, cos, sin)
        if self.output is None and self.router_state_dim:  # hand the state to the next stage
            return _join_state(h, state, self.router_state_dim)
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


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _join_state(h_BSD: torch.Tensor, state_TH: torch.Tensor | None, H: int) -> torch.Tensor:
    """(B, S, D + H): the hidden states with the router state (T, H) of the same tokens
    appended on the feature dim (zeros before the first MoE layer). Under TP, h is a
    sequence-sharded DTensor and the state holds this rank's tokens: the result is a
    DTensor of the same layout."""
    local = _local(h_BSD)
    B, S_loc = local.shape[:2]
    if state_TH is None:
        state_TH = local.new_zeros(B * S_loc, H)
    joined = torch.cat([local, state_TH.to(local.dtype).view(B, S_loc, H)], dim=-1)
    if local is h_BSD:
        return joined
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(joined, h_BSD.device_mesh, h_BSD.placements, run_check=False)


def _split_state(x: torch.Tensor, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo :func:`_join_state`: (hidden states (B, S, D), router state (T, H))."""
    local = _local(x)
    h, state = local[..., :D], local[..., D:]
    state_TH = state.reshape(-1, state.shape[-1])
    if local is x:
        return h, state_TH
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(h, x.device_mesh, x.placements, run_check=False), state_TH


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


def router_params(model_cfg: ModelConfig, moe_cfg: MoEConfig | None) -> tuple[int, int]:
    """(parameters, multiply-accumulates per token) of one MoE layer's routers: the gate
    (E x D) of each distinct chain round, or RMoE's per-layer projection (H x D) and head
    (E x H) plus one step of the shared cell (its parameters are counted once per model:
    :func:`rnn_params`). The MACs count every chain round."""
    D, E = model_cfg.dim, model_cfg.num_experts + model_cfg.null_experts  # all it scores
    if moe_cfg is None:
        return E * D, E * D
    C = moe_cfg.chain_iterations
    if RouterType(moe_cfg.router.name) == RouterType.recurrent:
        H = moe_cfg.router.rnn_hidden
        gates = 3 if moe_cfg.router.rnn_cell == "gru" else 1
        return H * D + E * H, H * D + 2 * gates * H * H + E * H
    distinct = C if moe_cfg.chain_router == "per_iteration" else 1
    return distinct * E * D, C * E * D


def rnn_params(moe_cfg: MoEConfig | None) -> int:
    """Parameters of RMoE's shared router cell (0 without it): 2 * g * (H^2 + H), g = 3
    gates for a GRU, 1 for a tanh RNN."""
    if moe_cfg is None or RouterType(moe_cfg.router.name) != RouterType.recurrent:
        return 0
    H = moe_cfg.router.rnn_hidden
    gates = 3 if moe_cfg.router.rnn_cell == "gru" else 1
    return 2 * gates * (H * H + H)


def count_params(model_cfg: ModelConfig, vocab_size: int,
                 moe_cfg: MoEConfig | None = None) -> ParamCount:
    """Closed-form parameter counts of ``Transformer(model_cfg, moe_cfg, vocab_size)``.

    ``active`` counts what one token's forward multiplies by, once per use: a chain of
    experts (``moe.chain_iterations=C``) uses its router, shared experts and K routed
    experts C times, and RMoE's router its projection, one cell step and its head; so
    ``6 * (active - embedding)`` stays the training FLOPs per token (of the matmuls: a
    Mamba layer's scan and an attention layer's scores come on top). A block whose mixer
    is Mamba (``model.mixer``) counts :func:`~moetrain.models.mamba.mamba_params`
    instead of the attention's. ``moe_cfg=None`` is
    the standard layer.
    """
    D, L = model_cfg.dim, model_cfg.n_layers
    hd = D // model_cfg.n_heads
    kv = model_cfg.n_kv_heads or model_cfg.n_heads
    attn = D * model_cfg.n_heads * hd * 2 + D * kv * hd * 2 + 2 * D  # q, o, k, v, two norms
    if model_cfg.qkv_bias:
        attn += (model_cfg.n_heads + 2 * kv) * hd
    dense_ffn = 3 * D * model_cfg.ffn_hidden
    E, K, F = model_cfg.num_experts, model_cfg.top_k, model_cfg.expert_hidden
    C = moe_cfg.chain_iterations if moe_cfg is not None else 1
    expert = 3 * D * F
    shared = model_cfg.n_shared_experts * expert
    # HMoE's ragged experts (model.expert_sizes): 3 D sum(F_e) weights; a routed row uses
    # 3 D mean(F) of them under uniform routing (metrics.flops.routed_hidden measures it)
    sizes = model_cfg.expert_sizes
    routed_all = E * expert if sizes is None else 3 * D * sum(sizes)
    routed_k = K * expert if sizes is None else K * 3 * D * sum(sizes) // E
    router, router_macs = router_params(model_cfg, moe_cfg)
    # MoE++'s constant experts: v (D) and W (2 x D) each, used by every token
    constant = model_cfg.constant_experts * 3 * D
    router, router_macs = router + constant, router_macs + constant
    total = rnn_params(moe_cfg)
    active = 0
    mamba = mamba_params(model_cfg) + 2 * D  # a Mamba mixer, two norms
    for i in range(L):
        mixer = attn if model_cfg.uses_attention(i) else mamba
        if model_cfg.is_moe_layer(i):
            total += mixer + router + shared + routed_all
            active += mixer + router_macs + C * (shared + routed_k)
        else:
            total += mixer + dense_ffn
            active += mixer + dense_ffn
    embedding = vocab_size * D
    head = D + (0 if model_cfg.tie_embeddings else vocab_size * D)  # final norm + output
    return ParamCount(total=total + embedding + head, active=active + embedding + head,
                      embedding=embedding)
