"""Train the same tiny MoE with each router and load-balancing method and compare them.

Every method is one ``python -m moetrain.train`` subprocess with the same seed, data,
model and schedule; only the routing overrides differ. From each run's metrics.jsonl the
tool computes the final validation loss and, over the last 50 steps (the last quarter
if the run has fewer than 200), the mean max/mean expert load (``load_imbalance``), load
CV, dropped and unrouted fractions and tokens/s. It writes, under ``--out``:

- ``compare_routers.md``: the table (also printed);
- ``compare_routers.png``: validation loss and load imbalance vs step, one line per method;
- ``compare_routers.json``: the same numbers, the command and the machine;
- ``runs/<method>/``: each run's directory (metrics.jsonl, log).

It ends with the auxiliary-loss-free verdict: with moe.aux_loss_coef=0, is ``aux_free``'s
load imbalance clearly below that of ``aux_free_control`` (the same run with
bias_update_rate=0)?

    python tools/compare_routers.py                        # all methods, 300 steps
    python tools/compare_routers.py --only aux_free,aux_free_control --steps 600
    python tools/compare_routers.py --extra "model.num_experts=16 model.top_k=4"
    python tools/compare_routers.py --reuse               # re-tabulate and re-plot finished runs
    python tools/compare_routers.py --list

Needs matplotlib for the figure (``pip install 'moetrain[plots]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Method:
    what: str  # one line for the table
    overrides: tuple[str, ...]


# Each method with its paper's balancing. Everything not set here is the default config
# (moe.aux_loss_coef=0.01 Switch loss, moe.z_loss_coef=1e-3, dropless dispatch).
METHODS: dict[str, Method] = {
    "topk_aux": Method("softmax top-2, Switch aux loss 1e-2", ("moe/router=topk",)),
    "topk_noaux": Method("softmax top-2, no balance loss",
                         ("moe/router=topk", "moe.aux_loss_coef=0")),
    "aux_free": Method("sigmoid top-2, expert bias (rate 1e-3), no balance loss",
                       ("moe/router=aux_free", "moe.aux_loss_coef=0")),
    "aux_free_control": Method("aux_free with bias_update_rate=0 (the control)",
                               ("moe/router=aux_free", "moe.aux_loss_coef=0",
                                "moe.router.bias_update_rate=0")),
    "deepseek_v3": Method("DeepSeek-V3: sigmoid, route_scale 2.5, bias, seq loss 1e-4",
                          ("moe/router=deepseek_v3", "moe.balance_loss=seq",
                           "moe.aux_loss_coef=1e-4")),
    "noisy_topk": Method("noisy top-2, importance + load CV² losses 1e-2 each",
                         ("moe/router=noisy_topk", "moe.aux_loss_coef=0")),
    "expert_choice": Method("expert choice, capacity factor 2 (no balance loss)",
                            ("moe/router=expert_choice",)),
    "sinkhorn": Method("S-BASE Sinkhorn top-2 (no balance loss)", ("moe/router=sinkhorn",)),
    "selective_sinkhorn": Method("SSR: OT routing on 1% of steps, no balance loss",
                                 ("moe/router=selective_sinkhorn", "moe.aux_loss_coef=0")),
    "threshold": Method("XMoE threshold 0.9, 1-2 experts, Switch aux loss 1e-2",
                        ("moe/router=threshold",)),
    "switch": Method("Switch top-1, capacity 1.25, Switch aux loss 1e-2",
                     ("moe/router=switch", "model.top_k=1", "moe.dispatch=capacity",
                      "moe.capacity_factor=1.25")),
}

# The shared model and run: 2 layers, 8 experts, top-2, 16 sequences of 128 bytes per step.
BASE: tuple[str, ...] = (
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.num_experts=8",
    "model.top_k=2", "model.expert_hidden=128", "train.seq_len=128",
    "train.global_batch_size=16", "train.micro_batch_size=16", "eval.every=50",
    "eval.batches=4", "checkpoint.every=0", "checkpoint.resume=none",
    "logging.tensorboard=false", "logging.heatmap_every=0", "train.progress=false", "seed=0",
)

WINDOW = 50  # steps averaged for the balance numbers (fewer on short runs: a quarter)
AUX_FREE_RATIO = 0.8  # "clearly below": aux_free's imbalance < 0.8 x the control's
METRICS = ("load_imbalance", "load_cv", "dropped_frac", "unrouted_frac", "tokens_per_s")


def window_size(train_steps: int) -> int:
    """Steps averaged: the last 50, or the last quarter of a run of fewer than 200."""
    return max(1, min(WINDOW, train_steps // 4))


def summarize(metrics_path: str | Path) -> dict:
    """The comparison's numbers for one run, from its metrics.jsonl."""
    from moetrain.metrics import read_metrics

    rows = read_metrics(metrics_path)
    train = [r for r in rows if "loss" in r]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if "val_loss" in r]
    if not train:
        raise ValueError(f"{metrics_path} holds no training rows: the run did not train")
    n = window_size(len(train))
    out: dict = {"steps": int(train[-1]["step"]), "window": n}
    for key in METRICS:
        vals = [float(r[key]) for r in train[-n:] if r.get(key) is not None]
        out[key] = sum(vals) / len(vals) if vals else None
    out["final_val_loss"] = val[-1][1] if val else None
    out["final_val_step"] = val[-1][0] if val else None
    out["val_curve"] = val
    out["load_imbalance_curve"] = [(int(r["step"]), float(r["load_imbalance"]))
                                   for r in train if "load_imbalance" in r]
    out["collapse_events"] = sum(r.get("event") == "expert_collapse" for r in rows)
    return out


def command(name: str, steps: int, run_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "moetrain.train", *BASE, f"train.steps={steps}",
            *METHODS[name].overrides, *extra, f"run.dir={run_dir}"]


def _complete(run_dir: Path, steps: int) -> bool:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return False
    from moetrain.metrics import read_metrics

    return any(r.get("step") == steps and "val_loss" in r for r in read_metrics(path))


def run_logged(cmd: list[str], run_dir: Path, threads: int, label: str) -> dict:
    """Run ``cmd`` in a fresh ``run_dir`` with its output in train.log; return and record
    (timing.json) {"wall_s", "load_avg"}: the 1-minute load average when it ended (above
    the core count, other processes shared the cores and tokens/s is low). Shared with
    tools/compare_schedules.py."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    log_path = run_dir / "train.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{label} failed (exit {rc}); its log is {log_path}:\n{tail}")
    out = {"wall_s": wall, "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    (run_dir / "timing.json").write_text(json.dumps(out) + "\n")
    return out


def train_one(name: str, steps: int, run_dir: Path, extra: list[str], reuse: bool,
              threads: int = 1) -> dict:
    """Run one method's training in a subprocess (:func:`run_logged`). With ``reuse``, a
    finished run is kept and what it recorded is returned."""
    timing = run_dir / "timing.json"
    if reuse and _complete(run_dir, steps) and timing.is_file():
        return json.loads(timing.read_text())
    return run_logged(command(name, steps, run_dir, extra), run_dir, threads,
                      f"method {name!r}")


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(results: dict[str, dict]) -> str:
    """The markdown table, one row per method in run order."""
    lines = [
        ("| method | routing / balancing | val loss | max/mean load | load CV | dropped "
         "| unrouted | tokens/s |"),
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {METHODS[name].what} | {fmt(r['final_val_loss'], '.3f')} "
            f"| {fmt(r['load_imbalance'], '.2f')} | {fmt(r['load_cv'], '.3f')} "
            f"| {fmt(r['dropped_frac'], '.3f')} | {fmt(r['unrouted_frac'], '.3f')} "
            f"| {fmt(r['tokens_per_s'], ',.0f')} |")
    return "\n".join(lines)


def aux_free_verdict(results: dict[str, dict]) -> dict | None:
    """Is aux_free's mean max/mean load clearly below the bias_update_rate=0 control's?"""
    if "aux_free" not in results or "aux_free_control" not in results:
        return None
    a = results["aux_free"]["load_imbalance"]
    c = results["aux_free_control"]["load_imbalance"]
    works = a < AUX_FREE_RATIO * c
    line = (f"aux-free balancing (moe.aux_loss_coef=0): mean max/mean load over the last "
            f"{results['aux_free']['window']} steps {a:.3f} with the bias vs {c:.3f} for the "
            f"control (bias_update_rate=0), ratio {a / c:.2f}: "
            + ("WORKS (clearly below)" if works else
               f"NOT clearly below (needs < {AUX_FREE_RATIO} x the control)"))
    return {"aux_free": a, "control": c, "ratio": a / c, "works": works, "line": line}


def plot(results: dict[str, dict], out: Path, smooth: int = 10) -> None:
    """Two panels: validation loss vs step, and load imbalance (moving average) vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_val, ax_load) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = plt.get_cmap("tab20").colors
    styles = ("-", "--", "-.", ":")
    for i, (name, r) in enumerate(results.items()):
        kw = {"color": colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20],
              "linestyle": styles[i % len(styles)], "linewidth": 1.4, "label": name}
        val = [(s, v) for s, v in r["val_curve"] if s > 0] or r["val_curve"]
        if val:  # from the first validation after step 0, where every run is at ~ln(257)
            steps, vals = zip(*val)
            ax_val.plot(steps, vals, marker="o", markersize=3, **kw)
        if r["load_imbalance_curve"]:
            steps, vals = zip(*r["load_imbalance_curve"])
            w = max(1, min(smooth, len(vals)))
            avg = [sum(vals[j - w + 1:j + 1]) / w for j in range(w - 1, len(vals))]
            ax_load.plot(steps[w - 1:], avg, **kw)
    ax_val.set_title("validation loss")
    ax_val.set_xlabel("step")
    ax_load.set_title(f"max / mean expert load ({smooth}-step moving average)")
    ax_load.set_xlabel("step")
    ax_load.axhline(1.0, color="gray", linewidth=0.8)
    for ax in (ax_val, ax_load):
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def add_common_args(p: argparse.ArgumentParser, methods, default_out: str) -> None:
    """The options both comparison tools share."""
    p.add_argument("--out", default=default_out, help="output directory")
    p.add_argument("--only", default="", help=f"comma-separated methods: {','.join(methods)}")
    p.add_argument("--extra", action="append", default=[],
                   help="Hydra overrides for every run, space-separated (repeatable); "
                        "they come after the tool's own")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per run (1: as fast as 2 for this model on 2 cores, and "
                        "it does not thrash when other processes share the cores)")
    p.add_argument("--reuse", action="store_true",
                   help="keep finished runs already under --out (re-tabulate, re-plot)")
    p.add_argument("--list", action="store_true", help="print the methods and exit")


def check_common_args(p: argparse.ArgumentParser, a: argparse.Namespace, methods) -> None:
    """Validate the shared options; sets ``a.names`` and ``a.extra_overrides``."""
    if a.threads < 1:
        p.error(f"--threads={a.threads} is invalid: must be >= 1")
    names = [n.strip() for n in a.only.split(",") if n.strip()] or list(methods)
    bad = [n for n in names if n not in methods]
    if bad:
        p.error(f"--only names unknown method(s) {', '.join(map(repr, bad))}: choose from "
                f"{', '.join(methods)}")
    a.names = list(dict.fromkeys(names))
    a.extra_overrides = [o for chunk in a.extra for o in shlex.split(chunk)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run (300)")
    add_common_args(p, METHODS, "outputs/compare_routers")
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error(f"--steps={a.steps} is invalid: must be >= 1")
    check_common_args(p, a, METHODS)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.list:
        for name, m in METHODS.items():
            print(f"{name:20s} {m.what}\n{'':20s} {' '.join(m.overrides)}")
        return 0
    from tqdm import tqdm

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    timings: dict[str, dict] = {}
    bar = tqdm(a.names, desc="routers", unit="run", dynamic_ncols=True)
    for name in bar:
        bar.set_postfix(method=name)
        run_dir = out / "runs" / name
        timings[name] = train_one(name, a.steps, run_dir, a.extra_overrides, a.reuse,
                                  a.threads)
        results[name] = {**summarize(run_dir / "metrics.jsonl"), **timings[name]}
        r = results[name]
        bar.write(f"{name}: val loss {fmt(r['final_val_loss'], '.4f')}, max/mean load "
                  f"{fmt(r['load_imbalance'], '.3f')} ({r['wall_s']:.1f} s)")
    bar.close()
    total = sum(t["wall_s"] for t in timings.values())  # the training subprocesses
    loads = [t["load_avg"] for t in timings.values() if t.get("load_avg") is not None]
    load = sum(loads) / len(loads) if loads else None

    md = table(results)
    verdict = aux_free_verdict(results)
    n = next(iter(results.values()))["window"]
    cmd = shlex.join(["python", "tools/compare_routers.py", *(argv if argv is not None
                                                              else sys.argv[1:])])
    header = (f"{a.steps} steps per method; balance columns: mean over the last {n} steps; "
              f"wall time {total:.0f} s on {machine()}, {a.threads} thread(s) per run"
              + (f"; mean 1-min load average {load:.1f}" if load is not None else "") + ".\n"
              f"Command: `{cmd}`\n\n")
    (out / "compare_routers.md").write_text(header + md + "\n"
                                            + (f"\n{verdict['line']}\n" if verdict else ""))
    report = {
        "command": cmd, "machine": machine(), "threads": a.threads, "steps": a.steps,
        "window": n,
        "base_overrides": list(BASE), "extra_overrides": a.extra_overrides,
        "wall_s": total, "load_avg": load,
        "methods": {name: {"what": METHODS[name].what,
                           "overrides": list(METHODS[name].overrides), **r}
                    for name, r in results.items()},
        "aux_free_verdict": verdict,
    }
    (out / "compare_routers.json").write_text(json.dumps(report, indent=1) + "\n")
    try:
        plot(results, out / "compare_routers.png")
    except ImportError:
        print("matplotlib is not installed: no figure (pip install 'moetrain[plots]')",
              file=sys.stderr)
    print(md)
    if verdict:
        print(verdict["line"])
    print(f"wall time {total:.0f} s; wrote {out}/compare_routers.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
