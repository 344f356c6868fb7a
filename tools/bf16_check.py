"""bf16 against fp32: two training runs of one model, same seed and data, loss curves compared.

Runs ``Trainer.train_step`` (what ``moetrain-train`` runs) for ``--steps`` optimizer steps
twice, with ``train.precision=fp32`` and ``train.precision=bf16`` (bf16 autocast; fp32
weights, gradients and optimizer state), from the same initial weights and on the same
samples. The fp32 run also sets ``moe.expert_backend=loop``: the grouped_mm backend runs
its GEMMs in bf16 on CUDA whatever the precision, and the reference must not. It reports both curves and their gap, smoothed over ``--window`` steps (one step's
loss is noisy: bf16 rounding changes which tokens a router picks):

- ``max_gap``: the largest |smoothed bf16 - smoothed fp32| over the run, relative to the
  smoothed fp32 loss;
- ``final_gap``: the same over the last window.

The check passes when ``max_gap <= --max-gap`` and ``final_gap <= --final-gap`` (defaults
3% and 1.5%: bf16 autocast follows fp32 training closely when the master weights and the
optimizer stay fp32; Micikevicius et al., 2018, "Mixed precision training", Kalamkar et
al., 2019, "A study of BFLOAT16 for deep learning training").

    python tools/bf16_check.py --json bf16.json                   # `small`, 300 steps, CUDA
    python tools/bf16_check.py --device cpu --model tiny --steps 4 --window 2 --seq-len 32 \\
        --micro-batch 2 -- model.dim=32 model.n_layers=2          # CPU smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _bench_train():
    spec = importlib.util.spec_from_file_location("_moetrain_bench_train", HERE / "bench_train.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def smooth(xs: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (fewer at the start)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= window:
            acc -= xs[i - window]
        out.append(acc / min(i + 1, window))
    return out


def compare(fp32: list[float], bf16: list[float], window: int) -> dict:
    """Relative gaps between the smoothed curves (see the module docstring)."""
    if len(fp32) != len(bf16) or not fp32:
        raise ValueError(f"curves of {len(fp32)} and {len(bf16)} steps: need equal, non-empty")
    a, b = smooth(fp32, window), smooth(bf16, window)
    gaps = [abs(y - x) / abs(x) for x, y in zip(a, b)]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    return {"max_gap": gaps[worst], "max_gap_step": worst + 1, "final_gap": gaps[-1],
            "final_fp32": a[-1], "final_bf16": b[-1],
            "raw_max_abs_diff": max(abs(y - x) for x, y in zip(fp32, bf16))}


def run(a: argparse.Namespace) -> dict:
    bench = _bench_train()
    curves, reports = {}, {}
    for precision in ("fp32", "bf16"):
        argv = ["--model", a.model, "--steps", str(a.steps), "--warmup", "0",
                "--seq-len", str(a.seq_len), "--micro-batch", str(a.micro_batch),
                "--global-batch", str(a.global_batch),
                "--run-dir", str(Path(a.run_dir) / precision)]
        if a.device:
            argv += ["--device", a.device]
        argv += ["--", f"train.precision={precision}", f"seed={a.seed}", *a.overrides]
        if precision == "fp32":
            argv.append("moe.expert_backend=loop")
        r = bench.run(bench.parse_args(argv))
        curves[precision] = r["losses"]
        reports[precision] = {k: r[k] for k in ("model", "device", "torch", "params_total",
                                                "params_active", "tokens_per_step",
                                                "tokens_per_s", "peak_mem_gib")}
    gaps = compare(curves["fp32"], curves["bf16"], a.window)
    ok = gaps["max_gap"] <= a.max_gap and gaps["final_gap"] <= a.final_gap
    return {"model": a.model, "steps": a.steps, "seed": a.seed, "window": a.window,
            "tolerance": {"max_gap": a.max_gap, "final_gap": a.final_gap}, **gaps, "ok": ok,
            "runs": reports, "losses": curves}


def format_report(r: dict) -> str:
    verdict = "ok" if r["ok"] else "FAILED"
    return (f"bf16 vs fp32, model {r['model']}, {r['steps']} steps, seed {r['seed']}, "
            f"losses smoothed over {r['window']} steps:\n"
            f"  final loss fp32 {r['final_fp32']:.4f}  bf16 {r['final_bf16']:.4f}  "
            f"gap {100 * r['final_gap']:.2f}% (tolerance {100 * r['tolerance']['final_gap']:.1f}%)\n"
            f"  largest gap {100 * r['max_gap']:.2f}% at step {r['max_gap_step']} (tolerance "
            f"{100 * r['tolerance']['max_gap']:.1f}%): {verdict}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small", help="a conf/model preset")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=20, help="steps the curves are smoothed over")
    p.add_argument("--max-gap", type=float, default=0.03)
    p.add_argument("--final-gap", type=float, default=0.015)
    p.add_argument("--run-dir", default=None, help="default: a temporary directory")
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides (after --)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    a.run_dir = a.run_dir or tempfile.mkdtemp(prefix="moetrain_bf16_")
    r = run(a)
    print(format_report(r), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    raise SystemExit(0 if main()["ok"] else 1)
