"""moetrain.experiments: the job runner's order, reuse and failures; seed statistics; the
routing measures (MaxVio, file entropy) on hand-computed examples; per-file sequences and
the router capture against the MoE layer's own counts. (routing_profile on a trained run:
tests/unit/tools/test_reproduce.py.)"""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moetrain import experiments as ex
from tests.conftest import TINY, compose

# A fake training run: sleeps, writes a metrics.jsonl whose last row validates at step 5
# and records when it ran, or fails.
_FAKE = """
import json, sys, time
out, sleep, fail = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
t0 = time.time()
time.sleep(sleep)
if fail:
    print("boom"); sys.exit(3)
with open(out + "/metrics.jsonl", "w") as f:
    f.write(json.dumps({"recipe": {}}) + "\\n")
    f.write(json.dumps({"step": 5, "loss": 1.0}) + "\\n")
    f.write(json.dumps({"step": 5, "val_loss": 2.0}) + "\\n")
with open(out + "/span.json", "w") as f:
    json.dump([t0, time.time()], f)
"""


def _job(root: Path, name: str, sleep: float, after=(), fail=False) -> ex.Job:
    d = root / name
    return ex.Job(name, d, (sys.executable, "-c", _FAKE, str(d), str(sleep), "1" if fail else "0"),
                  end_step=5, after=tuple(after))


def _span(job: ex.Job) -> list[float]:
    return json.loads((job.run_dir / "span.json").read_text())


def test_run_jobs_order_parallelism_and_reuse(tmp_path, capsys):
    a = _job(tmp_path, "a", 1.0)
    b = _job(tmp_path, "b", 0.0, after=["a"])
    c = _job(tmp_path, "c", 0.0)
    lines = []
    got = ex.run_jobs([a, b, c], parallel=2,
                      on_done=lambda j, t: lines.append(j.name) or f"{j.name} done")
    assert set(got) == {"a", "b", "c"} and not any(t["reused"] for t in got.values())
    assert 0 < got["a"]["cpu_s"] < got["a"]["wall_s"]  # it slept most of its second
    assert _span(b)[0] >= _span(a)[1]  # b waits for a
    assert _span(c)[0] < _span(a)[1]  # c runs beside a
    assert lines.index("a") < lines.index("b")
    assert (a.run_dir / "train.log").read_text().startswith(shlex.join(a.command) + "\n")
    # Without a terminal: one plain line per finished job, no carriage returns.
    err = capsys.readouterr().err
    assert "\r" not in err
    done_lines = [ln for ln in err.splitlines() if ln.startswith("runs ")]
    assert [ln.split(":")[0] for ln in done_lines] == ["runs 1/3", "runs 2/3", "runs 3/3"]
    assert any(ln.startswith("runs ") and ": b (" in ln and ln.endswith("| b done")
               for ln in done_lines)
    # reuse: finished runs are kept; re-training a job re-trains the jobs after it.
    stamp = {j.name: _span(j) for j in (a, b, c)}
    again = ex.run_jobs([a, b, c], parallel=2, reuse=True)
    assert all(t["reused"] for t in again.values())
    assert {j.name: _span(j) for j in (a, b, c)} == stamp
    (a.run_dir / "timing.json").unlink()  # a is no longer finished
    third = ex.run_jobs([a, b, c], parallel=1, reuse=True)
    assert {n: t["reused"] for n, t in third.items()} == {"a": False, "b": False, "c": True}
    assert _span(b)[0] > stamp["b"][0] and _span(c) == stamp["c"]
    # A run trained with another command (settings) is not reused.
    c2 = _job(tmp_path, "c", 0.01)
    assert ex.run_jobs([c2], reuse=True)["c"]["reused"] is False
    assert ex.run_jobs([c2], reuse=True)["c"]["reused"] is True


def test_run_jobs_failure_names_the_log_and_stops(tmp_path):
    bad = _job(tmp_path, "bad", 0.0, fail=True)
    after = _job(tmp_path, "after", 0.0, after=["bad"])
    with pytest.raises(RuntimeError, match=r"run 'bad' failed \(exit 3\).*bad/train.log"):
        ex.run_jobs([bad, after], parallel=2)
    assert not after.run_dir.exists()  # never started
    with pytest.raises(ValueError, match="not in the list"):
        ex.run_jobs([_job(tmp_path, "x", 0.0, after=["nope"])])


def test_statistics_and_table():
    mean, std = ex.mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and std == pytest.approx(math.sqrt(
        ((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert ex.mean_std([3.0]) == (3.0, None)
    # Welch: sqrt(s_a^2/n_a + s_b^2/n_b); s^2 = 1 for [1, 2, 3] and 4.5 for [0, 3].
    assert ex.se_diff([1.0, 2.0, 3.0], [0.0, 3.0]) == pytest.approx(math.sqrt(1 / 3 + 4.5 / 2))
    assert ex.se_diff([1.0], [1.0, 2.0]) is None
    assert ex.fmt_mean_std([1.0, 3.0], ".2f") == "2.00 ± 1.41"
    assert ex.fmt_mean_std([1.0], ".2f") == "1.00"
    assert ex.markdown_table(["a", "b"], [["x|y", "1"]], "lr") == (
        "| a | b |\n|---|---:|\n| x\\|y | 1 |")
    assert [ex.window_size(n) for n in (1, 8, 199, 200, 300)] == [1, 2, 49, 50, 50]
    rows = [{"step": i, "k": float(i)} for i in range(1, 9)] + [{"step": 9}]
    assert ex.window_mean(rows, "k", 3) == pytest.approx(7.5)  # rows 7, 8 (9 has no k)


def test_max_vio_and_file_entropy_by_hand():
    assert ex.max_vio([3, 1, 1, 3]) == pytest.approx(0.5)  # max 3 / mean 2 - 1
    assert ex.max_vio([2, 2, 2, 2]) == 0.0
    # Expert 0: 4 tokens of file 0 (entropy 0); expert 1: 2 + 2 (ln 2); expert 2: none.
    cond, ref = ex.file_entropy(np.array([[4, 0], [2, 2], [0, 0]]))
    assert cond == pytest.approx(0.5 * math.log(2))
    assert ref == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    # Experts that ignore the file: H(F | E) = H(F).
    cond, ref = ex.file_entropy(np.array([[3, 1], [6, 2]]))
    assert cond == pytest.approx(ref)


def test_file_sequences_cut_whole_files(tmp_path):
    from moetrain.data import ByteTokenizer, write_token_dataset

    docs = ["a" * 50, "b" * 70, "c" * 9, "d" * 31]  # the last 3 go to val
    write_token_dataset(docs, tmp_path / "d", ByteTokenizer(), val_fraction=0.75,
                        min_val_tokens=2, progress=False)
    tokens_NS, file_N = ex.file_sequences(tmp_path / "d", seq_len=10, per_file=5)
    # val = b*70 EOS c*9 EOS d*31 EOS: b gives 5 windows (capped), c none, d 3.
    assert file_N.tolist() == [0] * 5 + [2] * 3
    assert (tokens_NS[:5] == ord("b")).all() and (tokens_NS[5:] == ord("d")).all()
    assert tokens_NS.shape == (8, 10)


@pytest.mark.parametrize("router", ["topk", "threshold", "expert_choice"])
def test_route_counts_match_the_layers_own_load(router):
    from moetrain.config import validate
    from moetrain.models import Transformer

    cfg = compose(TINY + [f"moe/router={router}"])
    validate(cfg, 1)
    torch.manual_seed(0)
    model = Transformer(cfg.model, cfg.moe, 257)
    rng = np.random.default_rng(0)
    tokens_NS = rng.integers(0, 256, size=(6, 16))
    file_N = np.array([0, 0, 1, 2, 2, 2])
    counts_LEF = ex.route_counts(model, tokens_NS, file_N, batch=6)  # one forward
    layers = model.moe_layers()
    assert counts_LEF.shape == (len(layers), cfg.model.num_experts, 3)
    for i, layer in enumerate(layers):  # the layer's own record of that forward
        assert counts_LEF[i].sum(axis=1).tolist() == layer.last_stats.load_E.tolist()
    if router == "topk":  # every token of file f gives K pairs
        k = cfg.model.top_k
        assert counts_LEF.sum(axis=1).tolist() == [[32 * k, 16 * k, 48 * k]] * len(layers)
    assert model.training  # restored
