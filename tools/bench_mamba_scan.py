"""Time the Mamba mixer's two scans, forward + backward, side by side in one process.

``MambaMixer(scan="sequential")`` (a loop over time, the reference) against
``MambaMixer(scan="chunked")`` (the SSD form: within a chunk a masked matrix product, across
chunks a recurrence of T / chunk_size steps) for each chunk size, on the same weights and
input, for a few (B, T, D) shapes (d_state 16, expand 2). Each figure is the median of
``--iters`` timed forward + backward passes after ``--warmup`` warm-ups (perf_counter,
after a CUDA synchronize on GPU). ``speedup`` is sequential time / chunked time, above 1
when the chunked scan is faster; ``max |dy|`` is the largest output difference to the
sequential scan. Prints a Markdown table headed by the machine.

    python tools/bench_mamba_scan.py
    python tools/bench_mamba_scan.py --shapes 2,512,128 1,2048,256 --chunk-sizes 16 64 \\
        --device cuda --out bench_mamba_scan.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import moetrain  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moetrain.models.mamba import MambaMixer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        B, T, D = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not B,T,D (e.g. 2,512,128)")
    return B, T, D


def time_fwd_bwd(mixer: MambaMixer, x_BTD: torch.Tensor, warmup: int, iters: int) -> float:
    """Median seconds of one forward + backward of sum(y)."""
    sync = torch.cuda.synchronize if x_BTD.device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + iters):
        mixer.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        mixer(x_BTD).float().sum().backward()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_shape(B: int, T: int, D: int, chunk_sizes: list[int], d_state: int,
                device: torch.device, dtype: torch.dtype, warmup: int, iters: int) -> dict:
    torch.manual_seed(0)
    seq = MambaMixer(D, d_state=d_state, scan="sequential").to(device, dtype)
    x_BTD = torch.randn(B, T, D, device=device, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        y_ref = seq(x_BTD).float()
    row = {"B": B, "T": T, "D": D, "I": seq.d_inner, "N": d_state,
           "sequential_ms": 1e3 * time_fwd_bwd(seq, x_BTD, warmup, iters), "chunked": []}
    for q in chunk_sizes:
        chk = MambaMixer(D, d_state=d_state, scan="chunked", chunk_size=q).to(device, dtype)
        chk.load_state_dict(seq.state_dict())
        with torch.no_grad():
            dy = (chk(x_BTD).float() - y_ref).abs().max().item()
        ms = 1e3 * time_fwd_bwd(chk, x_BTD, warmup, iters)
        row["chunked"].append({"chunk_size": q, "ms": ms, "speedup": row["sequential_ms"] / ms,
                               "max_abs_diff": dy})
        del chk
    return row


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        from moetrain.experiments import cpu_name

        name = cpu_name()
    return (f"{device.type}: {name}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads")


def format_table(report: dict) -> str:
    title = (f"Mamba scan, forward + backward, {report['dtype']}, median of "
             f"{report['iters']} ({report['machine']})")
    lines = [title, "",
             "| B | T | D | I | N | sequential | chunk | chunked | speedup | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        for c in r["chunked"]:
            lines.append(f"| {r['B']} | {r['T']} | {r['D']} | {r['I']} | {r['N']} | "
                         f"{r['sequential_ms']:.1f} ms | {c['chunk_size']} | {c['ms']:.1f} ms | "
                         f"{c['speedup']:.2f}x | {c['max_abs_diff']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", type=parse_shape,
                   default=[(1, 256, 64), (4, 256, 64), (1, 1024, 64)],
                   help="B,T,D triples (default: 1,256,64 4,256,64 1,1024,64)")
    p.add_argument("--chunk-sizes", nargs="+", type=int, default=[8, 16, 64])
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", type=Path, help="also write the report as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    report = {"machine": machine(device), "dtype": args.dtype, "iters": args.iters,
              "rows": [bench_shape(B, T, D, args.chunk_sizes, args.d_state, device,
                                   DTYPES[args.dtype], args.warmup, args.iters)
                       for B, T, D in args.shapes]}
    print(format_table(report), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
