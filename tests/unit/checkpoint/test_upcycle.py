"""Sparse upcycling and Drop-Upcycling (moetrain/checkpoint/upcycle.py): the MoE reproduces
the dense model, dropped channels are exactly the drawn ones with the replaced weights'
statistics, the optimizer state follows the weights, bad input fails before any work."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import pytest
import torch

from moetrain.checkpoint.upcycle import (
    UpcycleError,
    build_upcycled,
    drop_upcycle,
    exactness_issue,
    inspect_dense,
    load_into,
    num_dropped,
    upcycle_state_dict,
)
from moetrain.config.schema import (
    ConfigError,
    DispatchMode,
    DropMode,
    InitConfig,
    ModelConfig,
    MoEConfig,
    RouterConfig,
    RouterInit,
    RouterType,
    ScoreFunc,
)
from moetrain.models import Transformer

V = 61
DENSE = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=64,
                    first_dense_layers=3, num_experts=4, top_k=2, expert_hidden=48)


def _moe_cfg(**router) -> MoEConfig:
    return MoEConfig(router=RouterConfig(**router), expert_backend="loop", kernel_backend="torch")


def _dense_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(DENSE, _moe_cfg(), V).eval()


def _moe(model_cfg: ModelConfig, moe_cfg: MoEConfig, sd: dict) -> Transformer:
    m = Transformer(model_cfg, moe_cfg, V)
    m.load_state_dict(sd, strict=True)
    return m.eval()


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (3, 24), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("target, router", [
    ({"first_dense_layers": 0}, {}),  # softmax top-2, renormalised
    ({"first_dense_layers": 0, "top_k": 3}, {"score_func": ScoreFunc.sigmoid}),
    ({"first_dense_layers": 1, "moe_every": 2}, {}),  # layers 0, 2 dense; 1 MoE
    ({"first_dense_layers": 0, "n_shared_experts": 2}, {}),  # shared + routed halves
    ({"first_dense_layers": 0, "top_k": 1}, {"name": RouterType.noisy_topk}),
    ({"first_dense_layers": 0, "num_experts": 8, "top_k": 2},
     {"name": RouterType.deepseek_v3, "score_func": ScoreFunc.sigmoid, "n_groups": 4,
      "topk_groups": 2}),
    # RMoE: fresh projection, head and shared cell; the renormalised top-k sums to 1
    ({"first_dense_layers": 0}, {"name": RouterType.recurrent, "rnn_hidden": 8}),
    ({"first_dense_layers": 1}, {"name": RouterType.compete}),
])
def test_upcycled_moe_reproduces_dense_logits(target, router):
    dense = _dense_model()
    model_cfg = dataclasses.replace(DENSE, **target)
    moe_cfg = _moe_cfg(**router)
    assert exactness_issue(model_cfg, moe_cfg) is None
    up = upcycle_state_dict(dense.state_dict(), model_cfg, moe_cfg, InitConfig(seed=3), V)
    moe = _moe(model_cfg, moe_cfg, up.model)
    assert moe.moe_layers(), "the target has MoE layers"
    x = _tokens()
    with torch.no_grad():
        ref, got = dense(x), moe(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("target, router, moe", [
    ({"top_k": 1}, {"name": RouterType.switch}, {}),  # raw top-1 probability
    ({}, {"renormalize": False}, {}),
    ({}, {"route_scale": 2.5}, {}),
    ({}, {"name": RouterType.threshold, "max_k": 2}, {}),  # at most 2: p sums below 1
    ({}, {}, {"dispatch": DispatchMode.capacity, "capacity_factor": 0.5}),
    ({}, {}, {"chain_iterations": 2}),  # Chain-of-Experts: the FFN twice, inner residual
    ({}, {}, {"chain_iterations": 2, "chain_residual": "outer"}),
])
def test_inexact_router_configs_are_named_and_differ(target, router, moe):
    """Where the combine weights need not sum to 1, upcycling is not exact: the check says
    so, and the logits do differ (so the exactness test above can fail)."""
    dense = _dense_model()
    model_cfg = dataclasses.replace(DENSE, first_dense_layers=0, **target)
    moe_cfg = dataclasses.replace(_moe_cfg(**router), **moe)
    assert exactness_issue(model_cfg, moe_cfg)
    up = upcycle_state_dict(dense.state_dict(), model_cfg, moe_cfg, InitConfig(), V)
    x = _tokens()
    with torch.no_grad():
        diff = (_moe(model_cfg, moe_cfg, up.model)(x) - dense(x)).abs().max().item()
    assert diff > 1e-3


def test_copies_router_init_and_dtypes():
    dense = _dense_model()
    sd = dense.state_dict()
    model_cfg = dataclasses.replace(DENSE, first_dense_layers=1, num_experts=64)
    init = InitConfig(seed=5, router_std=0.05)
    up = upcycle_state_dict(sd, model_cfg, _moe_cfg(), init, V).model
    for k in ("tok_embeddings.weight", "output.weight", "norm.weight",
              "layers.0.feed_forward.w2.weight", "layers.2.attention.wk.weight",
              "layers.1.ffn_norm.weight"):
        assert torch.equal(up[k], sd[k]), k
    for i in (1, 2):
        for name, dense_w in (("w1_EFD", "w1"), ("w3_EFD", "w3"), ("w2_EDF", "w2")):
            w = up[f"layers.{i}.moe.experts.{name}"]
            want = sd[f"layers.{i}.feed_forward.{dense_w}.weight"]
            assert w.shape[0] == 64 and all(torch.equal(w[e], want) for e in range(64))
        gate = up[f"layers.{i}.moe.router.gate.weight"]
        assert gate.dtype == torch.float32 and gate.shape == (64, 32)
        assert abs(gate.mean().item()) < 0.05 * 5 / math.sqrt(gate.numel())
        assert gate.std().item() == pytest.approx(0.05, rel=0.08)
        assert torch.equal(up[f"layers.{i}.moe.router.expert_bias"], torch.zeros(64))
    assert not torch.equal(up["layers.1.moe.router.gate.weight"],
                           up["layers.2.moe.router.gate.weight"])  # seeded per layer


@pytest.mark.parametrize("init", [
    {"drop_ratio": 0.5},  # auto: Drop-Upcycling's released recipe
    {"drop_ratio": 0.0, "router_init": RouterInit.uniform},
])
def test_uniform_router_init_is_drop_upcyclings_recipe(init):
    """Drop-Upcycling's conversions draw the router with ``torch_rand_002``: (u - mean(u)) *
    0.02 * sqrt(12), u ~ U(0, 1), a zero-mean uniform with std 0.02, so on
    [-0.02 sqrt(3), 0.02 sqrt(3)] = [-0.034641, 0.034641]. 4096 entries per layer: the
    sample mean's standard error is 0.02 / 64 = 3.1e-4, the sample std's about
    0.02 sqrt(0.8 / 4096) / 2 = 1.4e-4 (uniform kurtosis 9/5)."""
    dense = _dense_model()
    model_cfg = dataclasses.replace(DENSE, first_dense_layers=0, num_experts=128)
    up = upcycle_state_dict(dense.state_dict(), model_cfg, _moe_cfg(), InitConfig(**init), V)
    a = 0.02 * math.sqrt(3.0)
    assert a == pytest.approx(0.034641016, rel=1e-8)
    for i in range(3):
        gate = up.model[f"layers.{i}.moe.router.gate.weight"]
        assert gate.shape == (128, 32) and gate.dtype == torch.float32
        assert abs(gate.mean().item()) < 5 * 0.02 / 64
        assert abs(gate.std().item() - 0.02) < 5 * 1.4e-4
        assert gate.abs().max().item() <= a  # bounded: a normal passes a in 8.3% of draws
        assert gate.abs().max().item() > 0.99 * a  # and it fills the interval
        # flat: a uniform's entries fall in each quarter of [-a, a] equally often
        quarters = torch.histc(gate, bins=4, min=-a, max=a) / gate.numel()
        torch.testing.assert_close(quarters, torch.full((4,), 0.25), rtol=0, atol=0.03)
    # the plain-upcycling default stays normal: same std, unbounded tails
    normal = upcycle_state_dict(dense.state_dict(), model_cfg, _moe_cfg(), InitConfig(), V)
    gate = normal.model["layers.0.moe.router.gate.weight"]
    assert (gate.abs() > a).float().mean().item() == pytest.approx(0.0833, abs=0.02)


# ----------------------------------------------------------------------------- Drop-Upcycling
def _changed(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Channels (rows) where any entry differs."""
    return (new != old).any(dim=1).nonzero().flatten()


@pytest.mark.parametrize("mode", list(DropMode))
@pytest.mark.parametrize("ratio, F", [(0.3, 50), (0.29, 100), (1.0, 12), (0.05, 10)])
def test_drop_changes_exactly_floor_r_f_channels(mode, ratio, F):
    g0 = torch.Generator().manual_seed(0)
    w1, w3, w2 = (torch.randn(F, 8, generator=g0), torch.randn(F, 8, generator=g0),
                  torch.randn(8, F, generator=g0))
    (n1, n3, n2), (s1, s3, s2) = drop_upcycle(w1, w3, w2, ratio, mode,
                                              torch.Generator().manual_seed(7))
    n = math.floor(round(ratio * 100) * F / 100)  # integer arithmetic: the exact floor
    assert num_dropped(ratio, F) == n
    for new, old, idx in ((n1, w1, s1), (n3, w3, s3), (n2.T, w2.T, s2)):
        assert len(idx) == n and torch.equal(_changed(new, old), idx)
        keep = torch.ones(F, dtype=torch.bool)
        keep[idx] = False
        assert torch.equal(new[keep], old[keep])  # bit-identical elsewhere
    if mode == DropMode.per_expert:
        assert torch.equal(s1, s3) and torch.equal(s1, s2)
    elif 0 < n < F:
        assert not (torch.equal(s1, s3) and torch.equal(s1, s2))


def test_drop_statistics_match_replaced_weights():
    """The new entries follow N(mu, sigma) of the weights they replace, per matrix (each
    matrix has its own mean and row-dependent scale)."""
    F, D = 4096, 32
    g0 = torch.Generator().manual_seed(0)
    scale_F1 = torch.linspace(0.2, 2.0, F)[:, None]
    w1 = 0.3 + scale_F1 * torch.randn(F, D, generator=g0)
    w3 = -0.1 + 0.5 * scale_F1 * torch.randn(F, D, generator=g0)
    w2 = (0.05 + scale_F1 * torch.randn(F, D, generator=g0)).T.contiguous()
    for mode in DropMode:
        new, sets = drop_upcycle(w1, w3, w2, 0.5, mode, torch.Generator().manual_seed(1))
        for new_w, old_w, idx in ((new[0], w1, sets[0]), (new[1], w3, sets[1]),
                                  (new[2].T, w2.T, sets[2])):
            old, got = old_w[idx], new_w[idx]
            se = old.std().item() / math.sqrt(got.numel())  # standard error of the mean
            assert abs(got.mean().item() - old.mean().item()) < 5 * se
            assert got.std().item() == pytest.approx(old.std().item(), rel=0.02)


def test_drop_upcycled_experts_differ_and_are_seeded():
    dense = _dense_model()
    sd = dense.state_dict()
    model_cfg = dataclasses.replace(DENSE, first_dense_layers=0)
    moe_cfg = _moe_cfg()

    def up(**init):
        return upcycle_state_dict(sd, model_cfg, moe_cfg, InitConfig(**init), V).model

    a, b, c = up(drop_ratio=0.5, seed=1), up(drop_ratio=0.5, seed=1), up(drop_ratio=0.5, seed=2)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # same seed: identical
    w = a["layers.1.moe.experts.w1_EFD"]
    dense_w1 = sd["layers.1.feed_forward.w1.weight"]
    n = math.floor(0.5 * 48)
    for e in range(4):
        assert len(_changed(w[e], dense_w1)) == n
        for f in range(e):
            assert not torch.equal(w[e], w[f])  # experts differ
    assert not torch.equal(w, c["layers.1.moe.experts.w1_EFD"])  # another seed: other draws
    naive = up(drop_ratio=0.0, seed=1)  # r = 0: plain sparse upcycling
    assert all(torch.equal(naive["layers.1.moe.experts.w1_EFD"][e], dense_w1) for e in range(4))
    # the router: the same (seed, layer) generator; Drop-Upcycling's law is uniform
    normal = up(drop_ratio=0.5, seed=1, router_init=RouterInit.normal)
    assert torch.equal(naive["layers.1.moe.router.gate.weight"],
                       normal["layers.1.moe.router.gate.weight"])
    assert not torch.equal(naive["layers.1.moe.router.gate.weight"],
                           a["layers.1.moe.router.gate.weight"])


# ----------------------------------------------------------------------------- optimizer
def test_reused_optimizer_state_follows_the_weights():
    dense = _dense_model()
    opt = torch.optim.AdamW(dense.parameters(), lr=1e-3)
    dense(_tokens()).square().mean().backward()
    opt.step()
    named = dict(dense.named_parameters())
    dense_optim = {k: {n: t.clone() for n, t in opt.state[p].items()} for k, p in named.items()}
    for st in dense_optim.values():
        st["step"] = torch.tensor(17.0)
    model_cfg = dataclasses.replace(DENSE, first_dense_layers=0)
    init = InitConfig(drop_ratio=0.25, seed=4)
    up = upcycle_state_dict(dense.state_dict(), model_cfg, _moe_cfg(), init, V,
                            dense_optim=dense_optim)
    ref = upcycle_state_dict(dense.state_dict(), model_cfg, _moe_cfg(), init, V)
    assert "layers.0.moe.router.gate.weight" not in up.optim  # fresh: zero, step 0
    for name, dw in (("w1_EFD", "w1"), ("w3_EFD", "w3"), ("w2_EDF", "w2")):
        key = f"layers.2.moe.experts.{name}"
        st, dst = up.optim[key], dense_optim[f"layers.2.feed_forward.{dw}.weight"]
        assert float(st["step"]) == 17.0
        new = (ref.model[key] != dense.state_dict()[f"layers.2.feed_forward.{dw}.weight"])
        for m in ("exp_avg", "exp_avg_sq"):
            want = torch.where(new, torch.zeros(()), dst[m].expand_as(st[m]))
            assert torch.equal(st[m], want), (key, m)  # copied, zero at new channels
    assert torch.equal(up.optim["layers.1.attention.wq.weight"]["exp_avg"],
                       dense_optim["layers.1.attention.wq.weight"]["exp_avg"])

    # Into a model + optimizer: reused entries as given, the router fresh (step 0, zeros).
    moe = Transformer(model_cfg, _moe_cfg(), V)
    moe_opt = torch.optim.AdamW(moe.parameters(), lr=1e-3)
    load_into(moe, moe_opt, up)
    params = dict(moe.named_parameters())
    gate = moe_opt.state[params["layers.0.moe.router.gate.weight"]]
    assert float(gate["step"]) == 0 and not gate["exp_avg"].any()
    w1 = moe_opt.state[params["layers.0.moe.experts.w1_EFD"]]
    assert float(w1["step"]) == 17 and torch.equal(
        w1["exp_avg"], up.optim["layers.0.moe.experts.w1_EFD"]["exp_avg"])
    assert torch.equal(params["layers.0.moe.experts.w1_EFD"].detach(),
                       up.model["layers.0.moe.experts.w1_EFD"])


# ----------------------------------------------------------------------------- config
def test_init_config_fields_are_validated():
    with pytest.raises(ConfigError, match="init.drop_ratio"):
        InitConfig(from_dense="x", drop_ratio=1.5)
    with pytest.raises(ConfigError, match="init.router_std"):
        InitConfig(from_dense="x", router_std=0.0)
    with pytest.raises(ConfigError, match="init.seed"):
        InitConfig(from_dense="x", seed=-1)


def test_validate_init_rules(tiny_overrides):
    from moetrain.config import validate
    from tests.conftest import compose

    cfg = compose(tiny_overrides + ["init.from_dense=/nowhere", "model.first_dense_layers=2"])
    with pytest.raises(ConfigError, match="model.first_dense_layers"):
        validate(cfg, 1)
    for field in ("init.drop_ratio=0.5", "init.reuse_optimizer=true"):
        with pytest.raises(ConfigError, match=f"{field}.*init.from_dense=PATH"):
            validate(compose(tiny_overrides + [field]), 1)


# ----------------------------------------------------------------------------- bad input
def _save_dense(tmp_path: Path) -> Path:
    """A committed dense checkpoint of ``_dense_model`` (weights + AdamW) at step 1."""
    import torch.distributed as dist

    from moetrain.checkpoint import CheckpointManager, ModelOptimizerState
    from moetrain.config import CheckpointConfig

    model = _dense_model()
    opt = torch.optim.AdamW(model.parameters())
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mgr = CheckpointManager(CheckpointConfig(dir=str(tmp_path / "ckpt"), keep=0))
        mgr.save(1, {"model_optim": ModelOptimizerState(model, opt)}, blocking=True)
    finally:
        if owned:
            dist.destroy_process_group()
    return tmp_path / "ckpt" / "step_0000001"


def test_bad_dense_sources_fail_with_clear_errors(tmp_path):
    ckpt = _save_dense(tmp_path)
    assert inspect_dense(tmp_path / "ckpt").path == ckpt  # a directory of steps: its latest

    with pytest.raises(UpcycleError, match="does not exist"):
        inspect_dense(tmp_path / "missing")

    unmarked = tmp_path / "runs" / "step_0000002"
    shutil.copytree(ckpt, unmarked)
    (unmarked / "COMMITTED").unlink()
    with pytest.raises(UpcycleError, match="no COMMITTED marker"):
        inspect_dense(unmarked)

    truncated = tmp_path / "trunc" / "step_0000001"
    shutil.copytree(ckpt, truncated)
    data = next(truncated.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(UpcycleError, match=r"corrupt.*truncated"):
        inspect_dense(truncated)

    garbled = tmp_path / "garbled" / "step_0000001"
    shutil.copytree(ckpt, garbled)
    (garbled / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(UpcycleError, match="corrupt"):
        inspect_dense(garbled)

    hf = tmp_path / "gpt2"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(UpcycleError, match=r"unknown architecture.*gpt2"):
        inspect_dense(hf)

    # An MoE checkpoint is not a dense model.
    moe_cfg = dataclasses.replace(DENSE, first_dense_layers=0)
    up = upcycle_state_dict(_dense_model().state_dict(), moe_cfg, _moe_cfg(), InitConfig(), V)
    import torch.distributed.checkpoint as dcp

    dcp.save({"model_optim": {"model": up.model}}, checkpoint_id=str(tmp_path / "moe" /
                                                                      "step_0000001"),
             no_dist=True)
    (tmp_path / "moe" / "step_0000001" / "COMMITTED").write_text("{}")
    with pytest.raises(UpcycleError, match="already an MoE"):
        inspect_dense(tmp_path / "moe")


@pytest.mark.parametrize("override, field", [
    ({"dim": 64, "n_heads": 4}, "model.dim=64.*dim=32"),
    ({"expert_hidden": 64}, "model.expert_hidden=64.*set model.expert_hidden=48"),
    ({"n_layers": 4}, "model.n_layers=4.*n_layers=3"),
    ({"n_kv_heads": 4}, "n_kv_heads"),
])
def test_mismatched_target_fails_before_reading_weights(tmp_path, monkeypatch, override, field):
    ckpt = _save_dense(tmp_path)
    from moetrain.checkpoint import upcycle

    def no_reads(*a, **k):
        raise AssertionError("weights were read before the checks")

    monkeypatch.setattr(upcycle.DenseSource, "load", no_reads)
    init = InitConfig(from_dense=str(ckpt))
    target = dataclasses.replace(DENSE, first_dense_layers=0, **override)
    with pytest.raises(UpcycleError, match=field):
        build_upcycled(init, target, _moe_cfg(), V)
    with pytest.raises(UpcycleError, match="model.vocab_size=99"):
        build_upcycled(init, dataclasses.replace(DENSE, first_dense_layers=0), _moe_cfg(), 99)


def test_reuse_optimizer_needs_optimizer_state(tmp_path):
    import torch.distributed.checkpoint as dcp

    path = tmp_path / "step_0000001"
    dcp.save({"model_optim": {"model": _dense_model().state_dict()}}, checkpoint_id=str(path),
             no_dist=True)
    (path / "COMMITTED").write_text("{}")
    init = InitConfig(from_dense=str(path), reuse_optimizer=True)
    with pytest.raises(UpcycleError, match="init.reuse_optimizer=true.*no optimizer state"):
        build_upcycled(init, dataclasses.replace(DENSE, first_dense_layers=0), _moe_cfg(), V)


def test_fresh_router_parts_of_chains_and_recurrent_routers():
    """A Chain-of-Experts round's gate and RMoE's projection and head are drawn like the
    gate (N(0, router_std^2), seeded per layer, round and name); RMoE's shared cell like
    torch's GRUCell, U(-1/sqrt(H), 1/sqrt(H))."""
    dense = _dense_model()
    model_cfg = dataclasses.replace(DENSE, first_dense_layers=0, num_experts=64)
    init = InitConfig(seed=5, router_std=0.05)
    chain = dataclasses.replace(_moe_cfg(), chain_iterations=3)
    up = upcycle_state_dict(dense.state_dict(), model_cfg, chain, init, V).model
    gates = [up[k] for k in ("layers.1.moe.router.gate.weight",
                             "layers.1.moe.chain_routers.0.gate.weight",
                             "layers.1.moe.chain_routers.1.gate.weight")]
    plain = upcycle_state_dict(dense.state_dict(), model_cfg, _moe_cfg(), init, V).model
    assert torch.equal(gates[0], plain["layers.1.moe.router.gate.weight"])  # unchanged
    for g in gates[1:]:
        assert g.std().item() == pytest.approx(0.05, rel=0.08)
        assert not torch.equal(g, gates[0])
    assert not torch.equal(gates[1], gates[2])
    H = 16
    rec = _moe_cfg(name=RouterType.recurrent, rnn_hidden=H)
    up = upcycle_state_dict(dense.state_dict(), model_cfg, rec, init, V).model
    for name in ("proj.weight", "head.weight"):
        w = up[f"layers.0.moe.router.{name}"]
        assert w.std().item() == pytest.approx(0.05, rel=0.1)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):  # U(-b, b), b = 1/sqrt(H)
        cell = up[f"router_rnn.{name}"]
        assert cell.shape[0] == 3 * H and cell.abs().max().item() <= 1 / math.sqrt(H)
        assert cell.abs().max().item() > 0.9 / math.sqrt(H)
        assert cell.std().item() == pytest.approx(1 / math.sqrt(3 * H), rel=0.2)
    model = _moe(model_cfg, rec, up)  # every key the model has, strictly
    assert model.router_rnn is model.moe_layers()[0].router.cell
