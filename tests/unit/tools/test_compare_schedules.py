"""tools/compare_schedules.py: its table and JSON hold the numbers of the runs' metrics.jsonl,
and an upcycled method's token axis continues from its dense phase."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY, load_tool


def _tool():
    return load_tool("compare_schedules")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _expected(paths: list[Path]) -> dict:
    """The comparison's numbers recomputed by hand from the phases' metrics.jsonl."""
    offset, seconds, val, ks = 0, 0.0, [], []
    for path in paths:
        rows = _rows(path)
        train = [r for r in rows if "loss" in r]
        per_step = train[0]["tokens"]  # the first training row: one step's tokens
        val += [[offset + r["step"] * per_step, r["val_loss"]] for r in rows if "val_loss" in r]
        ks += [r.get("active_k", 1.0) for r in train]
        seconds += sum(r["step_time_s"] for r in train)
        offset += train[-1]["tokens"]
    n = max(1, min(50, len(train) // 4))
    loads = [r["load_imbalance"] for r in train[-n:] if "load_imbalance" in r]  # MoE only
    return {"tokens": offset, "train_s": seconds, "tokens_per_s": offset / seconds,
            "final_val_loss": val[-1][1], "final_val_tokens": val[-1][0], "val_curve": val,
            "final_active_k": ks[-1], "mean_active_k": sum(ks) / len(ks), "window": n,
            "load_imbalance": sum(loads) / n if loads else None}


def test_table_and_json_match_the_metrics(tmp_path, data_cache, capsys):
    tool = _tool()
    # TINY without its step count and dense FFN size (the tool ties ffn_hidden to the
    # experts' size, as upcycling needs): 8 x 32 = 256 tokens per step.
    extra = [o for o in TINY if not o.startswith(("train.steps=", "model.ffn_hidden="))]
    extra.append(f"data.cache_dir={data_cache}")
    out = tmp_path / "cmp"
    argv = ["--tokens", "2600", "--only", "topk,upcycle", "--out", str(out),
            "--extra", " ".join(extra)]
    assert tool.main(argv) == 0
    report = json.loads((out / "compare_schedules.json").read_text())
    # 2600 tokens round down to 10 steps; upcycle: round(0.4 x 10) = 4 dense + 6 MoE steps.
    assert list(report["methods"]) == ["topk", "upcycle"]
    assert (report["steps"], report["tokens_per_step"], report["dense_steps"]) == (10, 256, 4)
    cells = [[c.strip() for c in line.split("|")[1:-1]]
             for line in (out / "compare_schedules.md").read_text().splitlines()
             if line.startswith("| ")]
    md_rows = {row[0]: row[2:] for row in cells if row[0] in report["methods"]}
    runs = out / "runs"
    phases = {"topk": [runs / "topk"], "upcycle": [runs / "dense_phase", runs / "upcycle"]}
    for name, dirs in phases.items():
        got = dict(report["methods"][name])
        exp = _expected([d / "metrics.jsonl" for d in dirs])
        assert exp["tokens"] == 10 * 256 == exp["final_val_tokens"]
        assert got.pop("val_curve") == exp.pop("val_curve"), name  # copied floats: exact
        for key, value in exp.items():
            assert got[key] == pytest.approx(value, rel=1e-12, abs=0), (name, key)
        load = "-" if exp["load_imbalance"] is None else f"{exp['load_imbalance']:.2f}"
        assert md_rows[name] == [
            f"{exp['final_val_loss']:.3f}", f"{exp['tokens']:,}", f"{exp['tokens_per_s']:,.0f}",
            f"{exp['final_active_k']:.2f}", f"{exp['mean_active_k']:.2f}", load,
            f"{got['wall_s']:.0f}"]
        # Each run trained with its phase's overrides (the log starts with its command).
        for d, phase in zip(dirs, got["phases"]):
            assert phase["run"] == d.name
            assert all(o in d.joinpath("train.log").read_text().splitlines()[0]
                       for o in phase["overrides"])

    # top-k annealing, E = 4 -> 2 over 2/3 of 10 steps (6), rounded toward k_start:
    # k(t) = ceil(4 - t/3) for t < 6, then 2.
    topk = report["methods"]["topk"]
    assert [k for _, k in topk["k_curve"]] == [4, 4, 4, 3, 3, 3, 2, 2, 2, 2]
    assert topk["mean_active_k"] == pytest.approx(2.9) and topk["upcycle_tokens"] is None

    # Upcycled: the dense run (LR schedule of all 10 steps) stopped at step 4 (eval every 3:
    # steps 0, 3, 4), then the MoE phase (0, 3, 6) on one token axis, from where the dense
    # one ended: 4 x 256 tokens.
    up = report["methods"]["upcycle"]
    dense_cmd = (runs / "dense_phase" / "train.log").read_text().splitlines()[0].split()
    assert "train.steps=10" in dense_cmd
    # The tool's own settings come after --extra (TINY's checkpoint.every=0), run.dir last.
    assert dense_cmd[-3:-1] == ["train.stop_at=4", "checkpoint.every=4"]
    assert up["upcycle_tokens"] == 1024
    assert [t for t, _ in up["val_curve"]] == [0, 768, 1024, 1024, 1792, 2560]
    assert [k for _, k in up["k_curve"]] == [1.0] * 4 + [2.0] * 6
    assert up["mean_active_k"] == pytest.approx(1.6)
    # Exact copies and renormalised top-2 weights: the MoE computes the dense model, so its
    # step-0 validation repeats the dense phase's last one.
    assert up["val_curve"][3][1] == pytest.approx(up["val_curve"][2][1], rel=1e-5)
    dense_ckpt = runs / "dense_phase" / "checkpoints" / "step_0000004" / "COMMITTED"
    assert dense_ckpt.is_file()
    assert f"init.from_dense={runs / 'dense_phase' / 'checkpoints'}" in up["phases"][1]["overrides"]
    assert up["wall_s"] == pytest.approx(sum(json.loads((d / "timing.json").read_text())["wall_s"]
                                             for d in phases["upcycle"]))
    assert (out / "compare_schedules.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| upcycle |" in capsys.readouterr().out  # the table is printed too

    # --reuse keeps the finished runs (no training) and tabulates the same numbers.
    logs = {d: (d / "train.log").stat().st_mtime_ns for ds in phases.values() for d in ds}
    assert tool.main([*argv, "--reuse"]) == 0
    assert {d: (d / "train.log").stat().st_mtime_ns for d in logs} == logs
    again = json.loads((out / "compare_schedules.json").read_text())
    assert again["methods"] == report["methods"]


def test_bad_arguments_are_named(capsys):
    tool = _tool()
    with pytest.raises(SystemExit) as e:
        tool.main(["--only", "scratch,evomo"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'evomo'" in err and "evomoe" in err and "'scratch'" not in err
    with pytest.raises(SystemExit):
        tool.main(["--only", "upcycle", "--steps", "10", "--dense-fraction", "1.0"])
    assert "--dense-fraction=1.0 gives 10 dense steps of 10" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main(["--steps", "10", "--extra", "model.top_k=20"])  # checked before any run
    assert "--extra 'model.top_k=20' does not compose: model.top_k=20 is invalid" in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit):
        tool.main(["--steps", "10", "--tokens", "2560"])  # one budget or the other
    assert "not allowed with argument" in capsys.readouterr().err
