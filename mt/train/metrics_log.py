"""metrics.jsonl, the run's log of train and validation records, which a resumed run cuts back
to its checkpoint so that it reads as the log of an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mt.errors import MTError
from mt.files import write_atomic
from mt.train.board import TensorBoard


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line torn by a crash mid-write."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class MetricsLog:
    """metrics.jsonl in the run directory; on resume, lines past the checkpoint (and lines
    torn by a crash) are dropped. Every record also goes to TensorBoard when there is one."""

    def __init__(
        self, path: Path, resume_step: int | None, enabled: bool, board: TensorBoard | None = None
    ) -> None:
        self.path, self.enabled, self.board = path, enabled, board
        if not enabled:
            return
        kept = []
        if resume_step is not None and path.exists():
            kept = [
                line
                for line in path.read_text(encoding="utf-8").splitlines()
                if (step := _step_of(line)) is not None and step <= resume_step
            ]
        write_atomic(path, "".join(line + "\n" for line in kept))

    def write(self, **record: Any) -> None:
        """Append one record; a failed write (a full disk) is an MTError naming the file, and
        the last checkpoint stays as it was (a torn line is dropped on resume)."""
        if self.enabled:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                if self.board is not None:
                    self.board.record(record)
            except OSError as e:
                raise MTError(
                    f"cannot write {self.path}: {e.strerror or e}; the last checkpoint is intact, "
                    f"resume with the same command once there is room"
                ) from None
