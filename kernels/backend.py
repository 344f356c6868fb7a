"""Which path runs the MoE ops: the Triton kernels or their torch references.

``moetrain.kernels`` is the checkout's top-level ``kernels/`` folder (pyproject's
package-dir mapping). Three layers, as in OLMo-core: :mod:`.moe` and :mod:`.swiglu` hold
the raw ``@triton.jit`` kernels and their launchers (on the JIT layer of :mod:`.jit`),
:mod:`.ops` the ``autograd.Function`` wrappers, and the model code (router, dispatcher,
experts) calls the ops. :mod:`.selftest` checks them against the references on a device
before ``auto`` uses them. Each kernel has a pure-torch reference in :mod:`.reference`; the
references are the oracle in tests and the path used on CPU.

The folder has no ``__init__.py``: from the checkout's root (the working directory on
``sys.path``) a regular package there would shadow the PyPI package ``kernels``, which
transformers imports. ``moetrain/__init__.py`` makes it importable under an editable install.

``moe.kernel_backend`` picks the path (see :func:`use_triton`). Importing this module does
not import triton; :mod:`.moe` and :mod:`.ops` do.

Not here: fusing the gather into the first expert GEMM and the combine into the last
(ScatterMoE; Tan et al., 2024). By the byte count in the performance docs it could save at
most ~2% of the fine_grained target, less than a Triton grouped GEMM would likely lose to
``torch._grouped_mm``; ``tools/bench_moe_layer.py`` on a GPU settles it.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from moetrain.config.schema import ConfigError, KernelBackend

__all__ = ["interpreting", "triton_available", "use_triton"]


@functools.cache
def triton_available() -> bool:
    """True when the triton package is installed."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when triton would run kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    if not triton_available():
        return False
    from moetrain.kernels.jit import interpreting as _interpreting

    return _interpreting()


def use_triton(backend: KernelBackend | str, device: torch.device | torch.Tensor) -> bool:
    """Whether ``moe.kernel_backend`` selects the Triton kernels for tensors on ``device``.

    - ``torch``: never.
    - ``auto``: the kernels on a CUDA device once they have passed
      :func:`moetrain.kernels.selftest.kernels_verified` there (every op against its
      torch reference, forward and backward, once per process); the torch path on other
      devices, without triton, or (with a warning) when the check fails. Inside a
      ``torch.compile`` region the check is never run, only looked up:
      :func:`moetrain.parallel.parallelize` runs it before compiling.
    - ``triton``: always; it needs triton and a CUDA device, or the interpreter
      (``TRITON_INTERPRET=1``) for CPU tensors, and fails naming the fix otherwise.
    """
    backend = KernelBackend(backend)
    if isinstance(device, torch.Tensor):
        device = device.device
    if backend == KernelBackend.torch:
        return False
    if backend == KernelBackend.auto:
        if device.type != "cuda" or not triton_available():
            return False
        from moetrain.kernels import selftest

        index = device.index if device.index is not None else torch.cuda.current_device()
        verdict = selftest.VERDICTS.get((device.type, index))
        if verdict is None and torch.compiler.is_compiling():
            return False  # never trace the self-test; parallelize() runs it before compile
        return verdict if verdict is not None else selftest.kernels_verified(device.type, index)
    if not triton_available():
        raise ConfigError(
            "moe.kernel_backend=triton is invalid: triton is not installed; "
            "pip install triton, or set moe.kernel_backend=auto"
        )
    if device.type != "cuda" and not interpreting():
        raise ConfigError(
            f"moe.kernel_backend=triton is invalid on device {device.type!r}: the kernels "
            f"need a CUDA device (or TRITON_INTERPRET=1 to run them in triton's CPU "
            f"interpreter); set moe.kernel_backend=auto"
        )
    return True
