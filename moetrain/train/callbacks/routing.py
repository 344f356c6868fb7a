"""Callbacks of the routers: the keys of their random draws, the auxiliary-loss-free
expert-bias update and the balance monitor (collapse warning)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from moetrain.config.schema import BiasUpdate, Config
from moetrain.metrics.flops import expert_flop_shares
from moetrain.models.moe.routing import bias_delta
from moetrain.train.callbacks.base import Callback, register_callback

log = logging.getLogger(__name__)


def _in_backward() -> bool:
    """True while the autograd engine runs (an activation-checkpoint recompute)."""
    return torch._C._current_graph_task_id() != -1


class RoutingContextCallback(Callback):
    """Keys the routers' random draws by the step and the tokens' global positions.

    At each step start every local router gets (seed, step), and each MoE layer gets the
    keys of this rank's micro-batches: key = sample index * seq_len + position. A forward
    pre-hook hands micro-batch j's keys to the j-th training forward of the layer (and
    to the j-th recompute inside the backward), so pipeline schedules, which run several
    micro-batches before their backwards, key every forward right. Global-batch
    statistics restart at each step here too.
    """

    name = "routing_context"

    def __init__(self, seed: int, seq_len: int, total_steps: int = 0) -> None:
        self.seed, self.seq_len = seed, seq_len
        self.total_steps = total_steps  # train.steps (CompeteSMoE's schedule)
        self.keys: list[torch.Tensor] = []  # per micro-batch, on the device
        self.count: dict[tuple[int, bool], int] = {}
        self.hooked: set[int] = set()

    def on_step_start(self, trainer, step, micro_batches) -> None:
        for layer in trainer.pm.moe_layers:
            if id(layer) not in self.hooked:
                layer.register_forward_pre_hook(self._pre_forward)
                self.hooked.add(id(layer))
        layers = trainer.pm.moe_layers
        self.count = {}
        self.keys = []
        if any(layer.router.needs_token_keys for layer in layers):
            # One host-to-device copy per micro-batch and step, not per layer and forward.
            pos = torch.arange(self.seq_len)
            for idx in micro_batches:
                keys = (torch.tensor(idx)[:, None] * self.seq_len + pos).flatten()
                if trainer.device.type == "cuda":
                    keys = keys.pin_memory()
                self.keys.append(keys.to(trainer.device, non_blocking=True))
        for layer in layers:
            layer.router.context.set_step(self.seed, step)
            layer.router.context.total_steps = self.total_steps
            layer.reset_step_counts()

    def _pre_forward(self, layer, args) -> None:
        if not layer.training:
            layer.router.context.token_keys = None
            layer.micro_index = None
            return
        slot = (id(layer), _in_backward())
        j = self.count.get(slot, 0)
        self.count[slot] = j + 1
        layer.micro_index = j  # the micro-batch this forward (or recompute) belongs to
        if not self.keys:
            layer.router.context.token_keys = None
            return
        keys = self.keys[min(j, len(self.keys) - 1)]
        if layer.seq_shards > 1:  # this tp rank routes one shard of every sequence
            keys = keys.view(-1, self.seq_len).chunk(layer.seq_shards, dim=1)[
                layer.seq_shard_rank].flatten()
        layer.router.context.token_keys = keys


class ExpertBiasCallback(Callback):
    """Auxiliary-loss-free balancing (DeepSeek-V3; Loss-Free Balancing, Wang et al. 2024,
    Alg. 1): once per optimizer step, each MoE layer's expert bias moves by
    ``bias_delta(counts, moe.router.bias_update_rate, moe.router.bias_update)``.

    The counts are the step's routed rows per expert and layer: every micro-batch, summed
    over the data-parallel and tensor-parallel ranks and pipeline stages by the trainer's
    router statistics (training forwards only: not validation, not a recompute). So the
    update is identical on every rank. With ``moe.router.bias_update_tokens`` the bias
    freezes once that many training tokens are consumed (DeepSeek-V3's schedule). The
    bias is a float32 buffer of the router and is saved with the model; this callback's
    own state is the number of updates. A skipped step (non-finite loss or gradient norm,
    docs/nonfinite.md) moves no bias.
    """

    name = "expert_bias"

    def __init__(self, rate: float, rule: BiasUpdate, until_tokens: int = 0) -> None:
        self.rate, self.rule = rate, BiasUpdate(rule)
        self.until_tokens = until_tokens  # 0 = no limit
        self.updates = 0

    def on_step_end(self, trainer, step, metrics) -> None:
        if metrics.get("skipped"):  # a non-finite step: the model state stays untouched
            return
        counts_LE = trainer.moe_stats.last_counts_LE
        # The step's tokens are already counted: the bias moves while the tokens
        # consumed *before* this step are under the budget, then stays frozen exactly.
        before = trainer.progress.tokens - trainer.cfg.train.global_batch_size * trainer.cfg.train.seq_len
        if counts_LE is None or (self.until_tokens and before >= self.until_tokens):
            return
        delta_LE = bias_delta(counts_LE, self.rate, self.rule)
        for i, layer in enumerate(trainer.moe_stats.layers):
            if layer is None:  # held by another pipeline stage
                continue
            bias = layer.router.expert_bias
            with torch.no_grad():
                bias.add_(delta_LE[i].to(device=bias.device, dtype=bias.dtype))
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.updates = int(sd["updates"])


class BalanceMonitorCallback(Callback):
    """Expert-collapse warning: an expert whose share of a layer's routed rows stays below
    ``logging.collapse_fraction`` of its fair share 1/E for ``logging.collapse_steps``
    consecutive steps is reported once per episode, in the log and as a metrics.jsonl
    event ``{"step", "event": "expert_collapse", "layer", "expert", "steps", "share"}``.
    The per-expert run lengths are checkpointed, so a resume continues the count.
    """

    name = "balance_monitor"

    def __init__(self, fraction: float, steps: int, num_layers: int, num_experts: int,
                 expert_sizes: list[int] | None = None) -> None:
        self.fraction, self.steps = fraction, steps
        # HMoE's ragged experts: the share counts FLOPs (rows x F_e), not rows
        self.expert_sizes = expert_sizes
        # Consecutive low-load steps per MoE layer (in layer order) and expert.
        self.run_LE = torch.zeros(num_layers, num_experts, dtype=torch.int64)

    def on_step_end(self, trainer, step, metrics) -> None:
        counts_LE = trainer.moe_stats.last_counts_LE
        if counts_LE is None or self.steps == 0:
            return
        if self.expert_sizes is not None:
            share_LE = expert_flop_shares(counts_LE, self.expert_sizes).float()
        else:
            share_LE = counts_LE / counts_LE.sum(dim=1, keepdim=True).clamp_min(1)
        low_LE = share_LE < self.fraction / counts_LE.shape[1]
        self.run_LE = torch.where(low_LE, self.run_LE + 1, torch.zeros_like(self.run_LE))
        for layer, expert in (self.run_LE == self.steps).nonzero().tolist():
            share = float(share_LE[layer, expert])
            log.warning(
                "expert collapse: layer %d expert %d has received %.4f of the routed rows "
                "(< %.2f of its fair share 1/%d) for %d steps (at step %d); consider "
                "moe.aux_loss_coef, moe.router.bias_update_rate or another moe/router",
                layer, expert, share, self.fraction, counts_LE.shape[1], self.steps, step)
            trainer.metrics.log_event(step, {"event": "expert_collapse", "layer": layer,
                                             "expert": expert, "steps": self.steps,
                                             "share": share})

    def state_dict(self) -> dict[str, Any]:
        return {"run_LE": self.run_LE}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.run_LE = sd["run_LE"].clone()


register_callback("routing_context")(
    lambda cfg: RoutingContextCallback(cfg.seed, cfg.train.seq_len, cfg.train.steps))


def _expert_bias(cfg: Config) -> ExpertBiasCallback:
    r = cfg.moe.router
    return ExpertBiasCallback(r.bias_update_rate, r.bias_update, r.bias_update_tokens)


register_callback("expert_bias")(_expert_bias)


def _balance_monitor(cfg: Config) -> BalanceMonitorCallback:
    m = cfg.model
    n_moe = sum(m.is_moe_layer(i) for i in range(m.n_layers))
    return BalanceMonitorCallback(cfg.logging.collapse_fraction, cfg.logging.collapse_steps,
                                  n_moe, m.num_experts + m.null_experts, m.expert_sizes)


register_callback("balance_monitor")(_balance_monitor)

