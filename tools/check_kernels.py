"""Compile every Triton kernel of moetrain.kernels for a GPU, on a machine without one.

Triton's interpreter (``TRITON_INTERPRET=1``), which runs the kernel tests on CPU, executes
the kernels as numpy programs: it accepts things the compiler rejects (a ``tl.arange``
bound that is not a constexpr, a block shape that is not a power of two, a store whose
dtype does not cast). This tool lowers each kernel instantiation listed in a module's
``COMPILE_SPECS`` (see :class:`moetrain.kernels.jit.CompileSpec`) through the real
compiler, down to a cubin for the given CUDA architecture, and reports what a reader can
act on: warps, shared memory, and ptxas' registers and spill bytes per thread. No GPU is
needed.

    python tools/check_kernels.py                 # sm_90 (H100), every kernel module
    python tools/check_kernels.py --arch 80 90    # A100 and H100
    PYTHONPATH=/path/to/triton-3.6 python tools/check_kernels.py   # another triton

Exit status 0 when every instantiation compiled, 1 otherwise (the failures are printed
with the compiler's message).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# The compiler, not the interpreter, must build the kernels.
os.environ.pop("TRITON_INTERPRET", None)

try:
    import moetrain  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def kernel_modules() -> list[str]:
    """Every module of ``moetrain.kernels`` (they import triton; the package does not)."""
    import moetrain.kernels as pkg

    return [f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]


def collect(modules: list[str]) -> list[tuple[str, object]]:
    """(module, spec) for every ``COMPILE_SPECS`` entry of the given modules."""
    out = []
    for name in modules:
        mod = importlib.import_module(name)
        out += [(name, spec) for spec in getattr(mod, "COMPILE_SPECS", ())]
    return out


def _signature(spec) -> dict[str, str]:
    """Triton's signature dict for ``spec``; fails naming any argument it leaves out."""
    params = list(inspect.signature(spec.kernel.fn).parameters)
    sig = {**spec.types, **{k: "constexpr" for k in spec.constexprs}}
    missing = [p for p in params if p not in sig]
    extra = [k for k in sig if k not in params]
    if missing or extra:
        raise ValueError(f"COMPILE_SPECS entry for {spec.kernel.__name__} does not match its "
                         f"arguments: missing {missing}, unknown {extra}")
    return {p: sig[p] for p in params}


def compile_spec(spec, arch: int):
    """The compiled kernel of ``spec`` for CUDA ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=triton.jit(spec.kernel.fn), signature=_signature(spec),
                    constexprs=dict(spec.constexprs))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32))


def ptxas_usage(ptx: str, arch: int) -> str:
    """Registers and spill bytes per thread, from ``ptxas -v`` on the kernel's PTX ('' when
    this triton's ptxas cannot be found). Spills to local memory make a kernel slow."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except (ImportError, TypeError, AttributeError):
        return ""
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", str(src), "-o",
                              str(Path(tmp) / "k.o")], capture_output=True, text=True,
                             check=False)
    log = run.stdout + run.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    if run.returncode or regs is None:
        return ""
    return f" regs={regs.group(1)} spill={spills.group(1) if spills else 0}B"


def check(modules: list[str], archs: list[int], out=sys.stdout) -> list[str]:
    """Compile everything; print one line per instantiation; return the failures."""
    import triton

    specs = collect(modules)
    if not specs:
        raise SystemExit(f"no COMPILE_SPECS found in {modules}")
    print(f"triton {triton.__version__}: {len(specs)} kernel instantiations x "
          f"{len(archs)} architecture(s)", file=out)
    failures = []
    for arch in archs:
        for module, spec in specs:
            label = f"sm_{arch} {module.rsplit('.', 1)[-1]}.{spec.name}"
            try:
                compiled = compile_spec(spec, arch)
            except Exception as exc:  # noqa: BLE001 -- the compiler's error types vary by version
                msg = " ".join(str(exc).split())[:600]
                failures.append(f"{label}: {type(exc).__name__}: {msg}")
                print(f"FAIL {label}: {type(exc).__name__}: {msg}", file=out)
                continue
            meta = compiled.metadata
            print(f"ok   {label}  warps={meta.num_warps} "
                  f"shared={meta.shared}B{ptxas_usage(compiled.asm['ptx'], arch)}",
                  file=out, flush=True)
    print(f"{len(failures)} failed" if failures else "all compiled", file=out)
    return failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[90],
                    help="CUDA compute capabilities, e.g. 80 (A100) 90 (H100)")
    ap.add_argument("--module", action="append", default=None,
                    help="a module with COMPILE_SPECS (repeatable; default: every module "
                         "of moetrain.kernels)")
    args = ap.parse_args(argv)
    return 1 if check(args.module or kernel_modules(), args.arch) else 0


if __name__ == "__main__":
    raise SystemExit(main())
