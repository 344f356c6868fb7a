"""Training throughput: tokens/s and MFU of full optimizer steps on one device.

Builds moetrain's own :class:`~moetrain.train.trainer.Trainer` from the real Hydra config
(``conf/model/bench_1b.yaml`` by default: ~1.02B total / ~0.23B active parameters) and
times ``Trainer.train_step`` (forward, backward, clipping, AdamW step, MoE statistics),
after ``--warmup`` untimed steps (compilation, allocator warm-up). No separate loop: what
is timed is what ``moetrain-train`` runs.

MFU = tokens/s x model FLOPs per token / peak FLOP/s (PaLM appendix B;
``moetrain.metrics.flops``): the FLOPs count the active parameters only, and
recomputation from activation checkpointing does not raise it.

    python tools/bench_train.py                                   # bench_1b, bf16 on CUDA
    python tools/bench_train.py --compile --ac selective --json train.json
    python tools/bench_train.py --device cpu --model tiny --seq-len 64 --micro-batch 2 \\
        --steps 2 --warmup 1                                      # CPU smoke run
Extra Hydra overrides go after ``--``: ``python tools/bench_train.py -- moe.kernel_backend=torch``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch


def build_overrides(a: argparse.Namespace, run_dir: str) -> list[str]:
    gbs = a.global_batch or a.micro_batch
    out = [
        f"model={a.model}",
        f"train.steps={a.warmup + a.steps}",
        f"train.seq_len={a.seq_len}",
        f"train.micro_batch_size={a.micro_batch}",
        f"train.global_batch_size={gbs}",
        "train.progress=false",
        "eval.every=0",
        "checkpoint.every=0",
        "checkpoint.resume=none",
        "logging.tensorboard=false",
        "logging.heatmap_every=0",
        f"logging.peak_tflops={a.peak_tflops}",
        f"parallel.ac={a.ac}",
        f"parallel.compile={str(a.compile).lower()}",
        f"run.dir={run_dir}",
    ]
    if a.seq_len > 2048:
        out.append(f"model.max_seq_len={a.seq_len}")
    return out + list(a.overrides)


def run(a: argparse.Namespace) -> dict:
    import torch.distributed as dist

    from moetrain.config import compose_config, validate
    from moetrain.metrics import mfu
    from moetrain.parallel.mesh import destroy_distributed, init_distributed
    from moetrain.train.trainer import Trainer

    run_dir = a.run_dir or tempfile.mkdtemp(prefix="moetrain_bench_")
    cfg = compose_config(build_overrides(a, run_dir))
    layout = validate(cfg, 1)
    owns_group = not dist.is_initialized()
    _, _, device = init_distributed()
    trainer = Trainer(cfg, layout, device)
    cuda = device.type == "cuda"
    times, losses = [], []
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(a.warmup + a.steps):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = trainer.train_step()  # returns host floats: the step has finished
            if cuda:
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            losses.append(out["loss"])
            if i >= a.warmup:
                times.append(dt)
    finally:
        trainer.metrics.close()
        trainer.ckpt.close()
        if owns_group:
            destroy_distributed()
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
    tps = tokens_per_step * len(times) / sum(times)
    return {
        "model": cfg.model.name,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "params_total": trainer.params.total,
        "params_active": trainer.params.active,
        "seq_len": cfg.train.seq_len,
        "global_batch_size": cfg.train.global_batch_size,
        "micro_batch_size": cfg.train.micro_batch_size,
        "compile": a.compile,
        "ac": a.ac,
        "kernel_backend": cfg.moe.kernel_backend.value,
        "expert_backend": cfg.moe.expert_backend.value,
        "warmup_steps": a.warmup,
        "steps": len(times),
        "tokens_per_step": tokens_per_step,
        "step_times_s": times,
        "tokens_per_s": tps,
        "flops_per_token": trainer.flops_per_token,
        "peak_flops": trainer.peak,
        "mfu": mfu(tps, trainer.flops_per_token, trainer.peak),
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "losses": losses,
    }


def format_report(r: dict) -> str:
    mfu_s = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (set --peak-tflops)"
    mem = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else "n/a"
    lines = [
        (f"model {r['model']}: {r['params_total'] / 1e9:.2f}B total, "
         f"{r['params_active'] / 1e9:.2f}B active parameters on {r['device']}"),
        (f"  batch {r['global_batch_size']} x {r['seq_len']} tokens, compile={r['compile']}, "
         f"ac={r['ac']}, kernels={r['kernel_backend']}, experts={r['expert_backend']}"),
        (f"  {r['steps']} timed steps after {r['warmup_steps']} warm-up: "
         f"{sum(r['step_times_s']) / r['steps'] * 1e3:.1f} ms/step"),
        f"  tokens/s {r['tokens_per_s']:,.0f}   MFU {mfu_s}   peak memory {mem}",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="bench_1b", help="a conf/model preset")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="default: cuda when available; cpu hides the GPUs")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward")
    p.add_argument("--global-batch", type=int, default=32,
                   help="sequences per optimizer step (default 32: 4 micro-batches of 8, "
                        "65,536 tokens, so AdamW's pass over all 1.02B parameters is "
                        "amortised as in a real run; 0: one micro-batch)")
    p.add_argument("--compile", action="store_true", help="parallel.compile=true")
    p.add_argument("--ac", choices=["none", "full", "selective"], default="none",
                   help="activation checkpointing (parallel.ac)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="peak device TFLOP/s for MFU (0: look the GPU up)")
    p.add_argument("--run-dir", default=None, help="default: a temporary directory")
    p.add_argument("--json", default=None, help="write the report to this path")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides (after --)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA initialises
    report = run(a)
    print(format_report(report), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
