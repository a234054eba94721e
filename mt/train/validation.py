"""Validation during training: the label-smoothed loss of the validation split and the greedy
BLEU/chrF of its detokenized translations, and the metric that ranks checkpoints."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mt.config import Config, resolve_decoding
from mt.data.dataset import Prepared, PreparedSplit
from mt.model import Transformer
from mt.train.batching import TokenBatcher, make_batch
from mt.train.board import TensorBoard, draw_attention
from mt.train.loss import label_smoothed_nll
from mt.translate.evaluate import score
from mt.translate.translator import translate_ids


@torch.no_grad()
def valid_metrics(
    model: Transformer,
    cfg: Config,
    data: Prepared,
    split: PreparedSplit,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    board: TensorBoard | None = None,
    step: int = 0,
) -> dict[str, Any]:
    """The validation metrics of `model` on `split` (rank 0; no collective); with a `board`, the
    attention of the first sentences' translations is drawn there at `step`."""
    model.eval()  # the next update() puts the training model back in training mode
    # Validation keeps every line; one longer than the model's positions is cut to fit.
    n = cfg.model.max_positions - 1
    src_lens, tgt_lens = np.minimum(split.src_lens, n), np.minimum(split.tgt_lens, n)
    batcher = TokenBatcher(
        src_lens,
        tgt_lens,
        max(cfg.train.max_tokens, int(max(src_lens.max(), tgt_lens.max())) + 1),
        0,
        shuffle=False,
    )
    loss_sum = nll_sum = n_tok = 0.0
    for idx in batcher.epoch_batches(0):
        batch = make_batch([split.src(i)[:n] for i in idx], [split.tgt(i)[:n] for i in idx], idx)
        batch = batch.to(device)
        with autocast():
            logits = model(batch.src, batch.tgt_in)
        loss, nll = label_smoothed_nll(logits, batch.tgt_out, cfg.train.label_smoothing)
        loss_sum += float(loss)
        nll_sum += float(nll)
        n_tok += batch.n_tgt_tokens
    metrics = {
        "valid_loss": loss_sum / n_tok,
        "valid_nll": nll_sum / n_tok,
        "valid_ppl": math.exp(min(nll_sum / n_tok, 50.0)),
    }
    if cfg.train.valid_bleu:
        seqs = [split.src(i)[:n] for i in range(len(split))]
        hyps = translate_ids(model, seqs, resolve_decoding(cfg.decode, beam=1), device)
        texts = data.tokenizer.decode_tgt([h[0].tokens for h in hyps])
        s = score(texts, data.text("valid", "tgt"))
        metrics.update(valid_bleu=s["bleu"], valid_chrf=s["chrf"])
        if board is not None:
            draw_attention(board, step, model, seqs, [h[0].tokens for h in hyps], device)
    return metrics


def best_key(metrics: dict[str, Any], best_metric: str) -> str:
    """The metric that ranks checkpoints: train.best_metric's, or the loss without BLEU/chrF."""
    key = {"bleu": "valid_bleu", "chrf": "valid_chrf", "loss": "valid_loss"}[best_metric]
    return key if key in metrics else "valid_loss"


def improves(value: float, best: float | None, key: str) -> bool:
    """Whether `value` of metric `key` beats `best` (None: none yet); only the loss is better lower."""
    return best is None or (value < best if key == "valid_loss" else value > best)
