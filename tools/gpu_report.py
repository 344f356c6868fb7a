"""Everything that needs a GPU, in one command, with a README-ready summary.

Runs, one after the other, each with its log in ``--out``:

1. ``tools/check_kernels.py``: every Triton kernel compiled for this GPU's architecture;
2. ``pytest tests/gpu``: the kernels, the fused SwiGLU and grouped_mm on CUDA against their
   references (bf16 numerics);
3. ``tools/bench_moe_layer.py``: both issue shapes, moetrain (torch and Triton paths) beside
   the dense limit, the naive loop and the peers that are installed;
4. ``tools/bench_train.py``: tokens/s and MFU of ``bench_1b``, eager, compiled, and compiled
   with selective activation checkpointing.

Then it writes ``summary.md``: the tables the README's performance section holds, with the
device, the versions and the commands. A step that fails is reported and the others run.

    python tools/gpu_report.py --out gpu_report            # about 10 minutes on an H100
    python tools/gpu_report.py --out gpu_report --skip pytest_gpu --skip train_compile_ac
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def steps(out: Path, arch: int) -> dict[str, list[str]]:
    """Step name -> command (run from the repository root)."""
    py = sys.executable
    train = [py, "tools/bench_train.py"]
    return {
        "check_kernels": [py, "tools/check_kernels.py", "--arch", str(arch)],
        "pytest_gpu": [py, "-m", "pytest", "-q", "tests/gpu"],
        "bench_moe_layer": [py, "tools/bench_moe_layer.py", "--json",
                            str(out / "bench_moe_layer.json")],
        "train_eager": train + ["--json", str(out / "train_eager.json")],
        "train_compile": train + ["--compile", "--json", str(out / "train_compile.json")],
        "train_compile_ac": train + ["--compile", "--ac", "selective", "--json",
                                     str(out / "train_compile_ac.json")],
    }


def run_step(name: str, cmd: list[str], out: Path, timeout_s: float) -> dict:
    """Run one step with its output teed to ``out/<name>.log``; never raises."""
    print(f"== {name}: {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    log = out / f"{name}.log"
    with log.open("w") as f:
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            deadline = t0 + timeout_s
            for line in proc.stdout:
                sys.stdout.write(line)
                f.write(line)
                if time.perf_counter() > deadline:
                    proc.kill()
                    break
            rc = proc.wait()
        except OSError as e:
            f.write(f"{e}\n")
            rc = 127
    status = "ok" if rc == 0 else f"exit {rc}"
    print(f"== {name}: {status} in {time.perf_counter() - t0:.0f}s", flush=True)
    return {"step": name, "command": shlex.join(cmd), "status": status,
            "seconds": round(time.perf_counter() - t0, 1)}


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _ms(v: float | None) -> str:
    return f"{v:.1f} ms" if v is not None else "-"


def summarize(out: Path, ran: list[dict], env: str) -> str:
    """Markdown tables from the JSON reports found in ``out``."""
    lines = [f"Device and versions: {env}", "", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']} |" for r in ran]
    layer = _load(out / "bench_moe_layer.json")
    if layer:
        impls = [r["impl"] for r in layer["shapes"][0]["results"]]
        title = (f"MoE layer, forward + backward, {layer['dtype']}, mean of {layer['iters']} "
                 f"iterations:")
        lines += ["", title, "",
                  "| shape | target | " + " | ".join(impls) + " |",
                  "|---" * (len(impls) + 2) + "|"]
        for sh in layer["shapes"]:
            cells = []
            for r in sh["results"]:
                if r["ms"] is None:
                    cells.append(r["status"])
                else:
                    cells.append(f"{r['ms']:.1f} ms ({r['tflops']:.0f} TFLOP/s, "
                                 f"{r['pct_of_dense']:.0f}%)")
            verdict = {True: " met", False: " MISSED", None: ""}[sh.get("target_met")]
            target = f"≤ {sh['target_ms']} ms{verdict}" if sh.get("target_ms") else "-"
            lines.append(f"| {sh['name']} | {target} | " + " | ".join(cells) + " |")
    trains = [(n, _load(out / f"{n}.json")) for n in
              ("train_eager", "train_compile", "train_compile_ac")]
    trains = [(n, r) for n, r in trains if r]
    if trains:
        lines += ["", "Training step of bench_1b (full optimizer step):", "",
                  "| run | compile | ac | ms/step | tokens/s | MFU | peak memory |",
                  "|---|---|---|---|---|---|---|"]
        for n, r in trains:
            step_ms = 1e3 * sum(r["step_times_s"]) / max(1, len(r["step_times_s"]))
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            mem = f"{r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") is not None else "-"
            lines.append(f"| {n} | {r['compile']} | {r['ac']} | {step_ms:.0f} | "
                         f"{r['tokens_per_s']:,.0f} | {mfu} | {mem} |")
    lines += ["", "Commands:", "", "```"] + [r["command"] for r in ran] + ["```"]
    return "\n".join(lines) + "\n"


def environment() -> tuple[str, int]:
    """A one-line description of the device and versions, and the CUDA architecture."""
    import torch

    parts = [f"torch {torch.__version__}"]
    arch = 90
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = 10 * major + minor
        parts.insert(0, f"{torch.cuda.get_device_name()} (sm_{arch}), CUDA {torch.version.cuda}")
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("no triton")
    return ", ".join(parts), arch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_report", help="directory for logs, JSON, summary")
    ap.add_argument("--skip", action="append", default=[], help="a step to leave out")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per step")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env, arch = environment()
    todo = steps(out, arch)
    unknown = sorted(set(a.skip) - set(todo))
    if unknown:
        ap.error(f"--skip {unknown[0]!r} is not a step; steps: {', '.join(todo)}")
    if a.dry_run:
        for name, cmd in todo.items():
            if name not in a.skip:
                print(f"{name}: {shlex.join(cmd)}")
        return 0
    print(env, flush=True)
    ran = [run_step(n, c, out, a.timeout) for n, c in todo.items() if n not in a.skip]
    summary = summarize(out, ran, env)
    (out / "summary.md").write_text(summary)
    print("\n" + summary)
    return 0 if all(r["status"] == "ok" for r in ran) else 1


if __name__ == "__main__":
    raise SystemExit(main())
