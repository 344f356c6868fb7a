import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import oracle

ROOT = Path(__file__).resolve().parents[3]


def _tool():
    spec = importlib.util.spec_from_file_location("plot_metrics", ROOT / "tools" / "plot_metrics.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_series_and_figure(tmp_path):
    rows = [{"step": 1, "loss": 5.0, "lr": 1e-3, "mfu": None},
            {"step": 2, "loss": 4.0, "lr": 2e-3},
            {"step": 2, "val_loss": 4.5, "val_ppl": 90.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tool = _tool()
    series = tool.load_series(tmp_path)
    assert series["loss"] == ([1, 2], [5.0, 4.0])
    assert series["val_loss"] == ([2], [4.5])
    assert "mfu" not in series  # None values are skipped
    oracle("matplotlib")
    out = tmp_path / "m.png"
    assert tool.main([str(tmp_path), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tool.plot([str(tmp_path)], str(out)) == ["loss", "lr"]


def test_missing_run_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        _tool().load_series(tmp_path / "nope")
