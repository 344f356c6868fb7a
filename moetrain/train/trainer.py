"""The training loop. It reads top to bottom: build, (resume), then per optimizer step
accumulate micro-batches, clip, step, log, validate and checkpoint.

Every layout runs the same micro-batches (see ``GlobalBatchSampler.micro_batches``) and
normalises losses the same way, so per-step losses match the single-process run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moetrain import faults
from moetrain.checkpoint import CheckpointManager, ModelOptimizerState, RNGState
from moetrain.checkpoint.load import CONFIG_FILE, config_to_yaml
from moetrain.config.recipes import format_recipe, recipe_record
from moetrain.config.schema import Config, ConfigError, OptimOffload
from moetrain.config.validate import Layout
from moetrain.data import GlobalBatchSampler, build_data
from moetrain.data.hf_tokenizer import checkpoint_tokenizer_files
from moetrain.metrics import (
    MetricsLogger,
    flops_per_token_at_k,
    mfu,
    model_flops_per_token,
    peak_flops_per_s,
)
from moetrain.metrics.flops import mean_expert_hidden
from moetrain.models import Transformer, count_params
from moetrain.parallel.overlap_tuner import OverlapTuner
from moetrain.parallel.parallelize import ParallelModel, parallelize
from moetrain.parallel.pipeline import StageOptimizers
from moetrain.parallel.tensor import local_loss
from moetrain.train.callbacks import CallbackList, default_callbacks
from moetrain.train.moe_stats import MoEStatsTracker
from moetrain.train.optim import build_optimizer, lr_at, set_lr
from moetrain.train.preemption import StopSignal

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class Progress:
    """The trainer's own resumable counters (saved in every checkpoint)."""

    step: int = 0  # optimizer steps completed (skipped ones included)
    tokens: int = 0  # training tokens consumed, over all ranks
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient norm, in all
    consecutive_skips: int = 0  # ... of them since the last applied update

    # The checkpoint's "progress" entry keeps exactly step and tokens, so checkpoints from
    # before the skip counters load (DCP requires every key it is asked for); the counters
    # are the separate, optional "skips" entry (``SkipState``; absent in older ones: 0).
    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, sd: dict) -> None:
        self.step, self.tokens = int(sd["step"]), int(sd["tokens"])


@dataclass
class SkipState:
    """The checkpoint entry ``skips``: ``Progress``'s non-finite step counters."""

    progress: Progress

    def state_dict(self) -> dict:
        return {"skipped_steps": self.progress.skipped_steps,
                "consecutive_skips": self.progress.consecutive_skips}

    def load_state_dict(self, sd: dict) -> None:
        self.progress.skipped_steps = int(sd.get("skipped_steps", 0))
        self.progress.consecutive_skips = int(sd.get("consecutive_skips", 0))


@dataclass
class Summary:
    steps: int
    final_loss: float
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    run_dir: str = ""

    def format(self) -> str:
        lines = [
            "moetrain: training finished",
            f"  steps        {self.steps}",
            f"  final loss   {self.final_loss:.4f}",
        ]
        if self.val_losses:
            (s0, v0), (s1, v1) = self.val_losses[0], self.val_losses[-1]
            lines.append(f"  val loss     {v0:.4f} (step {s0}) -> {v1:.4f} (step {s1}), "
                         f"ppl {math.exp(min(v1, 50)):.2f}")
        tps = self.tokens / self.seconds if self.seconds > 0 else 0.0
        lines += [
            f"  tokens       {self.tokens:,} in {self.seconds:.1f} s ({tps:,.0f} tokens/s)",
            f"  run dir      {self.run_dir}  (metrics.jsonl, tensorboard/, checkpoints/)",
        ]
        return "\n".join(lines)


class Trainer:
    def __init__(self, cfg: Config, layout: Layout, device: torch.device):
        self.cfg, self.layout, self.device = cfg, layout, device
        self.rank = dist.get_rank()
        self.run_dir = Path(cfg.run.dir)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)

        # Checks the data's vocabulary against model.vocab_size before opening any shard.
        self.data = build_data(cfg.data, cfg.train.seq_len, model_vocab_size=cfg.model.vocab_size)
        vocab = self.vocab_size = self.data.vocab_size
        if cfg.init.from_dense:
            self._check_dense_tokenizer()

        # Every rank builds the same full model from the same seed; parallelize() then
        # keeps each rank's shard. So the initial weights do not depend on the layout.
        torch.manual_seed(cfg.seed)
        model = Transformer(cfg.model, cfg.moe, vocab)
        self.params = count_params(cfg.model, vocab, cfg.moe)
        self.pm: ParallelModel = parallelize(model, layout, cfg.parallel, cfg.moe, device,
                                             train=cfg.train,
                                             cpu_offload=cfg.optim.offload == OptimOffload.cpu)
        self.model: nn.Module = self.pm.model
        # One optimizer per model part: this rank's pipeline stages ([model] without PP).
        self.optimizers = [build_optimizer(part, cfg.optim, device) for part in self.pm.parts]
        self.optimizer = (self.optimizers[0] if len(self.optimizers) == 1
                          else StageOptimizers(self.optimizers))

        t = cfg.train
        self.dp_rank, self.dp_size = self.pm.dp_rank, layout.dp
        self.accum = t.global_batch_size // (t.micro_batch_size * self.dp_size)
        self.sampler = self.data.sampler(t.global_batch_size, cfg.seed)
        self.progress = Progress()
        # A checkpoint carries its config and the model's tokenizer (as a Hugging Face
        # tokenizer): moetrain.load_tokenizer and tools/export_hf.py need nothing else.
        files = {CONFIG_FILE: config_to_yaml(cfg), **checkpoint_tokenizer_files(
            self.data.tokenizer, cfg.model.max_seq_len)}
        self.ckpt = CheckpointManager(cfg.checkpoint, files=files)
        self.metrics = MetricsLogger(self.run_dir, cfg.logging, enabled=self.rank == 0)
        # The resolved training recipe: logged once, and metrics.jsonl's first line.
        recipe = recipe_record(cfg)
        self.metrics.set_recipe(recipe)
        if self.rank == 0:
            log.info(format_recipe(recipe))
        self.autocast_dtype = torch.bfloat16 if t.uses_bf16(device.type) else None
        self.peak = peak_flops_per_s(device, cfg.logging.peak_tflops)
        self.moe_stats = MoEStatsTracker(
            self.pm.all_moe_layers, device, layout.ep,
            cfg.model.num_experts + cfg.model.null_experts, cfg.moe.chain_iterations,
            cfg.moe.router.name == "compete", ffn_experts=cfg.model.num_experts)
        self.callbacks = CallbackList(default_callbacks(cfg))
        self.flops_per_token = model_flops_per_token(
            self.params.active - self.params.embedding, cfg.model.n_layers, cfg.model.dim, t.seq_len,
            cfg.model)  # attention layers only; Mamba layers add their scan
        # At model.top_k experts per token; each step moves it to the routed experts per
        # token it measured (a top-k schedule, variable-k routers): flops_per_token_at_k.
        self.flops_per_token_top_k = self.flops_per_token
        self.n_moe_layers = sum(cfg.model.is_moe_layer(i) for i in range(cfg.model.n_layers))
        # moe.a2a_overlap_chunks=auto: each step's time picks the next step's chunk count.
        self.overlap_tuner = OverlapTuner.for_layers(cfg.moe, layout.ep, self.pm.moe_layers,
                                                     device)

    # ------------------------------------------------------------------ helpers
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _state(self) -> dict:
        return {
            "model_optim": ModelOptimizerState(self.pm.parts, self.optimizers),
            "progress": self.progress,
            "skips": SkipState(self.progress),
            "sampler": self.sampler,
            "rng": RNGState(),
            **self.callbacks.states(),
        }

    def _batch(self, ds, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = ds.get_batch(indices)
        return inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            logits = self.model(inputs)
        with self.pm.loss_parallel():  # under TP the logits stay sharded over the vocabulary
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return local_loss(loss)

    def _all_reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over the data-parallel ranks (every rank of a stage holds a full loss)."""
        values = values.detach().to(self.device, torch.float32).clone()
        if self.dp_size > 1:
            dist.all_reduce(values, group=self.pm.dp_group)
            values /= self.dp_size
        return values

    def _check_skips(self, step: int) -> None:
        """Stop after ``train.max_skipped_steps`` consecutive skipped steps (with
        ``train.fail_on_nonfinite``; 0 = never). Raised before this step's checkpoint, so
        the newest checkpoint on disk holds the last good state."""
        t, n = self.cfg.train, self.progress.consecutive_skips
        if not t.fail_on_nonfinite or not t.max_skipped_steps or n < t.max_skipped_steps:
            return
        raise NonFiniteLossError(
            f"{n} consecutive steps had a non-finite loss or gradient norm (steps "
            f"{step - n + 1}..{step}, all skipped): training diverged. Resume from the last "
            f"checkpoint with a lower optim.lr, a longer optim.warmup_steps or optim.grad_clip "
            f"set; train.max_skipped_steps={t.max_skipped_steps} sets the tolerance "
            f"(0 or train.fail_on_nonfinite=false: skip and never stop)"
        )

    # ------------------------------------------------------------------ phases
    def resume(self) -> None:
        path = self.ckpt.resolve_resume()
        if path is None:
            if self.cfg.init.from_dense:
                self._init_from_dense()
            return
        if self.cfg.init.from_dense:
            log.info("init.from_dense is not used: resuming from %s", path)
        # A step-0 checkpoint (tools/upcycle.py) may hold only the model, optimizer and
        # progress: nothing has been sampled yet and the RNG is as seeded.
        # "skips": absent from checkpoints written before the non-finite step counters.
        optional = ("callback.", "skips") + (
            ("sampler", "rng") if self.ckpt.step_of(path) == 0 else ())
        self.ckpt.load(path, self._state(), optional=optional)
        if self.cfg.checkpoint.resume.strip().lower() != "auto":
            self.ckpt.promote(path)  # a later resume=auto continues this branch
        self.metrics.truncate_after(self.progress.step)
        log.info("resumed from %s at step %d", path, self.progress.step)

    def _check_dense_tokenizer(self) -> None:
        """Upcycling continues the dense model's pretraining: its data must be tokenized
        the way the dense model was. A Hugging Face directory or a moetrain checkpoint
        that carries its tokenizer is compared with the data's, before any work."""
        from moetrain.checkpoint.load import resolve_checkpoint
        from moetrain.data.hf_tokenizer import describe, same_framing, same_tokenizer
        from moetrain.data.tokenizer import HFTokenizer

        src, data_tok = Path(self.cfg.init.from_dense).expanduser(), self.data.tokenizer
        if data_tok is None or not src.exists():
            return  # no tokenizer to compare; a missing source fails in upcycling
        where = src if (src / "config.json").is_file() else resolve_checkpoint(src)
        if not (where / "tokenizer.json").is_file():
            return  # an HF model without tokenizer.json, or an older checkpoint
        dense_tok = HFTokenizer(where)
        d = self.cfg.data
        data = f"data.sources={[s.path for s in d.sources]}" if d.sources else \
            f"data.source={d.source}"
        if not same_tokenizer(dense_tok, data_tok):
            raise ConfigError(
                f"init.from_dense={self.cfg.init.from_dense} was trained with its own "
                f"tokenizer ({describe(dense_tok)}) but {data} was tokenized with another "
                f"({describe(data_tok)}): the upcycled model would read ids of another "
                f"vocabulary. Prepare the data with its tokenizer: python "
                f"tools/prepare_data.py --input ... --output DIR --tokenizer {where}, then "
                f"data.source=DIR")
        if not same_framing(dense_tok, data_tok) and self.rank == 0:
            log.warning("init.from_dense=%s and %s share a vocabulary but frame documents "
                        "differently (EOS %s / BOS %s against EOS %s / BOS %s): as prepared "
                        "with --eos-token / --bos", self.cfg.init.from_dense, data,
                        dense_tok.eos_id, dense_tok.bos_id if dense_tok.add_bos else None,
                        data_tok.eos_id, getattr(data_tok, "bos_id", None)
                        if getattr(data_tok, "add_bos", False) else None)

    def _init_from_dense(self) -> None:
        """Upcycle ``init.from_dense`` into the placed model (docs/upcycling.md): every rank
        builds the same whole tensors from the same files and keeps its shards."""
        from moetrain.checkpoint.upcycle import upcycle_into

        cfg = self.cfg
        upcycle_into(self.pm.parts, self.optimizers if cfg.init.reuse_optimizer else None,
                     cfg.init, cfg.model, cfg.moe, self.vocab_size,
                     progress=self.rank == 0 and cfg.train.progress, verbose=self.rank == 0)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over the next global batch.

        Non-finite steps: if the step's loss (mean over the data-parallel ranks, summed over
        the pipeline stages) or its global gradient norm is NaN/inf, the update is skipped:
        no ``optimizer.step()`` (weights, optimizer moments and step counts untouched), the
        gradients are zeroed. The step still counts (Megatron-LM's semantics): its data is
        consumed (the sampler moves on, nothing is re-read), ``progress.step`` and
        ``tokens`` advance, and the LR schedule moves on with the step. The metrics carry
        ``skipped`` (0/1) and ``skipped_steps`` (cumulative, resumed from checkpoints), and
        rank 0 logs a warning naming the step. ``fit`` stops after
        ``train.max_skipped_steps`` consecutive skips (``_check_skips``).

        Both values reach the host in one read before the optimizer step (the step's only
        sync), so the decision costs no extra sync. They are identical on every rank: the
        gradient norm is reduced over all shards and stages, the loss all-reduced over dp
        (and summed over pp by the schedule), so every rank skips the same steps.
        """
        cfg, t = self.cfg, self.cfg.train
        step = self.progress.step
        lr = lr_at(step, t.steps, cfg.optim)
        set_lr(self.optimizer, lr)
        self.pm.set_aux_loss_scale(1.0 / self.accum)

        global_batch = self.sampler.next_global_batch()
        micro = GlobalBatchSampler.micro_batches(
            global_batch, self.dp_rank, self.dp_size, t.micro_batch_size
        )
        self.callbacks.on_step_start(self, step, micro)
        loss_sum = torch.zeros((), device=self.device)
        if self.pm.pipeline is not None:  # the schedule runs the micro-batches
            batches = [self._batch(self.data.train, indices) for indices in micro]
            with self._autocast():
                loss_sum = self.pm.pipeline.step(batches, self.moe_stats)
            micro = []  # nothing left for the loop below
        for j, indices in enumerate(micro):
            inputs, targets = self._batch(self.data.train, indices)
            with self.pm.no_grad_sync(last=j == len(micro) - 1):
                loss = self._loss(inputs, targets)
                with self.pm.loss_parallel():
                    (loss / self.accum).backward()
            loss_sum += loss.detach()
            self.moe_stats.accumulate()

        faults.hit("mid_step", step + 1, modules=self.pm.parts)
        self.callbacks.on_after_backward(self, step)
        grad_norm_t = self.pm.clip_grad_norm_(cfg.optim.grad_clip)
        loss_t = self._all_reduce_mean(loss_sum / self.accum)
        # The step's one host read: the loss and the gradient norm together.
        loss, grad_norm = torch.stack(
            [loss_t, grad_norm_t.detach().to(loss_t.device, torch.float32)]).tolist()
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        p = self.progress
        p.step += 1
        p.tokens += t.global_batch_size * t.seq_len
        if skipped:
            p.skipped_steps += 1
            p.consecutive_skips += 1
            if self.rank == 0:
                log.warning(
                    "step %d skipped: loss %s, grad norm %s (not finite); weights and "
                    "optimizer state unchanged (%d consecutive, %d skipped in all)",
                    p.step, loss, grad_norm, p.consecutive_skips, p.skipped_steps)
        else:
            p.consecutive_skips = 0
        out = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped": float(skipped),
               "skipped_steps": p.skipped_steps}
        out.update(self.moe_stats.reduce(self.pm.stats_group, self.pm.stats_size,
                                         self.pm.pp_group))
        if self.layout.ep > 1:  # token bytes all ranks sent through all-to-all this step
            sent = torch.tensor(float(self.pm.ep_bytes_sent()), device=self.device)
            if self.pm.stats_size > 1:  # every dp (x tp) rank of the stage
                dist.all_reduce(sent, group=self.pm.stats_group)
            if self.pm.pp_group is not None:  # and every stage
                dist.all_reduce(sent, group=self.pm.pp_group)
            out["a2a_bytes"] = sent.item()
            if cfg.model.null_experts:  # MoE++: rows of zero-computation experts never sent
                saved = self.pm.ep_bytes_saved(self.device)
                if self.pm.stats_size > 1:
                    dist.all_reduce(saved, group=self.pm.stats_group)
                if self.pm.pp_group is not None:
                    dist.all_reduce(saved, group=self.pm.pp_group)
                out["a2a_bytes_saved"] = saved.item()
        m = cfg.model
        if self.layout.ep > m.num_experts > 0 and m.expert_sizes is None:
            out.update(self._expert_modes())
        elif self.layout.ep > 1 and cfg.parallel.expert_mode != "fixed" and m.expert_sizes is None:
            # whole experts on every rank: nothing to switch, the mode is r=1 (expert-parallel)
            out.update({f"moe/layer{i}/r": 1.0 for i in range(m.n_layers) if m.is_moe_layer(i)})
        return out

    def _expert_modes(self) -> dict[str, float]:
        """Sharded experts (Tutel's modes, moetrain/parallel/adaptive.py): each MoE layer's
        mode r this step (the mean over its calls) and the expert-weight bytes every rank
        all-gathered. Every ep rank of a stage picks the same r; stages are summed."""
        n = self.cfg.model.n_layers
        vals = torch.zeros(2, n + 1, dtype=torch.float64, device=self.device)
        for i, r in self.pm.expert_modes().items():
            vals[0, i], vals[1, i] = r, 1.0
        vals[0, n] = float(self.pm.weight_gather_bytes())
        if self.pm.stats_size > 1:  # bytes of every rank of the stage; r of one of them
            gathered = vals[0, n].clone()
            dist.all_reduce(gathered, group=self.pm.stats_group)
            vals[0, n] = gathered
        if self.pm.pp_group is not None:
            dist.all_reduce(vals, group=self.pm.pp_group)
        host = vals.tolist()
        out = {f"moe/layer{i}/r": host[0][i] for i in range(n) if host[1][i]}
        out["weight_gather_bytes"] = host[0][n]
        return out

    def validate(self) -> float:
        """Mean LM loss over ``eval.batches`` fixed validation micro-batches. A mixture
        (data.sources) runs them on each source, logs ``val_loss/<name>`` and returns the
        weight-averaged loss."""
        if not self.data.val_sets:
            return self._val_loss(self.data.val)
        w = self.data.val_weights
        per = {name: self._val_loss(ds) for name, ds in self.data.val_sets.items()}
        self.metrics.log_step(self.progress.step, {f"val_loss/{k}": v for k, v in per.items()})
        return sum(w[k] * v for k, v in per.items())

    @torch.no_grad()
    def _val_loss(self, val) -> float:
        """Mean LM loss over ``eval.batches`` fixed micro-batches of ``val`` (same samples
        for every layout: micro-batch j goes to data-parallel rank j % dp)."""
        self.model.eval()
        m, n = self.cfg.train.micro_batch_size, self.cfg.eval.batches
        n_samples = len(val)
        total, count = torch.zeros((), device=self.device), 0
        batches = []
        rounds = -(-n // self.dp_size)
        for k in range(rounds):
            j = k * self.dp_size + self.dp_rank
            indices = [(j * m + i) % n_samples for i in range(m)]
            inputs, targets = self._batch(val, indices)
            if self.pm.pipeline is not None:
                if j < n:
                    batches.append((inputs, targets))
            elif j < n:
                total += self._loss(inputs, targets)
            else:
                # Every rank runs the same number of forwards: expert-parallel and
                # global-batch layers hold collectives. The padding batch is not counted.
                self._loss(inputs, targets)
            count += j < n
        if self.pm.pipeline is not None:
            with self._autocast():
                total = self.pm.pipeline.eval(batches, pad_to=rounds)
        sums = torch.stack([total, torch.tensor(float(count), device=self.device)])
        if self.dp_size > 1:
            dist.all_reduce(sums, group=self.pm.dp_group)
        self.model.train()
        self.pm.ep_bytes_sent()  # drop validation's all-to-all bytes: a2a_bytes is per step
        return (sums[0] / sums[1]).item()

    def fit(self) -> Summary:
        cfg, t = self.cfg, self.cfg.train
        self.resume()
        val_losses: list[tuple[int, float]] = []
        bar = None
        if t.progress and self.rank == 0:  # tqdm on a terminal, plain lines in a log file
            from moetrain.metrics.progress import progress_display

            bar = progress_display(t.steps, self.progress.step, end=t.stop_at or t.steps)
        # Before the baseline validation: schedules set the routers for the current step.
        self.callbacks.on_train_start(self)
        if cfg.eval.every and self.progress.step == 0:
            # The untrained model's validation loss: the baseline every later one compares to.
            val_losses.append((0, self.validate()))
            self.metrics.log_val(0, val_losses[-1][1])
        self.model.train()
        t_start, last_loss = time.perf_counter(), float("nan")
        tokens_start = self.progress.tokens
        self.stop = StopSignal(self.device).install()
        try:
            end = t.stop_at or t.steps
            while self.progress.step < end:
                t0 = time.perf_counter()
                out = self.train_step()
                dt = time.perf_counter() - t0
                step = self.progress.step
                last_loss = out["loss"]
                tps = t.global_batch_size * t.seq_len / dt
                out.update(tokens=self.progress.tokens, tokens_per_s=tps, step_time_s=dt)
                if self.overlap_tuner is not None:  # the step's count; sets the next one
                    out["moe/a2a_chunks"] = self.overlap_tuner.step(dt)
                if "active_k" in out:  # MFU counts the routed experts per token of the step
                    self.flops_per_token = flops_per_token_at_k(
                        self.flops_per_token_top_k,
                        cfg.model.top_k * cfg.moe.chain_iterations, out["active_k"],
                        self.n_moe_layers, cfg.model.dim,
                        mean_expert_hidden(cfg.model.expert_hidden, cfg.model.expert_sizes),
                        out.get("routed_hidden"))
                util = mfu(tps / self.layout.world_size, self.flops_per_token, self.peak)
                if util is not None:
                    out["mfu"] = util
                self.callbacks.on_step_end(self, step, out)
                load_LE = self.moe_stats.last_load_LE
                last = step == end
                if step % t.log_every == 0 or last:
                    self.metrics.log_step(step, out)
                    if load_LE is not None:
                        self.metrics.log_expert_loads(step, load_LE)
                self._check_skips(step)  # before validation and checkpoint
                faults.hit("step_end", step, stopped=lambda: self.stop.received is not None)
                if load_LE is not None and self.metrics.heatmap_due(step):
                    self.metrics.log_heatmap(step, load_LE)
                if bar is not None:
                    bar.update(step, last_loss, tps)
                if cfg.eval.every and (step % cfg.eval.every == 0 or last):
                    val = self.validate()
                    val_losses.append((step, val))
                    self.metrics.log_val(step, val)
                    self.callbacks.on_validation(self, step, val)
                    if bar is not None:
                        bar.write(f"step {step}: val_loss {val:.4f}")
                self.ckpt.poll()  # commit a finished async save
                stopping = (bool(t.stop_at) and step == t.stop_at) or self.stop.requested()
                if stopping or (cfg.checkpoint.every and (step % cfg.checkpoint.every == 0 or last)):
                    self.ckpt.save(step, self._state())
                if stopping:
                    break
        finally:
            self.stop.uninstall()
            if bar is not None:
                bar.close()
            self.ckpt.close()
            self.metrics.close()
        return Summary(
            steps=self.progress.step,
            final_loss=last_loss,
            val_losses=val_losses,
            tokens=self.progress.tokens - tokens_start,
            seconds=time.perf_counter() - t_start,
            run_dir=str(self.run_dir),
        )
