"""MoE layer options: ``moe.kernel_backend`` (Triton kernels, CPU interpreter, against the
torch path) and ``moe.recompute_experts`` (same gradients, activations recomputed)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from moetrain.kernels.backend import use_triton

from moetrain.config.schema import (
    ConfigError,
    DispatchMode,
    ExpertBackend,
    KernelBackend,
    ModelConfig,
    MoEConfig,
    RouterConfig,
    ScoreFunc,
)
from moetrain.models.moe.experts import GroupedExperts
from moetrain.models.moe.layer import MoELayer
from tests.conftest import needs

needs_triton = needs("triton")
D, F, E, K = 16, 24, 6, 2


def _layer(kernel: KernelBackend, score=ScoreFunc.softmax, dispatch=DispatchMode.dropless,
           recompute: bool = False, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    mcfg = ModelConfig(dim=D, n_heads=2, num_experts=E, top_k=K, expert_hidden=F)
    moe_cfg = MoEConfig(router=RouterConfig(score_func=score, temperature=1.5),
                        dispatch=dispatch, capacity_factor=0.8,
                        expert_backend=ExpertBackend.loop, kernel_backend=kernel,
                        recompute_experts=recompute)
    layer = MoELayer(D, mcfg, moe_cfg)
    layer.init_weights(0.5, 0.5)
    with torch.no_grad():
        layer.router.expert_bias.copy_(0.05 * torch.arange(E))
    return layer


def _run(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_()
    out = layer(x)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=torch.float32)).view(out.shape))
    grads = {n: p.grad for n, p in layer.named_parameters()}
    grads["x"] = x.grad
    return out, grads


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("score,dispatch", [(ScoreFunc.softmax, DispatchMode.dropless),
                                            (ScoreFunc.sigmoid, DispatchMode.capacity)])
def test_triton_layer_matches_torch_layer(score, dispatch):
    ref = _layer(KernelBackend.torch, score, dispatch)
    fast = copy.deepcopy(ref)
    fast.router.kernel_backend = KernelBackend.triton
    fast.dispatcher.kernel_backend = KernelBackend.triton
    x = torch.randn(3, 7, D)  # 21 tokens
    out_ref, g_ref = _run(ref, x)
    out, g = _run(fast, x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(fast.last_stats.load_E, ref.last_stats.load_E)
    assert int(fast.last_stats.num_dropped) == int(ref.last_stats.num_dropped)
    if dispatch == DispatchMode.capacity:
        assert int(ref.last_stats.num_dropped) > 0  # the capacity path really drops rows
    for name, want in g_ref.items():
        torch.testing.assert_close(g[name], want, rtol=1e-5, atol=1e-5)


def test_kernel_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert not use_triton(KernelBackend.torch, cpu)
    assert not use_triton(KernelBackend.auto, cpu)  # CPU trains on the torch path
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if importlib.util.find_spec("triton") is not None:
        with pytest.raises(ConfigError, match=r"moe.kernel_backend=triton.*kernel_backend=auto"):
            use_triton(KernelBackend.triton, cpu)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert use_triton("triton", torch.zeros(1))


@pytest.mark.parametrize("backend", [ExpertBackend.loop, ExpertBackend.grouped_mm])
def test_recompute_experts_gives_identical_gradients(backend):
    torch.manual_seed(0)
    plain = GroupedExperts(4, 16, 32, backend)
    plain.init_weights(0.3, 0.3)
    recomputed = copy.deepcopy(plain)
    recomputed.recompute = True
    counts = torch.tensor([5, 0, 9, 3])
    x = torch.randn(17, 16)
    outs = []
    for ex in (plain, recomputed):
        xi = x.clone().requires_grad_()
        y = ex(xi, counts)
        y.backward(torch.sin(y.detach()))
        outs.append((y, xi.grad, [p.grad for p in ex.parameters()]))
    (y0, gx0, gp0), (y1, gx1, gp1) = outs
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    assert all(torch.equal(a, b) for a, b in zip(gp0, gp1))


def test_recompute_experts_drops_the_hidden_activations():
    """Saved tensors of the expert forward: without recompute they include the R x F
    hidden activations; with it only the inputs (rows and weights) are kept."""
    torch.manual_seed(0)
    R, Dm, Fh = 64, 8, 96
    counts = torch.tensor([R])

    def saved_numel(recompute: bool) -> int:
        ex = GroupedExperts(1, Dm, Fh, ExpertBackend.loop, recompute)
        ex.init_weights(0.1, 0.1)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ex(torch.randn(R, Dm, requires_grad=True), counts)
        return total

    assert saved_numel(False) >= 4 * R * Fh
    assert saved_numel(True) < R * Fh


def test_layer_passes_recompute_flag():
    assert _layer(KernelBackend.torch, recompute=True).experts.recompute is True
    assert _layer(KernelBackend.torch).experts.recompute is False
