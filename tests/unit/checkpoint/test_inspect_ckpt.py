"""tools/inspect_ckpt.py on a tiny training run: the report (step, tokens, world size, keys,
manifest), --diff between two steps, --json, and exit 2 for corrupt / missing checkpoints."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from moetrain.train.main import run
from tests.conftest import compose

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("inspect_ckpt_tool", ROOT / "tools" / "inspect_ckpt.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

WEIGHT = "model_optim.model.layers.0.attention.wq.weight"
BUFFER = "model_optim.model.layers.0.moe.router.expert_bias"  # not trained without aux-free


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_cache) -> Path:
    from tests.conftest import TINY

    out = tmp_path_factory.mktemp("inspect") / "run"
    cfg = compose(TINY + [f"run.dir={out}", f"data.cache_dir={data_cache}", "checkpoint.every=3",
                          "checkpoint.keep=0", "train.steps=6", "eval.every=0"])
    run(cfg)
    return out


def _ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:07d}"


def test_inspect_reports_step_tokens_layout_keys_and_manifest(run_dir, capsys):
    cfg = compose(["train.seq_len=32", "train.global_batch_size=8"])
    r = tool.inspect(run_dir)  # a run dir resolves to its latest step
    assert r["path"] == str(_ckpt(run_dir, 6))
    assert r["step"] == 6 and r["progress"]["step"] == 6
    assert r["progress"]["tokens"] == 6 * cfg.train.global_batch_size * cfg.train.seq_len
    assert r["world_size"] == 1
    assert r["layout"]["tp"] == 1 and r["layout"]["pp"] == 1
    w = r["keys"][WEIGHT]
    assert w == {"kind": "tensor", "shape": [32, 32], "dtype": "float32", "numel": 1024,
                 "bytes": 4096}
    assert r["keys"]["progress.tokens"]["kind"] == "bytes"
    assert r["totals"]["tensors"] == sum(v["kind"] == "tensor" for v in r["keys"].values())
    assert r["manifest"] == {"status": "ok", "check": "size+crc32", "problems": []}

    assert tool.main([str(_ckpt(run_dir, 6))]) == 0
    text = capsys.readouterr().out
    assert "tokens seen  1,536" in text and "world size 1" in text and "OK" in text
    assert tool.main(["--json", str(run_dir / "checkpoints")]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 6


def test_diff_between_steps(run_dir, capsys):
    d = tool.diff(_ckpt(run_dir, 3), _ckpt(run_dir, 6), budget_bytes=8192)  # several groups
    assert d["only_in_a"] == [] and d["only_in_b"] == [] and d["changed"] == {}
    assert d["max_abs_diff"][WEIGHT] > 0
    assert d["max_abs_diff"][BUFFER] == 0
    assert d["bytes_equal"]["progress.tokens"] is False
    assert d["bytes_equal"]["sampler.seed"] is True
    assert tool.main(["--diff", str(_ckpt(run_dir, 3)), str(_ckpt(run_dir, 6))]) == 0
    assert "max |A - B|" in capsys.readouterr().out
    same = tool.diff(_ckpt(run_dir, 6), _ckpt(run_dir, 6))
    assert same["summary"]["tensors_differing"] == 0


def test_corrupt_missing_and_uncommitted_exit_2(run_dir, tmp_path, capsys):
    bad = tmp_path / "step_0000006"
    shutil.copytree(_ckpt(run_dir, 6), bad)
    data = bad / "__0_0.distcp"
    blob = bytearray(data.read_bytes())
    blob[100] ^= 0xFF  # same size, changed bytes: only the CRC32 sees it
    data.write_bytes(bytes(blob))
    r = tool.inspect(bad)
    assert r["manifest"]["status"] == "corrupt"
    assert any(str(data) in q and "CRC32" in q for q in r["manifest"]["problems"])
    assert tool.inspect(bad, full=False)["manifest"]["status"] == "ok"  # sizes only
    assert tool.main([str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err

    missing = tmp_path / "nope"
    assert tool.main([str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    unfinished = tmp_path / "step_0000009"
    unfinished.mkdir()
    assert tool.main([str(unfinished)]) == 2
    assert "COMMITTED" in capsys.readouterr().err
