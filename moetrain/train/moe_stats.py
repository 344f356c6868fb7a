"""Router statistics of one optimizer step, summed over micro-batches and data-parallel
ranks, turned into the scalars the metrics logger writes.

Each MoE layer records detached ``last_stats`` in its forward; this module only reads them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class MoEStatsTracker:
    """Accumulates per-layer router statistics over the micro-batches of one step.

    Sums (not means) are accumulated so that the all-reduce over data parallelism and the
    division by the number of micro-batches give layout-independent values.
    """

    def __init__(self, moe_layers: list, device: torch.device, ep: int = 1):
        self.layers = moe_layers
        self.ep = ep
        self.device = device
        self.last_load_LE: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        n = len(self.layers)
        e = self.layers[0].router.num_experts if n else 0
        self.load_LE = torch.zeros(n, e, device=self.device)
        # columns: aux_loss, z_loss, entropy, dropped, routed, micro-batches
        self.scalars_L6 = torch.zeros(n, 6, device=self.device)

    def accumulate(self) -> None:
        for i, layer in enumerate(self.layers):
            s = layer.last_stats
            if s is None:
                continue
            self.load_LE[i] += s.load_E.float()
            self.scalars_L6[i] += torch.stack([
                s.aux_loss.float(), s.z_loss.float(), s.entropy.float(),
                s.num_dropped.float(), s.num_routed.float(),
                torch.ones((), device=self.device),
            ])

    def reduce(self, group: dist.ProcessGroup | None, world: int) -> dict[str, float]:
        """All-reduce over ``group`` (data parallelism) and return step scalars.

        ``aux_loss`` is the raw Switch load-balancing loss (1.0 = perfectly balanced) and
        ``z_loss`` the raw router z-loss, both averaged over MoE layers and micro-batches;
        coefficients are not applied.
        """
        if not self.layers:
            return {}
        packed = torch.cat([self.load_LE, self.scalars_L6], dim=1)
        if world > 1:
            dist.all_reduce(packed, group=group)
        e = self.load_LE.shape[1]
        load_LE, s = packed[:, :e], packed[:, e:]
        n_mb = s[:, 5].clamp_min(1)
        frac_LE = load_LE / load_LE.sum(dim=1, keepdim=True).clamp_min(1)
        self.last_load_LE = frac_LE.cpu()
        imbalance_L = frac_LE.max(dim=1).values * e  # max load / mean load
        out = {
            "aux_loss": (s[:, 0] / n_mb).mean().item(),
            "z_loss": (s[:, 1] / n_mb).mean().item(),
            "router_entropy": (s[:, 2] / n_mb).mean().item(),
            "dropped_frac": (s[:, 3].sum() / s[:, 4].sum().clamp_min(1)).item(),
            "load_imbalance": imbalance_L.mean().item(),
        }
        if self.ep > 1:
            # Load per EP rank (its E/ep experts) and max/mean across the EP ranks.
            rank_load_LR = frac_LE.view(frac_LE.shape[0], self.ep, -1).sum(dim=2)
            out["ep_load_imbalance"] = (rank_load_LR.max(dim=1).values * self.ep).mean().item()
            for r in range(self.ep):
                out[f"ep_load/rank{r}"] = rank_load_LR[:, r].mean().item()
        self.reset()
        return out
