"""tools/bench_moe_layer.py and tools/bench_train.py on CPU: the numbers they report."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from tests.conftest import oracle

TOOLS = Path(__file__).resolve().parents[3] / "tools"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_bench_moe_layer_tiny_on_cpu(tmp_path):
    bench = _tool("bench_moe_layer")
    out = tmp_path / "bench.json"
    report = bench.main(["--device", "cpu", "--shape", "tiny", "--warmup", "1", "--iters", "2",
                         "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    (sh,) = report["shapes"]
    D, F, E, K, T = 64, 96, 8, 2, 256
    assert (sh["D"], sh["F"], sh["E"], sh["K"], sh["T"]) == (D, F, E, K, T)
    assert sh["input_shape"] == [1, 256, 64]
    assert sh["expert_flops"] == 18 * T * K * D * F == 56_623_104
    # Correctness is checked before timing: moetrain's layer equals the naive loop.
    for name in ("moetrain", "moetrain_torch"):
        check = sh["check"][name]
        assert check["ok"] and check["output_rel_err"] < 1e-5, check
        assert check["input_grad_rel_err"] < 1e-5
    # The Triton variant needs a GPU (or the interpreter): skipped, naming the fix.
    assert sh["check"]["moetrain_triton"]["ok"] is None
    assert sh["target_met"] is None  # targets are for an H100
    rows = {r["impl"]: r for r in sh["results"]}
    assert set(rows) == set(bench.IMPLS)
    assert rows["moetrain_triton"]["status"] == "skipped"
    assert "TRITON_INTERPRET=1" in rows["moetrain_triton"]["note"]
    for name in ("moetrain", "moetrain_torch", "naive_loop", "dense_limit"):
        r = rows[name]
        assert r["status"] == "ok" and r["ms"] > 0
        assert math.isclose(r["tflops"], sh["expert_flops"] / (r["ms"] * 1e-3) / 1e12)
        assert math.isclose(r["pct_of_dense"], 100 * rows["dense_limit"]["ms"] / r["ms"])
        assert r["peak_mem_gib"] is None  # CUDA only
    assert rows["dense_limit"]["pct_of_dense"] == pytest.approx(100.0)
    # Each implementation's output is compared with the naive loop's on the same weights.
    assert rows["naive_loop"]["rel_err_vs_naive"] == 0.0
    assert rows["moetrain"]["rel_err_vs_naive"] < 1e-5
    assert rows["dense_limit"]["rel_err_vs_naive"] is None  # another function
    for name in ("hf_mixtral", "hf_mixtral_grouped_mm", "torchtitan"):
        if rows[name]["status"] != "ok":
            assert rows[name]["status"] == "skipped" and rows[name]["note"]
    # megatron-core's router puts its weight on the current CUDA device: skipped, saying so.
    assert rows["megatron"]["status"] == "skipped" and "CUDA" in rows["megatron"]["note"]


def test_bench_dense_limit_equals_one_expert_swiglu():
    import torch

    bench = _tool("bench_moe_layer")
    s = bench.SHAPES["tiny"]
    w = bench.make_weights(s, torch.device("cpu"), torch.float32, 0)
    x = torch.randn(5, s.D)
    h = torch.nn.functional.silu(x @ w.w1_EFD[0].T) * (x @ w.w3_EFD[0].T)
    torch.testing.assert_close(bench.DenseLimit(w)(x), h @ w.w2_EDF[0].T)


def test_peer_weights_are_loaded_by_name_and_layout():
    """Peers get moetrain's weights, transposed where they store (E, D, F) for (E, F, D)."""
    import torch
    from torch import nn

    bench = _tool("bench_moe_layer")
    s = bench.SHAPES["tiny"]
    w = bench.make_weights(s, torch.device("cpu"), torch.float32, 0)
    peer = nn.Module()
    peer.router = nn.Module()
    peer.router.gate = nn.Linear(s.D, s.E, bias=False)
    peer.experts = nn.Module()
    peer.experts.w1 = nn.Parameter(torch.empty(s.E, s.D, s.F))  # transposed layout
    peer.experts.w3 = nn.Parameter(torch.empty(s.E, s.F, s.D))
    peer.experts.w2 = nn.Parameter(torch.empty(s.E, s.F, s.D))  # transposed layout
    bench._copy_weights(peer, w)
    assert torch.equal(peer.router.gate.weight, w.gate_ED)
    assert torch.equal(peer.experts.w1, w.w1_EFD.transpose(-2, -1))
    assert torch.equal(peer.experts.w3, w.w3_EFD)
    assert torch.equal(peer.experts.w2, w.w2_EDF.transpose(-2, -1))
    peer.experts.bias = nn.Parameter(torch.zeros(3))
    with pytest.raises(RuntimeError, match="cannot map experts.bias"):
        bench._copy_weights(peer, w)


def test_bench_train_tiny_on_cpu(tmp_path, data_cache):
    from moetrain.metrics import model_flops_per_token

    bench = _tool("bench_train")
    report = bench.main([
        "--device", "cpu", "--model", "tiny", "--seq-len", "32", "--micro-batch", "2",
        "--global-batch", "4", "--steps", "2", "--warmup", "1", "--peak-tflops", "2",
        "--run-dir", str(tmp_path / "run"), "--json", str(tmp_path / "train.json"), "--",
        "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.num_experts=4",
        "model.expert_hidden=32", "model.max_seq_len=64", "data.default_corpus_mb=0.25",
        f"data.cache_dir={data_cache}",
    ])
    assert json.loads((tmp_path / "train.json").read_text())["steps"] == 2
    assert report["tokens_per_step"] == 4 * 32 and len(report["step_times_s"]) == 2
    assert report["tokens_per_s"] == pytest.approx(4 * 32 * 2 / sum(report["step_times_s"]))
    # FLOPs per token: 6 N_active (no embedding) + 12 L D S, PaLM appendix B.
    n = report["params_active"] - 257 * 32
    assert report["flops_per_token"] == model_flops_per_token(n, 2, 32, 32)
    assert report["mfu"] == pytest.approx(
        report["tokens_per_s"] * report["flops_per_token"] / 2e12)
    assert len(report["losses"]) == 3 and all(math.isfinite(v) for v in report["losses"])
    assert report["losses"][0] == pytest.approx(math.log(257), rel=0.05)  # untrained


def test_scaled_shapes_keep_experts_and_top_k():
    bench = _tool("bench_moe_layer")
    q = bench.SHAPES["qwen3_like"]
    assert (q.D, q.F, q.E, q.K, q.T) == (2048, 768, 128, 8, 16384)
    assert (q.max_vs_torchtitan, q.min_pct_dense) == (0.8, 70.0)
    small = q.scaled(32)
    assert (small.name, small.D, small.F, small.E, small.K, small.T) == (
        "qwen3_like/32", 64, 24, 128, 8, 512)
    assert small.input_shape == (1, 512, 64)
    three = bench.SHAPES["fine_grained"].scaled(3)  # T 5456 -> whole 2048-token sequences
    assert (three.D, three.F, three.T, three.input_shape) == (680, 464, 4096, (2, 2048, 680))
    assert bench.SHAPES["mixtral_like"].scaled(1) is bench.SHAPES["mixtral_like"]


def test_targets_are_ratios_to_peers_of_the_same_run():
    bench = _tool("bench_moe_layer")
    s = bench.SHAPES["fine_grained"]

    def rows(**ms):
        return [{"impl": k, "ms": v} for k, v in ms.items()]

    r = bench.judge(s, rows(moetrain=10.0, moetrain_torch=12.0, torchtitan=14.0,
                            dense_limit=7.5), on_gpu=True)
    assert r["best_moetrain"] == "moetrain"
    assert r["vs_torchtitan"] == pytest.approx(10 / 14)  # <= 0.8: met
    assert r["best_pct_of_dense"] == pytest.approx(75.0)  # >= 70: met
    assert r["target_met"] is True
    r = bench.judge(s, rows(moetrain=10.0, torchtitan=12.0, dense_limit=7.5), on_gpu=True)
    assert r["vs_torchtitan"] == pytest.approx(10 / 12) and r["target_met"] is False
    assert "MISSED" in r["target_notes"][0] and "met" in r["target_notes"][1]
    # Without torchtitan the ratio target is not measured: no verdict.
    r = bench.judge(s, rows(moetrain=5.0, torchtitan=None, dense_limit=4.0), on_gpu=True)
    assert r["target_met"] is None and "not measured" in r["target_notes"][0]
    mixtral = bench.SHAPES["mixtral_like"]  # <= 0.9x torchtitan only
    r = bench.judge(mixtral, rows(moetrain_triton=27.0, torchtitan=30.0, dense_limit=5.0),
                    on_gpu=True)
    assert r["target_met"] is True and len(r["target_notes"]) == 1
    assert bench.judge(mixtral, rows(moetrain=27.0, torchtitan=30.0), on_gpu=False)[
        "target_met"] is None  # targets are judged on a GPU only


def test_megatron_peer_computes_the_same_moe(monkeypatch):
    """megatron-core's MoELayer with the shared weights equals the naive loop (run on CPU
    here by pointing its router's device lookup at the CPU; one-rank gloo group)."""
    oracle("megatron.core")
    import torch
    import torch.distributed as dist

    bench = _tool("bench_moe_layer")
    s = bench.SHAPES["tiny"]
    w = bench.make_weights(s, torch.device("cpu"), torch.float32, 0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    owned = not dist.is_initialized()
    try:
        module = bench.build_megatron(s, w, cuda_only=False)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(*s.input_shape, generator=g)
        grad = torch.randn(*s.input_shape, generator=g)
        ref_y, ref_gx = bench._fwd_bwd(bench.NaiveLoopMoE(w, s.K), x, grad)
        y, gx = bench._fwd_bwd(module, x, grad)
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if owned and dist.is_initialized():
            dist.destroy_process_group()
    assert bench._rel_err(y, ref_y) < 1e-5
    assert bench._rel_err(gx, ref_gx) < 1e-5
    with pytest.raises(RuntimeError, match="CUDA only"):
        bench.build_megatron(s, w)


def test_bf16_check_gaps_of_smoothed_curves():
    bf16 = _tool("bf16_check")
    assert bf16.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    fp32 = [4.0, 4.0, 2.0, 2.0]
    low = [4.0, 4.4, 2.0, 2.0]  # one noisy step; smoothed over 2: [4, 4.2, 3.2, 2]
    r = bf16.compare(fp32, low, window=2)  # against [4, 4, 3, 2]: gaps 0, 5%, 6.7%, 0
    assert r["max_gap"] == pytest.approx(0.2 / 3) and r["max_gap_step"] == 3
    assert r["final_gap"] == 0.0 and r["raw_max_abs_diff"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="equal"):
        bf16.compare(fp32, low[:3], window=2)


def test_gpu_report_collects_every_step_into_one_results_file(tmp_path, data_cache):
    """The pieces of tools/gpu_report.py's CPU smoke run, in this process: the step reports
    it collects, the README table, the kernel choice, time boxes and the budget."""
    report_tool = _tool("gpu_report")
    logs = tmp_path / "logs"
    logs.mkdir()
    layer = _tool("bench_moe_layer").main([
        "--device", "cpu", "--shape", "tiny", "--impl", "moetrain", "--impl", "dense_limit",
        "--warmup", "0", "--iters", "1", "--json", str(logs / "bench_moe_layer.json")])
    train = _tool("bench_train").main([
        "--device", "cpu", "--model", "tiny", "--seq-len", "32", "--micro-batch", "2",
        "--global-batch", "2", "--steps", "1", "--warmup", "0", "--peak-tflops", "2",
        "--run-dir", str(tmp_path / "run"), "--json", str(logs / "train_eager.json"),
        "--", "model.max_seq_len=64", "data.default_corpus_mb=0.25",
        f"data.cache_dir={data_cache}"])
    bf = _tool("bf16_check")
    check = {"model": "tiny", "steps": 2, "seed": 0, "window": 1, "ok": True,
             "tolerance": {"max_gap": 0.03, "final_gap": 0.015},
             **bf.compare([5.0, 4.0], [5.0, 4.04], 1)}
    (logs / "bf16_check.json").write_text(json.dumps(check))
    choice = report_tool.measure_kernel_choice(["qwen3_like"], 64, "cpu", 0, 1)
    (logs / "kernel_choice.json").write_text(json.dumps(choice))
    ops = choice["shapes"]["qwen3_like/64"]["ops"]
    assert set(ops) == {"topk_router", "routing_metadata", "permute", "unpermute_combine",
                        "swiglu"}
    assert all(r["torch_ms"] > 0 and r["triton_ms"] is None and r["choice"] == "torch"
               for r in ops.values())  # the kernels need CUDA: torch is chosen
    assert set(choice["kernel_choice"].values()) == {"torch"}

    # Steps run in order, a with_next pair together, each killed at its time box; once the
    # budget is spent, the rest is skipped, not run.
    py = sys.executable
    steps = [report_tool.Step("a", [py, "-c", "print('A')"], 30, with_next=True),
             report_tool.Step("slow", [py, "-c", "import time; time.sleep(60)"], 2),
             report_tool.Step("boom", [py, "-c", "import sys; sys.exit(3)"], 30)]
    ran = report_tool.run_all(steps, logs, deadline=None)
    assert [(r["step"], r["status"]) for r in ran] == [
        ("a", "ok"), ("slow", "timed out after 2s"), ("boom", "exit 3")]
    assert ran[1]["seconds"] < 30 and (logs / "a.log").read_text() == "A\n"
    import time

    late = report_tool.run_all(steps[2:], logs, deadline=time.monotonic() + 5)
    assert late[0]["status"] == "skipped: the time budget was spent"

    info = {"device": "cpu", "versions": {"torch": "x"}, "mode": "cpu-smoke", "seconds": 1}
    results = report_tool.collect(tmp_path, ran + late, info)
    assert results["moe_layer"] == layer and results["train"]["train_eager"] == train
    assert results["kernel_choice"]["kernel_choice"] == choice["kernel_choice"]
    assert results["targets"]["tiny"]["met"] is None
    md = report_tool.summarize(json.loads(json.dumps(results)))
    rows = {r["impl"]: r for r in layer["shapes"][0]["results"]}
    assert (f"| tiny | {rows['dense_limit']['ms']:.1f} ms | - | - | "
            f"{rows['moetrain']['ms']:.1f} ms (moetrain) | - | "
            f"{layer['shapes'][0]['best_pct_of_dense']:.0f}% | - |") in md
    assert f"{train['tokens_per_s']:,.0f} | {100 * train['mfu']:.1f}% |" in md
    assert "final gap 1.00%" in md and "| boom | exit 3 |" in md
    assert "| choice | torch | torch | torch | torch | torch |" in md
    assert report_tool.report_name({"device": "NVIDIA H200", "memory_gib": 140}) == "h200"
    assert report_tool.report_name({"device": "x86_64"}) == "cpu"

    # The budget mode scales every time box with the budget.
    full = {s.name: s.timeout_s for s in report_tool.plan(tmp_path, 90, "budget", 480)}
    half = {s.name: s.timeout_s for s in report_tool.plan(tmp_path, 90, "budget", 240)}
    assert half == {k: v / 2 for k, v in full.items()}
    assert report_tool.main(["--out", str(tmp_path), "--dry-run", "--budget-s", "480"]) == 0
    with pytest.raises(SystemExit):
        report_tool.main(["--out", str(tmp_path), "--skip", "nonsense", "--dry-run"])
