"""Everything that needs a GPU, in one command, with a README-ready summary.

On a GPU machine with no package index, from the repository root, with the wheels of
``tools/gpu_wheels.sh`` carried in ``.whl/`` (one line; $OUT is where results are collected):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*-none-any.whl && export PYTHONPATH=/tmp/site:/tmp/mc:$PWD || exit; python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/mc .whl/megatron_core-*.whl || echo 'no megatron-core wheel for this python'; ln -sfn ../kernels moetrain/kernels; ln -sfn ../conf moetrain/conf; export PYTHONUNBUFFERED=1; python3 tools/gpu_report.py --budget-s 480 --out tools/results 2>&1 | tee $OUT/report.log; rc=${PIPESTATUS[0]}; cp tools/results/*.json tools/results/summary.md $OUT/; tar czf $OUT/logs.tgz -C tools/results logs; exit $rc

(The pure-Python wheels must install; megatron-core's wheel is built for one Python
version, and without it that peer is reported as skipped. The two links stand in for the
install's package-dir mapping of ``moetrain.kernels`` and ``moetrain.conf``, so the checkout
runs as it is, without setuptools. Run it with ``.whl`` carried and a limit of about 560 s.)

Steps, each in its own process, time-boxed, with its log in ``<out>/logs``; a step that
fails or runs out of time is reported and the others run:

1. ``pytest_gpu``: ``pytest tests/gpu`` and the CUDA test of
   ``tests/unit/models/test_no_host_sync.py`` (``NO_SYNC_CUDA_TEST``), every GPU path
   against its torch reference on the device: the kernels, fused SwiGLU and grouped_mm;
   the capacity path under ``torch.compile(fullgraph=True)`` with inductor (static shapes,
   no host read, CUDA's sync debug mode) and eager; HMoE's ragged grouped_mm, MoE++ with
   the Triton dispatcher, CompeteSMoE's dense step in bf16, Mamba's chunked scan, RMoE's
   router under autocast (``tests/gpu/test_designs_gpu.py``). Beside it
   ``check_kernels``: every Triton kernel compiled ahead of time for this GPU's
   architecture; and ``offload_check``: ``optim.offload=cpu`` (DeepSpeed's CPU Adam) for a
   few steps of an MoE layer on the device, against torch's AdamW on the same gradients,
   or "skipped: <why>" when deepspeed or its ``cpu_adam`` op is not available there (the
   report does not fail on that) (the three run at the same time);
2. ``bench_moe_layer``: the three shapes, moetrain (auto, torch and Triton paths) beside the
   dense limit, the naive loop and the peers (transformers, torchtitan, megatron-core);
3. ``kernel_choice``: each Triton op against its torch twin at the three shapes, forward +
   backward; the faster per op (what a measured ``moe.kernel_backend=auto`` would pick);
4. ``train_eager``, ``train_compile``, ``train_compile_ac``: tokens/s and MFU of
   ``bench_1b`` (``tools/bench_train.py``), eager, compiled, and compiled with selective
   activation checkpointing;
5. ``bf16_check``: ``small`` trained 300 steps in fp32 and in bf16, same seed and data;
   the gap between the loss curves against its tolerance (``tools/bf16_check.py``).

It writes ``<out>/<name>.json`` (every figure, the device, the versions; ``<name>`` is
``h200`` on an H200) and ``<out>/summary.md`` (the README's tables).

    python tools/gpu_report.py                           # full iterations, about 15 min
    python tools/gpu_report.py --budget-s 480            # trimmed: within 8 min on an H200
    python tools/gpu_report.py --cpu-smoke --out /tmp/r  # the whole report, tiny, on CPU
    python tools/gpu_report.py --dry-run --budget-s 480  # the commands only
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ("mixtral_like", "fine_grained", "qwen3_like")
# The budget mode's time boxes, for a budget of BUDGET_REF_S; scaled with --budget-s.
BUDGET_REF_S = 480.0
# The capacity path's eager CUDA check (sync debug mode), which lives with its CPU twins.
NO_SYNC_CUDA_TEST = ("tests/unit/models/test_no_host_sync.py::"
                     "test_capacity_layer_never_synchronises_on_cuda")
PEERS = ("torch", "triton", "transformers", "torchtitan", "megatron-core", "hydra-core",
         "numpy")


@dataclass
class Step:
    name: str
    cmd: list[str]
    timeout_s: float
    with_next: bool = False  # runs at the same time as the step after it
    env: dict[str, str] = field(default_factory=dict)


def plan(out: Path, arch: int, mode: str, budget_s: float | None) -> list[Step]:
    """The steps of one report. ``mode``: ``full``, ``budget`` or ``cpu-smoke``."""
    py = sys.executable
    logs = out / "logs"
    k = (budget_s or BUDGET_REF_S) / BUDGET_REF_S
    smoke = mode == "cpu-smoke"
    tiny: list[str] = []  # Hydra overrides of the smoke run's tiny model
    layer = [py, "tools/bench_moe_layer.py", "--json", str(logs / "bench_moe_layer.json")]
    for s in SHAPES:
        layer += ["--shape", s]
    choice = [py, "tools/gpu_report.py", "--measure-kernels", str(logs / "kernel_choice.json")]
    train = [py, "tools/bench_train.py"]
    bf16 = [py, "tools/bf16_check.py", "--json", str(logs / "bf16_check.json")]
    offload = [py, "tools/gpu_report.py", "--check-offload", str(logs / "offload_check.json")]
    if mode == "full":
        boxes = {"pytest": 900, "check": 900, "layer": 1800, "choice": 600, "train": 900,
                 "bf16": 1200, "offload": 600}
    elif mode == "budget":
        layer += ["--warmup", "2", "--iters", "5"]
        choice += ["--warmup", "3", "--iters", "10"]
        train += ["--warmup", "3", "--steps", "4"]
        # pytest: the inductor compiles of the capacity path (two graphs, forward and
        # backward) and the Triton kernels' first compiles
        ref = {"pytest": 120, "check": 75, "layer": 150, "choice": 45, "train": 150,
               "bf16": 120, "offload": 60}
        boxes = {n: v * k for n, v in ref.items()}
    else:  # cpu-smoke: the same steps on CPU, with tiny sizes
        data = ["data.default_corpus_mb=0.25"]
        if os.environ.get("MOETRAIN_DATA_CACHE"):
            data.append(f"data.cache_dir={os.environ['MOETRAIN_DATA_CACHE']}")
        tiny = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.num_experts=4",
                "model.expert_hidden=32", "model.max_seq_len=64", *data]
        layer += ["--device", "cpu", "--scale", "64", "--warmup", "0", "--iters", "1"]
        choice += ["--device", "cpu", "--scale", "64", "--warmup", "0", "--iters", "1"]
        train += ["--device", "cpu", "--model", "tiny", "--seq-len", "32", "--micro-batch", "2",
                  "--global-batch", "2", "--warmup", "0", "--steps", "1", "--peak-tflops", "1"]
        bf16 += ["--device", "cpu", "--model", "tiny", "--steps", "4", "--window", "2",
                 "--seq-len", "32", "--micro-batch", "2", "--global-batch", "2"]
        offload += ["--device", "cpu"]
        boxes = {"pytest": 120, "check": 300, "layer": 120, "choice": 60, "train": 300,
                 "bf16": 120, "offload": 120}
    tail = ["--", *tiny] if smoke else []
    train_steps = [
        Step("train_eager", train + ["--json", str(logs / "train_eager.json"), *tail],
             boxes["train"] * (0.4 if mode == "budget" else 1)),
        Step("train_compile", train + ["--compile", "--json", str(logs / "train_compile.json"),
                                       *tail], boxes["train"]),
        Step("train_compile_ac", train + ["--compile", "--ac", "selective", "--json",
                                          str(logs / "train_compile_ac.json"), *tail],
             boxes["train"]),
    ]
    return [
        Step("pytest_gpu", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "tests/gpu", NO_SYNC_CUDA_TEST], boxes["pytest"], with_next=True),
        Step("check_kernels", [py, "tools/check_kernels.py", "--arch", str(arch)],
             boxes["check"], with_next=True),
        Step("offload_check", offload, boxes["offload"]),
        Step("bench_moe_layer", layer, boxes["layer"]),
        train_steps[1],
        train_steps[0],
        Step("kernel_choice", choice, boxes["choice"]),
        Step("bf16_check", bf16 + tail, boxes["bf16"]),
        train_steps[2],
    ]


# ----------------------------------------------------------------------------- running
def run_step(name: str, cmd: list[str], logs: Path, timeout_s: float,
             env: dict[str, str] | None = None) -> dict:
    """Run one step, its output teed to ``logs/<name>.log``, killed (with its process group)
    after ``timeout_s``; never raises."""
    logs.mkdir(parents=True, exist_ok=True)
    print(f"== {name} (at most {timeout_s:.0f}s): {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    rc: int | str
    with (logs / f"{name}.log").open("w") as f:
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace",
                                    start_new_session=True, env={**os.environ, **(env or {})})
        except OSError as e:
            f.write(f"{e}\n")
            rc = 127
        else:
            def pump() -> None:
                assert proc.stdout is not None
                for line in proc.stdout:
                    sys.stdout.write(f"[{name}] {line}")
                    f.write(line)

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            try:
                rc = proc.wait(timeout=max(1.0, timeout_s))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the step and what it started
                proc.wait()
                rc = "timeout"
            reader.join(timeout=10)
    seconds = round(time.perf_counter() - t0, 1)
    status = "ok" if rc == 0 else (f"timed out after {timeout_s:.0f}s" if rc == "timeout"
                                   else f"exit {rc}")
    print(f"== {name}: {status} in {seconds:.0f}s", flush=True)
    return {"step": name, "command": shlex.join(cmd), "status": status, "seconds": seconds,
            "timeout_s": round(timeout_s)}


def run_all(todo: list[Step], logs: Path, deadline: float | None) -> list[dict]:
    """Run the steps in order (a ``with_next`` step at the same time as the one after it);
    under a deadline, each step's time box is cut to what is left, and a step that cannot
    start is reported as skipped."""
    ran: list[dict] = []
    i = 0
    while i < len(todo):
        group = [todo[i]]
        while group[-1].with_next and i + len(group) < len(todo):
            group.append(todo[i + len(group)])
        i += len(group)
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left < 10:
            ran += [{"step": s.name, "command": shlex.join(s.cmd), "seconds": 0.0,
                     "status": "skipped: the time budget was spent", "timeout_s": 0}
                    for s in group]
            continue
        results: dict[str, dict] = {}

        def go(s: Step, left: float | None = left, results: dict = results) -> None:
            box = s.timeout_s if left is None else min(s.timeout_s, left)
            results[s.name] = run_step(s.name, s.cmd, logs, box, s.env)

        threads = [threading.Thread(target=go, args=(s,)) for s in group]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ran += [results[s.name] for s in group]
    return ran


# ----------------------------------------------------------------------------- kernel choice
def _time_ms(fn, device, warmup: int, iters: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / max(1, iters)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / max(1, iters)


def _fwd_bwd(fn, inputs, grads):
    """A closure running ``fn`` forward and backward (cotangents ``grads`` for the floating
    outputs that need them)."""
    import torch

    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]

    def step():
        for t in leaves:
            t.grad = None
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])

    return step


def op_cases(s, device, dtype) -> dict[str, tuple]:
    """Op name -> (Triton op closure, torch closure) at shape ``s``, forward + backward.

    The torch side is the reference each op replaces on ``moe.kernel_backend=torch``
    (:mod:`moetrain.kernels.reference`; the layer's torch combine is the same gather and
    weighted sum)."""
    import torch
    from moetrain.kernels import ops
    from moetrain.kernels import reference as ref

    T, D, F, E, K = s.T, s.D, s.F, s.E, s.K
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(T, E, generator=g, device=device)
    ids, w, _ = ref.topk_router_ref(logits, None, K, False, True)
    meta = ref.routing_metadata_ref(ids, E, None)
    R = int(meta.row_index_R.numel())
    x = torch.randn(T, D, generator=g, device=device).to(dtype)
    y = torch.randn(R, D, generator=g, device=device).to(dtype)
    a = torch.randn(R, F, generator=g, device=device).to(dtype)
    b = torch.randn(R, F, generator=g, device=device).to(dtype)
    g_w, g_s = torch.randn(T, K, device=device), torch.randn(T, E, device=device)
    g_rows, g_tok = torch.randn(R, D, device=device).to(dtype), torch.randn(T, D, device=device)
    g_h = torch.randn(R, F, device=device).to(dtype)
    pos = meta.pos_TK
    return {
        "topk_router": (
            _fwd_bwd(lambda z: ops.topk_router(z, None, K, False, True), [logits],
                     [None, g_w, g_s]),
            _fwd_bwd(lambda z: ref.topk_router_ref(z, None, K, False, True), [logits],
                     [None, g_w, g_s])),
        "routing_metadata": (lambda: ops.routing_metadata(ids, E),
                             lambda: ref.routing_metadata_ref(ids, E, None)),
        "permute": (
            _fwd_bwd(lambda t: ops.permute(t, meta.row_index_R, pos, K), [x], [g_rows]),
            _fwd_bwd(lambda t: ref.permute_ref(t, meta.row_index_R, K), [x], [g_rows])),
        "unpermute_combine": (
            _fwd_bwd(lambda r, ww: ops.unpermute_combine(r, ww, pos, x.dtype), [y, w],
                     [g_tok.to(dtype)]),
            _fwd_bwd(lambda r, ww: ref.unpermute_combine_ref(r, ww, pos, x.dtype), [y, w],
                     [g_tok.to(dtype)])),
        "swiglu": (_fwd_bwd(ops.swiglu, [a, b], [g_h]),
                   _fwd_bwd(ref.swiglu_ref, [a, b], [g_h])),
    }


def measure_kernel_choice(shape_names: list[str], scale: int, device_name: str,
                          warmup: int, iters: int) -> dict:
    """Each Triton op against its torch twin at each shape; the faster one per op and shape,
    and per op overall (the smaller sum of times over the shapes)."""
    import torch

    sys.path.insert(0, str(ROOT / "tools"))
    import bench_moe_layer as bench

    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    triton_ok = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    shapes: dict[str, dict] = {}
    totals: dict[str, dict[str, float]] = {}
    for name in shape_names:
        s = bench.SHAPES[name].scaled(scale)
        rows = {}
        for op, (kernel, torch_fn) in op_cases(s, device, dtype).items():
            row = {"torch_ms": _time_ms(torch_fn, device, warmup, iters), "triton_ms": None}
            if triton_ok:
                try:
                    row["triton_ms"] = _time_ms(kernel, device, warmup, iters)
                except Exception as e:  # noqa: BLE001 - a kernel that fails is not chosen
                    row["note"] = f"{type(e).__name__}: {e}"[:300]
            else:
                row["note"] = "the Triton kernels need a CUDA device"
            row["choice"] = ("triton" if row["triton_ms"] is not None
                             and row["triton_ms"] < row["torch_ms"] else "torch")
            rows[op] = row
            for k in ("torch_ms", "triton_ms"):
                if row[k] is not None:
                    totals.setdefault(op, {}).setdefault(k, 0.0)
                    totals[op][k] += row[k]
        shapes[s.name] = {"T": s.T, "D": s.D, "F": s.F, "E": s.E, "K": s.K, "ops": rows}
    choice = {}
    for op, t in totals.items():
        whole = "triton_ms" in t and all(r["ops"][op]["triton_ms"] is not None
                                         for r in shapes.values())
        choice[op] = "triton" if whole and t["triton_ms"] < t["torch_ms"] else "torch"
    return {"device": device_name, "dtype": str(dtype)[6:], "warmup": warmup, "iters": iters,
            "shapes": shapes, "kernel_choice": choice}


# ----------------------------------------------------------------------------- offload
OFFLOAD_TOL = 1e-4  # the C++ op and torch's AdamW round differently (train/offload.py)


def check_offload(device_name: str, steps: int = 3) -> dict:
    """``optim.offload=cpu`` on ``device_name``: an MoE layer's parameters stepped by
    moetrain's ``CPUOffloadAdamW`` (DeepSpeed's C++ Adam on CPU master copies; on CUDA the
    gradients go to the host and the weights come back) against the AdamW of
    ``optim.offload=none`` (fused on CUDA), both on the same gradients, for ``steps``
    steps. ``status``: ``ok``, ``FAILED: ...`` when the updates differ by more than
    ``OFFLOAD_TOL`` (relative), or ``skipped: <why>`` when deepspeed cannot be imported or
    its ``cpu_adam`` op cannot be built or loaded here (it is JIT-compiled on first use:
    a C++ compiler and ninja; a prebuilt op would have to match this machine's torch,
    CUDA and Python builds, so none is carried)."""
    import copy

    import torch

    from moetrain.config.schema import ModelConfig, MoEConfig, OptimConfig, OptimOffload
    from moetrain.models.moe.layer import MoELayer
    from moetrain.train.optim import build_optimizer

    device = torch.device(device_name)
    r: dict = {"device": device_name, "steps": steps, "tolerance": OFFLOAD_TOL}
    try:
        from moetrain.train import offload
    except Exception as e:  # noqa: BLE001 - deepspeed's import fails in more ways than one
        return {**r, "status": f"skipped: deepspeed cannot be imported here ({e})"}
    t0 = time.perf_counter()
    try:
        offload.load_cpu_adam_op()
    except Exception as e:  # noqa: BLE001 - a missing compiler, ninja, headers, ...
        return {**r, "status": f"skipped: {e}"}
    r["op_load_s"] = round(time.perf_counter() - t0, 1)
    D, E, Fh, T = (512, 8, 1024, 2048) if device.type == "cuda" else (16, 4, 32, 16)
    torch.manual_seed(0)
    ref = MoELayer(D, ModelConfig(dim=D, n_heads=2, num_experts=E, top_k=2,
                                  expert_hidden=Fh), MoEConfig()).to(device)
    ref.init_weights(0.02, 0.02)
    off = copy.deepcopy(ref)
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    opts = {kind: build_optimizer(m, OptimConfig(lr=1e-3, offload=kind), device)
            for kind, m in ((OptimOffload.none, ref), (OptimOffload.cpu, off))}
    step_s: dict[str, list[float]] = {k.value: [] for k in opts}
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1)).to(device)
    for _ in range(steps):
        ref.zero_grad(set_to_none=True)
        ref(x).float().square().mean().backward()
        for p, q in zip(ref.parameters(), off.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
        for kind, opt in opts.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_s[kind.value].append(time.perf_counter() - t0)
    worst, worst_name = 0.0, ""
    for (n, p), q in zip(ref.named_parameters(), off.parameters()):
        moved = (p.detach() - start[n]).float()
        err = ((q.detach() - p.detach()).float().norm() / moved.norm().clamp_min(1e-30)).item()
        if err > worst:
            worst, worst_name = err, n
    r.update(max_rel_update_diff=worst, worst_param=worst_name,
             step_ms={k: round(1e3 * min(v), 2) for k, v in step_s.items()},
             params=sum(p.numel() for p in ref.parameters()))
    r["status"] = ("ok" if worst <= OFFLOAD_TOL else
                   f"FAILED: {worst_name}'s update differs by {worst:.1e} (relative)")
    return r


# ----------------------------------------------------------------------------- summary
def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _ms(r: dict | None) -> str:
    if r is None:
        return "-"
    return f"{r['ms']:.1f} ms" if r.get("ms") is not None else r.get("status", "-")


def readme_table(layer: dict) -> list[str]:
    """One row per shape: the figures the README's performance section quotes."""
    lines = [("| shape | dense limit | torchtitan | transformers grouped_mm | moetrain | "
              "moetrain / torchtitan | moetrain % of dense | target |"),
             "|---|---|---|---|---|---|---|---|"]
    for sh in layer["shapes"]:
        if sh.get("error"):
            lines.append(f"| {sh['name']} | failed: {sh['error'][:200]} | | | | | | |")
            continue
        rows = {r["impl"]: r for r in sh["results"]}
        best = rows.get(sh.get("best_moetrain") or "")
        ours = (f"{best['ms']:.1f} ms ({sh['best_moetrain']})" if best else "-")
        ratio = f"{sh['vs_torchtitan']:.2f}x" if sh.get("vs_torchtitan") else "-"
        pct = f"{sh['best_pct_of_dense']:.0f}%" if sh.get("best_pct_of_dense") else "-"
        verdict = {True: "met", False: "MISSED", None: "-"}[sh.get("target_met")]
        if sh.get("target_notes"):
            verdict += " (" + "; ".join(sh["target_notes"]) + ")"
        lines.append(f"| {sh['name']} | {_ms(rows.get('dense_limit'))} | "
                     f"{_ms(rows.get('torchtitan'))} | {_ms(rows.get('hf_mixtral_grouped_mm'))}"
                     f" | {ours} | {ratio} | {pct} | {verdict} |")
    return lines


def summarize(results: dict) -> str:
    """Markdown: the README table, every implementation, training, bf16 and kernel choice."""
    v = results.get("versions", {})
    lines = [f"# GPU report: {results.get('device', '?')}", "",
             "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".",
             f"Mode: {results.get('mode')}" + (f", budget {results['budget_s']:.0f} s"
                                               if results.get("budget_s") else "") +
             f"; took {results.get('seconds', 0):.0f} s.", "",
             "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']} |" for r in results["steps"]]
    if results.get("pytest_gpu"):
        lines += ["", f"GPU tests (pytest_gpu): {results['pytest_gpu']}."]
    off = results.get("offload_check")
    if off:
        if off["status"] == "ok" or off["status"].startswith("FAILED"):
            ms = off["step_ms"]
            lines += ["", (f"optim.offload=cpu on {off['device']} ({off['params']:,} "
                           f"parameters, {off['steps']} steps): DeepSpeed's CPU Adam against "
                           f"AdamW, largest relative update difference "
                           f"{off['max_rel_update_diff']:.1e} (tolerance "
                           f"{off['tolerance']:.0e}); step {ms['cpu']:.1f} ms offloaded, "
                           f"{ms['none']:.1f} ms on the device: {off['status']}.")]
        else:
            lines += ["", f"optim.offload=cpu on {off['device']}: {off['status']}"]
    layer = results.get("moe_layer")
    if layer:
        lines += ["", (f"MoE layer, forward + backward, {layer['dtype']}, mean of "
                       f"{layer['iters']} iterations after {layer['warmup']} warm-ups "
                       f"(expert FLOPs 18 T K D F):"), ""]
        lines += readme_table(layer)
        impls = next(([r["impl"] for r in sh["results"]] for sh in layer["shapes"]
                      if sh["results"]), [])
        lines += ["", ("Every implementation (ms, TFLOP/s, % of the dense limit, peak memory, "
                       "relative error against the naive loop):"), "",
                  "| shape | " + " | ".join(impls) + " |", "|---" * (len(impls) + 1) + "|"]
        for sh in (sh for sh in layer["shapes"] if sh["results"]):
            cells = []
            for r in sh["results"]:
                if r["ms"] is None:
                    cells.append(f"{r['status']}: {r['note'][:80]}")
                    continue
                mem = f", {r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") else ""
                err = (f", err {r['rel_err_vs_naive']:.0e}"
                       if r.get("rel_err_vs_naive") is not None else "")
                cells.append(f"{r['ms']:.2f} ms, {r['tflops']:.0f} TFLOP/s, "
                             f"{r['pct_of_dense']:.0f}%{mem}{err}")
            lines.append(f"| {sh['name']} | " + " | ".join(cells) + " |")
    trains = results.get("train") or {}
    if trains:
        lines += ["", "Training step of the benchmark model (full optimizer step):", "",
                  "| run | model | compile | ac | ms/step | tokens/s | MFU | peak memory |",
                  "|---|---|---|---|---|---|---|---|"]
        for n, r in trains.items():
            step_ms = 1e3 * sum(r["step_times_s"]) / max(1, len(r["step_times_s"]))
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            mem = f"{r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") is not None else "-"
            lines.append(f"| {n} | {r['model']} | {r['compile']} | {r['ac']} | {step_ms:.0f} | "
                         f"{r['tokens_per_s']:,.0f} | {mfu} | {mem} |")
        peak = next((r.get("peak_flops") for r in trains.values() if r.get("peak_flops")), None)
        if peak:
            lines.append(f"\nMFU against {peak / 1e12:.0f} TFLOP/s (dense bf16 peak).")
    bf = results.get("bf16_check")
    if bf:
        lines += ["", f"bf16 against fp32 ({bf['model']}, {bf['steps']} steps, seed "
                      f"{bf['seed']}, losses smoothed over {bf['window']} steps): final loss "
                      f"{bf['final_fp32']:.4f} / {bf['final_bf16']:.4f}, final gap "
                      f"{100 * bf['final_gap']:.2f}% (tolerance "
                      f"{100 * bf['tolerance']['final_gap']:.1f}%), largest gap "
                      f"{100 * bf['max_gap']:.2f}% at step {bf['max_gap_step']} (tolerance "
                      f"{100 * bf['tolerance']['max_gap']:.1f}%): "
                      + ("ok" if bf["ok"] else "FAILED") + "."]
    kc = results.get("kernel_choice")
    if kc:
        ops = list(kc["kernel_choice"])
        lines += ["", (f"Kernel choice, Triton / torch ms per op (forward + backward, "
                       f"{kc['dtype']}):"), "", "| shape | " + " | ".join(ops) + " |",
                  "|---" * (len(ops) + 1) + "|"]
        for name, sh in kc["shapes"].items():
            cells = []
            for op in ops:
                r = sh["ops"][op]
                tri = f"{r['triton_ms']:.3f}" if r["triton_ms"] is not None else "-"
                cells.append(f"{tri} / {r['torch_ms']:.3f} ({r['choice']})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("| choice | " + " | ".join(kc["kernel_choice"][op] for op in ops) + " |")
    lines += ["", "Commands:", "", "```"] + [r["command"] for r in results["steps"]] + ["```"]
    return "\n".join(lines) + "\n"


def collect(out: Path, ran: list[dict], info: dict) -> dict:
    """The results file: the step statuses and every step's JSON report."""
    logs = out / "logs"
    results = {**info, "steps": ran}
    layer = _load(logs / "bench_moe_layer.json")
    if layer:
        results["moe_layer"] = layer
        results["targets"] = {sh["name"]: {"met": sh.get("target_met"),
                                           "notes": sh.get("target_notes", []),
                                           "vs_torchtitan": sh.get("vs_torchtitan"),
                                           "pct_of_dense": sh.get("best_pct_of_dense")}
                              for sh in layer["shapes"]}
    trains = {n: r for n in ("train_eager", "train_compile", "train_compile_ac")
              if (r := _load(logs / f"{n}.json"))}
    if trains:
        results["train"] = trains
    for name in ("bf16_check", "kernel_choice"):
        if (r := _load(logs / f"{name}.json")):
            results[name] = r
    if (r := _load(logs / "offload_check.json")):
        results["offload_check"] = r
        for step in ran:  # a skip is reported as such, and fails nothing
            if (step["step"] == "offload_check" and step["status"] == "ok"
                    and r["status"].startswith("skipped")):
                step.update(status=r["status"][:300], skip_ok=True)
    if (tests := _pytest_counts(logs / "pytest_gpu.log")):
        results["pytest_gpu"] = tests
    return results


def _pytest_counts(log: Path) -> str | None:
    """pytest's last line ("12 passed, 3 skipped in 40.1s"), without its timing."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if re.search(r"\d+ (passed|failed|skipped|error)", line):
            return re.sub(r" in [\d.]+s.*$", "", line.strip("= "))
    return None


def environment() -> dict:
    """The device, its CUDA architecture and the versions of what the report runs."""
    import torch

    info: dict = {"device": platform.processor() or "cpu", "arch": 90,
                  "python": platform.python_version(), "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        info.update(device=torch.cuda.get_device_name(), arch=10 * major + minor,
                    memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30))
    versions = {}
    for pkg in PEERS:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    info["versions"] = versions
    return info


def report_name(info: dict) -> str:
    """``h200`` for "NVIDIA H200", ``h100_80gb_hbm3`` for "NVIDIA H100 80GB HBM3", ``cpu``
    off a GPU."""
    if "memory_gib" not in info:
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", info["device"].lower().replace("nvidia", "")).strip("_")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "tools" / "results"),
                    help="directory for <name>.json, summary.md and logs/")
    ap.add_argument("--name", default=None, help="results file name (default: the device's)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="trimmed iterations, and every step done within this many seconds")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="every step on CPU with tiny sizes (tests the report itself)")
    ap.add_argument("--skip", action="append", default=[], help="a step to leave out")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    # One step of the report (run as its own process): the per-op kernel timings.
    ap.add_argument("--measure-kernels", metavar="JSON", default=None, help=argparse.SUPPRESS)
    # Another: the optim.offload=cpu check.
    ap.add_argument("--check-offload", metavar="JSON", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scale", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=10, help=argparse.SUPPRESS)
    ap.add_argument("--iters", type=int, default=50, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.measure_kernels:
        import torch

        dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        r = measure_kernel_choice(list(SHAPES), a.scale, dev, a.warmup, a.iters)
        Path(a.measure_kernels).parent.mkdir(parents=True, exist_ok=True)
        Path(a.measure_kernels).write_text(json.dumps(r, indent=2))
        for name, sh in r["shapes"].items():
            print(name, {op: (v["triton_ms"], v["torch_ms"], v["choice"])
                         for op, v in sh["ops"].items()})
        print("kernel_choice:", r["kernel_choice"], flush=True)
        return 0
    if a.check_offload:
        import torch

        dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        r = check_offload(dev)
        Path(a.check_offload).parent.mkdir(parents=True, exist_ok=True)
        Path(a.check_offload).write_text(json.dumps(r, indent=2))
        print(json.dumps(r), flush=True)
        return 1 if r["status"].startswith("FAILED") else 0
    if a.cpu_smoke and a.budget_s is not None:
        ap.error("--cpu-smoke and --budget-s: choose one")
    if a.cpu_smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    mode = "cpu-smoke" if a.cpu_smoke else ("budget" if a.budget_s is not None else "full")
    out = Path(a.out).resolve()
    info = environment()
    todo = plan(out, info["arch"], mode, a.budget_s)
    unknown = sorted(set(a.skip) - {s.name for s in todo})
    if unknown:
        ap.error(f"--skip {unknown[0]!r} is not a step; steps: "
                 f"{', '.join(s.name for s in todo)}")
    todo = [s for s in todo if s.name not in a.skip]
    if a.dry_run:
        for s in todo:
            print(f"{s.name} (at most {s.timeout_s:.0f}s): {shlex.join(s.cmd)}")
        return 0
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for s in todo:  # no stale report from an earlier run
        (out / "logs" / f"{s.name}.json").unlink(missing_ok=True)
    print(json.dumps(info), flush=True)
    t0 = time.monotonic()
    # A few seconds stay for the summary.
    deadline = None if a.budget_s is None else t0 + a.budget_s - 5
    ran = run_all(todo, out / "logs", deadline)
    info.update(mode=mode, budget_s=a.budget_s, seconds=round(time.monotonic() - t0, 1),
                finished=datetime.datetime.now(datetime.UTC).isoformat(
                    timespec="seconds"))
    results = collect(out, ran, info)
    name = a.name or report_name(info)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    summary = summarize(results)
    (out / "summary.md").write_text(summary)
    print("\n" + summary, flush=True)
    return 0 if all(r["status"] == "ok" or r.get("skip_ok") for r in ran) else 1


if __name__ == "__main__":
    raise SystemExit(main())
