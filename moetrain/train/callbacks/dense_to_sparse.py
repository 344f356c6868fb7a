"""EvoMoE (Nie et al. 2021, arXiv 2112.14397) as a callback (``schedule=evomoe`` with
``moe/router=dts``): expert-diversify, the spawn of E experts, the Dense-to-Sparse gate,
then hard top-k.

Legend: E experts, e local experts, F expert hidden, D model dim; S1 x S2 is one expert's
weight matrix (F x D for w1_EFD and w3_EFD, D x F for w2_EDF).

Phases by global step t (optimizer steps done before the step being trained):

- t < diversify_steps: the DTS router sends every token to expert 0 with weight 1, so one
  base expert trains alone. The public code has no diversify stage: this stage and the
  spawn below are moetrain's design after the paper's description (docs/schedules.md).
- At t = diversify_steps, E experts are spawned from expert 0: expert e = W_0 * M_e, with
  M_e a Bernoulli(1 - mask_ratio) mask keyed by (mask_seed, layer, matrix, e, entry).
  Every layout draws the same masks, and mask_ratio = 0 gives E exact copies. The
  masks are not rescaled by 1 / (1 - mask_ratio): the paper writes W_base * M_i.
- diversify_steps <= t < hard_step: the DTS gate (soft phase). The Gumbel-softmax
  temperature is tau(t) = anneal(temperature_start -> temperature_end, t -
  diversify_steps, steps).
- t >= hard_step: hard top-k (schedule.hard_k, null = model.top_k; EvoMoE: 1) of the
  Gumbel-perturbed logits.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from moetrain.config.schema import Anneal, Config, SpawnOptimizer
from moetrain.models.moe.routing import keyed_uniform
from moetrain.models.moe.schedule import PHASE_CODES, EvoMoESchedule
from moetrain.train.callbacks.schedules import ScheduleCallback

__all__ = ["PHASE_CODES", "EvoMoECallback", "spawn_experts"]

log = logging.getLogger(__name__)

# One mask stream per expert weight matrix.
_MATRIX_SALT = {"w1_EFD": 0xE1, "w3_EFD": 0xE3, "w2_EDF": 0xE2}


class EvoMoECallback(ScheduleCallback, EvoMoESchedule):
    """EvoMoE's phases (module docstring; the values are :class:`EvoMoESchedule`'s) on
    every DTS router, and the spawn.

    State: ``spawned``, whether the spawn is done. It is saved in every checkpoint, so a
    resume after the spawn does not spawn again. A checkpoint without this entry (the
    schedule was enabled on resume) spawns at resume when t >= diversify_steps.
    """

    name = "evomoe"

    def __init__(self, diversify_steps: int, hard_step: int, kind: Anneal, tau_start: float,
                 tau_end: float, steps: int, top_k: int, gumbel_threshold: float,
                 mask_ratio: float, mask_seed: int,
                 spawn_optimizer: SpawnOptimizer = SpawnOptimizer.copy,
                 gumbel_gates: bool = False) -> None:
        super().__init__(diversify_steps, hard_step, kind, tau_start, tau_end, steps, top_k,
                         gumbel_threshold, gumbel_gates)
        self.mask_ratio, self.mask_seed = mask_ratio, mask_seed
        self.spawn_optimizer = SpawnOptimizer(spawn_optimizer)
        self.spawned = False

    @classmethod
    def from_config(cls, cfg: Config, **extra: Any) -> EvoMoECallback:
        s = cfg.schedule
        return super().from_config(
            cfg, mask_ratio=s.mask_ratio,
            mask_seed=cfg.seed if s.mask_seed is None else s.mask_seed,
            spawn_optimizer=s.spawn_optimizer, **extra)

    def _set(self, trainer, t: int) -> None:
        super()._set(trainer, t)
        if self.diversify_steps > 0 and t >= self.diversify_steps and not self.spawned:
            spawn_experts(trainer.pm.moe_layers, trainer.optimizers, self.mask_ratio,
                          self.mask_seed, self.spawn_optimizer)
            self.spawned = True
            log.info("EvoMoE: experts spawned from expert 0 at step %d (mask_ratio %s, "
                     "optimizer state: %s)", t, self.mask_ratio, self.spawn_optimizer.value)

    def state_dict(self) -> dict[str, Any]:
        return {"spawned": int(self.spawned)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.spawned = bool(int(sd["spawned"]))


# ----------------------------------------------------------------------------- spawn
def _box(w: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """This rank's part of ``w`` (E, S1, S2): (local tensor, its shape, its offset in the
    global tensor). A DTensor (expert-parallel, FSDP, ETP shards) gives its local shard
    box, the one DCP saves; a plain tensor is all of it."""
    if isinstance(w, DTensor):
        shape, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh,
                                                              w.placements)
        return w.to_local(), tuple(shape), tuple(offset)
    return w, tuple(w.shape), (0,) * w.dim()


def _expert0(w: torch.Tensor) -> torch.Tensor:
    """Expert 0's (S1, S2) matrix of ``w`` on every rank of ``w``'s mesh.

    Expert 0 lives on the first expert-parallel rank, and FSDP or ETP may split it
    further. Each rank writes its part of expert 0 into zeros, and the sum over every
    axis of the mesh assembles it. Each entry has one writer (replicas along Replicate
    axes write only at coordinate 0), so the sum is exact.
    """
    local, shape, off = _box(w)
    if not isinstance(w, DTensor):
        return local[0].detach().clone()
    mesh = w.device_mesh
    buf = torch.zeros(tuple(w.shape[1:]), dtype=local.dtype, device=local.device)
    first_replica = all(mesh.get_local_rank(i) == 0
                        for i, p in enumerate(w.placements) if p.is_replicate())
    if first_replica and off[0] == 0 and shape[0] > 0:
        buf[off[1]:off[1] + shape[1], off[2]:off[2] + shape[2]] = local[0]
    for i in range(mesh.ndim):
        if mesh.size(i) > 1:
            dist.all_reduce(buf, group=mesh.get_group(i))
    return buf


def _write(w: torch.Tensor, base: torch.Tensor, ratio: float, salt: tuple[int, ...]) -> None:
    """Set every expert e of this rank's part of ``w`` to ``base`` * M_e, where M_e zeroes
    the entries whose keyed uniform (key = global flat index e*S1*S2 + i*S2 + j, ``salt``)
    is below ``ratio``."""
    local, shape, off = _box(w)
    S1, S2 = w.shape[1], w.shape[2]
    sub = base[off[1]:off[1] + shape[1], off[2]:off[2] + shape[2]].to(local.dtype)
    dev = local.device
    flat = ((torch.arange(shape[1], device=dev) + off[1])[:, None] * S2
            + (torch.arange(shape[2], device=dev) + off[2])[None, :])
    for i in range(shape[0]):
        if ratio > 0:
            u = keyed_uniform(flat + (off[0] + i) * S1 * S2, *salt)
            local[i].copy_(torch.where(u >= ratio, sub, torch.zeros_like(sub)))
        else:
            local[i].copy_(sub)


@torch.no_grad()
def spawn_experts(layers: list, optimizers: list, mask_ratio: float, seed: int,
                  optimizer_mode: SpawnOptimizer = SpawnOptimizer.copy) -> None:
    """EvoMoE's spawn on this rank's MoE ``layers``: every expert becomes expert 0's
    weights times its keyed mask (module docstring). A collective over each expert
    weight's mesh, so every rank holding these layers must call it.

    The spawned experts' AdamW moments follow ``optimizer_mode``:

    - ``copy``: they continue expert 0's. exp_avg is masked like the weights, so a zeroed
      entry restarts with no momentum. exp_avg_sq is copied whole, keeping expert 0's
      per-entry scale.
    - ``reset``: zeros, as a fresh parameter. Adam's step count is one per weight tensor
      and is not reset, so bias correction is ~1: the first update after a reset is
      about (1 - beta1) / sqrt(1 - beta2) of the learning rate per entry.
    """
    states: dict[int, dict] = {}
    for opt in optimizers:
        for p, st in opt.state.items():
            states[id(p)] = st
    for layer in layers:
        idx = int(layer.router.layer_idx)
        for name, w in sorted(layer.experts.named_parameters()):
            kind = name.rsplit(".", 1)[-1]
            salt = (seed, idx, _MATRIX_SALT[kind])
            _write(w, _expert0(w), mask_ratio, salt)
            st = states.get(id(w), {})
            for key in sorted(k for k, v in st.items()
                              if isinstance(v, torch.Tensor) and v.shape == w.shape):
                moment = st[key]
                if optimizer_mode == SpawnOptimizer.reset:
                    _box(moment)[0].zero_()
                else:  # the first moment masked like the weights, the second whole
                    _write(moment, _expert0(moment),
                           mask_ratio if key == "exp_avg" else 0.0, salt)
