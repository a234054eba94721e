"""What the updates call: the model wrapped for DDP and, with train.compile, compiled along with
the loss (which fuses log-softmax, gather and sums that would otherwise write (tokens, V) floats)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch

from mt.config import Config
from mt.train.distributed import Dist


def wrap_model(
    model: torch.nn.Module, cfg: Config, dist: Dist, loss: Callable[..., Any]
) -> tuple[torch.nn.Module, Callable[..., Any] | None]:
    """(what the updates call, the compiled `loss` or None without train.compile)."""
    wrapped, compiled_loss = dist.wrap(model), None
    t = cfg.train
    if t.compile:
        # With pad_to_multiple every batch has one of a few shapes: each is compiled once,
        # statically. Without, shapes vary from batch to batch: dynamic shapes.
        dynamic = not t.pad_to_multiple
        if dynamic and dist.is_main:
            print("mt train: train.compile without train.pad_to_multiple compiles for dynamic shapes, "
                  "slowly; train.pad_to_multiple=16 (or 32) gives a few static ones")
        if t.pad_to_multiple:
            shapes = -(-(cfg.data.max_len + 1) // t.pad_to_multiple)
            # Dynamo gives up compiling a function after recompile_limit shapes (8).
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, shapes + 1)
        # An OptimizedModule, a Module: torch annotates compile() as returning a plain callable.
        wrapped = cast(torch.nn.Module, torch.compile(wrapped, dynamic=dynamic))
        compiled_loss = torch.compile(loss, dynamic=dynamic)
    return wrapped, compiled_loss
