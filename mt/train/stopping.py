"""When a run stops: a stop signal (SIGINT, SIGTERM), early stopping, or a budget reached."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from typing import Any

from mt.checkpoint import TrainState
from mt.config import TrainConfig


class Stop:
    def __init__(self, is_main: bool) -> None:
        self.is_main = is_main
        self.signal: int | None = None  # SIGINT or SIGTERM, once received
        self.early = False  # train.patience validations without improvement

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def on_signal(self, signum: int, frame: Any) -> None:
        """SIGINT (Ctrl-C) or SIGTERM (a scheduler, `docker stop`, `kill`): finish the update,
        save, say how to resume, exit. A second signal stops at once."""
        if self.requested:
            raise KeyboardInterrupt
        self.signal = signum
        if self.is_main:
            print(
                f"\nmt train: {signal.Signals(signum).name}: stopping after this update and saving a "
                f"checkpoint (send it again to abort)",
                file=sys.stderr,
            )

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM go to on_signal while training; the previous handlers come back after."""
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {signum: signal.signal(signum, self.on_signal) for signum in handled}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def reason(self, t: TrainConfig, s: TrainState, elapsed: float) -> str | None:
        """The one place that decides to stop; None while the run goes on."""
        if self.requested:
            return "interrupted"
        if self.early:
            return "early stopping"
        if (
            (t.max_steps and s.step >= t.max_steps)
            or (t.max_epochs and s.epoch >= t.max_epochs)
            or (t.max_minutes and elapsed >= t.max_minutes * 60)
        ):
            return "budget reached"
        return None
