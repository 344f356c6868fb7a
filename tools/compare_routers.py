"""Train the same tiny MoE with each router and load-balancing method and compare them.

Every method is one ``python -m moetrain.train`` subprocess with the same seed, data,
model and schedule; only the routing overrides differ. Besides the routers and balance
losses, three MoE designs route differently: ``coe`` (Chain-of-Experts: 2 rounds of top-1,
the same 2 expert evaluations per token as top-2), ``recurrent`` (RMoE's GRU router) and
``compete`` (CompeteSMoE: some steps run every expert). From each run's metrics.jsonl the
tool computes the final validation loss and, over the last 50 steps (the last quarter
if the run has fewer than 200), the mean max/mean expert load (``load_imbalance``), load
CV, dropped and unrouted fractions and tokens/s. It also gives each method's training
FLOPs per token: ``6 N_active + 12 L D S`` (:func:`moetrain.metrics.model_flops_per_token`
on the run's config, composed from its overrides: a chain's rounds and RMoE's router
included), moved from ``model.top_k * moe.chain_iterations`` routed experts per MoE layer
to the run's measured ``active_k`` averaged over all its steps (as the trainer's MFU does:
:func:`moetrain.metrics.flops_per_token_at_k`; it counts expert choice's and the
threshold router's variable k and CompeteSMoE's all-expert steps), and that as a multiple
of ``topk_aux``'s ("× top-k"). It writes, under ``--out``:

- ``compare_routers.md``: the table (also printed);
- ``compare_routers.png``: validation loss and load imbalance vs step, one line per method;
- ``compare_routers.json``: the same numbers, the command and the machine;
- ``runs/<method>/``: each run's directory (metrics.jsonl, log).

It ends with the auxiliary-loss-free verdict: with moe.aux_loss_coef=0, is ``aux_free``'s
load imbalance clearly below that of ``aux_free_control`` (the same run with
bias_update_rate=0)?

    python tools/compare_routers.py                        # all methods, 300 steps
    python tools/compare_routers.py --only aux_free,aux_free_control --steps 600
    python tools/compare_routers.py --only topk_aux,coe,recurrent,compete
    python tools/compare_routers.py --extra "model.num_experts=16 model.top_k=4"
                                  # (sets top_k for coe and switch too: see × top-k)
    python tools/compare_routers.py --reuse               # re-tabulate and re-plot finished runs
    python tools/compare_routers.py --list

Needs matplotlib for the figure (``pip install 'moetrain[plots]'``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
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
    # Chain-of-Experts (arXiv 2506.18945) matched to topk_aux's compute: C * K = 2 x 1
    # expert evaluations per token, as top-2's 1 x 2, on the same 8 experts (parameters
    # equal but for the second round's router). CoE's official flags: a router per round
    # (use_igate), softmax top-K not renormalised (norm_topk_prob=false; with K = 1 a
    # renormalised weight would be 1 and the router would get no gradient), the inner
    # residual (the block's output is x_C, x_0 = the normalised input), the per-sequence
    # balance loss 1e-3 in every round, no z-loss. No shared expert: the table's model has
    # none.
    "coe": Method("Chain-of-Experts: 2 rounds of softmax top-1 (2 experts/token), router per "
                  "round, not renormalised, inner residual, seq loss 1e-3 per round, no z-loss",
                  ("moe/router=topk", "model.top_k=1", "moe.chain_iterations=2",
                   "moe.chain_router=per_iteration", "moe.chain_residual=inner",
                   "moe.router.renormalize=false", "moe.balance_loss=seq",
                   "moe.aux_loss_coef=0.001", "moe.z_loss_coef=0")),
    # RMoE (arXiv 2408.06793) with its recipe (Switch loss 1e-3, no z-loss). Its state is
    # 32 wide, not RMoE's 256: at dim 64 a 256-wide GRU would cost 5.5x the whole top-k
    # model's FLOPs per token (6 H^2 per layer against 2 x 3 D F for the experts); 32
    # (D / 2) costs 1.09x, a router that is a small part of the layer as in the paper.
    "recurrent": Method("RMoE: GRU router state (32) shared across layers, softmax top-2, "
                        "Switch aux loss 1e-3, no z-loss",
                        ("moe/router=recurrent", "moe.router.rnn_hidden=32")),
    # CompeteSMoE (arXiv 2505.13380) with its LM-pretraining defaults (conf/moe/router/
    # compete.yaml) and recipe: its competition steps run every expert (FLOPs/token).
    "compete": Method("CompeteSMoE: top-2; 7% of (step, layer)s after 5% run all experts, "
                      "top-1 balance loss 1e-2, z-loss 1e-3",
                      ("moe/router=compete",)),
    # MoE++ (arXiv 2410.07348) at the parameters of topk_aux: its 8 + 4 configuration (1
    # zero, 1 copy, 2 constant experts beside the 8 FFN experts; 2 x 64 + 64 parameters
    # each constant), its balance loss (tau 0.75, beta 1e-2) and no z-loss.
    # HMoE (arXiv 2408.10681) at topk_aux's total expert parameters: 8 experts whose
    # hidden sizes sum to 8 x 128 (classes of 2 each), top-2, the size-weighted Switch
    # loss (its normalisation is moetrain's: docs/hmoe.md).
    "hmoe": Method("HMoE: 8 experts of hidden 32/64/192/224 (2 each, sum 8 x 128), top-2, "
                   "size-weighted Switch loss 1e-2, z-loss 1e-3",
                   ("moe/router=topk", "model.expert_sizes=[32,32,64,64,192,192,224,224]",
                    "moe.balance_loss=size_weighted")),
    # MoE-Mamba (arXiv 2401.04081): Mamba mixers in place of attention, Switch (top-1) MoE
    # FFNs, against the same Mamba model with dense FFNs of one expert's size (equal
    # active parameters) and against the Transformer's Switch MoE (`switch`).
    "moe_mamba": Method("MoE-Mamba: Mamba-1 mixers, Switch top-1 MoE (capacity 1.25), "
                        "Switch aux loss 1e-2",
                        ("model.mixer=mamba", "moe/router=switch", "model.top_k=1",
                         "moe.dispatch=capacity", "moe.capacity_factor=1.25")),
    "mamba_dense": Method("Mamba-1 mixers, dense FFN of one expert's size (128)",
                          ("model.mixer=mamba", "model.first_dense_layers=2",
                           "model.ffn_hidden=128")),
    "moepp": Method("MoE++: 8 FFN + 1 zero, 1 copy, 2 constant experts, top-2, "
                    "tau-weighted Switch loss 1e-2 (tau 0.75), no z-loss",
                    ("moe/router=topk", "model.zero_experts=1", "model.copy_experts=1",
                     "model.constant_experts=2", "moe.z_loss_coef=0")),
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
FLOPS_BASELINE = "topk_aux"  # the "× top-k" column divides by its FLOPs per token


def summarize(metrics_path: str | Path) -> dict:
    """The comparison's numbers for one run, from its metrics.jsonl."""
    from moetrain.metrics import read_metrics

    train, val = read_run(metrics_path)
    n = window_size(len(train))
    out: dict = {"steps": int(train[-1]["step"]), "window": n}
    for key in METRICS:
        out[key] = window_mean(train, key, n)
    # Routed experts per token over the whole run (its training FLOPs): a variable k
    # varies, CompeteSMoE's competition steps come at random.
    out["active_k_mean"] = window_mean(train, "active_k", len(train))
    # HMoE: the routed rows' mean expert hidden size (where the rows went), same window
    out["routed_hidden_mean"] = (window_mean(train, "routed_hidden", len(train))
                                 if any("routed_hidden" in r for r in train) else None)
    out["final_val_loss"] = val[-1][1] if val else None
    out["final_val_step"] = val[-1][0] if val else None
    out["val_curve"] = val
    out["load_imbalance_curve"] = [(int(r["step"]), float(r["load_imbalance"]))
                                   for r in train if "load_imbalance" in r]
    out["collapse_events"] = sum(r.get("event") == "expert_collapse"
                                 for r in read_metrics(metrics_path))
    return out


def overrides(name: str, steps: int, extra: list[str]) -> list[str]:
    """The Hydra overrides of a method's run (its command without run.dir)."""
    return [*BASE, f"train.steps={steps}", *METHODS[name].overrides, *extra]


def command(name: str, steps: int, run_dir: Path, extra: list[str]) -> tuple[str, ...]:
    return train_command(overrides(name, steps, extra), run_dir)


def run_config(name: str, steps: int, extra: list[str]):
    """The config a method's run trains with, composed from its overrides as
    ``python -m moetrain.train`` composes them."""
    from moetrain.config import compose_config

    return compose_config(overrides(name, steps, extra))


def flops_per_token(cfg, active_k: float | None = None,
                    routed_hidden: float | None = None) -> float:
    """Training FLOPs per token of ``cfg``'s model: ``6 N_active + 12 L D S`` (N_active
    from :func:`moetrain.models.transformer.count_params` without the input embedding: a
    chain's C rounds of router, shared and K routed experts, RMoE's router, the output
    layer), counted at ``model.top_k * moe.chain_iterations`` routed experts per token
    and moved to ``active_k`` (the routed rows per token a run measured, metrics.jsonl's
    ``active_k``) when given, as the trainer does for MFU. With HMoE's ragged experts,
    ``routed_hidden`` (the run's row-weighted mean F) replaces uniform routing's mean F."""
    from moetrain.metrics import flops_per_token_at_k, model_flops_per_token
    from moetrain.metrics.flops import mean_expert_hidden
    from moetrain.models.transformer import count_params
    from moetrain.parallel.memory import resolve_vocab_size

    m = cfg.model
    p = count_params(m, resolve_vocab_size(cfg), cfg.moe)
    f = model_flops_per_token(p.active - p.embedding, m.n_layers, m.dim, cfg.train.seq_len, m)
    if active_k is None:
        return f
    n_moe = sum(m.is_moe_layer(i) for i in range(m.n_layers))
    return flops_per_token_at_k(f, m.top_k * cfg.moe.chain_iterations, active_k, n_moe,
                                m.dim, mean_expert_hidden(m.expert_hidden, m.expert_sizes),
                                routed_hidden)


def add_flops(results: dict[str, dict], steps: int, extra: list[str]) -> None:
    """Each run's ``flops_per_token`` (its config at its measured mean ``active_k``) and
    ``flops_vs_topk``, that over :data:`FLOPS_BASELINE`'s (its own run when there is one,
    else its config at its fixed k: a top-k router routes exactly top_k per token)."""
    for name, r in results.items():
        r["flops_per_token"] = flops_per_token(run_config(name, steps, extra),
                                               r.get("active_k_mean"),
                                               r.get("routed_hidden_mean"))
    base = (results[FLOPS_BASELINE]["flops_per_token"] if FLOPS_BASELINE in results
            else flops_per_token(run_config(FLOPS_BASELINE, steps, extra)))
    for r in results.values():
        r["flops_vs_topk"] = r["flops_per_token"] / base


def _mflops(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e6:.3f}M"


def table(results: dict[str, dict]) -> str:
    """The markdown table, one row per method in run order."""
    rows = [[name, METHODS[name].what, fmt(r["final_val_loss"], ".3f"),
             fmt(r["load_imbalance"], ".2f"), fmt(r["load_cv"], ".3f"),
             fmt(r["dropped_frac"], ".3f"), fmt(r["unrouted_frac"], ".3f"),
             fmt(r["tokens_per_s"], ",.0f"), _mflops(r.get("flops_per_token")),
             fmt(r.get("flops_vs_topk"), ".3f")] for name, r in results.items()]
    return markdown_table(["method", "routing / balancing", "val loss", "max/mean load",
                           "load CV", "dropped", "unrouted", "tokens/s", "FLOPs/token",
                           "× top-k"], rows, "llrrrrrrrr")


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

    t0 = time.perf_counter()
    timings = run_jobs(jobs, parallel=a.jobs, threads=a.threads, reuse=a.reuse,
                       desc="routers", on_done=report_line)
    elapsed = time.perf_counter() - t0  # end to end, --jobs runs at a time
    results = {name: {**summarize(out / "runs" / name / "metrics.jsonl"),
                      **{k: v for k, v in timings[name].items() if k != "reused"}}
               for name in a.names}
    add_flops(results, a.steps, a.extra_overrides)
    total = sum(t["wall_s"] for t in timings.values())  # the training subprocesses
    loads = [t["load_avg"] for t in timings.values() if t.get("load_avg") is not None]
    load = sum(loads) / len(loads) if loads else None

    md = table(results)
    verdict = aux_free_verdict(results)
    n = next(iter(results.values()))["window"]
    cmd = shlex.join(["python", "tools/compare_routers.py", *(argv if argv is not None
                                                              else sys.argv[1:])])
    header = (f"{a.steps} steps per method; balance columns: mean over the last {n} steps; "
              f"FLOPs/token: training FLOPs per token at the run's mean active k, × top-k: "
              f"over {FLOPS_BASELINE}'s; "
              f"{total:.0f} s of training runs ({elapsed:.0f} s end to end, --jobs "
              f"{a.jobs}) on {machine()}, {a.threads} thread(s) per run"
              + (f"; mean 1-min load average {load:.1f}" if load is not None else "") + ".\n"
              f"Command: `{cmd}`\n\n")
    (out / "compare_routers.md").write_text(header + md + "\n"
                                            + (f"\n{verdict['line']}\n" if verdict else ""))
    report = {
        "command": cmd, "machine": machine(), "threads": a.threads, "steps": a.steps,
        "window": n,
        "base_overrides": list(BASE), "extra_overrides": a.extra_overrides,
        "wall_s": total, "elapsed_s": elapsed, "jobs": a.jobs, "load_avg": load,
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
    print(f"{total:.0f} s of training runs, {elapsed:.0f} s end to end; wrote "
          f"{out}/compare_routers.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
