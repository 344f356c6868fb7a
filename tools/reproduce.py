"""Test the papers' headline claims at small scale: each method against its paper's
baseline, with the same model and token budget, over several seeds, and give a verdict.

Every run is a ``python -m moetrain.train`` subprocess on the embedded corpus (the default
data): 2 layers, dim 64, 8 experts of hidden size 128, top-2 (the Chain-of-Experts pair:
15 routed + 1 shared experts of hidden 64), 16 sequences of 128 bytes per step,
``--steps`` (800) steps, validation every 25 steps on 8 x 16 sequences. Runs that several
claims share are trained once per seed (one top-k + aux loss baseline, one dense model);
a claim whose baseline needs other settings (its paper's balance loss) has its own.
``--list`` prints the claims and their runs. Under ``--out`` it writes:

- ``reproduce.md``: one row per claim (also printed): the paper, the claim, the setup, the
  metric, method and baseline as mean ± sample standard deviation over the seeds, the
  verdict;
- ``reproduce.json``: the same, every seed's value, every run's overrides, the command,
  the machine and the wall time;
- ``reproduce.png``: one panel per measured quantity: each seed's value, mean ± std;
- ``runs/seed<s>/<run>/``: each run (metrics.jsonl, train.log, checkpoints where needed).

Metrics (lower is better, except where noted):

- val loss: the last validation loss (nats per byte) in metrics.jsonl;
- MaxVio_batch: max over experts of the step's load / mean load - 1 (Wang et al., arXiv
  2408.15664), from metrics.jsonl's ``load_imbalance`` - 1, mean over the MoE layers and
  the last 50 steps;
- MaxVio_global: the same over the validation files at once, from the final checkpoint;
- H(file | expert): how specialised the experts are. The final checkpoint routes up to 16
  sequences from the start of each validation file (a default-corpus document is one
  stdlib source file), a forward hook on each router records the chosen experts, and
  H(F | E) = sum_e (n_e / n) H(F | e), H(F | e) the entropy of expert e's tokens over the
  files, mean over layers (moetrain.experiments.file_entropy);
- active k: routed experts per token (``active_k``), mean over the last 50 steps;
- steps to dense loss: the first step at which the validation loss reaches the dense
  model's final one (same seed), linearly interpolated between validations; "not
  reached" within the run.

Verdicts. For a part of a claim, a and b are the method's and the baseline's values over
n_a and n_b seeds, and d = mean(a) - mean(b), signed so that d < 0 favours the method.
The standard error of the difference of the means is Welch's
SE = sqrt(s_a^2 / n_a + s_b^2 / n_b), s the sample standard deviation (n - 1).

- "better" (superiority): holds if d < -2 SE, does not hold if d > 2 SE, otherwise
  inconclusive (the difference is within 2 standard errors);
- "no worse" (non-inferiority): holds if d <= 2 SE (not significantly worse), otherwise
  does not hold;
- a claim with several parts holds only if every part holds, does not hold if any part
  does not hold, and is inconclusive otherwise;
- one seed (``--quick``): no standard error, so every verdict is inconclusive. The
  ``lean`` beside every verdict applies the same rules with SE = 0 (which side the means
  fall on); it is not a verdict, and the table shows it only for one seed.
- a part whose method never reaches its target (steps to dense loss) does not hold if no
  seed reaches it and is inconclusive if only some do.

Every claim needs 21 runs per seed (63 for 3 seeds). Time on 2 CPU cores (AMD EPYC,
otherwise idle) with ``--jobs 2``, 1 thread per run, measured before the coe, rmoe and
compete claims were added: the other 11 claims' 15 runs took 615 s end to end for one
seed (``--quick``; 1,173 s of CPU time in the runs), and 3 seeds (45 runs) are estimated
at 3 x that, about 31 min (less with ``--reuse`` after a ``--quick`` into the same
``--out``: seed 0 is kept). Those three claims alone (``--only coe,rmoe,compete``, 18
runs for 3 seeds) took 607 s end to end (1,136 s of CPU time). The time scales with
``--steps``.
Needs matplotlib for the figure (``pip install 'moetrain[plots]'``).

    python tools/reproduce.py                      # every claim, 3 seeds, 800 steps
    python tools/reproduce.py --quick              # one seed
    python tools/reproduce.py --only switch,upcycling --seeds 5
    python tools/reproduce.py --only coe,rmoe,compete --quick
    python tools/reproduce.py --reuse              # re-tabulate finished runs
    python tools/reproduce.py --list
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
    fmt_mean_std,
    machine,
    markdown_table,
    mean_std,
    pyplot,
    read_run,
    routing_profile,
    run_jobs,
    se_diff,
    train_command,
    window_mean,
    window_size,
)

STEPS = 800
DENSE_FRACTION = 0.4  # share of the steps the upcycled runs train dense
PER_FILE = 16  # validation sequences per file for the routing profile

# The shared model and run. The dense FFN has one expert's size (upcycling copies it).
BASE: tuple[str, ...] = (
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.num_experts=8",
    "model.top_k=2", "model.expert_hidden=128", "model.ffn_hidden=${model.expert_hidden}",
    "train.seq_len=128", "train.global_batch_size=16", "train.micro_batch_size=16",
    "eval.every=25", "eval.batches=8", "checkpoint.every=0", "checkpoint.resume=none",
    "logging.tensorboard=false", "logging.heatmap_every=0", "train.progress=false",
)

# Each run spells out its paper's recipe (balance loss and coefficients, conf/moe/router/
# and moetrain/config/recipes.py) so that a baseline does not move with the defaults; the
# routers' own knobs (threshold, bias rate, noise) come from their conf/moe/router/*.yaml.
TOPK = ("moe/router=topk", "moe.balance_loss=switch", "moe.aux_loss_coef=0.01",
        "moe.z_loss_coef=0.001")
GB = (*TOPK, "train.micro_batch_size=2", "eval.batches=64", "data.val_fraction=0.05")
# Chain-of-Experts (arXiv 2506.18945) and its MoE baseline with CoE's official flags
# (ZihanWang314/CoE config.json, _run.sh): N experts = N - 1 routed + 1 shared (re-run
# every round), softmax top-K per round not renormalised (norm_topk_prob=false), a router
# per round (use_igate), the inner residual (block output x_C, x_0 = the normalised input,
# which their C = 1 baseline shares), the per-sequence balance loss 1e-3 in every round,
# no z-loss. Their pair CoE(C=2, K=4) vs MoE(C=1, K=8) on 64 experts, scaled to 16: C=2,
# K=2 vs C=1, K=4 (C * K = 4 routed evaluations per token in both). Experts of hidden 64
# keep the experts' parameters those of the other runs (16 x 64 = 8 x 128 hidden units per
# layer), at F / D = 1 (CoE: 704 / 1024). The optimizer is the other runs' (CoE's lr 3e-4
# and weight decay 0.01 are for its 1024-wide model; the claim is a paired comparison).
COE = ("moe/router=topk", "model.num_experts=15", "model.n_shared_experts=1",
       "model.expert_hidden=64", "moe.chain_router=per_iteration", "moe.chain_residual=inner",
       "moe.router.renormalize=false", "moe.balance_loss=seq", "moe.aux_loss_coef=0.001",
       "moe.z_loss_coef=0")


@dataclass(frozen=True)
class RunSpec:
    """One run per seed. ``overrides`` may name {seed}, {steps}, {dense_steps},
    {diversify} (10% of the steps) and {anneal} (2/3 of the steps)."""

    what: str
    overrides: tuple[str, ...]
    upcycled: bool = False  # the MoE phase after the dense run's checkpoint at dense_steps
    profile: bool = False  # keep the final checkpoint and measure its routing


RUNS: dict[str, RunSpec] = {
    "topk_aux": RunSpec("softmax top-2, Switch loss 1e-2, z-loss 1e-3", TOPK, profile=True),
    "topk_noaux": RunSpec("softmax top-2, no balance loss, z-loss 1e-3",
                          ("moe/router=topk", "moe.aux_loss_coef=0", "moe.z_loss_coef=0.001")),
    "loss_free": RunSpec("sigmoid top-2, expert bias (rate 1e-3), no aux loss, no z-loss",
                         ("moe/router=aux_free", "moe.aux_loss_coef=0", "moe.z_loss_coef=0"),
                         profile=True),
    # Micro-batches of 2 sequences (the same validation tokens: 64 x 2 sequences), and a
    # validation split of 5% of the files (about 30 instead of 5) for the specialisation.
    "gb_micro": RunSpec("top-2 + Switch loss, micro-batches of 2 sequences, their statistics",
                        (*GB, "moe.aux_loss_scope=micro_batch"), profile=True),
    "gb_global": RunSpec("gb_micro with global-batch statistics",
                         (*GB, "moe.aux_loss_scope=global_batch"), profile=True),
    "dense": RunSpec("dense model, FFN = one expert (128)",
                     ("model.first_dense_layers=${model.n_layers}",)),
    "switch": RunSpec("Switch top-1, capacity 1.25, Switch loss 1e-2, no z-loss",
                      ("moe/router=switch", "model.top_k=1", "moe.dispatch=capacity",
                       "moe.capacity_factor=1.25", "moe.balance_loss=switch",
                       "moe.aux_loss_coef=0.01", "moe.z_loss_coef=0")),
    "expert_choice": RunSpec("expert choice, capacity factor 2, z-loss 1e-3",
                             ("moe/router=expert_choice", "moe.router.ec_capacity_factor=2.0",
                              "moe.aux_loss_coef=0", "moe.z_loss_coef=0.001")),
    "xmoe": RunSpec("XMoE threshold 0.9, 1 to 8 experts, XMoE loss 1e-2, no z-loss",
                    ("moe/router=threshold", "moe.router.max_k=${model.num_experts}",
                     "moe.balance_loss=xmoe", "moe.aux_loss_coef=0.01", "moe.z_loss_coef=0")),
    "upcycle": RunSpec("dense to 40%, then upcycled top-2 (experts = FFN copies)",
                       (*TOPK, "init.seed={seed}"), upcycled=True),
    "drop_upcycle": RunSpec("dense to 40%, then Drop-Upcycling r = 0.5",
                            (*TOPK, "init.seed={seed}", "init.drop_ratio=0.5"),
                            upcycled=True),
    "evomoe": RunSpec("EvoMoE: 1 expert for 10%, DTS gate τ 2→0.5 to 77%, then top-2",
                      ("moe/router=dts", "schedule=evomoe", "schedule.diversify_steps={diversify}",
                       "schedule.steps={anneal}", "schedule.hard_k=2",
                       "moe.balance_loss=evomoe", "moe.aux_loss_coef=0.01",
                       "moe.z_loss_coef=0")),
    "ssr": RunSpec("selective Sinkhorn (OT on 1% of steps), no aux loss, no z-loss",
                   ("moe/router=selective_sinkhorn", "moe.aux_loss_coef=0",
                    "moe.z_loss_coef=0")),
    "sinkhorn": RunSpec("S-BASE Sinkhorn top-2, no aux loss, no z-loss",
                        ("moe/router=sinkhorn", "moe.aux_loss_coef=0", "moe.z_loss_coef=0")),
    "noisy_topk": RunSpec("noisy top-2, importance + load losses 1e-2, zero-init gates",
                          ("moe/router=noisy_topk", "moe.router.noisy_zero_init=true",
                           "moe.aux_loss_coef=0", "moe.z_loss_coef=0")),
    "coe": RunSpec("Chain-of-Experts: 15 routed + 1 shared experts of 64, 2 rounds of top-2",
                   (*COE, "moe.chain_iterations=2", "model.top_k=2")),
    "coe_moe": RunSpec("CoE's MoE baseline: the same experts and flags, 1 round of top-4",
                       (*COE, "moe.chain_iterations=1", "model.top_k=4")),
    # RMoE (arXiv 2408.06793) and the same model with the plain linear router, both on
    # RMoE's recipe (Switch loss 1e-3, no z-loss). A state of 32, not RMoE's 256: at dim 64
    # a 256-wide GRU costs 5.5x the top-k model's FLOPs per token, 32 (D / 2) 1.09x.
    "recurrent": RunSpec("RMoE: GRU router state 32 across layers, top-2, Switch loss 1e-3, "
                         "no z-loss",
                         ("moe/router=recurrent", "moe.router.rnn_hidden=32",
                          "moe.balance_loss=switch", "moe.aux_loss_coef=0.001",
                          "moe.z_loss_coef=0")),
    "topk_aux1e3": RunSpec("softmax top-2 (linear router), Switch loss 1e-3, no z-loss",
                           ("moe/router=topk", "moe.balance_loss=switch",
                            "moe.aux_loss_coef=0.001", "moe.z_loss_coef=0")),
    # CompeteSMoE (arXiv 2505.13380, its LM-pretraining defaults in conf/moe/router/
    # compete.yaml) and the same router without competition: both train the router steps
    # on its top-1 balance loss (moe.balance_loss=xmoe: E sum_e mean p_e x share of top-1
    # picks) 1e-2 and the z-loss 1e-3, which topk_aux's Switch loss is not.
    "compete": RunSpec("CompeteSMoE: top-2, 7% of (step, layer)s after 5% compete, top-1 "
                       "loss 1e-2, z-loss 1e-3",
                       ("moe/router=compete", "moe.balance_loss=xmoe", "moe.aux_loss_coef=0.01",
                        "moe.z_loss_coef=0.001")),
    "topk_top1aux": RunSpec("softmax top-2, top-1 balance loss 1e-2, z-loss 1e-3",
                            ("moe/router=topk", "moe.balance_loss=xmoe",
                             "moe.aux_loss_coef=0.01", "moe.z_loss_coef=0.001")),
}
DENSE = "dense"  # the run the upcycled ones start from

METRICS: dict[str, str] = {  # key -> how the table names it
    "val_loss": "val loss",
    "max_vio_batch": "MaxVio_batch",
    "max_vio_global": "MaxVio_global",
    "file_entropy": "H(file | expert), nats",
    "active_k": "active k",
    "steps_to_dense": "steps to dense loss",
}


@dataclass(frozen=True)
class Part:
    """One measured statement: ``method`` is ``test`` than ``baseline`` on ``metric``."""

    metric: str
    method: str
    baseline: str
    test: str  # "better" (superiority) | "no_worse" (non-inferiority)
    spec: str = ".3f"


@dataclass(frozen=True)
class Claim:
    name: str
    paper: str  # arXiv id
    claim: str  # the headline, in our words
    setup: str  # the comparison as run here
    parts: tuple[Part, ...]
    proper: str  # what a real test would take


CLAIMS: dict[str, Claim] = {c.name: c for c in (
    Claim("loss_free", "2408.15664",
          "Loss-Free Balancing balances the experts better than the auxiliary loss, with "
          "validation loss no worse",
          "loss_free vs topk_aux",
          (Part("max_vio_global", "loss_free", "topk_aux", "better"),
           Part("val_loss", "loss_free", "topk_aux", "no_worse")),
          "many fine-grained experts (tens to hundreds) and billions of tokens, where the "
          "aux loss's interference with the LM loss is measurable"),
    Claim("global_batch", "2501.11873",
          "Balance statistics over the global batch instead of each micro-batch give lower "
          "validation loss and more specialised experts",
          "gb_global vs gb_micro: top-2 + Switch loss in micro-batches of 2 sequences, "
          "8 per step",
          (Part("val_loss", "gb_global", "gb_micro", "better"),
           Part("file_entropy", "gb_global", "gb_micro", "better", ".4f")),
          "data of distinct domains, micro-batches of one or a few sequences against a "
          "global batch of thousands (data parallelism), and an aux coefficient large "
          "enough to constrain routing"),
    Claim("switch", "2101.03961",
          "At the same compute per token, a top-1 MoE reaches the dense model's final "
          "loss in fewer steps",
          "switch vs dense (its FFN = one expert)",
          (Part("steps_to_dense", "switch", "dense", "better", ".0f"),),
          "a model large enough that the FFN dominates compute, and enough steps that "
          "the dense model's loss curve flattens"),
    Claim("expert_choice", "2202.09368",
          "Expert-choice routing reaches lower validation loss than top-2 token choice at "
          "equal compute",
          "expert_choice (capacity factor 2: 2 experts per token on average) vs topk_aux",
          (Part("val_loss", "expert_choice", "topk_aux", "better"),),
          "dozens of experts and a longer run; routing over whole micro-batches is not "
          "causal, so a decoder's validation reads a little of the future"),
    Claim("xmoe", "2403.18926",
          "Threshold routing uses fewer experts per token than top-k at validation loss no "
          "worse",
          "xmoe vs topk_aux",
          (Part("active_k", "xmoe", "topk_aux", "better", ".2f"),
           Part("val_loss", "xmoe", "topk_aux", "no_worse")),
          "many small experts (XMoE's fine-grained setting), so that a token can stop "
          "after one or two"),
    Claim("upcycling", "2212.05055",
          "From a dense checkpoint, the upcycled MoE beats continuing the dense model for "
          "the same extra tokens",
          "upcycle (dense 40%, MoE 60%) vs dense (100%)",
          (Part("val_loss", "upcycle", "dense", "better"),),
          "a converged dense checkpoint and an extra budget that is a real fraction of "
          "its pre-training"),
    Claim("drop_upcycling", "2502.19261",
          "Drop-Upcycling ends below naive upcycling",
          "drop_upcycle vs upcycle, same dense checkpoint",
          (Part("val_loss", "drop_upcycle", "upcycle", "better"),),
          "long MoE training after the upcycling: re-initialised channels pay off late"),
    Claim("evomoe", "2112.14397",
          "EvoMoE (dense start, then dense-to-sparse gate) ends below the same MoE trained "
          "from scratch",
          "evomoe (hard top-2 at the end) vs topk_aux",
          (Part("val_loss", "evomoe", "topk_aux", "better"),),
          "a budget long enough for each phase, and more experts"),
    Claim("ssr", "2511.08972",
          "Selective Sinkhorn Routing, without any auxiliary loss, is at least as good as "
          "top-k with the aux loss, and balances better than top-k without it",
          "ssr vs topk_aux (loss) and vs topk_noaux (balance)",
          (Part("val_loss", "ssr", "topk_aux", "no_worse"),
           Part("max_vio_batch", "ssr", "topk_noaux", "better")),
          "enough steps that the transport steps (1% of them) add up, and more experts"),
    Claim("sinkhorn", "2202.01169",
          "S-BASE's Sinkhorn routing is balanced without an auxiliary loss and at least "
          "as good as top-k with one",
          "sinkhorn vs topk_aux",
          (Part("max_vio_batch", "sinkhorn", "topk_aux", "no_worse"),
           Part("val_loss", "sinkhorn", "topk_aux", "no_worse")),
          "a scaling study (several model sizes), as the paper's claim is about scaling"),
    Claim("noisy_topk", "1701.06538",
          "The noisy top-k gate's importance and load losses balance the experts",
          "noisy_topk vs topk_noaux",
          (Part("max_vio_batch", "noisy_topk", "topk_noaux", "better"),),
          "already measurable here; the paper's thousands of experts test it far harder"),
    Claim("coe", "2506.18945",
          "Chain-of-Experts (experts applied in sequential rounds, re-routed each round) "
          "reaches a lower validation loss than the MoE with the same experts and expert "
          "evaluations per token",
          "coe (2 rounds of top-2) vs coe_moe (1 round of top-4): 15 routed + 1 shared "
          "experts of 64, CoE's flags in both",
          (Part("val_loss", "coe", "coe_moe", "better"),),
          "the paper's model: 64 experts (63 routed + 1 shared) of hidden 704 at width "
          "1024, C=2 K=4 against K=8, trained long enough for the curves to separate"),
    Claim("rmoe", "2408.06793",
          "A layerwise recurrent router (a GRU state carried across the MoE layers) "
          "reaches a lower validation loss than the plain router with the same experts",
          "recurrent (GRU state 32) vs topk_aux1e3, both on RMoE's recipe (Switch loss "
          "1e-3, no z-loss)",
          (Part("val_loss", "recurrent", "topk_aux1e3", "better"),),
          "many MoE layers for the state to cross (2 here), RMoE's state of 256 in a model "
          "wide enough that it is a small cost, and longer training"),
    Claim("compete", "2505.13380",
          "Competition (on some steps every expert runs and the router learns the experts' "
          "own ranking) reaches a lower validation loss than the same router without it",
          "compete vs topk_top1aux (the same router and router-step losses); competition "
          "steps cost more compute (active k)",
          (Part("val_loss", "compete", "topk_top1aux", "better"),),
          "many experts and layers (their sweep: 64 experts of 128, 16 layers) and long "
          "training, so that enough competition steps teach the router"),
)}


# ----------------------------------------------------------------------------- verdicts
def part_verdict(a: list[float | None], b: list[float | None], test: str) -> dict:
    """Verdict of one part from the method's values ``a`` and the baseline's ``b`` (one per
    seed; None = target not reached), lower values being better: the module docstring's
    rules. Returns {"verdict", "lean", "diff", "se"}, ``diff`` = mean(a) - mean(b)."""
    if test not in ("better", "no_worse"):
        raise ValueError(f"test {test!r}: must be 'better' or 'no_worse'")
    got_a, got_b = [v for v in a if v is not None], [v for v in b if v is not None]
    if not got_a or not got_b:
        v = "does not hold" if not got_a and got_b else "inconclusive"
        return {"verdict": v, "lean": v, "diff": None, "se": None}
    d = mean_std(got_a)[0] - mean_std(got_b)[0]  # < 0: the method is better
    se = se_diff(got_a, got_b)

    def rule(s: float) -> str:
        if test == "better":
            return "holds" if d < -2 * s else "does not hold" if d > 2 * s else "inconclusive"
        return "holds" if d <= 2 * s else "does not hold"

    lean = rule(0.0)
    if len(got_a) < len(a) or len(got_b) < len(b):  # some seeds did not reach the target
        return {"verdict": "inconclusive", "lean": lean, "diff": d, "se": se}
    return {"verdict": "inconclusive" if se is None else rule(se), "lean": lean, "diff": d,
            "se": se}


def combine(verdicts: list[str]) -> str:
    """A compound claim: holds if every part holds, does not hold if any part does not."""
    if "does not hold" in verdicts:
        return "does not hold"
    return "holds" if all(v == "holds" for v in verdicts) else "inconclusive"


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First step at which the validation curve [(step, loss)] is <= ``target``, linearly
    interpolated between the validations around it; None if it never is."""
    for i, (s, v) in enumerate(curve):
        if v <= target:
            if i == 0:
                return float(s)
            s0, v0 = curve[i - 1]
            return s0 + (v0 - target) / (v0 - v) * (s - s0)
    return None


# ----------------------------------------------------------------------------- runs
def plan_runs(names: list[str]) -> list[str]:
    """The runs the claims need, in RUNS order (the dense run when one is upcycled)."""
    need = {r for n in names for p in CLAIMS[n].parts for r in (p.method, p.baseline)}
    if any(RUNS[r].upcycled for r in need):
        need.add(DENSE)
    return [r for r in RUNS if r in need]


def dense_steps(steps: int) -> int:
    return round(DENSE_FRACTION * steps)


def _fill(override: str, values: dict) -> str:
    for k, v in values.items():
        override = override.replace("{" + k + "}", str(v))
    return override


def make_jobs(runs: list[str], seeds: list[int], steps: int, root: Path,
              extra: list[str]) -> list[Job]:
    """One job per (seed, run); the upcycled runs after their seed's dense run."""
    d = dense_steps(steps)
    values = {"steps": steps, "dense_steps": d, "diversify": steps // 10,
              "anneal": max(1, 2 * steps // 3)}
    from moetrain.checkpoint import step_dir_name

    jobs = []
    for seed in seeds:
        for name in runs:
            spec = RUNS[name]
            run_dir = root / f"seed{seed}" / name
            n = steps - d if spec.upcycled else steps
            own = [_fill(o, {**values, "seed": seed}) for o in spec.overrides]
            last: list[str] = []  # after --extra: what the tool relies on
            ckpt, after = None, ()
            if spec.upcycled:
                dense_ckpt = root / f"seed{seed}" / DENSE / "checkpoints" / step_dir_name(d)
                last.append(f"init.from_dense={dense_ckpt}")
                after = (f"seed{seed}/{DENSE}",)
            if name == DENSE:  # (also when no upcycled run is asked: the same command)
                last += [f"checkpoint.every={d}", "checkpoint.keep=0"]
                ckpt = d
            if spec.profile:
                last += [f"checkpoint.every={n}"]
                ckpt = n
            cmd = train_command([*BASE, f"train.steps={n}", f"seed={seed}", *own, *extra,
                                 *last], run_dir)
            jobs.append(Job(f"seed{seed}/{name}", run_dir, cmd, end_step=n,
                            checkpoint_step=ckpt, after=after, label=f"run {name!r} seed {seed}"))
    return jobs


def summarize(run_dir: Path, profile: bool) -> dict:
    """One run's numbers from its metrics.jsonl (and its checkpoint's routing)."""
    train, val = read_run(run_dir / "metrics.jsonl")
    n = window_size(len(train))
    imb = window_mean(train, "load_imbalance", n)
    out = {"steps": int(train[-1]["step"]), "window": n,
           "val_loss": val[-1][1] if val else None, "val_step": val[-1][0] if val else None,
           "val_curve": val, "max_vio_batch": None if imb is None else imb - 1.0,
           "active_k": window_mean(train, "active_k", n)}
    if profile:
        out.update(routing_profile(run_dir, per_file=PER_FILE))
    return out


def part_values(part: Part, results: dict[int, dict[str, dict]]) -> tuple[list, list]:
    """The method's and the baseline's value per seed."""
    a, b = [], []
    for runs in results.values():
        m, base = runs[part.method], runs[part.baseline]
        if part.metric == "steps_to_dense":
            a.append(steps_to_reach(m["val_curve"], base["val_loss"]))
            b.append(steps_to_reach(base["val_curve"], base["val_loss"]))
        else:
            a.append(m[part.metric])
            b.append(base[part.metric])
    return a, b


def evaluate(names: list[str], results: dict[int, dict[str, dict]]) -> list[dict]:
    """Every claim's parts, values and verdicts."""
    out = []
    for name in names:
        c = CLAIMS[name]
        parts = []
        for p in c.parts:
            a, b = part_values(p, results)
            parts.append({"metric": p.metric, "label": METRICS[p.metric], "test": p.test,
                          "method": p.method, "baseline": p.baseline, "spec": p.spec,
                          "method_values": a, "baseline_values": b,
                          **part_verdict(a, b, p.test)})
        out.append({"name": name, "paper": f"arXiv {c.paper}", "claim": c.claim,
                    "setup": c.setup, "proper": c.proper, "parts": parts,
                    "verdict": combine([q["verdict"] for q in parts]),
                    "lean": combine([q["lean"] for q in parts])})
    return out


# ----------------------------------------------------------------------------- output
def _values_cell(values: list, spec: str) -> str:
    got = [v for v in values if v is not None]
    missing = len(values) - len(got)
    cell = fmt_mean_std(got, spec) if got else "not reached"
    return cell + (f" ({missing} of {len(values)} not reached)" if got and missing else "")


def _verdict_cell(c: dict, seeds: int) -> str:
    cell = f"**{c['verdict']}**"
    if len(c["parts"]) > 1:
        cell += " (" + "; ".join(p["verdict"] for p in c["parts"]) + ")"
    if seeds < 2:
        cell += f"; 1 seed, leans {c['lean']}"
    return cell


def table(claims: list[dict], seeds: int) -> str:
    rows = []
    for c in claims:
        ps = c["parts"]
        rows.append([
            c["name"], c["paper"], c["claim"], c["setup"],
            "<br>".join(f"{p['label']} ({'better' if p['test'] == 'better' else 'no worse'})"
                        for p in ps),
            "<br>".join(f"{p['method']}: {_values_cell(p['method_values'], p['spec'])}"
                        for p in ps),
            "<br>".join(f"{p['baseline']}: {_values_cell(p['baseline_values'], p['spec'])}"
                        for p in ps),
            _verdict_cell(c, seeds)])
    return markdown_table(["claim", "paper", "what the paper claims", "setup", "metric",
                           "method", "baseline", "verdict"], rows, "llllllll")


COLORS = {"holds": "tab:green", "does not hold": "tab:red", "inconclusive": "tab:gray"}


def plot(claims: list[dict], out: Path) -> None:
    """One panel per part: each seed's value (dots) and mean ± std (bar) for the method
    and the baseline; the title's colour is the part's verdict."""
    plt = pyplot()
    parts = [(c, p) for c in claims for p in c["parts"]]
    cols = min(4, len(parts))
    rows = -(-len(parts) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(parts):]:
        ax.axis("off")
    for ax, (c, p) in zip(axes.flat, parts):
        for x, (who, vals) in enumerate(((p["method"], p["method_values"]),
                                         (p["baseline"], p["baseline_values"]))):
            got = [v for v in vals if v is not None]
            if got:
                mean, std = mean_std(got)
                ax.errorbar([x], [mean], yerr=[std or 0.0], fmt="s", color="black",
                            capsize=4, markersize=5)
                ax.plot([x + 0.12] * len(got), got, "o", color="tab:blue", alpha=0.6,
                        markersize=4)
            if len(got) < len(vals):
                ax.annotate(f"{len(vals) - len(got)} not reached", (x, 0.02),
                            xycoords=("data", "axes fraction"), ha="center", fontsize=7)
        ax.set_xticks([0, 1], [p["method"], p["baseline"]], fontsize=8)
        ax.set_xlim(-0.5, 1.6)
        ax.set_title(f"{c['name']}: {p['label']}", fontsize=8,
                     color=COLORS[p["verdict"]])
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=STEPS,
                   help=f"optimizer steps per run, all phases ({STEPS})")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per run (3)")
    seeds.add_argument("--quick", action="store_true", help="one seed (= --seeds 1)")
    add_common_args(p, list(CLAIMS), "runs/reproduce", what="claim", jobs=2)
    a = p.parse_args(argv)
    check_common_args(p, a, list(CLAIMS), what="claim")
    if a.quick:
        a.seeds = 1
    if a.seeds < 1:
        p.error(f"--seeds={a.seeds} is invalid: must be >= 1")
    if a.steps < 1:
        p.error(f"--steps={a.steps} is invalid: must be >= 1")
    a.runs = plan_runs(a.names)
    d = dense_steps(a.steps)
    if DENSE in a.runs and not 1 <= d < a.steps:
        p.error(f"--steps={a.steps} puts the dense run's upcycling checkpoint at step {d}: "
                f"the dense and the MoE phase need a step each (raise --steps)")
    return a


def print_list() -> None:
    for c in CLAIMS.values():
        print(f"{c.name} (arXiv {c.paper}): {c.claim}.\n  setup: {c.setup}")
        for p in c.parts:
            print(f"  {METRICS[p.metric]}: {p.method} {p.test.replace('_', ' ')} than "
                  f"{p.baseline}")
    print("\nruns (per seed):")
    for name, r in RUNS.items():
        tail = " init.from_dense=<dense run's checkpoint at 40%>" if r.upcycled else ""
        print(f"  {name:14s} {r.what}\n  {'':14s} {' '.join(r.overrides)}{tail}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.list:
        print_list()
        return 0
    t0 = time.perf_counter()
    out = Path(a.out).resolve()
    root = out / "runs"
    root.mkdir(parents=True, exist_ok=True)
    seeds = list(range(a.seeds))
    jobs = make_jobs(a.runs, seeds, a.steps, root, a.extra_overrides)
    timings = run_jobs(jobs, parallel=a.jobs, threads=a.threads, reuse=a.reuse,
                       desc="reproduce")
    results = {s: {r: summarize(root / f"seed{s}" / r, RUNS[r].profile) for r in a.runs}
               for s in seeds}
    claims = evaluate(a.names, results)
    wall = time.perf_counter() - t0
    run_s = sum(t["wall_s"] for t in timings.values())
    cpus = [t.get("cpu_s") for t in timings.values()]
    cpu_s = None if None in cpus else sum(cpus)
    trained = sum(not t["reused"] for t in timings.values())

    md = table(claims, a.seeds)
    cmd = shlex.join(["python", "tools/reproduce.py",
                      *(argv if argv is not None else sys.argv[1:])])
    header = (f"{a.seeds} seed(s), {a.steps} steps per run (upcycled: {dense_steps(a.steps)} "
              f"dense + {a.steps - dense_steps(a.steps)} MoE); {len(jobs)} runs "
              f"({trained} trained now), {run_s:.0f} s of training runs"
              + (f" ({cpu_s:.0f} s CPU time)" if cpu_s is not None else "")
              + f", {wall:.0f} s end to end on {machine()}, {a.jobs} run(s) at a time, "
              f"{a.threads} thread(s) each.\n"
              f"Command: `{cmd}`\n\n")
    (out / "reproduce.md").write_text(header + md + "\n")
    report = {
        "command": cmd, "machine": machine(), "seeds": a.seeds, "steps": a.steps,
        "dense_steps": dense_steps(a.steps), "jobs": a.jobs, "threads": a.threads,
        "wall_s": wall, "run_s": run_s, "cpu_s": cpu_s, "base_overrides": list(BASE),
        "extra_overrides": a.extra_overrides,
        "runs": {r: {"what": RUNS[r].what, "overrides": list(RUNS[r].overrides),
                     "seeds": {s: results[s][r] for s in seeds}} for r in a.runs},
        "timings": timings, "claims": claims,
    }
    (out / "reproduce.json").write_text(json.dumps(report, indent=1) + "\n")
    try:
        plot(claims, out / "reproduce.png")
    except ImportError:
        print("matplotlib is not installed: no figure (pip install 'moetrain[plots]')",
              file=sys.stderr)
    print(md)
    print(f"\n{wall:.0f} s end to end; wrote {out}/reproduce.{{md,json,png}}")
    for c in claims:
        lean = f" (1 seed, leans {c['lean']})" if a.seeds < 2 else ""
        print(f"{c['name']:15s} {c['verdict']}{lean}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
