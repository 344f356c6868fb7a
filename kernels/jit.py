"""The JIT layer under every Triton kernel here: compiler or interpreter, chosen at launch.

``triton.jit`` chooses between the compiler and the interpreter (``TRITON_INTERPRET=1``)
when it decorates. :class:`LazyJIT` defers that to the first launch, so the interpreter
tests work even when triton was imported earlier in the same process.

:class:`CompileSpec` names one concrete instantiation of a kernel (argument types and
constexpr values). ``tools/check_kernels.py`` compiles every module's ``COMPILE_SPECS`` to
a GPU binary ahead of time, with no GPU: the interpreter accepts programs the compiler
rejects (dtype mixes, non-constexpr shapes), and this catches them on a CPU machine.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import triton
import triton.language as tl

__all__ = ["CompileSpec", "LazyJIT", "block_d", "interpreting", "lazy_jit", "pow2"]


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


class LazyJIT:
    """A ``@triton.jit`` kernel built for the mode (compiler or interpreter) in force at launch."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.__name__ = fn.__name__
        self._by_mode: dict[bool, object] = {}

    @property
    def jit(self):
        mode = interpreting()
        kernel = self._by_mode.get(mode)
        if kernel is None:
            kernel = self._by_mode[mode] = triton.jit(self.fn)
        return kernel

    def __getitem__(self, grid):
        launch = self.jit[grid]
        if not interpreting():
            return launch

        def interpreted(*args, **kwargs):
            with _interpreter_device_calls():
                return launch(*args, **kwargs)

        return interpreted


@contextlib.contextmanager
def _interpreter_device_calls():
    """Let the interpreter call triton's own ``@jit`` helpers (``tl.sum``, ``tl.argmax``...).

    Triton decorates its standard library when it is imported. Imported without
    ``TRITON_INTERPRET=1`` (say, by an earlier test), those helpers are compiler-mode
    ``JITFunction`` objects, which refuse a Python call. For the duration of an interpreted
    launch, such calls run the helper's Python body the way the interpreter's own
    ``InterpretedFunction`` does. Nothing changes when triton was imported in interpreter
    mode, or on a GPU.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if isinstance(tl.standard.sum, InterpretedFunction):
        yield
        return
    original = JITFunction.__call__

    def call(self, *args, **kwargs):
        interp = _INTERPRETED.get(id(self))
        if interp is None or interp[0] is not self:
            interp = _INTERPRETED[id(self)] = (self, InterpretedFunction(self.fn))
        return interp[1](*args, **kwargs)

    JITFunction.__call__ = call
    try:
        yield
    finally:
        JITFunction.__call__ = original


_INTERPRETED: dict[int, tuple[object, object]] = {}


def lazy_jit(fn) -> LazyJIT:
    return LazyJIT(fn)


def pow2(n: int, least: int = 2) -> int:
    return max(least, triton.next_power_of_2(max(1, n)))


def block_d(D: int) -> int:
    return min(pow2(D, 16), 1024)


@dataclass(frozen=True)
class CompileSpec:
    """One instantiation of ``kernel`` to compile ahead of time.

    ``types`` maps each runtime argument to its triton type (``"*bf16"``, ``"*i64"``,
    ``"i32"``, ``"fp32"``); ``constexprs`` maps each ``tl.constexpr`` argument to a value.
    Together they must name every argument of the kernel.
    """

    kernel: LazyJIT
    types: dict[str, str]
    constexprs: dict[str, object] = field(default_factory=dict)

    @property
    def name(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        ptrs = ",".join(sorted({t for t in self.types.values() if t.startswith("*")}))
        return f"{self.kernel.__name__}[{ptrs}|{args}]"

