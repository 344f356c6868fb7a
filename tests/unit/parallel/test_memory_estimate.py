"""The memory estimator against known values: preset parameter totals, hand-derived
per-rank shards, the activation memory torch's MemTracker measures on CPU for every
activation-checkpointing mode, and the layout search and CLI."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moetrain.config import ConfigError, validate
from moetrain.models import Transformer, count_params
from moetrain.parallel.activation_checkpoint import apply_ac
from moetrain.parallel.memory import (
    GiB,
    estimate,
    local_param_counts,
    model_params,
    suggest_layouts,
)
from tests.conftest import TINY, compose

EXPERT = 3 * 4096 * 14336  # one Mixtral expert: w1, w3 (F x D) and w2 (D x F)


def test_mixtral_totals_and_hand_derived_shards():
    cfg = compose(["model=mixtral_8x7b"])
    counts = count_params(cfg.model, 32000)
    assert sum(p.numel for p in model_params(cfg, 32000)) == counts.total
    assert round(counts.total / 1e9, 1) == 46.7  # Jiang et al., 2024
    assert round(counts.active / 1e9, 1) == 12.9
    # dp=8, ep=8: every dim 0 splits evenly and each rank keeps one expert per layer.
    cfg8 = compose(["model=mixtral_8x7b", "parallel.ep=8", "train.micro_batch_size=1"])
    assert local_param_counts(cfg8, validate(cfg8, 8), 32000) == [counts.total // 8] * 8
    # ep=8 of dp=64: one local expert per layer cannot split over edp=8 on dim 0, so FSDP
    # shards it on dim 1 (F of w1/w3, D of w2; both divide by 8): each rank holds 1/8 of
    # its expert in each of the 32 layers, plus 1/64 of the rest (every dim 0 splits
    # evenly over dp=64, except the 8-row routers: ranks 0-7 hold one row, the rest none).
    # Dim 0 put the whole expert on edp rank 0 instead: 32 * EXPERT = 5.64B, 5.66B in all.
    cfg64 = compose(["model=mixtral_8x7b", "parallel.ep=8", "train.micro_batch_size=1",
                     "train.global_batch_size=64"])
    per_rank = local_param_counts(cfg64, validate(cfg64, 64), 32000)
    router = 32 * 8 * 4096
    rest = (counts.total - 32 * 8 * EXPERT - router) // 64
    assert per_rank[0] == 32 * EXPERT // 8 + rest + 32 * 4096 == 729_845_824  # ~0.73B
    assert per_rank[8] == per_rank[0] - 32 * 4096  # edp 1 of rank 0's ep rank: no router row
    assert sum(per_rank) == counts.total
    est = estimate(cfg64, 64, 32000)
    assert est.rank == 0 and est.params == per_rank[0]
    assert est.parts["params (fp32)"] == 4 * per_rank[0]  # no FSDP padding left


def test_deepseekmoe_total():
    cfg = compose(["model=deepseekmoe_16b"])
    assert round(count_params(cfg.model, 102400).total / 1e9, 1) == 16.4  # Dai et al., 2024
    assert sum(p.numel for p in model_params(cfg, 102400)) == \
        count_params(cfg.model, 102400).total


MEM = TINY + ["train.micro_batch_size=8", "train.seq_len=64", "model.n_layers=4",
              "model.n_kv_heads=1", "model.n_shared_experts=1", "model.first_dense_layers=1"]


def _measured_peak(cfg) -> tuple[int, int]:
    """(saved activations, activations + temporaries) at the peak of one fwd+bwd, as the
    trainer runs it on CPU (bf16 autocast for train.precision=bf16)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.moe, 257)
    apply_ac(model, cfg.parallel.ac, attention=cfg.parallel.ac_attention)
    tokens = torch.randint(0, 257, (cfg.train.micro_batch_size, cfg.train.seq_len))
    tracker = MemTracker()
    tracker.track_external(model)
    bf16 = cfg.train.precision.value == "bf16"
    with tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(tokens)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        del logits
        loss.backward()
    peak = {str(k).rsplit(".", 1)[-1]: v
            for k, v in tracker.get_tracker_snapshot("peak")[torch.device("cpu")].items()}
    return peak["ACT"], peak["ACT"] + peak["TEMP"]


@pytest.mark.parametrize("ac", [[], ["parallel.ac=full"], ["parallel.ac=selective"],
                                ["parallel.ac=selective", "parallel.ac_attention=true"],
                                ["moe.recompute_experts=true"], ["train.precision=bf16"],
                                ["train.precision=bf16", "parallel.ac=full"]],
                         ids=["none", "full", "selective", "selective_attn", "in_module",
                              "bf16", "bf16_full"])
def test_activation_estimate_matches_measured_peak(ac):
    cfg = compose(MEM + ac)
    act, peak = _measured_peak(cfg)
    est = estimate(cfg, 1, 257, device="cpu")
    predicted_peak = est.parts["activations"] + est.parts["logits / recompute"]
    if "train.precision=bf16" in ac:  # autocast's bf16 weight copies live as activations
        predicted_peak += est.parts["param buffers"]
    assert predicted_peak == pytest.approx(peak, rel=0.07 if "bf16" in str(ac) else 0.05)
    if not ac:  # nothing recomputed: the saved tensors themselves
        assert est.parts["activations"] == pytest.approx(act, rel=0.02)


# dp=4 ranks (one process on a fake process group), 4 micro-batches of 4 x 32 tokens each.
GRAD_SYNC = TINY + ["train.micro_batch_size=4", "train.seq_len=32", "model.n_layers=4",
                    "model.n_kv_heads=1", "model.n_shared_experts=1",
                    "model.first_dense_layers=1", "model.vocab_size=257",
                    "train.global_batch_size=64"]


def _measured_fsdp_peak(cfg, world: int) -> dict[str, int]:
    """FSDPMemTracker's breakdown at the peak of one step's micro-batches (forward and
    backward, no optimizer), placed by the real ``parallelize`` on a ``world``-rank fake
    process group (collectives are no-ops; every buffer is allocated) and accumulated
    through ``no_grad_sync`` as the trainer does."""
    import torch.distributed as dist
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from moetrain.parallel.parallelize import parallelize

    layout = validate(cfg, world)
    accum = cfg.train.global_batch_size // (cfg.train.micro_batch_size * layout.dp)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        torch.manual_seed(0)
        model = Transformer(cfg.model, cfg.moe, 257)
        pm = parallelize(model, layout, cfg.parallel, cfg.moe, torch.device("cpu"),
                         train=cfg.train)
        tokens = torch.randint(0, 257, (accum, cfg.train.micro_batch_size, cfg.train.seq_len))
        tracker = FSDPMemTracker(pm.model)
        with tracker:
            for j in range(accum):
                tracker.reset_mod_stats()  # per-module stats of one forward at a time
                with pm.no_grad_sync(last=j == accum - 1):
                    logits = pm.model(tokens[j])
                    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[j].flatten())
                    del logits
                    (loss / accum).backward()
        snap = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
        return {str(k).rsplit(".", 1)[-1]: v for k, v in snap.items()}
    finally:
        dist.destroy_process_group()


def test_fsdp_grad_sync_memory_matches_measured():
    """Under FSDP with 4 micro-batches, ``last_microbatch`` holds every unit's unsharded
    fp32 gradient (the dp-gathered model: 4 B x every parameter) and ``every_microbatch``
    the sharded one (4 B x the padded shard); the estimator's gradient term equals what
    FSDPMemTracker finds at the peak, and the two estimates differ by the measured saving.
    """
    est, peak = {}, {}
    for mode in ("every_microbatch", "last_microbatch"):
        cfg = compose(GRAD_SYNC + [f"parallel.fsdp_grad_sync={mode}"])
        est[mode] = estimate(cfg, 4, 257, device="cpu")
        peak[mode] = _measured_fsdp_peak(cfg, 4)
        grads = peak[mode]["SHARDED_GRAD"] + peak[mode]["UNSHARDED_GRAD"]
        assert est[mode].parts["grads (fp32)"] == grads
        # No optimizer ran: the rest of the estimate bounds the measured peak from above
        # (two gathered units and a gradient in flight: the backward's working set; this
        # peak is at the end of a forward, with one unit gathered).
        rest = est[mode].total - est[mode].parts["adamw m+v (fp32)"]
        assert peak[mode]["Total"] <= rest <= 1.08 * peak[mode]["Total"]
    total = count_params(cfg.model, 257).total
    assert peak["last_microbatch"]["UNSHARDED_GRAD"] == 4 * total
    every = peak["every_microbatch"]
    assert every["UNSHARDED_GRAD"] == 0 and every["SHARDED_GRAD"] == every["SHARDED_PARAM"]
    saved = est["last_microbatch"].total - est["every_microbatch"].total
    assert saved == peak["last_microbatch"]["Total"] - peak["every_microbatch"]["Total"]


def test_unsharded_gradients_need_an_accumulation_window():
    """One micro-batch per step: both modes hold only the sharded gradient. Under pp > 1
    the schedule defers every stage's reduce-scatter (as ``last_microbatch``): the most
    loaded rank holds its stage's parameters' unsharded fp32 gradients (hand count)."""
    from moetrain.parallel.mesh import ParallelDims

    one = ["train.global_batch_size=16"]  # dp=4 x 4 sequences: no accumulation
    every, last = (estimate(compose(GRAD_SYNC + one + [f"parallel.fsdp_grad_sync={m}"]), 4,
                            257, device="cpu") for m in ("every_microbatch", "last_microbatch"))
    assert every.parts == last.parts
    assert every.parts["grads (fp32)"] == every.parts["params (fp32)"]
    cfg = compose(GRAD_SYNC + ["parallel.pp=2", "parallel.pp_split=[0,2]"])
    est = estimate(cfg, 4, 257, device="cpu")  # dp=2, 8 micro-batches per step
    pp_rank = ParallelDims.from_layout(est.layout).coords(est.rank)["pp"]
    held = {-1, 0, 1} if pp_rank == 0 else {2, 3, 4}  # 4 = final norm and output
    assert est.parts["grads (fp32)"] == 4 * sum(
        p.numel for p in model_params(cfg, 257) if p.layer in held)
    assert est.parts["grads (fp32)"] > 1.9 * est.parts["params (fp32)"]  # vs the shard


@pytest.mark.parametrize("precision,device,dp_mode,want", [
    ("auto", "cuda", "fsdp", (2, 2, 2)),  # bf16 autocast, FSDP gathers bf16 parameters
    ("fp32", "cuda", "fsdp", (4, 4, 4)),  # fp32 asked for: no bf16 anywhere
    ("auto", "cuda", "replicate", (2, 4, 4)),  # autocast over an fp32 residual stream
    ("bf16", "cpu", "fsdp", (2, 4, 4)),  # FSDP keeps fp32 parameters off CUDA
    ("auto", "cpu", "fsdp", (4, 4, 4)),
])
def test_dtypes_follow_precision(precision, device, dp_mode, want):
    """(matmul outputs, residual stream, gathered parameters) bytes, as the trainer's
    autocast and parallelize()'s FSDP parameter dtype pick them."""
    from moetrain.parallel.memory import _dtypes

    cfg = compose([f"train.precision={precision}", f"parallel.dp_mode={dp_mode}",
                   "train.micro_batch_size=2"])
    assert cfg.train.uses_bf16(device) == (want[0] == 2)
    assert _dtypes(cfg, validate(cfg, 8), device) == want


def test_recompute_orders_activation_memory():
    acts = {name: estimate(compose(MEM + extra), 1, 257, device="cpu").parts["activations"]
            for name, extra in [("none", []), ("sel", ["parallel.ac=selective"]),
                                ("full", ["parallel.ac=full"])]}
    assert acts["full"] < acts["sel"] < acts["none"]


def test_suggestions_fit_and_are_valid():
    # Parameters, gradients and AdamW state alone: 16 B * 46.7e9 / 8 = 87 GiB > 78 GiB.
    cfg = compose(["model=mixtral_8x7b", "train.seq_len=4096", "train.micro_batch_size=1",
                   "train.global_batch_size=64", "parallel.ac=full"])
    fits, tried = suggest_layouts(cfg, 8, 80.0, vocab_size=32000)
    assert tried > 0 and fits == []
    fits, tried = suggest_layouts(cfg, 32, 80.0, vocab_size=32000)
    assert 0 < len(fits) < tried
    for f in fits:
        assert f.estimate.total <= 78 * GiB
        trial = copy.deepcopy(cfg)
        lay = f.estimate.layout
        trial.parallel.pp, trial.parallel.tp, trial.parallel.ep = lay.pp, lay.tp, lay.ep
        assert validate(trial, 32) == lay
    assert [f.step_s for f in fits] == sorted(f.step_s for f in fits)


def _cli():
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
    try:
        import estimate_memory
    finally:
        sys.path.pop(0)
    return estimate_memory


def test_cli_prints_estimate_and_suggestions(capsys):
    cli = _cli()
    args = ["model=mixtral_8x7b", "parallel.ep=8", "train.seq_len=4096",
            "train.micro_batch_size=1", "train.global_batch_size=64", "parallel.ac=full"]
    assert cli.main(args + ["--world-size", "32", "--gpu-memory-gb", "80", "--top", "3"]) == 0
    out = capsys.readouterr().out
    cfg = compose(args)
    rank0 = max(local_param_counts(cfg, validate(cfg, 32), 32000))
    assert f"holds {rank0 / 1e9:.3f}B parameters" in out
    assert "46.70B parameters, 12.88B active" in out
    assert out.count("\n") > 15 and "pp   dp  tp  ep" in out


def test_cli_rejects_invalid_layout(capsys):
    assert _cli().main(["parallel.ep=3", "--world-size", "4"]) == 2
    assert "parallel.ep=3" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="parallel.ep"):
        estimate(compose(["parallel.ep=3"]), 4)


def test_fused_kernels_save_one_swiglu_tensor_and_the_fp32_combine():
    """On CUDA the Triton SwiGLU keeps 3 of the eager gate's 4 R x F tensors and the fused
    combine no fp32 weighted rows: per MoE layer, c R F + 4 T K D bytes fewer."""
    from moetrain.parallel.memory import _layer_acts

    cfg = compose(["model=small", "train.seq_len=512", "train.micro_batch_size=2"])
    lay = validate(cfg, 1)
    m = cfg.model
    i = next(j for j in range(m.n_layers) if m.is_moe_layer(j))
    T = 2 * 512
    fast, rows = _layer_acts(cfg, lay, i, T, "cuda", 1.0)
    eager, _ = _layer_acts(compose(["model=small", "train.seq_len=512",
                                    "train.micro_batch_size=2", "moe.kernel_backend=torch"]),
                           lay, i, T, "cuda", 1.0)
    assert rows == T * m.top_k
    c = 2  # bf16 on CUDA
    assert eager["experts_mid"] - fast["experts_mid"] == c * rows * m.expert_hidden
    assert eager["combine"] - fast["combine"] == 4 * T * m.top_k * m.dim
    on_cpu, _ = _layer_acts(cfg, lay, i, T, "cpu", 1.0)  # CPU runs the torch path
    assert on_cpu["experts_mid"] == 4 * 4 * rows * m.expert_hidden
