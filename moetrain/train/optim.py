"""Optimizer and learning-rate schedule.

The LR is a pure function of the optimizer step, so the schedule's whole state is the
step counter the trainer saves in every checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moetrain.config.schema import LRSchedule, OptimConfig, OptimOffload


def build_optimizer(model: nn.Module, cfg: OptimConfig,
                    device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms, biases or the router bias).

    Fused on CUDA (torch's fused AdamW replaces apex's FusedAdam). With
    ``optim.offload=cpu``, the same AdamW on the CPU with DeepSpeed's C++ Adam, master
    weights and moments in CPU memory (``moetrain.train.offload``).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Mamba's A_log and D are not decayed (mamba_simple's _no_weight_decay); matched by
        # name, which survives FSDP's parameter replacement
        leaf = name.rsplit(".", 1)[-1]
        decayed = p.ndim >= 2 and "norm" not in name and leaf not in ("A_log", "D")
        (decay if decayed else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.offload == OptimOffload.cpu:
        from moetrain.train.offload import CPUOffloadAdamW  # needs the deepspeed extra

        return CPUOffloadAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=device.type == "cuda",
    )


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    - cosine: linear warmup to ``lr``, cosine decay to ``min_lr_ratio * lr`` at the end.
    - wsd: linear warmup, flat at ``lr``, then linear decay to ``min_lr_ratio * lr`` over
      the last ``decay_fraction`` of the steps (Hu et al., 2024, MiniCPM).
    - constant: linear warmup, then flat.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == LRSchedule.constant:
        return peak
    if cfg.schedule == LRSchedule.cosine:
        span = max(1, total_steps - cfg.warmup_steps - 1)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(cfg.decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return peak + (floor - peak) * progress


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
