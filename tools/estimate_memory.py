"""Predict per-GPU memory of a training run, and suggest layouts that fit a GPU.

    python tools/estimate_memory.py model=mixtral_8x7b train.seq_len=4096 \\
        train.micro_batch_size=1 train.global_batch_size=256 parallel.ep=8 \\
        parallel.ac=full --world-size 64
    python tools/estimate_memory.py model=mixtral_8x7b ... --world-size 64 --gpu-memory-gb 80

Positional arguments are Hydra overrides, composed through the real conf/ tree exactly as
``moetrain-train`` composes them. The estimate is for the most loaded rank (pipeline stage
0 under 1F1B, the rank holding the largest FSDP shards) on a CUDA GPU: bf16 autocast for
``train.precision=auto``, FSDP gathering bf16 parameters. The derivation is in
``moetrain/parallel/memory.py``. With ``--gpu-memory-gb`` every valid (pp, dp, tp, ep) of
the world size is estimated and the ones that fit are ranked by a simple step-time model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import moetrain  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moetrain.config import ConfigError, compose_config
from moetrain.parallel import memory


def _gib(n: float) -> str:
    return f"{n / memory.GiB:.1f}"


def suggestion_table(fits: list[memory.LayoutCost], top: int) -> str:
    head = (f"{'pp':>3} {'dp':>4} {'tp':>3} {'ep':>3} {'edp':>4}  {'params/rank':>12}  "
            f"{'memory GiB':>10}  {'step s':>7}  {'comm s':>7}  {'bubble s':>8}")
    rows = [head, "-" * len(head)]
    for f in fits[:top]:
        e, lay = f.estimate, f.estimate.layout
        rows.append(f"{lay.pp:>3} {lay.dp:>4} {lay.tp:>3} {lay.ep:>3} {lay.edp:>4}  "
                    f"{e.params / 1e9:>11.2f}B  {_gib(e.total):>10}  {f.step_s:>7.2f}  "
                    f"{f.comm_s:>7.2f}  {f.bubble_s:>8.2f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=mixtral_8x7b")
    ap.add_argument("--world-size", type=int, required=True, help="number of GPUs")
    ap.add_argument("--gpu-memory-gb", type=float, default=None,
                    help="suggest layouts that fit this much memory per GPU (GiB)")
    ap.add_argument("--reserve-gb", type=float, default=2.0,
                    help="memory kept free for the CUDA context, NCCL and allocator slack")
    ap.add_argument("--imbalance", type=float, default=1.0,
                    help="rows of the busiest expert rank / the mean (dropless routing)")
    ap.add_argument("--top", type=int, default=10, help="suggestions to print")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100)")
    args = ap.parse_args(argv)

    try:
        cfg = compose_config(args.overrides)
        vocab = memory.resolve_vocab_size(cfg)
        est = memory.estimate(cfg, args.world_size, vocab, imbalance=args.imbalance)
    except ConfigError as e:
        print(f"estimate_memory: invalid config: {e}", file=sys.stderr)
        return 2
    lay, t = est.layout, cfg.train
    from moetrain.models import count_params

    counts = count_params(cfg.model, vocab, cfg.moe)
    print(f"model {cfg.model.name}: {counts.total / 1e9:.2f}B parameters, "
          f"{counts.active / 1e9:.2f}B active; micro-batch {t.micro_batch_size} x {t.seq_len} "
          f"tokens, precision {cfg.train.precision.value}, ac={cfg.parallel.ac.value}")
    print(f"layout pp={lay.pp} dp={lay.dp} tp={lay.tp} ep={lay.ep} (edp={lay.edp}) on "
          f"{lay.world_size} GPUs; rank {est.rank} holds {est.params / 1e9:.3f}B parameters")
    print(est.format())
    if args.gpu_memory_gb is None:
        return 0
    budget = args.gpu_memory_gb - args.reserve_gb
    verdict = "fits" if est.total <= budget * memory.GiB else "does NOT fit"
    print(f"\nthis layout {verdict} in {args.gpu_memory_gb:g} GiB "
          f"(minus {args.reserve_gb:g} GiB reserve)")
    fits, tried = memory.suggest_layouts(
        cfg, args.world_size, args.gpu_memory_gb, vocab_size=vocab,
        reserve_gb=args.reserve_gb, imbalance=args.imbalance,
        gpus_per_node=args.gpus_per_node, peak_tflops=args.peak_tflops)
    print(f"\n{len(fits)} of {tried} valid layouts fit; fastest first by a simple model "
          f"(compute at 40% MFU + un-overlapped communication + pipeline bubble):")
    if fits:
        print(suggestion_table(fits, args.top))
    else:
        print("none: try parallel.ac=full, a smaller train.micro_batch_size, or more GPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
