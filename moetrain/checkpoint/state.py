"""Stateful wrappers that make training state savable through ``torch.distributed.checkpoint``.

DCP saves a ``dict[str, Stateful]``: it calls ``state_dict()`` on save and, on load, calls
``state_dict()`` for a template, fills it in place from storage and hands it back to
``load_state_dict()``. Sharded parameters and optimizer states travel as DTensors, so a
checkpoint written at one world size or layout loads at another (DCP reshards on read).
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

__all__ = ["ModelOptimizerState", "ObjectState", "RNGState"]


def _fill_fresh_state(optim: torch.optim.Optimizer) -> None:
    """Give the parameters that have no optimizer state yet, in an optimizer that has
    stepped, the state they would start with: one zero-gradient, zero-lr step over them
    alone, with the step count set back to 0 (Adam's moments stay 0, the weights do not
    move). A parameter that has had no gradient yet (EvoMoE's gate before the spawn, with no
    z-loss) then still has a tensor in the checkpoint, which the load template (every
    parameter initialised) asks for; its first real step is that of a fresh state."""
    if not optim.state:
        return  # get_state_dict initialises a fresh optimizer itself
    missing = {p for g in optim.param_groups for p in g["params"]
               if p.requires_grad and not optim.state.get(p)}
    if not missing:
        return
    grads = {p: p.grad for g in optim.param_groups for p in g["params"]}
    lrs = [g.get("lr") for g in optim.param_groups]
    try:
        for g in optim.param_groups:
            for p in g["params"]:
                p.grad = torch.zeros_like(p) if p in missing else None
            if "lr" in g:
                g["lr"] = torch.tensor(0.0) if isinstance(g["lr"], torch.Tensor) else 0.0
        optim.step()
    finally:
        for g, lr in zip(optim.param_groups, lrs):
            if lr is not None:
                g["lr"] = lr
        for p, grad in grads.items():
            p.grad = grad
    for p in missing:
        step = optim.state[p].get("step")
        if isinstance(step, torch.Tensor):
            step.zero_()
        elif step is not None:
            optim.state[p]["step"] = 0


def _as_list(x: Any) -> list:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


class ModelOptimizerState(Stateful):
    """Model parameters/buffers and optimizer state, in DCP's resharding-friendly form.

    Goes through ``get_state_dict``/``set_state_dict`` so FSDP2/TP/EP-sharded parameters and
    their optimizer states are saved as sharded DTensors under their plain FQNs
    (``layers.0.attn.wq.weight``), which DCP reshards on load to any other layout.
    ``flatten_optimizer_state_dict=True`` keys optimizer state by parameter FQN
    (``state.<fqn>.exp_avg``) instead of by parameter index, so it survives a different
    parameter order or a pipeline split.

    ``models``/``optimizers`` may be a list of model parts with one optimizer each (pipeline
    stages on one rank); their FQNs must be disjoint. ``optimizers=None`` saves weights only.

    An optimizer that has not stepped yet has no state; ``get_state_dict`` initialises it with
    one zero-gradient, zero-lr step so the load template has every tensor. Consequence: calling
    ``state_dict()`` before the first real step leaves Adam's step count at 1. Parameters
    that have had no gradient yet in an optimizer that has stepped get their fresh state
    (:func:`_fill_fresh_state`), so the checkpoint matches that template.
    """

    def __init__(
        self,
        models: nn.Module | Sequence[nn.Module],
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
    ) -> None:
        self.models: list[nn.Module] = _as_list(models)
        self.optimizers: list[torch.optim.Optimizer] = _as_list(optimizers)
        if not self.models:
            raise ValueError("ModelOptimizerState needs at least one model part")
        if self.optimizers and len(self.optimizers) != len(self.models):
            raise ValueError(
                f"ModelOptimizerState got {len(self.models)} model parts and "
                f"{len(self.optimizers)} optimizers; pass one optimizer per model part"
            )
        self.options = StateDictOptions(flatten_optimizer_state_dict=True)

    def _part_state(self, i: int) -> tuple[dict[str, Any], dict[str, Any]]:
        if not self.optimizers:
            return get_model_state_dict(self.models[i], options=self.options), {}
        _fill_fresh_state(self.optimizers[i])
        return get_state_dict(self.models[i], self.optimizers[i], options=self.options)

    def state_dict(self) -> dict[str, Any]:
        model_sd: dict[str, Any] = {}
        optim_sd: dict[str, Any] = {}
        for i in range(len(self.models)):
            m, o = self._part_state(i)
            model_sd.update(m)
            optim_sd.update(o)
        out: dict[str, Any] = {"model": model_sd}
        if self.optimizers:
            out["optim"] = optim_sd
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        model_sd = state_dict["model"]
        optim_sd = state_dict.get("optim", {})
        for i, model in enumerate(self.models):
            # Each part takes exactly its own keys (set_state_dict is strict about extras).
            own_model, own_optim = self._part_state(i)
            part_model = {k: model_sd[k] for k in own_model}
            if self.optimizers:
                part_optim = {k: optim_sd[k] for k in own_optim}
                set_state_dict(
                    model, self.optimizers[i], model_state_dict=part_model,
                    optim_state_dict=part_optim, options=self.options,
                )
            else:
                set_model_state_dict(model, part_model, options=self.options)


class RNGState(Stateful):
    """Every rank's random number generators: torch CPU, CUDA (current device), python, numpy.

    Each rank's states are stored under ``rank{r}``. ``state_dict()`` all-gathers them (a
    collective: DCP calls it on every rank, in the same order) into one pickled blob under a
    single key, so the checkpoint holds the full ``{rank: states}`` map however many ranks wrote
    it. On load, rank ``r`` restores ``rank{r}``; a rank with no saved entry (the world grew)
    keeps its current generators, and entries of ranks that no longer exist are ignored.
    Restoring is exact: the next random numbers equal those the saving run would have drawn.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group

    @staticmethod
    def _capture() -> dict[str, Any]:
        states: dict[str, Any] = {
            "torch_cpu": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["torch_cuda"] = torch.cuda.get_rng_state()
        return states

    @staticmethod
    def _restore(states: dict[str, Any]) -> None:
        torch.set_rng_state(states["torch_cpu"])
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        if "torch_cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["torch_cuda"])

    def _rank_world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)
        return 0, 1

    def state_dict(self) -> dict[str, Any]:
        _, world = self._rank_world()
        mine = self._capture()
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, mine, group=self.process_group)
        else:
            gathered = [mine]
        per_rank = {f"rank{r}": s for r, s in enumerate(gathered)}
        return {"per_rank": pickle.dumps(per_rank)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rank, _ = self._rank_world()
        per_rank = pickle.loads(state_dict["per_rank"])
        states = per_rank.get(f"rank{rank}")
        if states is not None:
            self._restore(states)


class ObjectState(Stateful):
    """Adapts a ``get``/``set`` pair of callables to ``Stateful`` (step counters, small dicts).

    Values must be tensors or picklable python objects; DCP stores non-tensors as bytes.
    """

    def __init__(self, get: Callable[[], dict[str, Any]], set: Callable[[dict[str, Any]], None]):
        self._get = get
        self._set = set

    def state_dict(self) -> dict[str, Any]:
        return self._get()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._set(state_dict)
