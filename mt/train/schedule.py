"""Learning-rate schedules as pure functions of the update step.

The trainer calls `set_lr(optimizer, lr_at(step, cfg, d_model))` before every update.
Because the learning rate depends on nothing but the step, resuming needs no
scheduler state: restoring the step counter restores the schedule.

Steps are 1-based: the first optimizer update is step 1.

inverse_sqrt (fairseq): linear warmup from `warmup_init_lr` at step 0 to `lr` at step
`warmup_steps`, then `lr * sqrt(warmup_steps / step)`. The peak is reached exactly at
step == warmup_steps. (fairseq sets the lr for update k from the k - 1 updates done,
so its curve is this one shifted by one step.) warmup_steps = 0 means no warmup:
`lr / sqrt(step)`, the same curve as warmup_steps = 1.

noam (Vaswani et al. 2017): `lr * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)`.
Here `lr` is a scale factor, not the peak: the peak, at step == warmup_steps, is
`lr / sqrt(d_model * warmup_steps)`; the paper's setting is lr = 1.0 (use lr = 2.0 for
the common tensor2tensor variant). warmup_init_lr is not used. warmup_steps = 0 means
`lr * (d_model * step)**-0.5` from the first step.
"""

from __future__ import annotations

import math

import torch

from mt.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig, d_model: int | None = None) -> float:
    """Learning rate for update `step` (1-based). `d_model` is required for "noam"."""
    if step < 1:
        raise ValueError(f"steps are 1-based, got step {step}")
    warmup = cfg.warmup_steps
    if cfg.schedule == "inverse_sqrt":
        warmup = max(warmup, 1)  # no warmup == reaching the peak at step 1
        if step < warmup:
            return cfg.warmup_init_lr + (cfg.lr - cfg.warmup_init_lr) * step / warmup
        return cfg.lr * math.sqrt(warmup / step)
    if cfg.schedule == "noam":
        if d_model is None or d_model < 1:
            raise ValueError(f"the noam schedule needs d_model >= 1, got {d_model}")
        # With no warmup, the linear branch step * warmup**-1.5 is infinite: never the min.
        factor = step**-0.5 if warmup == 0 else min(step**-0.5, step * warmup**-1.5)
        return cfg.lr * d_model**-0.5 * factor
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
