"""A recorder of device-to-host reads, for the tests that hold a code path to none.

A host read (``.item()``, ``int(t)``, ``if t:``, ``.tolist()``, a boolean-mask index,
``nonzero``) makes the host wait for the device. :class:`HostReads` records every
operator whose result the host must read, in the forward and in the backward (autograd
runs the backward's operators through the same modes), on any device: on a CPU it finds
the reads a GPU run would synchronise on.
"""

from __future__ import annotations

from typing import Self

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostReads"]


class _DispatchReads(TorchDispatchMode):
    """aten operators that read device data on the host or size an output from it."""

    def __init__(self, reads: list[str]) -> None:
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.data_dependent_output in func.tags:  # item, int(), bool(), float()
            self.reads.append(str(func))
        elif torch.Tag.dynamic_output_shape in func.tags:
            # Integer indexing and repeat_interleave with a known size read nothing.
            if func is torch.ops.aten.index.Tensor:
                read = any(i is not None and i.dtype in (torch.bool, torch.uint8)
                           for i in args[1])
            elif func is torch.ops.aten.repeat_interleave.Tensor:
                read = kwargs.get("output_size") is None
            else:  # nonzero, masked_select, unique, ...
                read = True
            if read:
                self.reads.append(str(func))
        return func(*args, **kwargs)


class _FunctionReads(TorchFunctionMode):
    """Host reads that never reach the dispatcher (``tolist`` copies in C++)."""

    def __init__(self, reads: list[str]) -> None:
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.numpy):
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


class HostReads:
    """Context manager: ``.reads`` lists the host reads made inside it (operator names)."""

    def __enter__(self) -> Self:
        self.reads: list[str] = []
        self._modes = [_FunctionReads(self.reads), _DispatchReads(self.reads)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
