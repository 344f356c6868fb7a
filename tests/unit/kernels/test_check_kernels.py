"""tools/check_kernels.py compiles every kernel for an H100 (sm_90) on this CPU machine.

The interpreter tests check what the kernels compute; this checks that the real compiler
accepts them, which the interpreter does not (it runs them as numpy). The tool runs in a
subprocess so that no ``TRITON_INTERPRET`` of this process leaks into it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import needs

pytestmark = needs("triton")

ROOT = Path(__file__).resolve().parents[3]


def _run(*args: str, cwd: Path = ROOT, extra_path: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(ROOT / "tools" / "check_kernels.py"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                          check=False)


def test_every_kernel_compiles_for_sm90():
    from moetrain.kernels import moe, swiglu

    run = _run("--arch", "90")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("ok ")]
    # One line per instantiation, each with ptxas' verdict on spills when it ran.
    assert len(lines) == len(moe.COMPILE_SPECS) + len(swiglu.COMPILE_SPECS)
    for spec in moe.COMPILE_SPECS:
        assert any(spec.kernel.__name__ in ln for ln in lines), spec.name
    assert "all compiled" in run.stdout
    assert not [ln for ln in lines if "spill=" in ln and "spill=0B" not in ln]


def test_a_kernel_only_the_interpreter_accepts_fails_with_the_compiler_message(tmp_path):
    """``tl.arange`` with a runtime bound runs in the interpreter but cannot compile."""
    (tmp_path / "bad_kernels.py").write_text(textwrap.dedent('''
        import triton.language as tl
        from moetrain.kernels.jit import CompileSpec, lazy_jit

        @lazy_jit
        def _runtime_arange_kernel(x_ptr, n):
            offs = tl.arange(0, n)
            tl.store(x_ptr + offs, offs.to(tl.float32))

        @lazy_jit
        def _fine_kernel(x_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, offs.to(tl.float32))

        COMPILE_SPECS = [
            CompileSpec(_runtime_arange_kernel, {"x_ptr": "*fp32", "n": "i32"}),
            CompileSpec(_fine_kernel, {"x_ptr": "*fp32"}, {"BLOCK": 16}),
        ]
    '''))
    run = _run("--module", "bad_kernels", extra_path=str(tmp_path))
    assert run.returncode == 1, run.stdout + run.stderr
    fails = [ln for ln in run.stdout.splitlines() if ln.startswith("FAIL")]
    assert len(fails) == 1 and "_runtime_arange_kernel" in fails[0]
    assert any(ln.startswith("ok ") and "_fine_kernel" in ln for ln in run.stdout.splitlines())
    assert "1 failed" in run.stdout


def test_a_spec_that_misses_an_argument_is_named(tmp_path):
    (tmp_path / "half_spec.py").write_text(textwrap.dedent('''
        import triton.language as tl
        from moetrain.kernels.jit import CompileSpec, lazy_jit

        @lazy_jit
        def _k(x_ptr, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, offs.to(tl.float32), mask=offs < n)

        COMPILE_SPECS = [CompileSpec(_k, {"x_ptr": "*fp32"}, {"BLOCK": 16})]
    '''))
    run = _run("--module", "half_spec", extra_path=str(tmp_path))
    assert run.returncode == 1
    assert "missing ['n']" in run.stdout
