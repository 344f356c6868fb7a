"""Kernel tests run the Triton kernels in triton's CPU interpreter.

``TRITON_INTERPRET=1`` is set per test by the ``interpret`` fixture, not for the whole
session. The kernels choose the interpreter when they launch
(``moetrain.kernels.jit.LazyJIT``), so this works even when triton was imported earlier
in the same process without it (the suite runs in one process).
"""

from __future__ import annotations

import pytest


@pytest.fixture
def interpret(monkeypatch):
    """Run Triton kernels in the CPU interpreter for the duration of one test."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield
