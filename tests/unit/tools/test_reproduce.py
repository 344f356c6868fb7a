"""tools/reproduce.py: the verdict rules on hand-made numbers, the claim table's
completeness, and a 2-seed run whose JSON, Markdown and figure hold the numbers of the
runs' metrics.jsonl and checkpoints."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY, compose, load_tool, oracle


def _tool():
    return load_tool("reproduce")


def test_superiority_rule():
    v = _tool().part_verdict
    # d = -1, SE = sqrt(0.01/3 + 0.01/3) = 0.0816: better by 12 SE.
    r = v([1.0, 1.1, 0.9], [2.0, 2.1, 1.9], "better")
    assert r["verdict"] == r["lean"] == "holds"
    assert r["diff"] == pytest.approx(-1.0) and r["se"] == pytest.approx(math.sqrt(0.02 / 3))
    assert v([2.0, 2.1, 1.9], [1.0, 1.1, 0.9], "better")["verdict"] == "does not hold"
    # d = -0.05 with SE = sqrt(0.04/3 * 2) = 0.163: within 2 SE.
    r = v([1.0, 1.2, 0.8], [1.05, 1.25, 0.85], "better")
    assert (r["verdict"], r["lean"]) == ("inconclusive", "holds")
    # d = -0.3 against 2 SE = 0.327 (inconclusive), then -0.4 (holds): the 2 SE edge.
    assert v([0.75, 0.95, 0.55], [1.05, 1.25, 0.85], "better")["verdict"] == "inconclusive"
    assert v([0.65, 0.85, 0.45], [1.05, 1.25, 0.85], "better")["verdict"] == "holds"
    # Equal constant values: no difference, not better.
    assert v([2.0, 2.0], [2.0, 2.0], "better")["verdict"] == "inconclusive"


def test_non_inferiority_rule():
    v = _tool().part_verdict
    # Worse by 0.05 with 2 SE = 0.327: not significantly worse.
    assert v([1.05, 1.25, 0.85], [1.0, 1.2, 0.8], "no_worse")["verdict"] == "holds"
    # Worse by 0.4 > 2 SE.
    assert v([1.4, 1.6, 1.2], [1.0, 1.2, 0.8], "no_worse")["verdict"] == "does not hold"
    assert v([2.0, 2.0], [2.0, 2.0], "no_worse")["verdict"] == "holds"  # d = 0 <= 0
    assert v([0.5, 0.6], [1.0, 1.1], "no_worse")["verdict"] == "holds"  # better is no worse
    with pytest.raises(ValueError, match="'worse'"):
        v([1.0], [1.0], "worse")


def test_one_seed_missing_values_and_compound_claims():
    t = _tool()
    r = t.part_verdict([1.0], [2.0], "better")
    assert (r["verdict"], r["lean"], r["se"]) == ("inconclusive", "holds", None)
    assert t.part_verdict([2.0], [1.0], "no_worse")["lean"] == "does not hold"
    # Never reached by the method: does not hold; reached by some seeds: inconclusive.
    assert t.part_verdict([None, None], [10.0, 10.0], "better")["verdict"] == "does not hold"
    r = t.part_verdict([5.0, None], [10.0, 10.0], "better")
    assert r["verdict"] == "inconclusive" and r["diff"] == pytest.approx(-5.0)
    assert t.combine(["holds", "holds"]) == "holds"
    assert t.combine(["holds", "inconclusive"]) == "inconclusive"
    assert t.combine(["inconclusive", "does not hold", "holds"]) == "does not hold"


def test_steps_to_reach_interpolates():
    f = _tool().steps_to_reach
    curve = [(0, 5.0), (25, 3.0), (50, 2.0), (75, 1.5)]
    assert f(curve, 2.5) == pytest.approx(37.5)  # halfway from 3.0 (25) to 2.0 (50)
    assert f(curve, 2.0) == pytest.approx(50.0)
    assert f(curve, 6.0) == 0.0
    assert f(curve, 1.0) is None


def test_every_claim_is_complete_and_every_run_composes():
    from moetrain.config import validate

    t = _tool()
    assert len(t.CLAIMS) == 14 and len(t.RUNS) == 21
    for name, c in t.CLAIMS.items():
        assert c.name == name and re.fullmatch(r"\d{4}\.\d{5}", c.paper), name
        assert c.claim and c.setup and c.proper and c.parts, name
        for p in c.parts:
            assert p.metric in t.METRICS and p.test in ("better", "no_worse"), name
            assert p.method in t.RUNS and p.baseline in t.RUNS and p.method != p.baseline
    assert set(t.plan_runs(list(t.CLAIMS))) == set(t.RUNS)  # no run is unused
    # Each run's command line (seed 1, 600 steps) composes and validates.
    for job in t.make_jobs(list(t.RUNS), [1], 600, Path("/nonexistent"), []):
        overrides = [o for o in job.command[3:] if not o.startswith("run.dir=")]
        cfg = compose(overrides)
        validate(copy.deepcopy(cfg), 1)
        assert cfg.seed == 1
        assert cfg.train.steps == (360 if t.RUNS[job.name.split("/")[1]].upcycled else 600)


def _flat(cfg) -> dict:
    """A composed config as {"group.key": value}."""
    from omegaconf import OmegaConf

    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v
    walk(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True,
                                enum_to_str=True), "")
    return out


def _run_config(t, name: str):
    job = t.make_jobs([name], [0], 600, Path("/r"), [])[0]
    # One run dir for every run: the paths derived from it (checkpoint.dir) match.
    return compose([o for o in job.command[3:] if not o.startswith("run.dir=")]
                   + ["run.dir=/r/run"])


def test_new_claims_compare_runs_that_differ_only_in_the_method():
    """coe, rmoe and compete: method and baseline differ in what the claim is about only,
    with the paper's balance loss in both."""
    t = _tool()
    want = {
        "coe": {"moe.chain_iterations": (2, 1), "model.top_k": (2, 4)},
        "rmoe": {"moe.router.name": ("recurrent", "topk"), "moe.router.rnn_hidden": (32, 256)},
        "compete": {"moe.router.name": ("compete", "topk")},
    }
    for claim, diff in want.items():
        (part,) = t.CLAIMS[claim].parts
        assert (part.metric, part.test) == ("val_loss", "better")
        a, b = _flat(_run_config(t, part.method)), _flat(_run_config(t, part.baseline))
        got = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
        assert got == diff, claim
    coe = _flat(_run_config(t, "coe"))
    assert {k: coe[k] for k in ("model.num_experts", "model.n_shared_experts",
                                "model.expert_hidden", "moe.chain_router",
                                "moe.chain_residual", "moe.router.renormalize",
                                "moe.balance_loss", "moe.aux_loss_coef", "moe.z_loss_coef")} == {
        "model.num_experts": 15, "model.n_shared_experts": 1, "model.expert_hidden": 64,
        "moe.chain_router": "per_iteration", "moe.chain_residual": "inner",
        "moe.router.renormalize": False, "moe.balance_loss": "seq", "moe.aux_loss_coef": 1e-3,
        "moe.z_loss_coef": 0.0}
    rmoe = _flat(_run_config(t, "recurrent"))
    assert (rmoe["moe.balance_loss"], rmoe["moe.aux_loss_coef"], rmoe["moe.z_loss_coef"]) == (
        "switch", 1e-3, 0.0)
    comp = _flat(_run_config(t, "compete"))
    assert (comp["moe.balance_loss"], comp["moe.aux_loss_coef"], comp["moe.z_loss_coef"]) == (
        "xmoe", 1e-2, 1e-3)


def test_coe_pair_is_compute_matched_by_hand():
    """CoE(C=2, K=2) vs MoE(C=1, K=4) on 15 + 1 experts of 64: the same routed expert
    evaluations per token, the same expert parameters as the other runs' 8 x 128, total
    parameters apart by the second round's routers only."""
    from moetrain.models.transformer import count_params

    t = _tool()
    coe, moe, top = (_run_config(t, n) for n in ("coe", "coe_moe", "topk_aux"))
    assert coe.moe.chain_iterations * coe.model.top_k == moe.model.top_k == 4
    expert = 3 * 64 * 64
    assert 16 * expert == 8 * 3 * 64 * 128  # 196,608 per layer
    p_coe, p_moe, p_top = (count_params(c.model, 257, c.moe) for c in (coe, moe, top))
    assert p_coe.total - p_moe.total == 2 * 15 * 64  # a second router per layer
    assert p_moe.total - p_top.total == 2 * (15 - 8) * 64  # wider router, same experts
    # Active: MoE 4 routed + 1 shared per layer; CoE 2 rounds of (2 routed + 1 shared) and
    # 2 routers: its shared expert runs twice, as in the paper.
    assert p_coe.active - p_moe.active == 2 * (expert + 15 * 64)


def test_upcycled_runs_follow_their_seeds_dense_checkpoint():
    t = _tool()
    jobs = {j.name: j for j in t.make_jobs(["dense", "upcycle"], [0, 1], 100, Path("/r"), [])}
    assert jobs["seed1/upcycle"].after == ("seed1/dense",)
    assert jobs["seed1/dense"].checkpoint_step == 40
    assert "init.from_dense=/r/seed1/dense/checkpoints/step_0000040" in jobs[
        "seed1/upcycle"].command
    assert "init.seed=1" in jobs["seed1/upcycle"].command


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _by_hand(run: Path) -> dict:
    """A run's final validation loss and MaxVio_batch recomputed from its metrics.jsonl."""
    rows = _rows(run / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    n = max(1, min(50, len(train) // 4))
    return {"val_loss": [r for r in rows if "val_loss" in r][-1]["val_loss"],
            "max_vio_batch": sum(r["load_imbalance"] - 1 for r in train[-n:]) / n}


def test_two_seed_run_matches_the_metrics(tmp_path, data_cache, capsys):
    t = _tool()
    oracle("matplotlib")
    extra = [o for o in TINY if not o.startswith(("train.steps=", "model.ffn_hidden="))]
    extra.append(f"data.cache_dir={data_cache}")
    out = tmp_path / "rep"
    argv = ["--only", "ssr", "--seeds", "2", "--steps", "6", "--out", str(out),
            "--extra", " ".join(extra)]
    assert t.main(argv) == 0
    report = json.loads((out / "reproduce.json").read_text())
    assert report["seeds"] == 2 and report["steps"] == 6
    assert set(report["runs"]) == {"topk_aux", "topk_noaux", "ssr"}
    runs = out / "runs"
    hand = {(s, r): _by_hand(runs / f"seed{s}" / r) for s in (0, 1)
            for r in ("topk_aux", "topk_noaux", "ssr")}
    claims = {c["name"]: c for c in report["claims"]}
    assert list(claims) == ["ssr"] and len(claims["ssr"]["parts"]) == 2
    md = (out / "reproduce.md").read_text()
    for c in claims.values():
        for p in c["parts"]:
            a = [hand[s, p["method"]][p["metric"]] for s in (0, 1)]
            b = [hand[s, p["baseline"]][p["metric"]] for s in (0, 1)]
            assert p["method_values"] == pytest.approx(a, rel=1e-12)
            assert p["baseline_values"] == pytest.approx(b, rel=1e-12)
            # The verdict by hand: Welch SE, 2 SE.
            d = np.mean(a) - np.mean(b)
            se = math.sqrt(np.var(a, ddof=1) / 2 + np.var(b, ddof=1) / 2)
            want = (("holds" if d < -2 * se else "does not hold" if d > 2 * se
                     else "inconclusive") if p["test"] == "better"
                    else "holds" if d <= 2 * se else "does not hold")
            assert p["verdict"] == want and p["se"] == pytest.approx(se)
            # The Markdown shows mean ± sample std of the same values.
            spec = p["spec"]
            for who, vals in ((p["method"], a), (p["baseline"], b)):
                cell = f"{who}: {np.mean(vals):{spec}} ± {np.std(vals, ddof=1):{spec}}"
                assert cell in md, cell
        assert f"**{c['verdict']}**" in md
    # The profiled baseline (topk_aux): MaxVio_global from its final checkpoint, by hand.
    import moetrain
    from moetrain import experiments as ex
    from moetrain.data import build_data

    model, cfg = moetrain.load(runs / "seed1" / "topk_aux")
    data = build_data(cfg.data, cfg.train.seq_len, progress=False)
    tokens_NS, file_N = ex.file_sequences(data.data_dir, cfg.train.seq_len, t.PER_FILE)
    loads_LE = ex.route_counts(model, tokens_NS, file_N).sum(axis=2)
    vio = np.mean([x.max() / x.mean() - 1 for x in loads_LE])
    prof = report["runs"]["topk_aux"]["seeds"]["1"]
    assert prof["max_vio_global"] == pytest.approx(vio) and prof["tokens"] == tokens_NS.size
    assert (out / "reproduce.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| ssr |" in capsys.readouterr().out  # the table is printed too

    # --reuse trains nothing and tabulates the same numbers.
    logs = {p: p.stat().st_mtime_ns for p in runs.glob("seed*/*/train.log")}
    assert len(logs) == 6
    assert t.main([*argv, "--reuse"]) == 0
    assert {p: p.stat().st_mtime_ns for p in logs} == logs
    again = json.loads((out / "reproduce.json").read_text())
    assert again["claims"] == report["claims"]


def test_bad_arguments_are_named(capsys):
    t = _tool()
    with pytest.raises(SystemExit):
        t.main(["--only", "ssr,swtch"])
    err = capsys.readouterr().err
    assert "'swtch'" in err and "switch" in err and "'ssr'" not in err
    with pytest.raises(SystemExit):
        t.main(["--quick", "--seeds", "2"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        t.main(["--only", "upcycling", "--steps", "1"])
    assert "--steps=1 puts the dense run's upcycling checkpoint at step 0" in (
        capsys.readouterr().err)
