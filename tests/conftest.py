"""Shared fixtures. Configs are composed from the real conf/ tree, as users get them."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
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


# ----------------------------------------------------------------------------- oracles
# Packages of the dev extra that tests use as independent references or test tools. CI
# installs them, so under CI=true a test that needs one fails on its import error, never
# skips: a silently skipped parity test is a parity test that did not run. Locally they may
# be missing: the test skips, naming the install.
ORACLES = {  # import name -> distribution
    "megatron.core": "megatron-core",
    "transformers": "transformers",
    "deepspeed": "deepspeed",
    "triton": "triton",
    "tokenizers": "tokenizers",
    "matplotlib": "matplotlib",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _skip_reason(module: str, err: BaseException) -> str:
    dist = next((d for m, d in ORACLES.items() if module == m or module.startswith(m + ".")),
                module)
    return (f"{dist} is not importable ({type(err).__name__}: {err}); "
            f"pip install -e '.[dev]'")


def oracle(module: str, *, module_level: bool = False):
    """Import and return an oracle ``module``; skip without it, but fail under CI=true.

    ``module_level=True`` for a call at a test module's top (pytest's
    ``allow_module_level``)."""
    try:
        return importlib.import_module(module)
    except Exception as err:  # an oracle that fails to import is missing
        if in_ci():
            raise ImportError(f"CI=true: the oracle {module!r} failed to import; CI installs "
                              f"it with the dev extra, so this is a failure, not a skip: "
                              f"{type(err).__name__}: {err}") from err
        pytest.skip(_skip_reason(module, err), allow_module_level=module_level)


@functools.cache
def _import_error(module: str) -> BaseException | None:
    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - any failure means: not importable here
        return err
    return None


def needs(module: str) -> pytest.MarkDecorator:
    """A skipif mark for tests that need ``module``; never skips under CI=true (the test then
    fails on the import itself)."""
    err = None if in_ci() else _import_error(module)
    return pytest.mark.skipif(err is not None,
                              reason=_skip_reason(module, err) if err is not None else "")


def oracle_versions() -> str:
    """One line: each oracle's installed version, from package metadata (imports nothing)."""
    parts = []
    for dist in dict.fromkeys(ORACLES.values()):
        try:
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist} MISSING")
    mode = "CI=true: a missing oracle fails" if in_ci() else "local: a missing oracle skips"
    return f"oracles: torch {torch.__version__}, " + ", ".join(parts) + f" ({mode})"


def pytest_sessionstart(session) -> None:
    """Print the oracle versions first, also under -q (where report headers are hidden)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(oracle_versions())
