"""A parameter that has had no gradient when a checkpoint is saved (EvoMoE's gate before
its spawn, trained with no z-loss) still resumes exactly: the checkpoint holds its fresh
optimizer state, so the load template (every parameter initialised) finds it."""

from __future__ import annotations

import torch
from torch import nn

from moetrain.checkpoint import CheckpointManager, ModelOptimizerState
from moetrain.config import CheckpointConfig


class _TwoPart(nn.Module):
    """``used`` trains from step 1; ``idle`` only once ``wake`` is set (a gate that gets
    its first gradient after a phase change)."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 4, bias=False)
        self.idle = nn.Linear(4, 4, bias=False)
        self.wake = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.used(x)
        return y + self.idle(x) if self.wake else y


def _build() -> tuple[_TwoPart, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = _TwoPart()
    return m, torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)


def _step(m: _TwoPart, opt: torch.optim.Optimizer, seed: int) -> None:
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed))
    m(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_parameter_without_gradient_resumes_exactly(pg, tmp_path):
    ref, ref_opt = _build()
    for s in range(2):
        _step(ref, ref_opt, s)
    assert ref.idle.weight not in ref_opt.state  # AdamW skipped it: no gradient yet
    idle_before = ref.idle.weight.detach().clone()

    mgr = CheckpointManager(CheckpointConfig(dir=str(tmp_path / "ckpt"), keep=0))
    mgr.save(2, {"model_optim": ModelOptimizerState(ref, ref_opt)})
    # Saving gave it the fresh state (step 0, zero moments) and left the weights alone.
    st = ref_opt.state[ref.idle.weight]
    assert float(st["step"]) == 0.0
    assert not st["exp_avg"].any() and not st["exp_avg_sq"].any()
    assert torch.equal(ref.idle.weight, idle_before)

    res, res_opt = _build()
    mgr.load(mgr.latest(), {"model_optim": ModelOptimizerState(res, res_opt)})
    # Both wake the idle part and continue: the same weights, bit for bit, as a run whose
    # idle part starts from a state AdamW creates itself (no checkpoint in between).
    never, never_opt = _build()
    for s in range(2):
        _step(never, never_opt, s)
    for m, opt in ((ref, ref_opt), (res, res_opt), (never, never_opt)):
        m.wake = True
        for s in range(2, 5):
            _step(m, opt, s)
    for a, b, c in zip(ref.parameters(), res.parameters(), never.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(res.idle.weight, idle_before)  # it did train after waking
