"""tools/compare_routers.py: its table and JSON hold the numbers of the runs' metrics.jsonl,
and its FLOPs per token those of a hand count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY, load_tool


def _tool():
    return load_tool("compare_routers")


def _expected(path: Path) -> dict:
    """The comparison's numbers recomputed from a metrics.jsonl by hand."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    n = max(1, min(50, len(train) // 4))
    out = {"window": n, "steps": train[-1]["step"]}
    for key in ("load_imbalance", "load_cv", "dropped_frac", "unrouted_frac", "tokens_per_s"):
        vals = [r[key] for r in train[-n:]]
        out[key] = sum(vals) / len(vals)
    val = [r for r in rows if "val_loss" in r]
    out["final_val_loss"], out["final_val_step"] = val[-1]["val_loss"], val[-1]["step"]
    out["active_k_mean"] = sum(r["active_k"] for r in train) / len(train)  # the whole run
    return out


# Training FLOPs per token of the test's model (the tool's BASE under TINY: dim 32, 2 layers
# of 2 heads, 4 experts of 32, seq 32, 257 bytes) at 2 routed experts per token, by hand:
# attention 4 * 32 * 32 + 2 * 32 (norms) = 4160 per layer; an expert 3 * 32 * 32 = 3072;
# the router 4 * 32 = 128 multiply-adds per round; output layer 257 * 32 + 32 (final norm).
# 6 N + 12 L D S, 12 * 2 * 32 * 32 = 24576.
TINY_HEAD = 257 * 32 + 32
TINY_TOP2 = 6 * (2 * (4160 + 128 + 2 * 3072) + TINY_HEAD) + 24576  # 199,296
TINY_COE = 6 * (2 * (4160 + 2 * 128 + 2 * 1 * 3072) + TINY_HEAD) + 24576  # 2 rounds of top-1
TINY_PER_K = 6 * 3 * 32 * 32 * 2  # one more routed expert per token in each of 2 layers


def test_table_and_json_match_the_metrics(tmp_path, data_cache, capsys):
    tool = _tool()
    steps = 12  # window = 12 // 4 = 3 steps
    extra = [o for o in TINY if not o.startswith("train.steps=")] + [f"data.cache_dir={data_cache}"]
    out = tmp_path / "cmp"
    # BASE's top-2 stays (TINY's model.top_k=2 after coe's own model.top_k=1 would undo it).
    extra = [o for o in extra if not o.startswith("model.top_k=")]
    names = ("aux_free", "expert_choice", "coe")
    assert TINY_TOP2 == 199296 and TINY_COE == 200832
    nominal = {"aux_free": TINY_TOP2, "expert_choice": TINY_TOP2, "coe": TINY_COE}
    assert tool.main(["--steps", str(steps), "--only", ",".join(names),
                      "--out", str(out), "--extra", " ".join(extra)]) == 0
    report = json.loads((out / "compare_routers.json").read_text())
    assert list(report["methods"]) == list(names)
    assert report["steps"] == steps and report["window"] == 3
    cells = [[c.strip() for c in line.split("|")[1:-1]]
             for line in (out / "compare_routers.md").read_text().splitlines()
             if line.startswith("| ")]
    assert cells[0][-2:] == ["FLOPs/token", "× top-k"]
    md_rows = {row[0]: row[2:] for row in cells if row[0] in names}
    assert len(md_rows) == 3
    for name in names:
        run = out / "runs" / name
        # The run trained with the method's overrides (the log starts with its command).
        assert all(o in run.joinpath("train.log").read_text().splitlines()[0]
                   for o in tool.METHODS[name].overrides)
        exp, got = _expected(run / "metrics.jsonl"), report["methods"][name]
        assert exp["steps"] == steps and exp["final_val_step"] == steps
        for key, value in exp.items():
            assert got[key] == pytest.approx(value, rel=1e-12, abs=0), (name, key)
        # FLOPs at the run's mean routed experts per token; topk_aux did not run: its
        # top-2 count is the "× top-k" base.
        flops = nominal[name] + TINY_PER_K * (exp["active_k_mean"] - 2)
        assert got["flops_per_token"] == pytest.approx(flops, rel=1e-12)
        assert got["flops_vs_topk"] == pytest.approx(flops / TINY_TOP2, rel=1e-12)
        assert md_rows[name] == [
            f"{exp['final_val_loss']:.3f}", f"{exp['load_imbalance']:.2f}",
            f"{exp['load_cv']:.3f}", f"{exp['dropped_frac']:.3f}",
            f"{exp['unrouted_frac']:.3f}", f"{exp['tokens_per_s']:,.0f}",
            f"{flops / 1e6:.3f}M", f"{flops / TINY_TOP2:.3f}"]
    # Two rounds of top-1 evaluate 2 experts per token, as top-2 does: only the second
    # round's router adds FLOPs (2 layers x 6 x 128).
    coe = report["methods"]["coe"]
    assert coe["active_k_mean"] == 2.0
    assert coe["flops_per_token"] - TINY_TOP2 == 2 * 6 * 128
    # Expert choice gives every expert exactly its capacity: perfectly balanced.
    ec = report["methods"]["expert_choice"]
    assert ec["load_imbalance"] == 1.0 and ec["load_cv"] == 0.0
    assert report["methods"]["aux_free"]["unrouted_frac"] == 0.0  # top-k routes every token
    assert report["aux_free_verdict"] is None  # needs both aux_free and its control
    assert (out / "compare_routers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| aux_free |" in capsys.readouterr().out  # the table is printed too


def test_aux_free_verdict_and_window():
    tool = _tool()
    res = {"aux_free": {"load_imbalance": 1.3, "window": 50},
           "aux_free_control": {"load_imbalance": 3.9, "window": 50}}
    v = tool.aux_free_verdict(res)
    assert v["works"] and v["ratio"] == pytest.approx(1 / 3)
    assert "1.300" in v["line"] and "3.900" in v["line"] and "WORKS" in v["line"]
    res["aux_free"]["load_imbalance"] = 3.5  # 0.9 x the control: not clearly below
    assert not tool.aux_free_verdict(res)["works"]
    assert [tool.window_size(n) for n in (1, 8, 199, 200, 300)] == [1, 2, 49, 50, 50]


def test_flops_per_token_of_the_tools_model_by_hand():
    """The tool's own model (dim 64, 2 layers of 4 heads, 8 experts of 128, seq 128, 257
    bytes), each method's config composed from its overrides."""
    tool = _tool()
    attn = 4 * 64 * 64 + 2 * 64  # q, k, v, o and two norms
    expert = 3 * 64 * 128
    head = 257 * 64 + 64
    attn_term = 12 * 2 * 64 * 128  # 196,608

    def count(router_macs: int, shared_and_routed: int) -> int:
        return 6 * (2 * (attn + router_macs + shared_and_routed) + head) + attn_term

    top2 = count(8 * 64, 2 * expert)
    assert top2 == 1_089_792
    coe = count(2 * 8 * 64, 2 * 1 * expert)  # 2 rounds: router twice, 1 expert each
    assert coe == 1_095_936
    # RMoE, state 32: projection 32 x 64, one GRU step 2 x 3 x 32^2, head 8 x 32.
    rmoe = count(32 * 64 + 6 * 32 * 32 + 8 * 32, 2 * expert)
    assert rmoe == 1_185_024
    per_k = 6 * 3 * 64 * 128 * 2  # one more routed expert per token in each MoE layer

    def f(name, k=None):
        return tool.flops_per_token(tool.run_config(name, 300, []), k)

    assert f("topk_aux") == top2 and f("topk_aux", 2.0) == top2
    assert f("coe") == coe and f("coe", 2.0) == coe
    assert f("recurrent") == rmoe
    # CompeteSMoE counts top-2 (no extra parameter); its competition steps come with the
    # measured k: a layer that competes routes all 8 experts per token.
    assert f("compete") == top2
    assert f("compete", 2.7) == pytest.approx(top2 + 0.7 * per_k)
    assert f("switch") == count(8 * 64, expert)  # top-1
    assert f("threshold", 1.5) == pytest.approx(top2 - 0.5 * per_k)
    # The "× top-k" base: topk_aux's run when there is one, else its top-2 count.
    res = {"coe": {"active_k_mean": 2.0}, "compete": {"active_k_mean": 2.7}}
    tool.add_flops(res, 300, [])
    assert res["coe"]["flops_vs_topk"] == pytest.approx(coe / top2)
    assert res["compete"]["flops_vs_topk"] == pytest.approx((top2 + 0.7 * per_k) / top2)
    res = {"topk_aux": {"active_k_mean": 3.0}, "coe": {"active_k_mean": 2.0}}
    tool.add_flops(res, 300, [])
    assert res["topk_aux"]["flops_vs_topk"] == 1.0
    assert res["coe"]["flops_vs_topk"] == pytest.approx(coe / (top2 + per_k))
    # --extra reaches the composed config (and the base).
    assert tool.flops_per_token(tool.run_config("topk_aux", 300, ["train.seq_len=64"])) == (
        top2 - attn_term // 2)


def test_list_names_the_new_designs(capsys):
    tool = _tool()
    assert tool.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("coe", "recurrent", "compete"):
        assert name in tool.METHODS
        assert any(line.startswith(f"{name} ") for line in out.splitlines()), name
        assert " ".join(tool.METHODS[name].overrides) in out
    coe = tool.METHODS["coe"].overrides
    assert {"model.top_k=1", "moe.chain_iterations=2", "moe.router.renormalize=false"} <= set(coe)


def test_unknown_only_name_is_named(capsys):
    with pytest.raises(SystemExit) as e:
        _tool().main(["--only", "aux_free,sinkorn"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'sinkorn'" in err and "sinkhorn" in err and "'aux_free'" not in err
