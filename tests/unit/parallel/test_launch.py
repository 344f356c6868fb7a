"""launch/ scripts and the SLURM launcher config.

The scripts run for real with the launcher replaced by a stub that records its argv; the
argv is then parsed by torchrun's own argument parser, so a misspelt flag fails here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

ROOT = Path(__file__).resolve().parents[3]
LAUNCH = ROOT / "launch"
SCRIPTS = ["torchrun.sh", "slurm.sbatch", "elastic.sh"]
OVERRIDES = ["parallel.ep=2", "train.steps=10", "run.dir=/tmp/a b"]  # one with a space
_LAUNCH_ENV = ("NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID",
               "RDZV_BACKEND", "TORCHRUN", "CUDA_VISIBLE_DEVICES", "MIN_NODES", "MAX_NODES",
               "MAX_RESTARTS", "GPUS_PER_NODE")


def _stub(dir_: Path, name: str, body: str) -> Path:
    path = dir_ / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def recorder(tmp_path) -> tuple[Path, Path]:
    """A fake launcher that writes its argv, NUL-separated, to a file."""
    out = tmp_path / "argv"
    return _stub(tmp_path, "fake-launcher", f"printf '%s\\0' \"$@\" > {out}"), out


def _run(script: str, args: list[str], env: dict[str, str], path_dir: Path | None = None):
    base = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV and
            not k.startswith("SLURM_")}
    if path_dir is not None:  # stubs first; no nvidia-smi is found in an empty stub dir
        base["PATH"] = f"{path_dir}:/usr/bin:/bin"
    return subprocess.run(["bash", str(LAUNCH / script), *args], env={**base, **env},
                          capture_output=True, text=True, timeout=30, check=False)


def _argv(out: Path) -> list[str]:
    return out.read_text().split("\0")[:-1]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(LAUNCH / script)], check=False).returncode == 0


def test_torchrun_single_node(recorder, tmp_path):
    launcher, out = recorder
    r = _run("torchrun.sh", OVERRIDES, {"TORCHRUN": str(launcher), "NPROC": "3"}, tmp_path)
    assert r.returncode == 0, r.stderr
    a = get_args_parser().parse_args(_argv(out))
    assert (a.nnodes, a.nproc_per_node, a.standalone) == ("1", "3", True)
    assert (a.module, a.training_script, a.training_script_args) == (
        True, "moetrain.train", OVERRIDES)


def test_torchrun_nproc_defaults_to_visible_gpus(recorder, tmp_path):
    launcher, out = recorder
    env = {"TORCHRUN": str(launcher), "CUDA_VISIBLE_DEVICES": "0,1,5"}
    assert _run("torchrun.sh", [], env, tmp_path).returncode == 0
    assert get_args_parser().parse_args(_argv(out)).nproc_per_node == "3"
    assert _run("torchrun.sh", [], {"TORCHRUN": str(launcher)}, tmp_path).returncode == 0
    assert get_args_parser().parse_args(_argv(out)).nproc_per_node == "1"  # no GPU


def test_torchrun_multi_node_rendezvous(recorder, tmp_path):
    launcher, out = recorder
    env = {"TORCHRUN": str(launcher), "NPROC": "8", "NNODES": "2", "MASTER_ADDR": "10.1.2.3",
           "MASTER_PORT": "29611", "RDZV_ID": "job42"}
    r = _run("torchrun.sh", OVERRIDES, env, tmp_path)
    assert r.returncode == 0, r.stderr
    a = get_args_parser().parse_args(_argv(out))
    assert (a.nnodes, a.nproc_per_node, a.standalone) == ("2", "8", False)
    assert (a.rdzv_backend, a.rdzv_endpoint, a.rdzv_id) == ("c10d", "10.1.2.3:29611", "job42")
    assert a.training_script_args == OVERRIDES


def test_torchrun_multi_node_needs_master_addr(recorder, tmp_path):
    launcher, out = recorder
    r = _run("torchrun.sh", [], {"TORCHRUN": str(launcher), "NNODES": "2"}, tmp_path)
    assert r.returncode == 2 and "needs MASTER_ADDR" in r.stderr
    assert not out.exists()


def test_slurm_sbatch(tmp_path):
    out = tmp_path / "argv"
    _stub(tmp_path, "srun", f"printf '%s\\0' \"$@\" > {out}")
    _stub(tmp_path, "scontrol", '[[ "$*" == "show hostnames gpu[07-08]" ]] && '
                                'printf "gpu07\\ngpu08\\n"')
    env = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "9157",
           "SLURM_GPUS_PER_NODE": "h100:4"}
    r = _run("slurm.sbatch", OVERRIDES, env, tmp_path)
    assert r.returncode == 0, r.stderr
    argv = _argv(out)
    # srun --kill-on-bad-exit=1 bash -c 'trap "" TERM USR1 USR2; exec "$@"' NAME torchrun ...:
    # the agents ignore the stop signals SLURM sends every process of the step.
    assert argv[:3] == ["--kill-on-bad-exit=1", "bash", "-c"]
    assert argv[3].startswith('trap "" TERM USR1 USR2;') and argv[5] == "torchrun"
    a = get_args_parser().parse_args(argv[6:])
    assert a.signals_to_handle == "SIGINT,SIGHUP,SIGQUIT"
    assert (a.nnodes, a.nproc_per_node) == ("2", "4")
    # MASTER_PORT defaults to 29500 + SLURM_JOB_ID % 1000: a port of its own per job.
    assert (a.rdzv_backend, a.rdzv_endpoint, a.rdzv_id) == ("c10d", "gpu07:29657", "9157")
    assert (a.module, a.training_script, a.training_script_args) == (
        True, "moetrain.train", OVERRIDES)
    header = [ln for ln in (LAUNCH / "slurm.sbatch").read_text().splitlines()
              if ln.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1" in header  # one torchrun per node


def test_elastic(recorder, tmp_path):
    launcher, out = recorder
    env = {"TORCHRUN": str(launcher), "MIN_NODES": "2", "MAX_NODES": "4", "NPROC": "8",
           "MASTER_ADDR": "head", "MAX_RESTARTS": "5"}
    r = _run("elastic.sh", ["checkpoint.resume=none"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    a = get_args_parser().parse_args(_argv(out))
    assert (a.nnodes, a.nproc_per_node, a.max_restarts) == ("2:4", "8", 5)
    assert (a.rdzv_backend, a.rdzv_endpoint) == ("c10d", "head:29500")
    # The script's resume=auto comes first, so the user's override wins in Hydra.
    assert a.training_script_args == ["checkpoint.resume=auto", "checkpoint.resume=none"]
    assert _compose(a.training_script_args).checkpoint.resume == "none"


# ------------------------------------------------------------------- hydra/launcher
def _has_submitit_plugin() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:
        return False


# With the plugin installed Hydra validates the file against the plugin's schema of the
# same name and warns that this matching is deprecated; the file also works without it.
_SCHEMA_WARNING = "ignore:(?s).*validated against ConfigStore schema:UserWarning"


def _compose(overrides: list[str], hydra_config: bool = False):
    from hydra import compose, initialize_config_dir

    from moetrain.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra_config)


@pytest.mark.filterwarnings(_SCHEMA_WARNING)
def test_submitit_launcher_is_opt_in():
    default = _compose([], hydra_config=True).hydra.launcher
    assert default._target_.endswith("BasicLauncher")
    cfg = _compose(["hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2",
                    "hydra.launcher.partition=gpu"], hydra_config=True).hydra.launcher
    assert cfg._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (cfg.nodes, cfg.partition, cfg.tasks_per_node, cfg.gpus_per_node) == (2, "gpu", 1, 1)


@pytest.mark.filterwarnings(_SCHEMA_WARNING)
@pytest.mark.skipif(not _has_submitit_plugin(),
                    reason="hydra-submitit-launcher is not installed (pip install moetrain[slurm])")
def test_submitit_launcher_fields_match_the_plugin_schema():
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    cfg = _compose(["hydra/launcher=submitit_slurm"], hydra_config=True).hydra.launcher
    assert set(cfg.keys()) == {f.name for f in dataclasses.fields(SlurmQueueConf)}
