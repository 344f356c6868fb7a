"""Router statistics of one optimizer step, summed over micro-batches and data-parallel
ranks, turned into the scalars the metrics logger writes.

Each MoE layer records detached ``last_stats`` in its forward; this module only reads them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moetrain.metrics.flops import flop_imbalance, rank_flop_shares


class MoEStatsTracker:
    """Accumulates per-layer router statistics over the micro-batches of one step.

    Sums (not means) are accumulated so that the all-reduce over data parallelism and the
    division by the number of micro-batches give layout-independent values.
    """

    def __init__(self, moe_layers: list, device: torch.device, ep: int = 1,
                 num_experts: int | None = None, chain_iterations: int = 1,
                 compete: bool = False, ffn_experts: int | None = None):
        # Every MoE layer of the model in layer order; under pipeline parallelism the layers
        # held by other stages are None (their rows stay zero here and are summed over pp).
        self.layers = moe_layers
        self.num_experts = num_experts or next(
            (m.router.num_experts for m in moe_layers if m is not None), 0)
        self.ep = ep
        # MoE++: the first ffn_experts of the num_experts the router scores are the FFN
        # experts (sharded over ep); the rest are zero-computation experts.
        self.ffn_experts = ffn_experts or self.num_experts
        # Chain-of-Experts: each round's load and balance loss are also logged per layer
        # (moe/layer{i}/round{t}/...); CompeteSMoE: the layers that competed.
        self.rounds = chain_iterations
        self.compete = compete
        self.device = device
        # HMoE's ragged experts (model.expert_sizes): an expert's work is rows x F_e, so the
        # balance metrics also count FLOPs, and EP ranks hold RaggedExperts.expert_order.
        self.first = next((m for m in moe_layers if m is not None), None)
        self.expert_sizes = getattr(self.first, "expert_sizes", None)
        self.last_load_LE: torch.Tensor | None = None
        # The step's routed rows per layer and expert, summed over micro-batches, data- and
        # tensor-parallel ranks and stages (float32, host): the expert-bias update's input.
        self.last_counts_LE: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        n, e = len(self.layers), self.num_experts
        # float64: exact counts past 2^24 rows per step (the bias update compares them).
        self.load_LE = torch.zeros(n, e, device=self.device, dtype=torch.float64)
        # columns: aux_loss, z_loss, entropy, dropped, routed, micro-batches, router_loss,
        # unrouted tokens, tokens, competition forwards, zero-computation slots
        self.scalars_LC = torch.zeros(n, 11, device=self.device, dtype=torch.float64)
        # per chain round (moe.chain_iterations > 1): routed rows per expert, balance loss
        self.round_LRE = torch.zeros(n, self.rounds if self.rounds > 1 else 0, e,
                                     device=self.device, dtype=torch.float64)
        self.round_aux_LR = torch.zeros(n, self.round_LRE.shape[1], device=self.device,
                                        dtype=torch.float64)
        # CompeteSMoE: the competition's router MSE, diversity and balance terms (raw),
        # summed over the layers' competing forwards
        self.compete_L3 = torch.zeros(n, 3 if self.compete else 0, device=self.device,
                                      dtype=torch.float64)

    def accumulate(self, only=None) -> None:
        """Add each layer's last micro-batch statistics (only layer ``only`` if given)."""
        for i, layer in enumerate(self.layers):
            if layer is None or (only is not None and layer is not only):
                continue
            s = layer.last_stats
            if s is None:
                continue
            self.load_LE[i] += s.load_E.double()
            self.scalars_LC[i] += torch.stack([
                s.aux_loss.float(), s.z_loss.float(), s.entropy.float(),
                s.num_dropped.float(), s.num_routed.float(),
                torch.ones((), device=self.device), s.router_loss.float(),
                s.num_unrouted.float(), s.num_tokens.float(),
                torch.full((), float(getattr(layer, "competed", False)), device=self.device),
                (s.num_null.float() if getattr(s, "num_null", None) is not None
                 else torch.zeros((), device=self.device)),
            ])
            terms = getattr(layer, "last_compete", None)
            if self.compete and getattr(layer, "competed", False) and terms is not None:
                self.compete_L3[i] += torch.stack([
                    terms["router_loss"], terms["diversity_loss"], terms["balance_loss"],
                ]).double().to(self.device)
            for t, r in enumerate(getattr(layer, "last_round_stats", [])[:self.rounds]):
                if self.round_LRE.shape[1]:
                    self.round_LRE[i, t] += r.load_E.double()
                    self.round_aux_LR[i, t] += r.aux_loss.double()

    def _bias_spread_L(self) -> torch.Tensor:
        """max - min of each layer's expert bias (0 off this pipeline stage: the sum over
        stages then gives each layer's value; biases are identical over dp and tp)."""
        out = torch.zeros(len(self.layers), device=self.device)
        for i, layer in enumerate(self.layers):
            if layer is not None:
                b = layer.router.expert_bias
                out[i] = (b.max() - b.min()).float().to(self.device)
        return out

    def reduce(self, group: dist.ProcessGroup | None, world: int,
               pp_group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """All-reduce over ``group`` (data parallelism) and ``pp_group`` (pipeline stages
        hold disjoint layers), and return step scalars.

        ``aux_loss`` is the raw Switch load-balancing loss (1.0 = perfectly balanced) and
        ``z_loss`` the raw router z-loss, both averaged over MoE layers and micro-batches;
        coefficients are not applied.
        """
        if not self.layers:
            return {}
        # The bias spread is identical on the ranks of a stage: pre-divided so the dp sum
        # gives it back; other stages' layers hold 0 here and come with the pp sum.
        spread_L1 = self._bias_spread_L()[:, None].double() / max(world, 1)
        L = len(self.layers)
        packed = torch.cat([self.load_LE, self.scalars_LC, spread_L1,
                            self.round_LRE.reshape(L, -1), self.round_aux_LR,
                            self.compete_L3], dim=1)
        if world > 1:
            dist.all_reduce(packed, group=group)
        if pp_group is not None and dist.get_world_size(pp_group) > 1:
            dist.all_reduce(packed, group=pp_group)
        e = self.load_LE.shape[1]
        load_LE, s = packed[:, :e], packed[:, e:]
        n_mb = s[:, 5].clamp_min(1)
        frac_LE = load_LE / load_LE.sum(dim=1, keepdim=True).clamp_min(1)
        # Per layer: max load / mean load, the load's coefficient of variation (population
        # std / mean), mean routing entropy, dropped share of the routed rows, and the
        # spread (max - min) of the expert bias.
        per_layer = {
            "load_imbalance": frac_LE.max(dim=1).values * e,
            "load_cv": frac_LE.std(dim=1, unbiased=False) * e,
            "router_entropy": s[:, 2] / n_mb,
            "dropped_frac": s[:, 3] / s[:, 4].clamp_min(1),
            "expert_bias_spread": s[:, 11],
        }
        sizes = self.expert_sizes
        if sizes is not None:  # max FLOP share x E (1.0: every expert does the same work)
            per_layer["flop_imbalance"] = flop_imbalance(load_LE[:, :self.ffn_experts], sizes)
        R = self.round_LRE.shape[1]
        if R:  # Chain-of-Experts: each round's load imbalance and balance loss
            rounds = s[:, 12:]
            load_LRE = rounds[:, :R * e].reshape(-1, R, e)
            frac_LRE = load_LRE / load_LRE.sum(dim=2, keepdim=True).clamp_min(1)
            for t in range(R):
                per_layer[f"round{t}/load_imbalance"] = frac_LRE[:, t].max(dim=1).values * e
                per_layer[f"round{t}/aux_loss"] = rounds[:, R * e + t] / n_mb
        names = ["aux_loss", "z_loss", "router_loss", "router_entropy", "dropped_frac",
                 "unrouted_frac", "load_imbalance", "load_cv", "expert_bias_spread",
                 "active_k"]
        values = [
            (s[:, 0] / n_mb).mean(),
            (s[:, 1] / n_mb).mean(),
            (s[:, 6] / n_mb).mean(),
            per_layer["router_entropy"].mean(),
            s[:, 3].sum() / s[:, 4].sum().clamp_min(1),
            s[:, 7].sum() / s[:, 8].sum().clamp_min(1),
            per_layer["load_imbalance"].mean(),
            per_layer["load_cv"].mean(),
            per_layer["expert_bias_spread"].mean(),
            # routed rows per token (before capacity drops), mean over layers: the experts
            # per token MFU counts (a schedule's k, or a variable-k router's mean)
            (s[:, 4] / s[:, 8].clamp_min(1)).mean(),
        ]
        if sizes is not None:
            # the step's row-weighted mean F: the routed rows' cost, for MFU
            F_E = torch.tensor(sizes, dtype=load_LE.dtype, device=load_LE.device)
            ffn_load = load_LE[:, :self.ffn_experts]
            names += ["flop_imbalance", "routed_hidden"]
            values += [per_layer["flop_imbalance"].mean(),
                       (ffn_load * F_E).sum() / ffn_load.sum().clamp_min(1)]
        if self.ffn_experts < e:  # MoE++: share of the routed slots on zero-computation
            names.append("null_frac")  # experts (routed counts only the FFN experts')
            values.append(s[:, 10].sum() / (s[:, 10].sum() + s[:, 4].sum()).clamp_min(1))
        if self.compete:  # MoE layers that competed this step (CompeteSMoE)
            names.append("competed_layers")
            values.append((s[:, 9] / n_mb).sum())
            # the competition's raw terms, mean over the competing layer forwards (0 on a
            # step without competition)
            forwards = s[:, 9].sum().clamp_min(1)
            terms_3 = s[:, -3:].sum(dim=0) / forwards
            names += ["compete/router_mse", "compete/diversity", "compete/balance"]
            values += list(terms_3.unbind(0))
        for key, v_L in per_layer.items():
            names += [f"moe/layer{i}/{key}" for i in range(v_L.shape[0])]
            values += list(v_L.unbind(0))
        if self.ep > 1:
            # Load per EP rank (its E/ep experts) and max/mean across the EP ranks.
            ffn_LE = frac_LE[:, :self.ffn_experts]  # the experts the ep ranks hold
            if sizes is not None:  # FLOPs per rank, by the ragged experts' placement
                experts = self.first.experts
                placement = (experts.rank_flop_matrix(self.ep)
                             if hasattr(experts, "rank_flop_matrix") else None)
                rank_load_LR = rank_flop_shares(ffn_LE, sizes, None, self.ep, placement)
            elif self.ep > self.ffn_experts:  # sharded experts: s ranks share each one's rows
                s = self.ep // self.ffn_experts
                rank_load_LR = (ffn_LE / s).repeat_interleave(s, dim=1)
            else:
                rank_load_LR = ffn_LE.view(ffn_LE.shape[0], self.ep, -1).sum(dim=2)
            rank_load_LR = rank_load_LR / rank_load_LR.sum(dim=1, keepdim=True).clamp_min(1e-12)
            names += ["ep_load_imbalance"] + [f"ep_load/rank{r}" for r in range(self.ep)]
            values += [(rank_load_LR.max(dim=1).values * self.ep).mean()]
            values += [rank_load_LR[:, r].mean() for r in range(self.ep)]
        # One device-to-host copy for the scalars and the load table.
        host = torch.cat([torch.stack(values), frac_LE.flatten(), load_LE.flatten()]).cpu()
        out = dict(zip(names, host[:len(names)].tolist()))
        n = len(names)
        self.last_load_LE = host[n:n + frac_LE.numel()].view_as(frac_LE)
        self.last_counts_LE = host[n + frac_LE.numel():].view_as(load_LE)
        self.reset()
        return out
