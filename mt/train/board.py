"""TensorBoard for a training run (`train.tensorboard: true`): every metrics.jsonl record as
scalars, and the cross-attention of a few fixed validation sentences as images.

Written by rank 0 to `<out_dir>/tensorboard`. A resumed run drops the events past its
checkpoint (`purge_step`), as metrics.jsonl drops its lines, so the curves of a resumed run
are those of an uninterrupted one.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mt.errors import ConfigError
from mt.model import Transformer
from mt.translate.alignment import cross_attention
from mt.translate.translator import pad_sources

BOARD_SENTENCES = 3  # validation sentences whose attention TensorBoard shows

SCALARS = {
    "train": ("loss", "nll", "ppl", "lr", "grad_norm", "tok_s"),
    "valid": ("valid_loss", "valid_nll", "valid_ppl", "valid_bleu", "valid_chrf"),
}


class TensorBoard:
    def __init__(self, directory: Path, resume_step: int | None) -> None:
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(
                "train.tensorboard needs the `tensorboard` extra: pip install -e '.[tensorboard]'"
            )
        from torch.utils.tensorboard import SummaryWriter

        purge = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(str(directory), purge_step=purge)

    def record(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record: its numbers under `<kind>/<name>`."""
        kind, step = record["kind"], record["step"]
        for name in SCALARS.get(kind, ()):
            if name in record:
                self.writer.add_scalar(f"{kind}/{name}", record[name], step)
        self.writer.flush()

    def attention(self, step: int, index: int, weights: Tensor) -> None:
        """(T, S) attention of target over source tokens, drawn as a greyscale image (8x8 pixels a
        cell, darker is more), as the page of `mt serve` does."""
        image = (1 - weights / weights.max().clamp(min=1e-9)).repeat_interleave(8, 0).repeat_interleave(8, 1)
        self.writer.add_image(f"attention/valid_{index}", image, step, dataformats="HW")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def draw_attention(
    board: TensorBoard, step: int, model: Transformer, seqs: list[np.ndarray], hyps: list[list[int]],
    device: torch.device,
) -> None:
    """The last decoder layer's cross-attention (heads averaged) of the first validation
    sentences' greedy translations (BOARD_SENTENCES of `seqs`), as TensorBoard images."""
    seqs = seqs[:BOARD_SENTENCES]
    src = pad_sources(seqs, device)
    for i, weights in enumerate(cross_attention(model, src, hyps[: len(seqs)])):
        board.attention(step, i, weights[-1].mean(0))
