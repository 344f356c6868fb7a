"""Train the same tiny MoE from scratch, with dense-to-sparse schedules and upcycled from a
dense model, on one token budget, and compare them.

Every run is a ``python -m moetrain.train`` subprocess on the default corpus with the same
seed, data, batch and model as ``tools/compare_routers.py`` (2 layers, dim 64, 8 experts of
hidden size 128, top-2, 16 sequences of 128 bytes per step); only the method's overrides
differ. The methods (``--list``):

- ``dense``: every layer dense (FFN hidden 128, the size of one expert), the whole budget;
- ``scratch``: the top-2 MoE from a fresh initialisation;
- ``evomoe``: EvoMoE (Nie et al., arXiv 2112.14397), ``moe/router=dts schedule=evomoe``:
  one expert for the first 10% of the steps, spawned into 8, the soft DTS gate with tau
  2 -> 0.5 over the next 2/3, then hard top-2 (conf/schedule/evomoe.yaml at 300 steps,
  with ``schedule.hard_k=2``: the same final k as the other methods; EvoMoE's is 1);
- ``temperature``: ``schedule=temperature``, tau 2 -> 0.5 over the first 2/3 of the steps;
- ``topk``: ``schedule=topk``, k 8 -> 2 over the first 2/3 of the steps. Annealing ends
  before the run does so that the last third trains at top-2, the k the final validation
  uses (with ``schedule.steps=null`` the last step would still train at k = 3);
- ``upcycle``: the ``dense`` run stopped after ``--dense-fraction`` (40%) of the steps
  (``train.stop_at``: the same LR schedule, so it is the dense curve up to there), then
  sparse upcycling (Komatsuzaki et al., arXiv 2212.05055) with ``init.from_dense``: every
  expert a copy of the FFN, a new router, a fresh optimizer and warmup + cosine LR schedule
  over the rest of the steps;
- ``drop_upcycle``: the same with Drop-Upcycling (Nakamura et al., arXiv 2502.19261),
  ``init.drop_ratio=0.5`` (its router drawn uniform, the released recipe's law).

The two upcycled methods share one dense run (``runs/dense_phase``). Their MoE phase is a
new run at step 0, so its sampler starts the corpus again: it sees the dense phase's
sequences a second time. From the runs' metrics.jsonl the tool computes, per method, the
final validation loss, the training tokens (all phases), tokens/s (tokens / summed
``step_time_s``), the final and mean ``active_k`` (routed experts per token; a dense
layer counts as 1, its FFN being one expert's size) and the mean max/mean expert load over
the last 50 steps. It writes, under ``--out``:

- ``compare_schedules.md``: the table (also printed);
- ``compare_schedules.png``: validation loss and active k vs training tokens; an upcycled
  run is one curve, dense phase then MoE phase;
- ``compare_schedules.json``: the same numbers and curves, the command and the machine;
- ``runs/<method>/``: each run's directory (metrics.jsonl, train.log).

    python tools/compare_schedules.py                     # all methods, 300 steps
    python tools/compare_schedules.py --only scratch,upcycle,drop_upcycle --tokens 1228800
    python tools/compare_schedules.py --extra "model.num_experts=16 model.top_k=4"
    python tools/compare_schedules.py --reuse             # re-tabulate and re-plot finished runs

Needs matplotlib for the figure (``pip install 'moetrain[plots]'``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
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
    window_size,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling compare_routers.py
from compare_routers import BASE as ROUTERS_BASE

# compare_routers' model and run; the dense FFN gets the experts' size, as upcycling needs,
# and validation comes twice as often for finer curves (the later override wins).
BASE: tuple[str, ...] = (*ROUTERS_BASE, "model.ffn_hidden=${model.expert_hidden}",
                         "eval.every=25")
DENSE: tuple[str, ...] = ("model.first_dense_layers=${model.n_layers}",)


def _anneal_steps(steps: int) -> int:
    """Annealing length: the first 2/3 of the run (evomoe.yaml: 200 of 300 steps)."""
    return max(1, 2 * steps // 3)


@dataclass(frozen=True)
class Method:
    what: str  # one line for the table; {dense} = the dense share of an upcycled method
    # The method's overrides for a run (or MoE phase) of the given number of steps.
    overrides: Callable[[int], tuple[str, ...]]
    upcycled: bool = False  # a dense phase first, then this run with init.from_dense


METHODS: dict[str, Method] = {
    "dense": Method("dense model (FFN = one expert's size), whole budget", lambda s: DENSE),
    "scratch": Method("top-2 MoE from scratch", lambda s: ()),
    "evomoe": Method(
        "EvoMoE: 1 expert for 10%, spawn, DTS gate τ 2→0.5, hard top-2 from 77%",
        lambda s: ("moe/router=dts", "schedule=evomoe", f"schedule.diversify_steps={s // 10}",
                   f"schedule.steps={_anneal_steps(s)}", "schedule.hard_k=2")),
    "temperature": Method("softmax τ 2→0.5 over the first 2/3, top-2",
                          lambda s: ("schedule=temperature", f"schedule.steps={_anneal_steps(s)}")),
    "topk": Method("k from E (dense) to top-k over the first 2/3",
                   lambda s: ("schedule=topk", f"schedule.steps={_anneal_steps(s)}")),
    "upcycle": Method("dense run to {dense}, then upcycled: experts = copies of the FFN",
                      lambda s: (), upcycled=True),
    "drop_upcycle": Method("dense run to {dense}, then Drop-Upcycling r = 0.5",
                           lambda s: ("init.drop_ratio=0.5",), upcycled=True),
}

DENSE_PHASE = "dense_phase"  # run directory of the upcycled methods' shared dense phase


@dataclass(frozen=True)
class Phase:
    """One training subprocess of a method."""

    name: str  # its directory under runs/
    steps: int  # train.steps: the LR schedule's length
    overrides: tuple[str, ...]  # after BASE and train.steps, before --extra
    last: tuple[str, ...] = ()  # after --extra: what the tool relies on
    stop_at: int = 0  # train.stop_at (in `last`): the step the run ends at; 0 = steps

    @property
    def end(self) -> int:
        return self.stop_at or self.steps


def phases(name: str, steps: int, dense_steps: int, runs: Path) -> list[Phase]:
    """A method's subprocesses: one run, or the dense phase then the upcycled MoE phase."""
    m = METHODS[name]
    if not m.upcycled:
        return [Phase(name, steps, m.overrides(steps))]
    moe_steps = steps - dense_steps
    dense_last = (f"train.stop_at={dense_steps}", f"checkpoint.every={dense_steps}")
    return [Phase(DENSE_PHASE, steps, DENSE, dense_last, stop_at=dense_steps),
            Phase(name, moe_steps, m.overrides(moe_steps),
                  (f"init.from_dense={runs / DENSE_PHASE / 'checkpoints'}",))]


def command(phase: Phase, run_dir: Path, extra: list[str]) -> tuple[str, ...]:
    return train_command([*BASE, f"train.steps={phase.steps}", *phase.overrides, *extra,
                          *phase.last], run_dir)


def summarize(metrics_paths: list[str | Path]) -> dict:
    """The comparison's numbers for one method from its phases' metrics.jsonl, in order.

    Each phase's tokens continue from the previous phase's last training row, so a
    validation at step s of a phase sits at (tokens before the phase) + s x (tokens per
    step). Rows without ``active_k`` (a dense model) count k = 1."""
    offset = 0
    train_s = 0.0
    val_curve: list[tuple[int, float]] = []
    k_curve: list[tuple[int, float]] = []
    boundaries: list[int] = []
    train: list[dict] = []
    for path in metrics_paths:
        train, val = read_run(path)
        per_step, rem = divmod(int(train[-1]["tokens"]), int(train[-1]["step"]))
        if rem:
            raise ValueError(f"{path}: tokens {train[-1]['tokens']} at step "
                             f"{train[-1]['step']} is not a whole number of steps")
        if offset:
            boundaries.append(offset)
        val_curve += [(offset + step * per_step, v) for step, v in val]
        k_curve += [(offset + int(r["tokens"]), float(r.get("active_k", 1.0))) for r in train]
        train_s += sum(float(r["step_time_s"]) for r in train)
        offset += int(train[-1]["tokens"])
    n = window_size(len(train))  # the last phase's last steps
    loads = [float(r["load_imbalance"]) for r in train[-n:] if "load_imbalance" in r]
    ks = [k for _, k in k_curve]
    return {
        "tokens": offset, "train_s": train_s, "tokens_per_s": offset / train_s,
        "final_val_loss": val_curve[-1][1] if val_curve else None,
        "final_val_tokens": val_curve[-1][0] if val_curve else None,
        "final_active_k": ks[-1], "mean_active_k": sum(ks) / len(ks),
        "load_imbalance": sum(loads) / len(loads) if loads else None, "window": n,
        "upcycle_tokens": boundaries[0] if boundaries else None,
        "val_curve": val_curve, "k_curve": k_curve,
    }


def describe(name: str, dense_fraction: float) -> str:
    return METHODS[name].what.format(dense=f"{dense_fraction:.0%}")


def table(results: dict[str, dict], dense_fraction: float) -> str:
    """The markdown table, one row per method in run order."""
    rows = [[name, describe(name, dense_fraction), fmt(r["final_val_loss"], ".3f"),
             f"{r['tokens']:,}", f"{r['tokens_per_s']:,.0f}", f"{r['final_active_k']:.2f}",
             f"{r['mean_active_k']:.2f}", fmt(r["load_imbalance"], ".2f"),
             f"{r['wall_s']:.0f}"] for name, r in results.items()]
    return markdown_table(["method", "what", "val loss", "tokens", "tokens/s", "final k",
                           "mean k", "max/mean load", "wall s"], rows, "llrrrrrrr")


def plot(results: dict[str, dict], out: Path) -> None:
    """Two panels against training tokens: validation loss and active k (experts per token)."""
    plt = pyplot()
    fig, (ax_val, ax_k) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = plt.get_cmap("tab10").colors
    styles = ("-", "--", "-.", ":")
    for i, (name, r) in enumerate(results.items()):
        kw = {"color": colors[i % 10], "linestyle": styles[i % len(styles)], "linewidth": 1.4,
              "label": name}
        # From the first validation after token 0, where every run is at ~ln(257).
        val = [(t, v) for t, v in r["val_curve"] if t > 0] or r["val_curve"]
        if val:
            tokens, vals = zip(*val)
            ax_val.plot([t / 1e6 for t in tokens], vals, marker="o", markersize=3, **kw)
        if r["k_curve"]:
            tokens, ks = zip(*r["k_curve"])
            ax_k.step([t / 1e6 for t in tokens], ks, where="pre", **kw)
        if r["upcycle_tokens"]:
            for ax in (ax_val, ax_k):
                ax.axvline(r["upcycle_tokens"] / 1e6, color=kw["color"], linewidth=0.6,
                           linestyle=":")
    # Every run falls fast at first: frame the last 85% of the budget (earlier points clip).
    late = [v for r in results.values() for t, v in r["val_curve"]
            if t >= 0.15 * r["tokens"]]
    if late and max(late) > min(late):
        lo, hi = min(late), max(late)
        ax_val.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax_val.set_title("validation loss (dotted vertical: upcycling)")
    ax_k.set_title("active k: routed experts per token (dense layer = 1)")
    for ax in (ax_val, ax_k):
        ax.set_xlabel("training tokens (millions)")
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def _tokens_per_step(extra: list[str]) -> int:
    from moetrain.config import compose_config

    cfg = compose_config([*BASE, *extra])
    return cfg.train.global_batch_size * cfg.train.seq_len


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="optimizer steps per method, all phases (300)")
    budget.add_argument("--tokens", type=int,
                        help="training tokens per method, rounded down to whole steps")
    p.add_argument("--dense-fraction", type=float, default=0.4,
                   help="share of the steps the upcycled methods train dense (0.4)")
    add_common_args(p, METHODS, "outputs/compare_schedules")
    a = p.parse_args(argv)
    check_common_args(p, a, METHODS)
    if a.list:
        return a
    from hydra.errors import HydraException

    from moetrain.config import ConfigError

    try:
        a.tokens_per_step = _tokens_per_step(a.extra_overrides)
    except (ConfigError, HydraException) as e:
        p.error(f"--extra {shlex.join(a.extra_overrides)!r} does not compose: {e}")
    if a.tokens is not None:
        a.steps = a.tokens // a.tokens_per_step
        if a.steps < 1:
            p.error(f"--tokens={a.tokens} is invalid: less than one step "
                    f"({a.tokens_per_step} tokens)")
    elif a.steps is None:
        a.steps = 300
    if a.steps < 1:
        p.error(f"--steps={a.steps} is invalid: must be >= 1")
    a.dense_steps = round(a.dense_fraction * a.steps)
    if any(METHODS[n].upcycled for n in a.names) and not 1 <= a.dense_steps < a.steps:
        p.error(f"--dense-fraction={a.dense_fraction} gives {a.dense_steps} dense steps of "
                f"{a.steps}: both phases need at least one step (raise --steps or pick a "
                f"fraction in (0, 1))")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.list:
        for name, m in METHODS.items():
            own = " ".join(m.overrides(300)) or "(defaults)"
            if m.upcycled:
                own = (f"{' '.join(DENSE)} train.stop_at=...; then {own} "
                       f"init.from_dense=...")
            print(f"{name:14s} {describe(name, a.dense_fraction)}\n{'':14s} {own}")
        return 0
    out = Path(a.out).resolve()
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    plans = {name: phases(name, a.steps, a.dense_steps, runs) for name in a.names}
    jobs: dict[str, Job] = {}  # per run directory: a shared phase runs once
    for plan in plans.values():
        for i, ph in enumerate(plan):
            jobs.setdefault(ph.name, Job(
                ph.name, runs / ph.name, command(ph, runs / ph.name, a.extra_overrides),
                end_step=ph.end, checkpoint_step=ph.end if ph.name == DENSE_PHASE else None,
                after=tuple(p.name for p in plan[:i]), label=f"run {ph.name!r}"))
    timings = run_jobs(list(jobs.values()), parallel=a.jobs, threads=a.threads,
                       reuse=a.reuse, desc="schedules")
    results: dict[str, dict] = {}
    for name, plan in plans.items():
        results[name] = {
            **summarize([runs / ph.name / "metrics.jsonl" for ph in plan]),
            "wall_s": sum(timings[ph.name]["wall_s"] for ph in plan),
            "phases": [{"run": ph.name, "steps": ph.end,
                        "overrides": [*ph.overrides, *ph.last]} for ph in plan],
        }
        r = results[name]
        print(f"{name}: val loss {fmt(r['final_val_loss'], '.4f')}, {r['tokens']:,} "
              f"tokens, final k {r['final_active_k']:.2f} ({r['wall_s']:.1f} s)")
    total = sum(t["wall_s"] for t in timings.values())  # the training subprocesses
    loads = [t["load_avg"] for t in timings.values() if t.get("load_avg") is not None]
    load = sum(loads) / len(loads) if loads else None

    md = table(results, a.dense_fraction)
    cmd = shlex.join(["python", "tools/compare_schedules.py",
                      *(argv if argv is not None else sys.argv[1:])])
    header = (f"{a.steps} steps ({a.steps * a.tokens_per_step:,} tokens) per method; upcycled "
              f"methods: {a.dense_steps} dense steps, then {a.steps - a.dense_steps} MoE steps; "
              f"wall time {total:.0f} s on {machine()}, {a.threads} thread(s) per run"
              + (f"; mean 1-min load average {load:.1f}" if load is not None else "") + ".\n"
              f"Command: `{cmd}`\n\n")
    (out / "compare_schedules.md").write_text(header + md + "\n")
    report = {
        "command": cmd, "machine": machine(), "threads": a.threads, "steps": a.steps,
        "tokens_per_step": a.tokens_per_step, "dense_steps": a.dense_steps,
        "base_overrides": list(BASE), "extra_overrides": a.extra_overrides,
        "wall_s": total, "load_avg": load,
        "methods": {name: {"what": describe(name, a.dense_fraction), **r}
                    for name, r in results.items()},
    }
    (out / "compare_schedules.json").write_text(json.dumps(report, indent=1) + "\n")
    try:
        plot(results, out / "compare_schedules.png")
    except ImportError:
        print("matplotlib is not installed: no figure (pip install 'moetrain[plots]')",
              file=sys.stderr)
    print(md)
    print(f"wall time {total:.0f} s; wrote {out}/compare_schedules.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
