"""Activation checkpointing and per-block compile change memory and speed, never numbers:
losses and gradients equal the unwrapped model's bitwise, the recomputed regions really
run twice, state dicts load across settings, and the real trainer logs the same
trajectory (also when a run saved with one setting resumes with another)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from moetrain.config import ConfigError
from moetrain.models import Transformer
from moetrain.models.attention import Attention
from moetrain.models.moe.experts import GroupedExperts
from moetrain.parallel.activation_checkpoint import apply_ac, apply_compile, is_checkpointed
from tests.conftest import TINY, compose
from tests.distributed._runs import step_rows, train

MODES = {
    "full": ("full", False),
    "selective": ("selective", False),
    "selective_attn": ("selective", True),
}
WRAP = "_checkpoint_wrapped_module."


@pytest.fixture(scope="module")
def base():
    cfg = compose(TINY + ["model.n_shared_experts=1", "model.first_dense_layers=1",
                          "model.n_layers=3"])
    torch.manual_seed(0)
    return Transformer(cfg.model, cfg.moe, 257)


def _step(model) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[type, int]]:
    """Loss, gradients (FQNs without the wrapper prefix) and forward calls per module type."""
    calls = {GroupedExperts: 0, Attention: 0}

    def count(mod, *_):
        calls[type(mod)] += 1

    # Pre-hooks: a recompute stops early, once it has re-created every saved tensor.
    hooks = [m.register_forward_pre_hook(count) for m in model.modules() if type(m) in calls]
    tokens = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(1))
    loss = F.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten())
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {n.replace(WRAP, ""): p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, calls


@pytest.mark.parametrize("name", list(MODES))
def test_recompute_is_exact_and_runs_twice(base, name):
    mode, attention = MODES[name]
    ref_loss, ref_grads, ref_calls = _step(copy.deepcopy(base))
    model = copy.deepcopy(base)
    apply_ac(model, mode, attention=attention)
    loss, grads, calls = _step(model)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for k in ref_grads:
        assert torch.equal(grads[k], ref_grads[k]), k
    # 2 MoE layers and 3 attention sublayers; a recomputed one runs again in the backward.
    assert ref_calls == {GroupedExperts: 2, Attention: 3}
    assert calls[GroupedExperts] == 4
    assert calls[Attention] == (6 if mode == "full" or attention else 3)
    wrapped = [n for n, m in model.named_modules() if is_checkpointed(m)]
    if mode == "full":
        assert wrapped == ["layers.0", "layers.1", "layers.2"]
    else:
        assert wrapped == (["layers.0.attention"] if attention else []) + [
            f"layers.{i}.{m}" for i in (1, 2)
            for m in (["attention", "moe.experts"] if attention else ["moe.experts"])]


def test_no_double_recompute_with_in_module_experts(base):
    """moe.recompute_experts (GroupedExperts.recompute) is never stacked with a wrapper."""
    sel = copy.deepcopy(base)
    for m in sel.modules():
        if isinstance(m, GroupedExperts):
            m.recompute = True
    full = copy.deepcopy(sel)
    apply_ac(sel, "selective")
    apply_ac(full, "full")
    assert not any(is_checkpointed(m) for m in sel.modules() if hasattr(m, "recompute"))
    assert all(not m.recompute for m in full.modules() if isinstance(m, GroupedExperts))
    assert _step(full)[2][GroupedExperts] == 4  # once in the forward, once recomputed


@pytest.mark.parametrize("name", list(MODES))
def test_state_dict_loads_across_settings(base, name):
    mode, attention = MODES[name]
    plain = copy.deepcopy(base)
    wrapped = copy.deepcopy(base)
    apply_ac(wrapped, mode, attention=attention)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    # Saved with AC, loaded without; and the other way round (fresh weights each time).
    torch.manual_seed(123)
    fresh = Transformer(base.model_cfg, compose(TINY).moe, 257)
    fresh.load_state_dict(wrapped.state_dict(), strict=True)
    for k, v in plain.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    torch.manual_seed(5)
    target = copy.deepcopy(fresh)
    target.init_weights()
    apply_ac(target, mode, attention=attention)
    target.load_state_dict(plain.state_dict(), strict=True)
    for k, v in plain.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_compile_keeps_numbers_and_names(base):
    ref_loss, ref_grads, _ = _step(copy.deepcopy(base))
    model = copy.deepcopy(base)
    apply_ac(model, "full")
    apply_compile(model, backend="eager")  # inductor needs a compiler toolchain; the
    # wrapping (in place, FQNs kept) is what is under test on CPU
    assert all(b._compiled_call_impl is not None for b in model.layers.values())
    assert list(model.state_dict()) == list(base.state_dict())
    loss, grads, _ = _step(model)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads)


def test_inductor_compile_with_selective_ac_matches_eager(tmp_path, monkeypatch):
    """The real backend ``parallel.compile`` uses (inductor, here generating C++ for the
    CPU): the MoE block's routing, dispatch, aux-loss injection and recompute region trace
    and match eager within float32 reordering."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    # One MoE block (with a shared expert): every block is compiled on its own, and one
    # MoE block covers what this test is about at a third of the compile time.
    cfg = compose(TINY + ["model.n_shared_experts=1", "model.n_layers=1"])
    torch.manual_seed(0)
    base = Transformer(cfg.model, cfg.moe, 257)
    ref_loss, ref_grads, _ = _step(copy.deepcopy(base))
    model = copy.deepcopy(base)
    apply_ac(model, "selective")
    apply_compile(model)
    loss, grads, _ = _step(model)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    for k, g in ref_grads.items():
        assert ((grads[k] - g).norm() / g.norm()).item() < 1e-5, k


def test_ac_attention_needs_selective():
    with pytest.raises(ConfigError, match="parallel.ac_attention"):
        compose(["parallel.ac=full", "parallel.ac_attention=true"])


# ----------------------------------------------------------------------------- trainer
BASE = TINY + ["eval.every=0"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def _run(tmp_path, cache, name, extra):
    return step_rows(train(BASE + extra + [f"run.dir={tmp_path / name}",
                                           f"data.cache_dir={cache}"]))


def test_trainer_trajectory_and_resume_across_settings(tmp_path, cache):
    keys = ("loss", "grad_norm", "aux_loss", "z_loss", "load_imbalance")
    ref = _run(tmp_path, cache, "ref", [])
    for name, extra in [("full", ["parallel.ac=full"]),
                        ("sel", ["parallel.ac=selective", "parallel.ac_attention=true"])]:
        got = _run(tmp_path, cache, name, extra)
        assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in ref]
    # Saved at step 3 with full AC, resumed without AC: the uninterrupted ac=none numbers.
    ckpt = ["checkpoint.every=3", "checkpoint.keep=0"]
    _run(tmp_path, cache, "resumed", ckpt + ["parallel.ac=full", "train.stop_at=3"])
    got = _run(tmp_path, cache, "resumed", ckpt)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in ref]
