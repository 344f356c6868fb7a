"""A non-finite gradient on one rank only skips the step on every rank.

``$MOETRAIN_FAULTS`` (moetrain/faults.py, ``action=nan_grad|inf_grad``) fills one rank's
local gradients at step 3, after its backward pass: a shard under FSDP (dp=2), that rank's
experts under EP (ep=2), the first pipeline stage under pp=2, which holds no loss. The
decision must reach every rank through the gradient-norm reduction (docs/nonfinite.md): a
rank that stepped while another skipped would leave replicas or shards out of step. Each
2-process run is held to the 1-process run that skips the same step: every rank records
the same skip, metrics.jsonl logs the same steps, learning rates, losses and gradient norms
(1e-5 relative), and the final checkpoints hold the same weights.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from moetrain import faults
from moetrain.metrics import read_metrics
from moetrain.testing import run_distributed
from tests.conftest import TINY, compose

BAD = 3  # the step (1-based) whose gradients are poisoned
STEPS = 6
BASE = [o for o in TINY if not o.startswith(("eval.every", "checkpoint.every"))] + [
    "eval.every=0", f"checkpoint.every={STEPS}", "checkpoint.keep=0"]


def _train_rank(rank: int, world: int, overrides: list[str], spec: str) -> dict:
    """Train with ``$MOETRAIN_FAULTS=spec``. Returns this rank's per-step host values (what
    it decided), how many of its gradients the fault filled, and (rank 0) metrics.jsonl."""
    from moetrain.train.main import run
    from moetrain.train.trainer import Trainer

    seen: list[tuple[int, float, float, float]] = []
    poisoned: list[int] = []
    step_fn, poison_fn = Trainer.train_step, faults._poison_grads

    def train_step(self):
        out = step_fn(self)
        seen.append((self.progress.step, out["skipped"], out["loss"], out["grad_norm"]))
        return out

    def poison(*args):
        poisoned.append(poison_fn(*args))
        return poisoned[-1]

    os.environ[faults.ENV] = spec
    Trainer.train_step, faults._poison_grads = train_step, poison
    try:
        run(compose(overrides))
    finally:
        Trainer.train_step, faults._poison_grads = step_fn, poison_fn
        del os.environ[faults.ENV]
    run_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("run.dir="))
    rows = read_metrics(Path(run_dir) / "metrics.jsonl") if rank == 0 else []
    return {"seen": seen, "poisoned": poisoned, "rows": [r for r in rows if "loss" in r]}


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The last checkpoint's model (parameters and buffers), loaded whole in this process."""
    import moetrain

    model, _ = moetrain.load(run_dir)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    """1-process runs: one whose step 3 is poisoned (all gradients), one without faults."""
    root = tmp_path_factory.mktemp("nonfinite_ref")
    out = {}
    for name, spec in (("skip", f"mid_step:step={BAD}:action=nan_grad"), ("clean", "")):
        run_dir = root / name
        got = _train_rank(0, 1, BASE + [f"run.dir={run_dir}", f"data.cache_dir={data_cache}"],
                          spec)
        out[name] = {**got, "weights": _final_weights(run_dir)}
    return out


def _assert_same_rows(ref: list[dict], got: list[dict], rtol: float = 1e-5) -> None:
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    assert [r["skipped"] for r in got] == [float(s == BAD) for s in range(1, STEPS + 1)]
    assert [r["skipped_steps"] for r in got] == [int(s >= BAD) for s in range(1, STEPS + 1)]
    for a, b in zip(ref, got):
        assert b["lr"] == a["lr"], a["step"]  # the schedule moves on over the skip
        for k in ("loss", "aux_loss", "grad_norm"):
            if k == "grad_norm" and a["step"] == BAD:
                assert not math.isfinite(a[k]) and not math.isfinite(b[k]), (a[k], b[k])
                continue
            assert abs(a[k] - b[k]) <= rtol * abs(a[k]), (
                f"step {a['step']} {k}: 1-process {a[k]!r} vs layout {b[k]!r}")


def _assert_same_weights(ref: dict, got: dict) -> None:
    assert got.keys() == ref.keys()
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_reference_skip_changes_the_weights(reference):
    """The skip is visible: without it every weight ends elsewhere, and the losses after
    the skipped step differ, so a layout where any rank stepped at step 3 fails below."""
    skip, clean = reference["skip"], reference["clean"]
    assert [skipped for _, skipped, *_ in skip["seen"]] == [float(s == BAD)
                                                             for s in range(1, STEPS + 1)]
    assert [r["skipped"] for r in clean["rows"]] == [0.0] * STEPS
    assert [r["lr"] for r in skip["rows"]] == [r["lr"] for r in clean["rows"]]
    # embedding, 2 layers x 10 weights, final norm, output; expert_bias: a buffer, 0 here
    params = [k for k in skip["weights"] if not k.endswith("expert_bias")]
    assert len(params) == 23
    for k in params:
        v = skip["weights"][k]
        assert not torch.allclose(clean["weights"][k], v, rtol=1e-4, atol=1e-5), k
    for a, b in zip(skip["rows"][BAD:], clean["rows"][BAD:]):
        assert abs(a["loss"] - b["loss"]) > 1e-4 * abs(a["loss"]), a["step"]


@pytest.mark.parametrize("name,extra,bad_rank,fault", [
    # FSDP over dp=2: rank 1 poisons its shard of one dense weight (1 gradient)
    ("dp2", [], 1, "action=nan_grad:param=layers.1.attention.wq.weight"),
    # ep=2 (edp=1): rank 1 poisons its own experts only (experts 2-3; 2 layers x 3 weights)
    ("ep2", ["parallel.ep=2"], 1, "action=nan_grad:param=*.experts.*"),
    # pp=2: the first stage (rank 0; the loss lives on the last) overflows to +inf
    ("pp2", ["parallel.pp=2"], 0, "action=inf_grad:param=layers.0.*"),
])
def test_one_rank_nonfinite_skips_everywhere(reference, tmp_path, data_cache, name, extra,
                                             bad_rank, fault):
    run_dir = tmp_path / name
    overrides = BASE + extra + [f"run.dir={run_dir}", f"data.cache_dir={data_cache}"]
    ranks = run_distributed(_train_rank, 2, overrides,
                            f"mid_step:step={BAD}:rank={bad_rank}:{fault}", timeout_s=120)
    n_poisoned = {"dp2": 1, "ep2": 6, "pp2": 10}[name]
    assert [got["poisoned"] for got in ranks] == [
        [n_poisoned] if r == bad_rank else [] for r in range(2)]  # one rank, once

    ref = reference["skip"]
    # Every rank took the same decision on the same host values.
    want = [float(s == BAD) for s in range(1, STEPS + 1)]
    for r, got in enumerate(ranks):
        assert [s for s, *_ in got["seen"]] == list(range(1, STEPS + 1)), r
        assert [skipped for _, skipped, *_ in got["seen"]] == want, f"rank {r}"
    values = [[(loss, gn) for _, _, loss, gn in got["seen"]] for got in ranks]
    assert repr(values[1]) == repr(values[0])  # bit-identical, nan and inf included

    _assert_same_rows(ref["rows"], ranks[0]["rows"])
    _assert_same_weights(ref["weights"], _final_weights(run_dir))
