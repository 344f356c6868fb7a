"""MetricsLogger: jsonl content, TensorBoard scalars/images read back, truncate_after."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moetrain.config import LoggingConfig
from moetrain.metrics import MetricsLogger, read_metrics, tensorboard_tag


def _events(tb_dir) -> EventAccumulator:
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_jsonl_and_tensorboard_scalars(tmp_path):
    log = MetricsLogger(tmp_path, LoggingConfig(), enabled=True)
    log.log_step(1, {"loss": 2.5, "aux_loss": torch.tensor(0.125), "lr": np.float32(0.5),
                     "tokens": 4096, "tokens_per_s": 1000.0, "mfu": None})
    log.log_step(2, {"loss": 2.25, "aux_loss": 0.0625, "lr": 0.25, "tokens": 8192,
                     "tokens_per_s": 1500.0, "mfu": None})
    log.log_val(2, 2.0)
    # Lines are on disk before close (flushed per line).
    lines = read_metrics(tmp_path / "metrics.jsonl")
    assert lines == [
        {"step": 1, "loss": 2.5, "aux_loss": 0.125, "lr": 0.5, "tokens": 4096,
         "tokens_per_s": 1000.0, "mfu": None},
        {"step": 2, "loss": 2.25, "aux_loss": 0.0625, "lr": 0.25, "tokens": 8192,
         "tokens_per_s": 1500.0, "mfu": None},
        {"step": 2, "val_loss": 2.0, "val_ppl": math.exp(2.0)},
    ]
    assert isinstance(lines[0]["tokens"], int)
    log.close()

    acc = _events(tmp_path / "tensorboard")
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "moe/aux_loss", "train/lr", "perf/tokens", "perf/tokens_per_s",
            "val/loss", "val/ppl"} <= tags
    assert not any("mfu" in t for t in tags)  # None is skipped in TensorBoard
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.5), (2, 2.25)]
    assert [e.value for e in acc.Scalars("moe/aux_loss")] == [0.125, 0.0625]
    assert acc.Scalars("val/ppl")[0].value == pytest.approx(math.exp(2.0), rel=1e-6)


def test_tags():
    assert tensorboard_tag("loss") == "train/loss"
    assert tensorboard_tag("grad_norm") == "train/grad_norm"
    assert tensorboard_tag("z_loss") == "moe/z_loss"
    assert tensorboard_tag("load_imbalance") == "moe/load_imbalance"
    assert tensorboard_tag("mfu") == "perf/mfu"
    assert tensorboard_tag("samples_per_s") == "perf/samples_per_s"
    assert tensorboard_tag("custom/thing") == "custom/thing"


def test_heatmap_image_and_layer_scalars(tmp_path):
    log = MetricsLogger(tmp_path, LoggingConfig(heatmap_every=5), enabled=True)
    assert [s for s in range(1, 12) if log.heatmap_due(s)] == [5, 10]
    load_LE = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
    log.log_heatmap(5, load_LE)
    log.close()
    acc = _events(tmp_path / "tensorboard")
    img = acc.Images("moe/expert_load")[0]
    assert (img.step, img.height, img.width) == (5, 2 * 48, 4 * 48)  # 48 px cells (capped)
    assert acc.Scalars("moe/load_max/layer1")[0].value == pytest.approx(2.8)
    assert acc.Scalars("moe/load_min/layer1")[0].value == pytest.approx(0.4)
    assert acc.Scalars("moe/load_max/layer0")[0].value == pytest.approx(1.0)


def test_truncate_after_drops_later_steps(tmp_path):
    log = MetricsLogger(tmp_path, LoggingConfig(tensorboard=False), enabled=True)
    for s in range(1, 6):
        log.log_step(s, {"loss": float(s)})
    log.log_val(4, 1.0)
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # torn line left by a crash

    resumed = MetricsLogger(tmp_path, LoggingConfig(tensorboard=False), enabled=True)
    assert resumed.truncate_after(3) == 4  # steps 4, 5, val@4 and the torn line
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    resumed.log_step(4, {"loss": 0.5})
    resumed.close()
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in recs] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 0.5)]
    assert not (tmp_path / "tensorboard").exists()


def test_disabled_rank_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "run", LoggingConfig(), enabled=False)
    log.log_step(1, {"loss": 1.0})
    log.log_val(1, 1.0)
    log.log_heatmap(1, torch.full((2, 4), 0.25))
    assert log.truncate_after(0) == 0
    log.close()
    assert not (tmp_path / "run").exists()
