"""The capacity path on CUDA under ``torch.compile(fullgraph=True)`` with inductor: one
graph with every shape static (no unbacked, data-dependent size), the eager layer's
outputs and gradients, and no synchronising call in a compiled forward + backward (CUDA's
sync debug mode raises on one).

The CPU version (aot_eager, loop experts) and the eager CUDA check (sync debug mode, torch
and Triton paths) are in tests/unit/models/test_no_host_sync.py; tools/gpu_report.py runs
that CUDA test beside this file. The Triton kernels are graph breaks by design
(``torch.compiler.disable``), so fullgraph covers ``moe.kernel_backend=torch``; here the
experts are grouped_mm in bf16, the CUDA fast path (its fake kernel needs bf16, which is
why the CPU test leaves it out).
"""

from __future__ import annotations

import copy

import pytest
import torch

from moetrain.config.schema import DropPolicy, ExpertBackend, KernelBackend, RouterType
from tests.unit.models.test_no_host_sync import _layer, _run, _static_shapes_backend, _x

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("policy,router,backend", [
    (DropPolicy.probs, RouterType.topk, ExpertBackend.grouped_mm),
    (DropPolicy.slot, RouterType.threshold, ExpertBackend.grouped_mm),  # inactive slots
    (DropPolicy.position, RouterType.topk, ExpertBackend.loop),
])
def test_capacity_layer_compiles_fullgraph_on_cuda_without_host_reads(policy, router, backend):
    torch._dynamo.reset()
    eager = _layer(policy, backend, router, KernelBackend.torch).cuda()
    compiled = copy.deepcopy(eager)
    unbacked: list[str] = []
    fn = torch.compile(compiled, fullgraph=True, backend=_static_shapes_backend(unbacked, "inductor"))
    x = _x().cuda()
    want, got = _run(eager, x), _run(compiled, x, fn)
    assert unbacked == []
    assert int(eager.last_stats.num_dropped) > 0  # the capacity really drops rows
    torch.testing.assert_close(compiled.last_stats.num_dropped, eager.last_stats.num_dropped)
    # grouped_mm: bf16 GEMMs, which inductor may fuse and round in another order
    tol = 2e-2 if backend == ExpertBackend.grouped_mm else 1e-5
    for name, w in want.items():
        assert _rel(got[name], w) <= tol, name
    # A compiled step, compilation done, must not synchronise the host with the device.
    compiled.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run(compiled, x, fn)
    finally:
        torch.cuda.set_sync_debug_mode("default")
