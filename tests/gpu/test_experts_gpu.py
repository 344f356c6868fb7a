"""grouped_mm expert backend (bf16 GEMMs on CUDA) against the loop reference."""

import pytest
import torch

from moetrain.config.schema import ExpertBackend, ModelConfig, MoEConfig
from moetrain.models.moe.experts import GroupedExperts
from moetrain.models.moe.layer import MoELayer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

E, D, F = 4, 64, 128


def _pair() -> tuple[GroupedExperts, GroupedExperts]:
    torch.manual_seed(0)
    loop = GroupedExperts(E, D, F, ExpertBackend.loop).cuda()
    loop.init_weights(0.05, 0.05)
    gmm = GroupedExperts(E, D, F, ExpertBackend.grouped_mm).cuda()
    gmm.load_state_dict(loop.state_dict())
    return loop, gmm


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_grouped_mm_bf16_matches_loop_forward_and_backward():
    loop, gmm = _pair()
    counts = torch.tensor([5, 0, 37, 22], device="cuda")  # an empty expert, unaligned groups
    x1 = torch.randn(int(counts.sum()), D, device="cuda", requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    g = torch.randn(x1.shape, device="cuda")
    y_ref, y = loop(x1, counts), gmm(x2, counts)
    assert y.dtype == torch.float32  # bf16 inside, input dtype out
    assert _rel(y, y_ref) < 2e-2
    y_ref.backward(g)
    y.backward(g)
    assert _rel(x2.grad, x1.grad) < 2e-2
    for name in ("w1_EFD", "w3_EFD", "w2_EDF"):
        assert _rel(getattr(gmm, name).grad, getattr(loop, name).grad) < 2e-2
        assert torch.count_nonzero(getattr(gmm, name).grad[1]) == 0


def test_auto_backend_picks_grouped_mm_on_cuda_when_aligned():
    auto = GroupedExperts(E, D, F, ExpertBackend.auto)
    assert auto.resolve_backend(torch.empty(1, D, device="cuda")) == ExpertBackend.grouped_mm
    misaligned = GroupedExperts(E, D, F + 1, ExpertBackend.auto)  # bf16 rows need F % 8 == 0
    assert misaligned.resolve_backend(torch.empty(1, D, device="cuda")) == ExpertBackend.loop


def test_moe_layer_grouped_mm_matches_loop_under_autocast():
    mcfg = ModelConfig(dim=D, n_heads=4, num_experts=E, top_k=2, expert_hidden=F)
    torch.manual_seed(0)
    ref = MoELayer(D, mcfg, MoEConfig(expert_backend=ExpertBackend.loop)).cuda()
    ref.init_weights(0.05, 0.05)
    fast = MoELayer(D, mcfg, MoEConfig(expert_backend=ExpertBackend.grouped_mm)).cuda()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 64, D, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_ref, y = ref(x), fast(x)
    assert torch.equal(ref.last_stats.load_E, fast.last_stats.load_E)  # fp32 routing
    assert _rel(y, y_ref) < 3e-2
