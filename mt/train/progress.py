"""What a run shows and logs as it trains: the progress bar, the update records not read yet, the
train lines of metrics.jsonl (losses averaged over the updates since the last line, tokens per
second of training alone) and the check that stops a diverging run."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from mt.config import TrainConfig
from mt.errors import MTError
from mt.train.metrics_log import MetricsLog

if TYPE_CHECKING:  # the trainer owns the state; this module updates the counters it is handed
    from mt.checkpoint import TrainState

MAX_NONFINITE_IN_ROW = 5
# What Trainer.update returns, on the device, in this order: per-token loss and nll, gradient
# norm, target tokens (all ranks), stop flag (ranks asking to stop), 1.0 if the step was taken.
RECORD = ("loss", "nll", "grad_norm", "tokens", "stop", "finite")


class Progress:
    def __init__(
        self, cfg: TrainConfig, log: MetricsLog, device: torch.device, is_main: bool, last_path: Path,
        elapsed_before: float,
    ) -> None:
        self.cfg, self.log, self.device, self.is_main, self.last_path = cfg, log, device, is_main, last_path
        self.t0, self.elapsed_before = time.time(), elapsed_before
        self.tokens_seen, self.window_start, self.window_paused = 0.0, time.perf_counter(), 0.0
        # (step, epoch, lr, record) of the updates whose records are not read yet.
        self.pending: list[tuple[int, int, float, torch.Tensor]] = []
        self.bar: tqdm | None = None  # while fit() runs

    def start(self, step: int, elapsed_before: float) -> None:
        """The clocks and the bar of a fit() from `step`."""
        self.t0, self.elapsed_before = time.time(), elapsed_before
        self.tokens_seen, self.window_start, self.window_paused = 0.0, time.perf_counter(), 0.0
        self.pending = []
        self.bar = tqdm(
            total=self.cfg.max_steps or None,
            initial=step,
            desc="train",
            unit="step",
            disable=not self.is_main,
            dynamic_ncols=True,
        )

    def advance(self, step: int, epoch: int, lr: float, record: torch.Tensor) -> None:
        """An update done: the bar moves on; its record is read later (read())."""
        if self.bar is not None:
            self.bar.update(1)
        self.pending.append((step, epoch, lr, record))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def elapsed(self) -> float:
        """Training seconds of this run, those before a resume included."""
        return self.elapsed_before + (time.time() - self.t0)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time that is not training (validation, checkpoints): left out of the logged tok_s. The
        device first finishes the updates queued before, so that their time stays counted."""
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.window_paused += time.perf_counter() - t0

    def read(self) -> list[tuple[dict[str, float], int, int, float]]:
        """The records of the updates not read yet (one wait for the device), in order, each as
        ({RECORD name: value}, step, epoch, lr)."""
        if not self.pending:
            return []
        values = torch.stack([record for *_, record in self.pending]).tolist()
        pending, self.pending = self.pending, []
        return [
            (dict(zip(RECORD, row, strict=True)), step, epoch, lr)
            for (step, epoch, lr, _), row in zip(pending, values, strict=True)
        ]

    def log_train(self, s: TrainState, out: dict[str, float], step: int, epoch: int, lr: float) -> None:
        """Every train.log_every steps: the losses averaged over the updates since the last line,
        weighted by tokens (the window's sums are checkpointed, so a resumed run logs alike), and
        tokens per second of training alone: validation and checkpoints are left out."""
        if out["finite"]:
            s.win_loss += out["loss"] * out["tokens"]
            s.win_nll += out["nll"] * out["tokens"]
            s.win_tokens += out["tokens"]
        self.tokens_seen += out["tokens"]
        if step % self.cfg.log_every:
            return
        seconds = time.perf_counter() - self.window_start - self.window_paused
        tok_s = self.tokens_seen / max(seconds, 1e-9)
        n = max(s.win_tokens, 1.0)
        loss, nll = s.win_loss / n, s.win_nll / n
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
        self.log.write(
            step=step,
            epoch=epoch,
            kind="train",
            loss=loss,
            nll=nll,
            ppl=math.exp(min(nll, 50.0)),
            lr=lr,
            grad_norm=out["grad_norm"],
            tok_s=tok_s,
        )
        self.tokens_seen, self.window_start, self.window_paused = 0.0, time.perf_counter(), 0.0
        s.win_loss = s.win_nll = s.win_tokens = 0.0

    def check_finite(self, s: TrainState, out: dict[str, float], step: int) -> None:
        """A skipped update is a warning; MAX_NONFINITE_IN_ROW of them in a row stop the run."""
        if out["finite"]:
            s.nonfinite_in_row = 0
            return
        s.nonfinite_in_row += 1
        if self.is_main:
            tqdm.write(
                f"mt train: warning: non-finite loss or gradient at step {step} "
                f"(loss {out['loss']}, grad norm {out['grad_norm']}); update skipped",
                file=sys.stderr,
            )
        if s.nonfinite_in_row >= MAX_NONFINITE_IN_ROW:
            raise MTError(
                f"training diverged: {s.nonfinite_in_row} non-finite losses in a row up to step {step}; "
                f"the last good checkpoint is {self.last_path}. Try a lower train.lr or train.clip_norm=1"
            )
