import math

import pytest
import torch

from mt.config import TrainConfig
from mt.train.schedule import lr_at, set_lr


def test_inverse_sqrt():
    cfg = TrainConfig(schedule="inverse_sqrt", lr=1e-3, warmup_steps=4, warmup_init_lr=0.0)
    assert lr_at(1, cfg) == pytest.approx(2.5e-4)
    assert lr_at(2, cfg) == pytest.approx(5e-4)
    assert lr_at(4, cfg) == pytest.approx(1e-3)  # peak exactly at warmup_steps
    assert lr_at(16, cfg) == pytest.approx(5e-4)  # 1e-3 * sqrt(4 / 16)
    cfg.warmup_init_lr = 1e-4
    assert lr_at(2, cfg) == pytest.approx(1e-4 + 0.9e-3 * 2 / 4)


def test_inverse_sqrt_no_warmup():
    cfg = TrainConfig(schedule="inverse_sqrt", lr=1e-3, warmup_steps=0)
    assert lr_at(1, cfg) == pytest.approx(1e-3)
    assert lr_at(4, cfg) == pytest.approx(5e-4)


def test_noam():
    cfg = TrainConfig(schedule="noam", lr=2.0, warmup_steps=100)
    # warmup branch: 2 * 256**-0.5 * 10 * 100**-1.5 = 2 / 16 * 0.01
    assert lr_at(10, cfg, d_model=256) == pytest.approx(2 / 16 * 0.01)
    assert lr_at(100, cfg, d_model=256) == pytest.approx(2 / 16 / 10)  # peak lr / sqrt(d * warmup)
    assert lr_at(400, cfg, d_model=256) == pytest.approx(2 / 16 / 20)
    cfg.warmup_steps = 0
    assert lr_at(4, cfg, d_model=64) == pytest.approx(2 / 8 / 2)
    with pytest.raises(ValueError):
        lr_at(1, cfg)


def test_continuous_at_warmup_and_rejects_step_zero():
    cfg = TrainConfig(schedule="inverse_sqrt", lr=5e-4, warmup_steps=4000)
    assert lr_at(3999, cfg) < lr_at(4000, cfg) == pytest.approx(5e-4)
    assert lr_at(4001, cfg) == pytest.approx(5e-4 * math.sqrt(4000 / 4001))
    with pytest.raises(ValueError):
        lr_at(0, cfg)


def test_set_lr():
    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)]}, {"params": []}], lr=1.0)
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
