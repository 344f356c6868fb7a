"""Model FLOPs per token, device peak FLOP/s and model FLOPs utilisation (MFU).

MFU = achieved model FLOP/s / peak device FLOP/s (PaLM, Chowdhery et al. 2022, appendix B).
It counts the FLOPs the model needs, not the FLOPs the hardware ran (recomputation from
activation checkpointing does not raise it), so it compares fairly across implementations.
"""

from __future__ import annotations

import torch

__all__ = ["expert_flop_shares", "flop_imbalance", "flops_per_token_at_k", "mean_expert_hidden",
           "mfu", "model_flops_per_token", "peak_flops_for_name", "peak_flops_per_s",
           "rank_flop_shares", "routed_hidden"]

# Dense (no structured sparsity) bf16 tensor-core peak per GPU, from NVIDIA's data sheets.
# Matched in order as case-insensitive substrings of torch.cuda.get_device_name().
_PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("h100 nvl", 835e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h200", 989e12),  # also GH200
    ("a100", 312e12),
)


def peak_flops_for_name(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s for a CUDA device name, or None for an unknown device."""
    name = device_name.lower()
    for key, peak in _PEAK_BF16:
        if key in name:
            return peak
    return None


def peak_flops_per_s(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s for MFU: ``logging.peak_tflops`` if > 0, else a lookup of the GPU name.

    None (MFU not reported) on CPU and on GPUs missing from the table; set
    ``logging.peak_tflops`` to report MFU there.
    """
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type == "cuda" and torch.cuda.is_available():
        return peak_flops_for_name(torch.cuda.get_device_name(device))
    return None


def model_flops_per_token(
    active_params_non_embedding: int, n_layers: int, dim: int, seq_len: int,
    model_cfg=None,
) -> float:
    """Training FLOPs per token: ``6 N + 12 L D S`` (PaLM appendix B).

    ``6 N``: forward (2) plus backward (4) multiply-adds over the N parameters each token
    touches; for an MoE, N counts only the top-k routed experts (plus shared experts, router,
    attention, the output projection) and excludes the input embedding (a lookup).
    ``12 L D S``: attention scores and weighted values, ``2 * 2 * S * D`` forward per layer and
    token, times 3 for the backward. Causal masking halves the useful work, but this term
    counts the full ``S x S`` matrix as PaLM does, so it slightly overstates causal models.

    ``model_cfg`` (a ModelConfig) with Mamba layers (``model.mixer``): the attention term
    counts only the layers that attend, and each Mamba layer adds 3 x its selective scan's
    elementwise FLOPs, 7 I N + 7 I per token (its projections are in N).
    """
    attention_layers = n_layers
    scan = 0.0
    if model_cfg is not None:
        attention_layers = sum(model_cfg.uses_attention(i) for i in range(model_cfg.n_layers))
        I, N = model_cfg.mamba_expand * model_cfg.dim, model_cfg.mamba_d_state
        scan = 3.0 * (7 * I * N + 7 * I) * (model_cfg.n_layers - attention_layers)
    return (6.0 * active_params_non_embedding + 12.0 * attention_layers * dim * seq_len
            + scan)


def flops_per_token_at_k(flops_per_token: float, top_k: float, active_k: float,
                         n_moe_layers: int, dim: int, expert_hidden: float,
                         routed_hidden: float | None = None) -> float:
    """:func:`model_flops_per_token` (counted at ``top_k`` routed experts per token) moved
    to ``active_k`` routed experts per token: each routed expert of a MoE layer adds
    ``6 * 3 D F`` (a SwiGLU expert holds 3 D F weights).

    ``active_k`` is the step's routed rows per token, averaged over the MoE layers: a
    top-k schedule's current k, or the mean of a variable-k router (threshold, expert
    choice, EvoMoE's soft phase). Rows dropped for capacity still count, as they do at a
    fixed k.

    HMoE's ragged experts (``model.expert_sizes``): ``expert_hidden`` is the F that
    ``flops_per_token`` was counted with (:func:`mean_expert_hidden`: uniform routing),
    and ``routed_hidden`` the step's row-weighted mean F (:func:`routed_hidden`), so the
    FLOPs follow where the rows actually went. None: the same F (uniform experts).
    """
    f = expert_hidden if routed_hidden is None else routed_hidden
    return flops_per_token + 6.0 * 3 * dim * n_moe_layers * (active_k * f - top_k * expert_hidden)


# ----------------------------------------------------------------------------- HMoE
# An expert's cost is (rows it receives) x F_e, so with ragged experts (HMoE, arXiv
# 2408.10681) balance, collapse and MFU count FLOPs, not rows. Uniform sizes reduce every
# function below to its row-count form.
def mean_expert_hidden(expert_hidden: int, expert_sizes: list[int] | None) -> float:
    """The F a routed row costs on average under uniform routing: mean(model.expert_sizes),
    or ``model.expert_hidden`` when the experts are uniform."""
    return expert_hidden if expert_sizes is None else sum(expert_sizes) / len(expert_sizes)


def expert_flop_shares(load_LE: torch.Tensor, sizes_E: list[int] | None) -> torch.Tensor:
    """Each expert's share of its layer's expert FLOPs, (L, E) summing to 1 per layer:
    load x F_e normalised (sizes None: the row shares). ``load_LE``: routed rows."""
    load = load_LE.double()
    if sizes_E is not None:
        load = load * torch.tensor(sizes_E, dtype=torch.float64, device=load.device)
    return load / load.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def flop_imbalance(load_LE: torch.Tensor, sizes_E: list[int] | None) -> torch.Tensor:
    """(L,) max FLOP share x E: 1.0 when every expert does the same work (with uniform
    sizes: ``load_imbalance``)."""
    return expert_flop_shares(load_LE, sizes_E).max(dim=-1).values * load_LE.shape[-1]


def rank_flop_shares(load_LE: torch.Tensor, sizes_E: list[int] | None,
                     expert_order: list[int] | None, ep: int,
                     placement_Ep: torch.Tensor | None = None) -> torch.Tensor:
    """(L, ep) each EP rank's share of the expert FLOPs: rank j holds the experts
    ``expert_order[j*E/ep:(j+1)*E/ep]`` (None: ids j*E/ep..; ragged experts:
    ``RaggedExperts.expert_order`` / ``class_slot_order``). ``placement_Ep`` instead gives
    each expert's share on each rank (``RaggedExperts.rank_flop_matrix``: split experts'
    work is spread over the ranks)."""
    share = expert_flop_shares(load_LE, sizes_E)
    if placement_Ep is not None:
        return share @ placement_Ep.to(share)
    if expert_order is not None:
        share = share[:, torch.tensor(expert_order, device=share.device)]
    return share.view(share.shape[0], ep, -1).sum(dim=-1)


def routed_hidden(load_LE: torch.Tensor, sizes_E: list[int]) -> float:
    """The row-weighted mean F of the routed rows (all layers): sum load x F / sum load,
    what a routed row of the step cost (``flops_per_token_at_k``'s ``routed_hidden``)."""
    load = load_LE.double()
    sizes = torch.tensor(sizes_E, dtype=torch.float64, device=load.device)
    total = load.sum()
    if total <= 0:
        return sum(sizes_E) / len(sizes_E)
    return float((load * sizes).sum() / total)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]; None when the peak is unknown."""
    if peak_flops is None or peak_flops <= 0:
        return None
    return tokens_per_s * flops_per_token / peak_flops
