import pytest
import torch
from torch import nn

from moetrain.config.schema import ConfigError, ExpertBackend
from moetrain.models.moe.experts import GroupedExperts

from ._ref import swiglu

E, D, F = 4, 8, 12


def _experts(backend: ExpertBackend, seed: int = 0) -> GroupedExperts:
    torch.manual_seed(seed)
    ex = GroupedExperts(E, D, F, backend)
    ex.init_weights(0.5, 0.5)
    return ex


def _reference(ex: GroupedExperts, x_RD: torch.Tensor, counts: list[int]) -> torch.Tensor:
    e_of_row = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    return torch.stack([swiglu(x_RD[r], ex.w1_EFD[e], ex.w3_EFD[e], ex.w2_EDF[e])
                        for r, e in enumerate(e_of_row.tolist())])


@pytest.mark.parametrize("backend", [ExpertBackend.loop, ExpertBackend.grouped_mm])
def test_backend_matches_per_row_reference_with_an_empty_expert(backend):
    counts = [3, 0, 5, 2]  # expert 1 receives nothing
    ex = _experts(backend)
    x = torch.randn(sum(counts), D, requires_grad=True)
    y = ex(x, torch.tensor(counts))
    ref = _reference(ex, x, counts)
    assert torch.allclose(y, ref, atol=1e-5)
    y.sum().backward()  # expanded gradient: grouped_mm needs it made contiguous
    assert torch.count_nonzero(ex.w1_EFD.grad[1]) == 0
    assert torch.count_nonzero(ex.w2_EDF.grad[1]) == 0
    assert ex.w1_EFD.grad[0].abs().sum() > 0


def test_grouped_mm_and_loop_agree_forward_and_backward_on_cpu():
    counts = [2, 6, 0, 4]
    loop, gmm = _experts(ExpertBackend.loop), _experts(ExpertBackend.grouped_mm)
    x1 = torch.randn(sum(counts), D, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    g = torch.randn(sum(counts), D)
    y1, y2 = loop(x1, torch.tensor(counts)), gmm(x2, torch.tensor(counts))
    assert torch.allclose(y1, y2, atol=1e-5)
    y1.backward(g)
    y2.backward(g)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5)
    for name in ("w1_EFD", "w3_EFD", "w2_EDF"):
        assert torch.allclose(getattr(loop, name).grad, getattr(gmm, name).grad, atol=1e-5)


def test_auto_backend_is_loop_on_cpu():
    assert _experts(ExpertBackend.auto).resolve_backend(torch.randn(1, D)) == ExpertBackend.loop


def test_grouped_mm_rejects_misaligned_sizes_with_a_fix():
    ex = GroupedExperts(2, 6, 5, ExpertBackend.grouped_mm)
    with pytest.raises(ConfigError, match="moe.expert_backend=loop"):
        ex(torch.randn(3, 6), torch.tensor([1, 2]))


def test_tokens_per_expert_length_must_match_local_experts():
    ex = _experts(ExpertBackend.loop)
    with pytest.raises(ValueError, match="per LOCAL expert"):
        ex(torch.randn(3, D), torch.tensor([1, 2]))


class _ShardedParam(nn.Parameter):
    """Stands in for a DTensor sharded on dim 0: the local shard holds experts 2 and 3."""

    def to_local(self) -> torch.Tensor:
        return self[2:]


def test_sharded_weights_use_the_local_shard():
    ex = _experts(ExpertBackend.loop)
    full = {n: getattr(ex, n).detach().clone() for n in ("w1_EFD", "w3_EFD", "w2_EDF")}
    for n, w in full.items():
        setattr(ex, n, _ShardedParam(w.clone()))
    counts = [3, 1]
    x = torch.randn(4, D)
    y = ex(x, torch.tensor(counts))
    ref = torch.stack([swiglu(x[r], full["w1_EFD"][e], full["w3_EFD"][e], full["w2_EDF"][e])
                       for r, e in enumerate([2, 2, 2, 3])])
    assert torch.allclose(y, ref, atol=1e-5)
    with pytest.raises(ValueError, match="hold 2 local experts"):
        ex(x, torch.tensor([1, 1, 1, 1]))
