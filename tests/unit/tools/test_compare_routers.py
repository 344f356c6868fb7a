"""tools/compare_routers.py: its table and JSON hold the numbers of the runs' metrics.jsonl."""

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
    return out


def test_table_and_json_match_the_metrics(tmp_path, data_cache, capsys):
    tool = _tool()
    steps = 12  # window = 12 // 4 = 3 steps
    extra = [o for o in TINY if not o.startswith("train.steps=")] + [f"data.cache_dir={data_cache}"]
    out = tmp_path / "cmp"
    assert tool.main(["--steps", str(steps), "--only", "aux_free,expert_choice",
                      "--out", str(out), "--extra", " ".join(extra)]) == 0
    report = json.loads((out / "compare_routers.json").read_text())
    assert list(report["methods"]) == ["aux_free", "expert_choice"]
    assert report["steps"] == steps and report["window"] == 3
    cells = [[c.strip() for c in line.split("|")[1:-1]]
             for line in (out / "compare_routers.md").read_text().splitlines()
             if line.startswith("| ")]
    md_rows = {row[0]: row[2:] for row in cells if row[0] in ("aux_free", "expert_choice")}
    assert len(md_rows) == 2
    for name in ("aux_free", "expert_choice"):
        run = out / "runs" / name
        # The run trained with the method's overrides (the log starts with its command).
        assert all(o in run.joinpath("train.log").read_text().splitlines()[0]
                   for o in tool.METHODS[name].overrides)
        exp, got = _expected(run / "metrics.jsonl"), report["methods"][name]
        assert exp["steps"] == steps and exp["final_val_step"] == steps
        for key, value in exp.items():
            assert got[key] == pytest.approx(value, rel=1e-12, abs=0), (name, key)
        assert md_rows[name] == [
            f"{exp['final_val_loss']:.3f}", f"{exp['load_imbalance']:.2f}",
            f"{exp['load_cv']:.3f}", f"{exp['dropped_frac']:.3f}",
            f"{exp['unrouted_frac']:.3f}", f"{exp['tokens_per_s']:,.0f}"]
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


def test_unknown_only_name_is_named(capsys):
    with pytest.raises(SystemExit) as e:
        _tool().main(["--only", "aux_free,sinkorn"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'sinkorn'" in err and "sinkhorn" in err and "'aux_free'" not in err
