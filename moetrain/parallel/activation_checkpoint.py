"""Activation checkpointing and per-block ``torch.compile``: steps 3 and 4 of the fixed
order TP -> EP -> AC -> compile -> PP split -> FSDP (torchtitan's ``apply_ac`` /
``apply_compile``).

Activation checkpointing (Chen et al., 2016, "Training Deep Nets with Sublinear Memory
Cost") keeps a region's inputs in the forward and re-runs the region in the backward, so
its intermediate activations never stay alive across the step. Modes (``parallel.ac``):

- ``full``: every transformer block. A block keeps only its input x_BSD; the backward
  re-runs attention, router, dispatch (and, under EP, the all-to-all) and the experts.
- ``selective``: each MoE layer's routed experts. Their SwiGLU intermediates, 4 * R * F
  values for R = T*K routed rows, dominate an MoE block's activations (see
  ``moetrain/parallel/memory.py``) and cost 2/3 of the block's FLOPs to redo; the
  router, the dispatch and its all-to-all are kept, so no communication is re-run.
  ``parallel.ac_attention=true`` also recomputes each attention sublayer (Korthikanti et
  al., 2022, recompute the parts whose memory is large and whose FLOPs are cheap), and
  each Mamba mixer in its place (``model.mixer``): its sequential scan keeps about
  (2N + 12) * I float32 values per token (each step's decays and state), far more than
  its FLOPs cost to redo.

Wrapping uses torch's non-reentrant ``checkpoint_wrapper``. It inserts
``_checkpoint_wrapped_module`` into parameter FQNs, and strips it again in ``state_dict``
(and re-adds it in ``load_state_dict``); DCP's ``get_state_dict`` strips it too. So a
checkpoint saved with any ``parallel.ac`` loads with any other. Recompute is exact:
the same ops on the same inputs (RNG state preserved), so losses and gradients are
bitwise those of ``ac=none``.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)

from moetrain.config.schema import ActivationCheckpointing

__all__ = ["apply_ac", "apply_compile", "is_checkpointed"]


def _wrap(module: nn.Module) -> nn.Module:
    if isinstance(module, CheckpointWrapper):  # idempotent: never nest two wrappers
        return module
    return checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                              preserve_rng_state=True)


def is_checkpointed(module: nn.Module) -> bool:
    """True if ``module`` is wrapped for activation checkpointing."""
    return isinstance(module, CheckpointWrapper)


def apply_ac(model: nn.Module, mode: ActivationCheckpointing, attention: bool = False) -> None:
    """Wrap the regions of ``model`` that ``mode`` recomputes, in place.

    ``model`` is a :class:`~moetrain.models.Transformer` (or a pipeline stage of one): its
    blocks are ``model.layers`` and a block's MoE layer is ``block.moe``.

    The in-module ``moe.recompute_experts`` (``GroupedExperts.recompute``) is the same
    recompute as ``selective``; it is never stacked with a wrapper: ``selective`` leaves
    such experts unwrapped, and ``full`` turns it off inside the blocks it wraps (a nested
    checkpoint would run the experts' forward three times for the same saving).
    """
    mode = ActivationCheckpointing(mode)
    if mode == ActivationCheckpointing.none:
        return
    for name, block in list(model.layers.named_children()):
        experts = block.moe.experts if block.moe_enabled else None
        if mode == ActivationCheckpointing.full:
            if getattr(experts, "recompute", False):
                experts.recompute = False
            model.layers.register_module(name, _wrap(block))
            continue
        if attention:  # the block's sequence mixer: attention or Mamba
            mixer = "attention" if block.uses_attention else "mamba"
            setattr(block, mixer, _wrap(getattr(block, mixer)))
        if experts is not None and not getattr(experts, "recompute", False):
            block.moe.experts = _wrap(experts)


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """``torch.compile`` each transformer block in place (torchtitan's per-block compile).

    ``nn.Module.compile`` keeps the module object, so FQNs, state dicts and the FSDP
    wrapping that follows are unchanged. Not ``fullgraph``: the dropless dispatch has
    data-dependent shapes (rows per expert), which graph-break.
    """
    for block in model.layers.values():
        block.compile(backend=backend)
