"""``parallel.fsdp_grad_sync`` changes communication and memory, not math: under FSDP with
gradient accumulation, reduce-scattering after every micro-batch and once after the last
one both log the 1-process per-step losses and gradient norms within 1e-5 relative.

One multi-process launch per world size trains both modes in turn (the trainer on the
launch's gloo group). ``auto`` resolves by layout, and an explicit ``every_microbatch``
that the layout cannot honour fails validation by name. The memory each mode holds is
checked against the estimator in tests/unit/parallel/test_memory_estimate.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.distributed._runs import assert_same_trajectory, step_rows, train

# One sequence per micro-batch: dp=2 accumulates 4 micro-batches per rank, dp=4 two.
BASE = [o for o in TINY if not o.startswith(("model.num_experts", "train.steps",
                                             "train.micro_batch_size"))] + [
    "model.num_experts=8", "train.micro_batch_size=1", "train.steps=4", "eval.every=0",
]
MODES = ("every_microbatch", "last_microbatch")


def _train_modes(rank: int, world: int, runs: list[list[str]]) -> list[tuple]:
    """Train each override list in turn on this launch's process group; rank 0 returns
    (resolved grad sync, accumulation steps, metrics rows) per run."""
    import torch

    from moetrain.config import validate
    from moetrain.metrics import read_metrics
    from moetrain.train.trainer import Trainer
    from tests.conftest import compose

    out = []
    for overrides in runs:
        cfg = compose(overrides)
        trainer = Trainer(cfg, validate(cfg, world), torch.device("cpu"))
        trainer.fit()
        if rank == 0:
            rows = read_metrics(Path(cfg.run.dir) / "metrics.jsonl")
            out.append((trainer.pm.grad_sync.value, trainer.accum, rows))
    return out


def _overrides(tmp_path, cache, name, extra=()):
    return BASE + list(extra) + [f"run.dir={tmp_path / name}", f"data.cache_dir={cache}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    return train(_overrides(tmp_path_factory.mktemp("ref"), data_cache, "ref"))


@pytest.mark.parametrize("world,extra", [(2, []), (4, ["parallel.ep=2"])],
                         ids=["dp2_fsdp", "dp4_ep2_fsdp"])
def test_both_modes_match_single_process(reference, tmp_path, data_cache, world, extra):
    from moetrain.testing import run_distributed

    runs = [_overrides(tmp_path, data_cache, mode, extra + [f"parallel.fsdp_grad_sync={mode}"])
            for mode in MODES]
    results = run_distributed(_train_modes, world, runs, timeout_s=300)[0]
    for mode, (resolved, accum, rows) in zip(MODES, results):
        assert resolved == mode
        assert accum == 8 // world  # >= 2 micro-batches per rank
        assert len(step_rows(rows)) == 4
        assert_same_trajectory(reference, rows)


@pytest.mark.parametrize("extra,world,want", [
    ([], 2, "every_microbatch"),  # FSDP: sharded gradients under accumulation
    (["parallel.pp=2"], 4, "last_microbatch"),  # the pipeline schedule syncs once
    (["parallel.dp_mode=replicate"], 2, "last_microbatch"),  # one all-reduce per step
    ([], 1, "last_microbatch"),  # nothing to sync
])
def test_auto_resolves_by_layout(extra, world, want):
    from moetrain.config import validate
    from moetrain.parallel.fsdp import grad_sync_mode
    from tests.conftest import compose

    cfg = compose(BASE + extra)
    assert cfg.parallel.fsdp_grad_sync.value == "auto"
    layout = validate(cfg, world)
    assert grad_sync_mode(cfg.parallel, layout.dp, layout.pp).value == want


@pytest.mark.parametrize("extra,world,field", [
    (["parallel.pp=2"], 4, "parallel.pp=2"),
    (["parallel.dp_mode=replicate"], 2, "parallel.dp_mode=replicate"),
])
def test_every_microbatch_rejected_where_it_cannot_apply(extra, world, field):
    from moetrain.config import ConfigError, validate
    from tests.conftest import compose

    cfg = compose(BASE + extra + ["parallel.fsdp_grad_sync=every_microbatch"])
    with pytest.raises(ConfigError, match=f"fsdp_grad_sync=every_microbatch with {field}.*"
                                          f"set parallel.fsdp_grad_sync=auto"):
        validate(cfg, world)
    # last_microbatch is what these layouts do: accepted.
    validate(compose(BASE + extra + ["parallel.fsdp_grad_sync=last_microbatch"]), world)
