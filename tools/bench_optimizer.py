"""Time one optimizer step: DeepSpeed's C++ CPU Adam (``optim.offload=cpu``) against
torch's AdamW, side by side in one process, for a few parameter counts.

Implementations (AdamW, betas 0.9/0.95, weight decay 0.1, the same fixed gradients):
- ``torch_foreach``: ``torch.optim.AdamW(foreach=True)`` on ``--device`` (moetrain's
  AdamW on CPU);
- ``torch_fused``: ``torch.optim.AdamW(fused=True)`` on ``--device`` (moetrain's AdamW
  on CUDA); skipped where torch has no fused kernel for the device;
- ``deepspeed_cpu``: ``DeepSpeedCPUAdam`` itself on CPU parameters;
- ``moetrain_offload``: moetrain's ``CPUOffloadAdamW`` (DeepSpeedCPUAdam, plus DTensor
  handling and the master copies) on ``--device`` parameters. On CUDA its step includes
  the gradient copy to the host and the weight copy back: the whole offloaded step.

The parameters are matrices of 1024 columns (plus one bias vector) summing to the size.
Each figure is the mean of ``--iters`` timed steps after ``--warmup`` warm-ups
(perf_counter, after a CUDA synchronize on GPU). Ratios are time / time of the reference
(``torch_foreach``, and ``torch_fused``), below 1 when faster. The C++ op runs OpenMP
threads (OMP_NUM_THREADS, default all cores); torch's CPU kernels use
``torch.get_num_threads()``. Both are in the report.

    python tools/bench_optimizer.py --sizes 8 32 --out bench_optimizer.json
    python tools/bench_optimizer.py --device cuda --sizes 32 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

try:
    import moetrain  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLS = 1024
REFERENCES = ("torch_foreach", "torch_fused")
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.95), 1e-8, 0.1


def make_params(numel: int, device: str, seed: int = 0) -> list[torch.nn.Parameter]:
    """Matrices of up to 4M elements (1024 columns) and a bias vector, ``numel`` in all,
    each with a fixed random gradient."""
    gen = torch.Generator().manual_seed(seed)
    shapes, left = [], numel
    bias = min(COLS, left)
    left -= bias
    while left >= COLS:
        rows = min(left // COLS, 4096)
        shapes.append((rows, COLS))
        left -= rows * COLS
    shapes.append((bias + left,))
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(device))
        p.grad = torch.randn(shape, generator=gen).to(device)
        params.append(p)
    return params


def _groups(params):
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": WD},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def builders(device: str) -> dict[str, Callable[[list], torch.optim.Optimizer]]:
    out: dict[str, Callable] = {
        "torch_foreach": lambda ps: torch.optim.AdamW(_groups(ps), lr=LR, betas=BETAS,
                                                      eps=EPS, foreach=True),
        "torch_fused": lambda ps: torch.optim.AdamW(_groups(ps), lr=LR, betas=BETAS, eps=EPS,
                                                    fused=True),
    }
    try:
        from moetrain.train.offload import CPUOffloadAdamW, DeepSpeedCPUAdam
    except ImportError as e:
        print(f"skipping the DeepSpeed optimizers: {e}", file=sys.stderr)
        return out
    if device == "cpu":
        out["deepspeed_cpu"] = lambda ps: DeepSpeedCPUAdam(
            _groups(ps), lr=LR, betas=BETAS, eps=EPS, adamw_mode=True)
    out["moetrain_offload"] = lambda ps: CPUOffloadAdamW(_groups(ps), lr=LR, betas=BETAS,
                                                         eps=EPS)
    return out


def time_steps(opt: torch.optim.Optimizer, device: str, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of ``iters`` steps after ``warmup`` untimed ones."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        opt.step()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        opt.step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def summarise(results: list[dict]) -> list[dict]:
    """Per size, each implementation's mean time over each reference's mean time."""
    ratios = []
    for size in dict.fromkeys(r["size_m"] for r in results):
        ms = {r["impl"]: r["ms"] for r in results if r["size_m"] == size}
        for ref in REFERENCES:
            if ref not in ms:
                continue
            for impl, t in ms.items():
                if impl != ref:
                    ratios.append({"size_m": size, "impl": impl, "vs": ref,
                                   "ratio": t / ms[ref]})
    return ratios


def table(results: list[dict], ratios: list[dict]) -> str:
    refs = [ref for ref in REFERENCES if any(r["vs"] == ref for r in ratios)]
    head = "| params | optimizer | step ms | " + " | ".join(f"/ {r}" for r in refs) + " |"
    lines = [head, "|" + "---|" * (3 + len(refs))]
    for r in results:
        cells = []
        for ref in refs:
            match = [x["ratio"] for x in ratios
                     if x["size_m"] == r["size_m"] and x["impl"] == r["impl"] and x["vs"] == ref]
            cells.append(f"{match[0]:.2f}x" if match else "1.00x" if r["impl"] == ref else "-")
        lines.append(f"| {r['size_m']:g}M | {r['impl']} | {r['ms']:.2f} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def run(sizes: list[float], device: str, warmup: int, iters: int,
        only: list[str] | None = None) -> dict:
    results, skipped = [], {}
    for size in sizes:
        numel = max(2, round(size * 1e6))
        for impl, build in builders(device).items():
            if only and impl not in only:
                continue
            params = make_params(numel, device)
            try:
                opt = build(params)
                times = time_steps(opt, device, warmup, iters)
            except (RuntimeError, NotImplementedError) as e:  # no fused kernel here
                skipped[impl] = str(e).splitlines()[0][:200]
                continue
            results.append({"size_m": size, "numel": numel, "impl": impl,
                            "ms": sum(times) / len(times), "times_ms": times})
            del opt, params
    return {
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset (all cores)"),
        "torch": torch.__version__,
        "warmup": warmup,
        "iters": iters,
        "results": results,
        "ratios": summarise(results),
        "skipped": skipped,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[8, 32],
                    help="parameter counts in millions (default: 8 32)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--only", nargs="+", help="implementations to run (default: all)")
    ap.add_argument("--out", type=Path, help="write the report as JSON here")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available; use --device cpu")
    report = run(args.sizes, args.device, args.warmup, args.iters, args.only)
    print(table(report["results"], report["ratios"]))
    for impl, why in report["skipped"].items():
        print(f"skipped {impl}: {why}")
    print(f"device {report['device']}, {report['cpu_count']} CPUs, torch threads "
          f"{report['torch_threads']}, OMP_NUM_THREADS {report['omp_num_threads']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
