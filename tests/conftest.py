"""Shared fixtures. Configs are composed from the real conf/ tree, as users get them."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


# A model and run small enough for a CPU test to train several steps in seconds.
TINY = [
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.ffn_hidden=64",
    "model.num_experts=4",
    "model.top_k=2",
    "model.expert_hidden=32",
    "model.max_seq_len=64",
    "train.seq_len=32",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.steps=6",
    "train.progress=false",
    "optim.warmup_steps=2",
    "eval.every=3",
    "eval.batches=2",
    "checkpoint.every=0",
    "logging.tensorboard=false",
    "logging.heatmap_every=0",
    "data.default_corpus_mb=0.25",
]


def compose(overrides: list[str] | None = None, *, typed: bool = True):
    """Compose conf/train.yaml with overrides; return the typed Config (or DictConfig)."""
    from moetrain.config import compose_config

    return compose_config(overrides, typed=typed)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One default-corpus cache for the whole session (built once, then memmapped)."""
    return str(tmp_path_factory.mktemp("moetrain_cache"))


@pytest.fixture
def tiny_overrides(tmp_path, data_cache) -> list[str]:
    return TINY + [f"run.dir={tmp_path / 'run'}", f"data.cache_dir={data_cache}"]


def load_tool(name: str):
    """Import ``tools/<name>.py`` (a script, not a package module) as a module."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module while executing
    spec.loader.exec_module(mod)
    return mod
