"""optim.offload=cpu (ZeRO-Offload with DeepSpeed's C++ CPU Adam) against torch's AdamW.

Tolerance. The C++ op computes AdamW in float32 with fused multiply-adds (the LR, the
bias corrections beta^t and the weight-decay factor are float32; torch's foreach AdamW
computes the bias corrections in double and rounds in another order), so one step agrees
with torch's to a few float32 ulps (weights after 20 steps: 2e-6 relative). Over 20
training steps of the tiny model those last-bit differences move the losses and gradient
norms by ~1e-7 relative (measured); the tests allow 1e-5, the bound every parallel layout
is held to, and the step-level test holds weights and moments to 1e-5 as well.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

import pytest
import torch

from tests.conftest import oracle

oracle("deepspeed", module_level=True)

from moetrain.config.schema import OptimConfig, OptimOffload
from moetrain.train.optim import build_optimizer, set_lr
from tests.conftest import TINY, compose
from tests.distributed._runs import step_rows, train

LOSS_RTOL = GRAD_NORM_RTOL = 1e-5
RESUME_RTOL = 1e-6


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.LayerNorm(16),
                               torch.nn.Linear(16, 8))


def _run(model, offload: OptimOffload, steps: int = 20):
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8,
                      offload=offload)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    for s in range(steps):
        set_lr(opt, cfg.lr * (s + 1) / steps)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def test_step_matches_torch_adamw():
    """20 steps with random gradients and a changing LR: weights and moments equal torch
    AdamW's to float32 rounding, in build_optimizer's two groups (decay on matrices)."""
    ref_model, off_model = _model(), _model()
    ref = _run(ref_model, OptimOffload.none)
    off = _run(off_model, OptimOffload.cpu)
    assert [len(g["params"]) for g in off.param_groups] == [2, 4]
    assert [g["weight_decay"] for g in off.param_groups] == [0.1, 0.0]
    for p_ref, p_off in zip(ref_model.parameters(), off_model.parameters()):
        torch.testing.assert_close(p_off, p_ref, rtol=1e-5, atol=1e-6)
        s_ref, s_off = ref.state[p_ref], off.state[p_off]
        assert set(s_off) == {"step", "exp_avg", "exp_avg_sq"} and float(s_off["step"]) == 20
        torch.testing.assert_close(s_off["exp_avg"], s_ref["exp_avg"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s_off["exp_avg_sq"], s_ref["exp_avg_sq"], rtol=1e-5,
                                   atol=1e-6)
    # The weights moved far more than the tolerance, so the comparison means something.
    assert (ref_model[0].weight - _model()[0].weight).abs().max() > 1e-2


def test_low_precision_params_step_an_fp32_master_copy():
    """bf16 parameters (as device-resident ones) are stepped through a CPU fp32 master
    copy: the master follows the fp32 AdamW run, the parameter is its bf16 rounding."""
    ref_model = _model()
    ref = _run(ref_model, OptimOffload.none)
    bf16_model = _model().to(torch.bfloat16)
    off = _run(bf16_model, OptimOffload.cpu)
    for p_ref, p in zip(ref_model.parameters(), bf16_model.parameters()):
        master = off._masters[p]
        assert master.dtype == torch.float32 and p.dtype == torch.bfloat16
        # The gradients were rounded to bf16 too, so compare with a looser bound.
        torch.testing.assert_close(master, p_ref, rtol=2e-2, atol=2e-3)
        assert torch.equal(p, master.to(torch.bfloat16))
        assert off.state[p]["exp_avg"].dtype == torch.float32
    del ref
    # A resume keeps the moments fp32 and in host memory: torch's loader would cast them to
    # each parameter's dtype (bf16 here) and device.
    sd = off.state_dict()
    want = {i: {k: v.clone() for k, v in st.items()} for i, st in sd["state"].items()}
    fresh = build_optimizer(bf16_model, OptimConfig(lr=1e-2, offload=OptimOffload.cpu),
                            torch.device("cpu"))
    fresh.load_state_dict(sd)
    got = fresh.state_dict()["state"]
    for i, st in want.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert got[i][key].dtype == torch.float32 and got[i][key].device.type == "cpu"
            assert torch.equal(got[i][key], st[key]), (i, key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    """20 steps of the tiny model with AdamW and with offload, a checkpoint every 10 steps,
    in one process each."""
    tmp = tmp_path_factory.mktemp("offload")
    base = [o for o in TINY if not o.startswith(("train.steps", "eval.every"))] + [
        "train.steps=20", "eval.every=0", f"data.cache_dir={data_cache}"]
    out = {"base": base, "tmp": tmp}
    out["adamw"] = train(base + [f"run.dir={tmp / 'adamw'}", "checkpoint.every=10",
                                 "checkpoint.async_save=false"])
    out["offload"] = train(base + ["optim.offload=cpu", f"run.dir={tmp / 'offload'}",
                                   "checkpoint.every=10", "checkpoint.async_save=false"])
    return out


def test_training_follows_adamw(runs):
    ref, got = step_rows(runs["adamw"]), step_rows(runs["offload"])
    assert [r["step"] for r in got] == list(range(1, 21))
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=GRAD_NORM_RTOL), a["step"]


def test_checkpoint_resume_follows_the_uninterrupted_run(runs):
    """The step-10 checkpoint (optimizer state saved through get_state_dict/DCP) resumes
    on the uninterrupted run's losses and gradient norms for steps 11-20. Not bit for bit:
    the C++ op keeps beta^t as a running float32 product, which a new process recomputes
    with pow(beta, t), one ulp away; a lost or reset moment would move the losses by
    orders of magnitude more than RESUME_RTOL."""
    tmp = runs["tmp"]
    ckpt = tmp / "offload" / "checkpoints" / "step_0000010"
    resumed = step_rows(train(runs["base"] + [
        "optim.offload=cpu", f"run.dir={tmp / 'resumed'}", f"checkpoint.resume={ckpt}"]))
    assert [r["step"] for r in resumed] == list(range(11, 21))
    full = step_rows(runs["offload"])[10:]
    for a, b in zip(full, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=RESUME_RTOL), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=RESUME_RTOL), a["step"]


@pytest.mark.parametrize("saved,resumed", [("adamw", "cpu"), ("offload", "none")])
def test_switching_offload_at_a_resume(runs, saved, resumed):
    """The optimizer state has AdamW's form and keys (moments, step, param-group options),
    so a torch AdamW checkpoint resumes with optim.offload=cpu and the other way round,
    on the trajectory of the run that saved it (the two agree to 1e-7, see above)."""
    tmp = runs["tmp"]
    ckpt = tmp / saved / "checkpoints" / "step_0000010"
    got = step_rows(train(runs["base"] + [
        f"optim.offload={resumed}", f"run.dir={tmp / f'{saved}_to_{resumed}'}",
        f"checkpoint.resume={ckpt}"]))
    assert [r["step"] for r in got] == list(range(11, 21))
    for a, b in zip(step_rows(runs[saved])[10:], got):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=GRAD_NORM_RTOL), a["step"]


def test_missing_deepspeed_names_the_extra(monkeypatch):
    for name in ("deepspeed", "deepspeed.ops", "deepspeed.ops.adam"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.delitem(sys.modules, "moetrain.train.offload", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'moetrain\[deepspeed\]'"):
        importlib.import_module("moetrain.train.offload")
    monkeypatch.undo()  # the real module back for the other tests


def test_stale_build_lock_and_failed_build_name_the_fix(monkeypatch, tmp_path):
    from deepspeed.ops.op_builder.builder import OpBuilder

    from moetrain.train import offload

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(OpBuilder, "_loaded_ops", {})  # as a fresh process
    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    old = time.time() - offload.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.raises(RuntimeError, match=r"rm .*cpu_adam/lock"):
        offload.load_cpu_adam_op()
    lock.unlink()

    def broken(self, verbose=False):
        raise RuntimeError("c++: command not found")

    monkeypatch.setattr(offload.CPUAdamBuilder, "load", broken)
    with pytest.raises(RuntimeError, match="C\\+\\+17 compiler.*optim.offload=none"):
        offload.load_cpu_adam_op()


def test_memory_estimate_moves_the_optimizer_state_to_the_host():
    """On a GPU under FSDP, offload (FSDP2's CPUOffloadPolicy) takes the fp32 parameter and
    gradient shards and AdamW's 8 B/parameter moments off the device into CPU memory;
    without sharding (replicate) the moments and a 4 B fp32 master copy move. On CPU
    nothing moves."""
    from moetrain.parallel.memory import estimate

    base, offload = compose(TINY + ["parallel.ep=2"]), compose(TINY + ["parallel.ep=2",
                                                                        "optim.offload=cpu"])
    ref = estimate(base, 4, 257, device="cuda")
    off = estimate(offload, 4, 257, device="cuda")
    moments, shard = ref.parts["adamw m+v (fp32)"], ref.parts["params (fp32)"]
    assert moments >= 8 * ref.params and moments == 2 * shard
    assert "adamw m+v (fp32)" not in off.parts and "params (fp32)" not in off.parts
    assert ref.parts["grads (fp32)"] == shard  # every_microbatch: sharded grads only
    assert off.parts["grads (fp32)"] == 0
    assert off.total == ref.total - moments - 2 * shard
    assert off.host == {"offload params (fp32)": shard, "offload grads (fp32)": shard,
                        "offload adam m+v (fp32)": moments}
    rep = ["parallel.dp_mode=replicate"]
    ref_r = estimate(compose(TINY + ["parallel.ep=2"] + rep), 4, 257, device="cuda")
    off_r = estimate(compose(TINY + ["parallel.ep=2", "optim.offload=cpu"] + rep), 4, 257,
                     device="cuda")
    assert off_r.total == ref_r.total - ref_r.parts["adamw m+v (fp32)"]
    assert off_r.host == {"offload master (fp32)": 4 * ref_r.params,
                          "offload adam m+v (fp32)": 8 * ref_r.params}
    on_cpu = estimate(offload, 4, 257, device="cpu")
    assert on_cpu.parts == estimate(base, 4, 257, device="cpu").parts
    assert on_cpu.host == {}
