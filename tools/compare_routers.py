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
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from moetrain.experiments import (
    Job,
    add_common_args,
    check_common_args,
    fmt,
    machine,
    markdown_table,
    pyplot,
    read_run,
    run_jobs,
    train_command,
    window_mean,
    window_size,
)


@dataclass(frozen=True)
class Method:
    what: str  # one line for the table
    overrides: tuple[str, ...]


# Each method with its paper's balancing: the router's training recipe (balance loss,
# coefficients, z-loss; docs/routers.md#training-recipes) unless a method sets them.
# Everything else is the default config (dropless dispatch).
METHODS: dict[str, Method] = {
    "topk_aux": Method("softmax top-2, Switch aux loss 1e-2, z-loss 1e-3",
                       ("moe/router=topk",)),
    "topk_noaux": Method("softmax top-2, no balance loss, z-loss 1e-3",
                         ("moe/router=topk", "moe.aux_loss_coef=0")),
    "aux_free": Method("sigmoid top-2, expert bias (rate 1e-3), no balance loss",
                       ("moe/router=aux_free",)),
    # bias_update_rate=0 leaves plain top-k, whose recipe has the losses: set them to 0.
    "aux_free_control": Method("aux_free with bias_update_rate=0 (the control)",
                               ("moe/router=aux_free", "moe.aux_loss_coef=0",
                                "moe.z_loss_coef=0", "moe.router.bias_update_rate=0")),
    "deepseek_v3": Method("DeepSeek-V3: sigmoid, route_scale 2.5, bias, seq loss 1e-4",
                          ("moe/router=deepseek_v3",)),
    "noisy_topk": Method("noisy top-2 (zero-init gates), importance + load CV² 1e-2 each",
                         ("moe/router=noisy_topk",)),
    "expert_choice": Method("expert choice, capacity factor 2 (no balance loss)",
                            ("moe/router=expert_choice",)),
    "sinkhorn": Method("S-BASE Sinkhorn top-2 (no balance loss)", ("moe/router=sinkhorn",)),
    "selective_sinkhorn": Method("SSR: OT routing on 1% of steps, no balance loss",
                                 ("moe/router=selective_sinkhorn",)),
    "threshold": Method("XMoE threshold 0.9, 1-8 experts, XMoE top-1 loss 1e-2",
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

AUX_FREE_RATIO = 0.8  # "clearly below": aux_free's imbalance < 0.8 x the control's
METRICS = ("load_imbalance", "load_cv", "dropped_frac", "unrouted_frac", "tokens_per_s")


def summarize(metrics_path: str | Path) -> dict:
    """The comparison's numbers for one run, from its metrics.jsonl."""
    from moetrain.metrics import read_metrics

    train, val = read_run(metrics_path)
    n = window_size(len(train))
    out: dict = {"steps": int(train[-1]["step"]), "window": n}
    for key in METRICS:
        out[key] = window_mean(train, key, n)
    out["final_val_loss"] = val[-1][1] if val else None
    out["final_val_step"] = val[-1][0] if val else None
    out["val_curve"] = val
    out["load_imbalance_curve"] = [(int(r["step"]), float(r["load_imbalance"]))
                                   for r in train if "load_imbalance" in r]
    out["collapse_events"] = sum(r.get("event") == "expert_collapse"
                                 for r in read_metrics(metrics_path))
    return out


def command(name: str, steps: int, run_dir: Path, extra: list[str]) -> tuple[str, ...]:
    return train_command([*BASE, f"train.steps={steps}", *METHODS[name].overrides, *extra],
                         run_dir)


def table(results: dict[str, dict]) -> str:
    """The markdown table, one row per method in run order."""
    rows = [[name, METHODS[name].what, fmt(r["final_val_loss"], ".3f"),
             fmt(r["load_imbalance"], ".2f"), fmt(r["load_cv"], ".3f"),
             fmt(r["dropped_frac"], ".3f"), fmt(r["unrouted_frac"], ".3f"),
             fmt(r["tokens_per_s"], ",.0f")] for name, r in results.items()]
    return markdown_table(["method", "routing / balancing", "val loss", "max/mean load",
                           "load CV", "dropped", "unrouted", "tokens/s"], rows, "llrrrrrr")


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
    plt = pyplot()
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
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    jobs = [Job(name, out / "runs" / name, command(name, a.steps, out / "runs" / name,
                                                   a.extra_overrides),
                end_step=a.steps, label=f"method {name!r}") for name in a.names]

    def report_line(job: Job, timing: dict) -> str:
        r = summarize(job.run_dir / "metrics.jsonl")
        return (f"{job.name}: val loss {fmt(r['final_val_loss'], '.4f')}, max/mean load "
                f"{fmt(r['load_imbalance'], '.3f')} ({timing['wall_s']:.1f} s)")

    timings = run_jobs(jobs, parallel=a.jobs, threads=a.threads, reuse=a.reuse,
                       desc="routers", on_done=report_line)
    results = {name: {**summarize(out / "runs" / name / "metrics.jsonl"),
                      **{k: v for k, v in timings[name].items() if k != "reused"}}
               for name in a.names}
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
