"""tools/bench_optimizer.py: its report holds every optimizer's timings, and its ratios
and table are computed from those timings (no timing thresholds)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_tool, oracle


def _tool():
    return load_tool("bench_optimizer")


def test_report_ratios_come_from_the_timings(tmp_path, capsys):
    oracle("deepspeed")
    tool = _tool()
    out = tmp_path / "bench.json"
    tool.main(["--sizes", "0.003", "0.002", "--warmup", "1", "--iters", "2",
               "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["iters"] == 2
    impls = {"torch_foreach", "torch_fused", "deepspeed_cpu", "moetrain_offload"}
    for size, numel in ((0.003, 3000), (0.002, 2000)):
        rows = {r["impl"]: r for r in report["results"] if r["size_m"] == size}
        assert set(rows) | set(report["skipped"]) == impls and "deepspeed_cpu" in rows
        for r in rows.values():
            assert r["numel"] == numel and len(r["times_ms"]) == 2
            assert r["ms"] == pytest.approx(sum(r["times_ms"]) / 2)
        for x in (x for x in report["ratios"] if x["size_m"] == size):
            assert x["ratio"] == pytest.approx(rows[x["impl"]]["ms"] / rows[x["vs"]]["ms"])
        got = {(x["impl"], x["vs"]) for x in report["ratios"] if x["size_m"] == size}
        refs = [ref for ref in ("torch_foreach", "torch_fused") if ref in rows]
        assert got == {(i, ref) for ref in refs for i in rows if i != ref}
    # The table prints each ratio.
    table = capsys.readouterr().out
    first = next(x for x in report["ratios"] if x["vs"] == "torch_foreach")
    assert f"{first['ratio']:.2f}x" in table


def test_parameters_sum_to_the_size():
    tool = _tool()
    for numel in (5, 1024, 1025, 3 * 4096 * 1024 + 7):
        params = tool.make_params(numel, "cpu")
        assert sum(p.numel() for p in params) == numel
        assert all(p.grad is not None and p.grad.shape == p.shape for p in params)
