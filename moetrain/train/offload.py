"""ZeRO-Offload's optimizer (``optim.offload=cpu``): the fp32 master weights and the Adam
moments live in CPU memory, and DeepSpeed's SIMD C++ Adam (``DeepSpeedCPUAdam``) steps
them. Ren et al., 2021, "ZeRO-Offload: Democratizing Billion-Scale Model Training".

Where the parameters are (the local shard of each one; a DTensor's local tensor):

- in CPU memory as contiguous fp32 (a CPU run; FSDP2 with ``CPUOffloadPolicy``, which
  keeps the sharded parameters and their gradients on the host): the C++ op updates the
  parameter in place, it *is* the master weight;
- elsewhere (device-resident parameters, or low-precision ones): a CPU fp32 master copy
  per parameter is stepped, then copied into the parameter. The copies are rebuilt from
  the parameters after a checkpoint load, so they are never saved.

The math is moetrain's AdamW (``optim.build_optimizer``): decoupled weight decay
(``p -= lr * wd * p``), bias-corrected moments, ``eps`` added to ``sqrt(v_hat)``, the same
two parameter groups, the LR set on the groups before each step (``optim.set_lr``). The
C++ op evaluates it in float32 with fused multiply-adds (torch's foreach AdamW computes
the bias corrections in double and rounds in another order), so the two agree to the
last bits of a step, not bit for bit.

The optimizer state has torch AdamW's form: per parameter ``step`` (a float32 scalar
tensor) and ``exp_avg``/``exp_avg_sq`` shaped and placed like the parameter (a DTensor for
a DTensor parameter), and its param groups carry AdamW's options, so
``get_state_dict``/``set_state_dict`` and DCP save and reshard it as they do AdamW's, and a
checkpoint resumes with either ``optim.offload`` setting.

First use JIT-compiles DeepSpeed's ``cpu_adam`` op (C++ with -O3 and the host's SIMD
flags; about a minute on two idle cores, 88 s of CPU time); torch caches the build in
``$TORCH_EXTENSIONS_DIR/cpu_adam`` (by default
``~/.cache/torch_extensions/py<ver>_<cpu|cuXYZ>/cpu_adam``), where later runs load it in
about a second. Concurrent processes serialise on the ``lock`` file of that directory
(torch's ``FileBaton``): one compiles, the others wait for it and then load the result.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

_INSTALL_FIX = ("pip install 'moetrain[deepspeed]' (or pip install deepspeed), or set "
                "optim.offload=none")

try:
    import cpuinfo  # py-cpuinfo, a dependency of deepspeed
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from deepspeed.ops.op_builder import CPUAdamBuilder
except ImportError as e:  # the optional extra is missing
    raise ImportError(
        f"optim.offload=cpu steps the optimizer with DeepSpeed's CPU Adam, but deepspeed "
        f"cannot be imported ({e}): {_INSTALL_FIX}") from e

log = logging.getLogger(__name__)

# torch.optim.AdamW's param-group options other than lr, betas, eps, weight_decay and
# amsgrad, at the values that describe DeepSpeed's AdamW mode.
ADAMW_GROUP_OPTIONS = {"foreach": None, "maximize": False, "capturable": False,
                       "differentiable": False, "fused": None, "decoupled_weight_decay": True}

# A build lock older than this is left over from a killed build: waiting on it would hang.
STALE_LOCK_S = 15 * 60


_probe_cpu_once = functools.cache(cpuinfo.get_cpu_info)


@contextlib.contextmanager
def _cpu_info_once():
    """py-cpuinfo probes the CPU in a subprocess (about a second); DeepSpeed asks it three
    times per optimizer (SIMD flags, SIMD width, CPU vendor). Answer from one probe."""
    original = cpuinfo.get_cpu_info
    cpuinfo.get_cpu_info = _probe_cpu_once
    try:
        yield
    finally:
        cpuinfo.get_cpu_info = original


def cpu_adam_build_dir() -> Path | None:
    """Where torch's JIT extension loader builds and caches DeepSpeed's ``cpu_adam`` op
    (None if this torch no longer has the private helper that says so)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory
    except ImportError:
        return None
    return Path(_get_build_directory(CPUAdamBuilder.NAME, verbose=False))


def load_cpu_adam_op():
    """DeepSpeed's ``cpu_adam`` C++ op, built on first use (logged: it takes a while).

    Raises RuntimeError naming the fix when the build fails (a C++ compiler and ninja
    are needed) or when a stale build lock from a killed build would make it wait forever.
    """
    builder = CPUAdamBuilder()
    if CPUAdamBuilder.NAME in builder._loaded_ops:  # built or loaded by this process
        return builder._loaded_ops[CPUAdamBuilder.NAME]
    from deepspeed.git_version_info import installed_ops

    building = False
    build_dir = cpu_adam_build_dir()
    if build_dir is not None and not installed_ops.get(CPUAdamBuilder.NAME, False):
        lock = build_dir / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            raise RuntimeError(
                f"optim.offload=cpu: the build lock {lock} is older than {STALE_LOCK_S // 60} "
                f"minutes, left by a build that was killed; no build is running: delete it "
                f"(rm {lock}) and start again")
        building = not any(build_dir.glob(f"{CPUAdamBuilder.NAME}*.so"))
        if building:
            log.info(
                "optim.offload=cpu: DeepSpeed's cpu_adam C++ op is not built on this machine "
                "yet: compiling it (about a minute: -O3 SIMD C++ against the torch headers), "
                "or waiting while another process holds %s; cached in %s for later runs "
                "(TORCH_EXTENSIONS_DIR moves it)", lock, build_dir)
    start = time.perf_counter()
    try:
        with _cpu_info_once():
            op = builder.load(verbose=False)
    except Exception as e:
        raise RuntimeError(
            f"optim.offload=cpu: DeepSpeed's cpu_adam C++ op failed to build or load ({e!r}). "
            f"It needs a C++17 compiler (g++ or clang++; set CXX to choose one) and ninja "
            f"(pip install ninja). To see the compiler output, run: python -c \"from "
            f"deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load("
            f"verbose=True)\". Or set optim.offload=none") from e
    if building:
        log.info("optim.offload=cpu: cpu_adam op ready after %.1f s",
                 time.perf_counter() - start)
    return op


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (shares storage with ``t``)."""
    return t.to_local() if isinstance(t, DTensor) else t


def _like_param(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` (this rank's piece) wrapped with ``p``'s mesh and placements."""
    if isinstance(p, DTensor):
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())
    return local


def _in_place(local: torch.Tensor) -> bool:
    """Whether the C++ op can update this tensor directly (it reads raw fp32 CPU memory)."""
    return local.device.type == "cpu" and local.dtype == torch.float32 and local.is_contiguous()


class CPUOffloadAdamW(DeepSpeedCPUAdam):
    """AdamW stepped on the CPU by DeepSpeed's C++ Adam (see the module docstring).

    ``param_groups`` hold the model's own parameters (DTensors included), so the
    checkpoint keys optimizer state by parameter FQN as for torch AdamW.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float):
        load_cpu_adam_op()  # build (logged) or load before DeepSpeedCPUAdam asks for it
        # adamw_mode: decoupled weight decay; each group brings its own weight_decay.
        with _cpu_info_once():
            super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0,
                             bias_correction=True, adamw_mode=True, fp32_optimizer_states=True)
        # torch AdamW's group options, describing what this optimizer does, so that the
        # checkpoint's param_groups have the same keys either way: a run may switch
        # optim.offload at a resume. Bias correction is always on (not a group option).
        for group in self.param_groups:
            group.pop("bias_correction")
            for key, value in ADAMW_GROUP_OPTIONS.items():
                group.setdefault(key, value)
        self._masters: dict[torch.Tensor, torch.Tensor] = {}

    def _master(self, p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """The CPU fp32 tensor the op updates: the local shard itself, or its master copy."""
        if _in_place(local):
            return local
        master = self._masters.get(p)
        if master is None:
            master = local.detach().to("cpu", torch.float32, copy=True).contiguous()
            self._masters[p] = master
        return master

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                local = _local(p)
                master = self._master(p, local)
                grad = _local(p.grad).to("cpu", torch.float32).contiguous()
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = _like_param(p, torch.zeros_like(master))
                    state["exp_avg_sq"] = _like_param(p, torch.zeros_like(master))
                state["step"] += 1
                exp_avg, exp_avg_sq = self._moments(p, state)
                self.ds_opt_adam.adam_update(
                    self.opt_id, int(state["step"]), float(group["lr"]), beta1, beta2,
                    group["eps"], group["weight_decay"], True, master, grad, exp_avg,
                    exp_avg_sq)
                if master is not local:
                    local.copy_(master, non_blocking=True)
        return loss

    @staticmethod
    def _moments(p: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The local exp_avg and exp_avg_sq as contiguous fp32 CPU tensors. State set from
        outside (torch's loader moves it to the parameter's device) is moved back once."""
        out = []
        for key in ("exp_avg", "exp_avg_sq"):
            local = _local(state[key])
            if not _in_place(local):
                local = local.to("cpu", torch.float32).contiguous()
                state[key] = _like_param(p, local)
            out.append(local)
        return out[0], out[1]

    def load_state_dict(self, state_dict) -> None:
        """Load, keeping the moments fp32 in host memory, and rebuild the master copies from
        the freshly loaded parameters on the next step.

        torch's loader casts optimizer state to each parameter's dtype and device: the
        moments would land in GPU memory (and be rounded to bf16 next to bf16 parameters)
        at a resume, exactly where offloading keeps them out. So they bypass it."""
        moments: dict[Any, dict[str, torch.Tensor]] = {}
        state = {}
        for pid, st in state_dict["state"].items():
            moments[pid] = {k: v for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")}
            state[pid] = {k: v for k, v in st.items() if k not in moments[pid]}
        super().load_state_dict({**state_dict, "state": state})
        ids = (pid for g in state_dict["param_groups"] for pid in g["params"])
        params = (p for g in self.param_groups for p in g["params"])
        by_id = dict(zip(ids, params))
        self._masters.clear()
        for pid, ms in moments.items():
            p = by_id[pid]
            for key, value in ms.items():
                self.state[p][key] = value.to(dtype=torch.float32)
            if ms:
                self._moments(p, self.state[p])

