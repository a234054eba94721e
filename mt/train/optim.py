"""The optimizer: AdamW without weight decay on 1-D parameters, the gradients' norm (clipped when
train.clip_norm says so), and a step skipped, on the device, when the update was not finite."""

from __future__ import annotations

import torch

from mt.config import TrainConfig


def build_optimizer(model: torch.nn.Module, t: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    # No weight decay on biases, norms and embeddings' padding-free 1-D parameters.
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=t.lr,
        betas=(t.betas[0], t.betas[1]),
        eps=t.eps,
        # The fused kernel is about twice as fast as the per-tensor loop, on CPU too.
        fused=device.type in ("cuda", "cpu"),
    )


def grad_norm(model: torch.nn.Module, clip_norm: float) -> torch.Tensor:
    """The gradients' total norm, clipped to `clip_norm` when that is set; without it the
    gradients are left alone (clip_grad_norm_ with an infinite bound multiplies every one by 1)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if clip_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, clip_norm, norm)
    return norm


def step_if(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """optimizer.step() when `finite` holds. The fused kernel skips on the device (and
    leaves its step count alone); any other optimizer needs the flag on the host."""
    if optimizer.defaults.get("fused"):
        # read by torch.optim.AdamW.step, an attribute torch's annotations do not declare
        optimizer.found_inf = (~finite).float()  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
    elif bool(finite):
        optimizer.step()
