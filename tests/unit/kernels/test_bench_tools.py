"""tools/bench_moe_layer.py and tools/bench_train.py on CPU: the numbers they report."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

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


def test_gpu_report_summarizes_the_benchmarks_and_reports_failed_steps(tmp_path, data_cache):
    """tools/gpu_report.py's summary holds the numbers of the JSON reports it finds."""
    report_tool = _tool("gpu_report")
    layer = _tool("bench_moe_layer").main([
        "--device", "cpu", "--shape", "tiny", "--impl", "moetrain", "--impl", "dense_limit",
        "--warmup", "0", "--iters", "1", "--json", str(tmp_path / "bench_moe_layer.json")])
    train = _tool("bench_train").main([
        "--device", "cpu", "--model", "tiny", "--seq-len", "32", "--micro-batch", "2",
        "--global-batch", "2", "--steps", "1", "--warmup", "0", "--peak-tflops", "2",
        "--run-dir", str(tmp_path / "run"), "--json", str(tmp_path / "train_eager.json"),
        "--", "model.max_seq_len=64", "data.default_corpus_mb=0.25",
        f"data.cache_dir={data_cache}"])
    failed = report_tool.run_step("boom", [sys.executable, "-c", "import sys; sys.exit(3)"],
                                  tmp_path, timeout_s=60)
    assert failed["status"] == "exit 3"
    md = report_tool.summarize(tmp_path, [failed], "cpu, torch x")
    assert "| boom | exit 3 |" in md
    rows = {r["impl"]: r for r in layer["shapes"][0]["results"]}
    assert f"| tiny | - | {rows['moetrain']['ms']:.1f} ms" in md
    assert f"{train['tokens_per_s']:,.0f} | {100 * train['mfu']:.1f}% |" in md
    assert report_tool.main(["--out", str(tmp_path), "--dry-run"]) == 0
    with pytest.raises(SystemExit):
        report_tool.main(["--out", str(tmp_path), "--skip", "nonsense", "--dry-run"])
