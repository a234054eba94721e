"""Multi-process training through torchrun (DDP): the few collective operations we need.

Launched by `torchrun`, the environment holds RANK, WORLD_SIZE and LOCAL_RANK; we
join the process group with NCCL on GPUs and gloo on CPUs. Without torchrun,
everything here is a no-op on a single process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "gloo"

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local)
            # A rank that dies leaves the others blocked in a collective; time out rather than hang
            # (torchrun also tears the whole job down when one worker fails).
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        return cls(rank, world, local, dist.get_backend())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def device(self, default: torch.device) -> torch.device:
        if default.type == "cuda" and self.enabled:
            return torch.device("cuda", self.local_rank)
        return default

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.enabled:
            return model
        dev = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    def no_sync(self, model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last batch of an accumulated update.

        `model` may be the DDP module or torch.compile's wrapper of it (`_orig_mod`).
        """
        ddp = getattr(model, "_orig_mod", model)
        if self.enabled and not sync and isinstance(ddp, DistributedDataParallel):
            return ddp.no_sync()
        return contextlib.nullcontext()

    def all_reduce_sum(self, t: torch.Tensor) -> None:
        """Sum `t` over ranks, in place. NCCL takes only CUDA tensors: callers pass tensors on
        the model's device (checked by a test with a recording stand-in)."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's object on every rank (validation metrics, so every rank decides alike)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's object, in rank order, on every rank (e.g. RNG states for a checkpoint)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
