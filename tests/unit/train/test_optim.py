import math

import pytest
import torch

from moetrain.config.schema import LRSchedule, OptimConfig
from moetrain.train.optim import build_optimizer, lr_at


def test_cosine_schedule_hand_computed():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=4, schedule=LRSchedule.cosine)
    # warmup: (step+1)/4
    assert [lr_at(s, 14, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # decay spans steps 4..13 (9 intervals); halfway (progress 0.5) -> floor + (peak-floor)/2
    assert lr_at(4, 14, cfg) == pytest.approx(1.0)
    assert lr_at(13, 14, cfg) == pytest.approx(0.1)
    mid = 0.1 + 0.5 * 0.9 * (1 + math.cos(math.pi * 4 / 9))
    assert lr_at(8, 14, cfg) == pytest.approx(mid)


def test_wsd_schedule_hand_computed():
    cfg = OptimConfig(lr=2.0, min_lr_ratio=0.0, warmup_steps=2, schedule=LRSchedule.wsd,
                      decay_fraction=0.2)
    lrs = [lr_at(s, 20, cfg) for s in range(20)]
    assert lrs[:2] == [1.0, 2.0]
    assert all(v == 2.0 for v in lrs[2:16])  # stable until the last 4 steps
    assert lrs[16:] == pytest.approx([1.5, 1.0, 0.5, 0.0])


def test_weight_decay_skips_norms_and_vectors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.RMSNorm(4))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.5), torch.device("cpu"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.5 for p in g["params"]}
    assert decayed == {id(model[0].weight)}
