"""The start-up self-test that gates ``moe.kernel_backend=auto`` on CUDA.

Run here on CPU tensors under Triton's interpreter: the same code a GPU runs, and a
deliberately wrong op must be caught and named.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import oracle

oracle("triton", module_level=True)

from moetrain.kernels import ops, selftest
from moetrain.kernels.backend import use_triton

from moetrain.config.schema import KernelBackend

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_cache():
    selftest.VERDICTS.clear()
    yield
    selftest.VERDICTS.clear()


@pytest.mark.usefixtures("interpret")
def test_the_kernels_pass_and_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    assert selftest.run_selftest(CPU) == []
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.usefixtures("interpret")
def test_a_wrong_combine_and_a_crashing_router_are_named(monkeypatch):
    real = ops.unpermute_combine

    def off_by_a_percent(*args, **kwargs):
        return real(*args, **kwargs) * 1.01

    def crash(*args, **kwargs):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(ops, "unpermute_combine", off_by_a_percent)
    monkeypatch.setattr(ops, "topk_router", crash)
    failures = selftest.run_selftest(CPU)
    assert any(f.startswith("unpermute_combine[capacity=None,float32].out: relative error 1.0")
               for f in failures), failures
    assert "topk_router[softmax]: RuntimeError: PTX assembly failed" in failures
    assert "topk_router[sigmoid]: RuntimeError: PTX assembly failed" in failures
    # Everything else still ran and agreed.
    assert not any(f.startswith(("permute", "routing_metadata", "swiglu")) for f in failures)


def test_auto_uses_the_kernels_on_cuda_only_once_verified(monkeypatch):
    calls = []

    def fake_selftest(device):
        calls.append(device)
        return verdict

    monkeypatch.setattr(selftest, "run_selftest", fake_selftest)
    gpu = torch.device("cuda", 0)
    verdict = []
    assert use_triton(KernelBackend.auto, gpu)
    assert use_triton(KernelBackend.auto, gpu)
    assert calls == [gpu]  # once per process and device
    assert not use_triton(KernelBackend.auto, CPU)  # CPU trains on the torch path

    selftest.VERDICTS.clear()
    verdict = ["swiglu.out: relative error 3.1e-02 > 0.0001"]
    with pytest.warns(RuntimeWarning, match=r"torch path runs instead.*swiglu\.out"):
        assert not use_triton(KernelBackend.auto, gpu)
    assert not use_triton(KernelBackend.auto, gpu)  # warned once, cached
    assert use_triton(KernelBackend.triton, gpu)  # an explicit choice skips the check
    assert not use_triton(KernelBackend.torch, gpu)


def test_a_compiled_region_looks_the_verdict_up_and_never_runs_the_check(monkeypatch):
    ran = []
    monkeypatch.setattr(selftest, "run_selftest", lambda device: ran.append(device) or [])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    gpu = torch.device("cuda", 0)
    assert not use_triton(KernelBackend.auto, gpu)  # not verified yet: the torch path
    assert ran == []
    selftest.VERDICTS[("cuda", 0)] = True  # what parallelize() leaves before compiling
    assert use_triton(KernelBackend.auto, gpu)
    assert ran == []
