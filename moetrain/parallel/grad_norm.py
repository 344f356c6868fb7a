"""Global gradient-norm clipping that counts every parameter exactly once.

Gradients may be plain tensors (replicated) or DTensors on different meshes (dense
parameters sharded over dp, or over dp x tp as 2-D DTensors under tensor parallelism;
experts over edp x ep; routers under TP over the flattened dp_tp mesh). Each gradient
must carry its parameter's placements: under TP, ``Partial`` gradients of sequence-
parallel norms are first redistributed (``tensor.align_grad_placements``). DTensor's norm
reduces over the mesh axes where the gradient is sharded and not over those where it is
replicated, so each group of gradients that share a mesh and placements gets its own
norm; the groups are then combined. Pipeline stages hold disjoint parameters, so their
squared norms are summed over the pp group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _group_key(g: torch.Tensor):
    if hasattr(g, "device_mesh"):
        return (id(g.device_mesh), tuple(str(p) for p in g.placements))
    return None


@torch.no_grad()
def clip_grad_norm_(
    params: list[nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup | None = None,
    uncounted: list[nn.Parameter] = (),
) -> torch.Tensor:
    """Clip in place to ``max_norm`` (0 = no clipping); return the total L2 norm.

    ``uncounted``: parameters among ``params`` that are copies of another counted one
    (tied weights on several pipeline stages): clipped, not counted in the norm.

    No host sync: the clip coefficient stays on the device (``min(1, max_norm / norm)``,
    as torch's ``clip_grad_norm_``), so the optimizer step is queued behind it.
    """
    skip = {id(p) for p in uncounted}
    grads = [p.grad for p in params if p.grad is not None]
    groups: dict = {}
    for g in (p.grad for p in params if p.grad is not None and id(p) not in skip):
        groups.setdefault(_group_key(g), []).append(g)
    sq = None
    for gs in groups.values():
        n = torch.nn.utils.get_total_norm(gs, norm_type=2.0, foreach=None)
        if hasattr(n, "full_tensor"):
            n = n.full_tensor()
        sq = n.float() ** 2 if sq is None else sq + n.float() ** 2
    if sq is None:  # no gradients on this rank
        sq = torch.zeros((), device=params[0].device if params else None)
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(sq, group=pp_group)
    total = sq.sqrt()
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef)
    return total
