"""Training runs for the multi-process tests: the real entry point, in-process per rank."""

from __future__ import annotations

from pathlib import Path

from moetrain.metrics import read_metrics
from moetrain.testing import run_distributed
from tests.conftest import compose


def _train_rank(rank: int, world: int, overrides: list[str]) -> list[dict] | None:
    from moetrain.train.main import run

    run(compose(overrides))
    if rank != 0:
        return None
    run_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("run.dir="))
    return read_metrics(Path(run_dir) / "metrics.jsonl")


def train(overrides: list[str], world: int = 1) -> list[dict]:
    """Run training with ``world`` processes (gloo); return rank 0's metrics.jsonl rows."""
    if world == 1:
        return _train_rank(0, 1, overrides)
    return run_distributed(_train_rank, world, overrides, timeout_s=300)[0]


class Runs:
    """Lazily trained runs, cached for a test module: ``get(name, overrides, world)``
    trains once under ``root/name`` (sharing the tokenised data under ``cache``)."""

    def __init__(self, root: Path, cache: str) -> None:
        self.root, self.cache, self.rows = root, cache, {}

    def dir(self, name: str) -> Path:
        return self.root / name

    def get(self, name: str, overrides: list[str], world: int = 1) -> list[dict]:
        if name not in self.rows:
            self.rows[name] = train(overrides + [f"run.dir={self.dir(name)}",
                                                 f"data.cache_dir={self.cache}"], world=world)
        return self.rows[name]

    def ckpt(self, name: str, step: int) -> Path:
        return self.dir(name) / "checkpoints" / f"step_{step:07d}"


def step_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "loss" in r]


def assert_same_trajectory(ref: list[dict], got: list[dict], rtol: float = 1e-5,
                           keys=("loss", "grad_norm", "aux_loss")) -> None:
    ref, got = step_rows(ref), step_rows(got)
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got):
        for k in keys:
            assert abs(a[k] - b[k]) <= rtol * abs(a[k]), (
                f"step {a['step']} {k}: 1-process {a[k]!r} vs layout {b[k]!r}"
            )
