"""`mt train`: teacher-forced training with exact resume, validation BLEU and checkpoints.

One update = `train.accum_steps` batches on each of `world_size` processes; the loss
of an update is its summed label-smoothed loss divided by the update's target
tokens over all ranks, so 2 ranks x accum 1 and 1 rank x accum 2 take the same step.

Everything the run needs to continue exactly is in `checkpoint_last.pt`: weights,
optimizer, grad scaler, RNG states, epoch and position in the epoch's batch list
(which is a pure function of seed and epoch). Running the same command again
resumes from it.
"""

from __future__ import annotations

import contextlib
import functools
import random
import shutil
import signal
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mt.checkpoint import (
    Checkpoint,
    Training,
    TrainState,
    keep_last,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_checkpoint_path,
)
from mt.config import Config, save_config, to_dict
from mt.data.prepare import pretrained_vocab
from mt.device import decode_precision, pick_device, train_autocast_dtype
from mt.errors import CheckpointError
from mt.files import DirectoryLock
from mt.model import Transformer
from mt.train import feed, optim, validation
from mt.train.batching import Batch, TokenBatcher
from mt.train.board import TensorBoard
from mt.train.compile import wrap_model
from mt.train.distributed import Dist
from mt.train.feed import collate as _collate  # the name scripts and tests use
from mt.train.finish import finish
from mt.train.loss import label_smoothed_nll
from mt.train.metrics_log import MetricsLog
from mt.train.prefetch import Prefetcher
from mt.train.progress import RECORD as RECORD
from mt.train.progress import Progress
from mt.train.resume import check_resumable, kept_epoch_weights, source_weights
from mt.train.run_dir import claim_out_dir
from mt.train.schedule import lr_at, set_lr
from mt.train.stopping import Stop


class Trainer:
    """Set-up is a sequence of small builders, in the order their dependencies need."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        t = cfg.train
        self.dist = Dist.from_env()
        if t.threads:
            torch.set_num_threads(t.threads)
        self.device = self.dist.device(pick_device(t.device, "train.device"))
        decode_precision(cfg.decode.precision, self.device)  # errors now, not at the final test
        self.amp_dtype = train_autocast_dtype(t.precision, self.device)
        # One GPU: update records are read every train.log_every steps, not after each update
        # (a read waits for the device). Several ranks read each one, to agree on stopping.
        self.defer_reads = self.device.type == "cuda" and not self.dist.enabled
        self.out = cfg.out_dir
        self.last_path, self.best_path = self.out / "checkpoint_last.pt", self.out / "checkpoint_best.pt"
        self.board: TensorBoard | None = None  # built last; close() may come before
        self.stop = Stop(self.dist.is_main)
        self.made_out_dir = self.dist.is_main and not self.out.exists()
        self.lock: DirectoryLock | None = claim_out_dir(self.out, self.dist)  # until close()
        try:
            last = self._read_last_checkpoint()
            if last is not None:  # before preparing: a changed vocabulary must not rebuild the cache
                check_resumable(last, cfg, self.last_path, self.dist)
            else:  # before preparing: a checkpoint to fine-tune that cannot be used prepares nothing
                pretrained_vocab(cfg)
            self.data = feed.load_data(cfg, self.dist)
            self.train_split = self.data.split("train")
            self.valid_split = feed.valid_split(self.data, cfg)
            # Seeds the RNGs: weights depend on train.seed only, or are train.init_from's.
            self.raw_model = self._build_model(fresh=last is None)
            self.optimizer = optim.build_optimizer(self.raw_model, t, self.device)
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
            self.state = TrainState()
            # (epoch, source weights) when a resumed epoch keeps the weights it began with.
            self.kept_weights: tuple[int, dict[str, float]] | None = None
            if last is not None:
                self._resume(last)  # weights, optimizer, scaler, counters and RNG
            del last
            if self.dist.is_main:  # the resolved config, next to what it produced
                save_config(cfg, self.out / "config.yaml")
            self.dist.barrier()
            self.model, self.compiled_loss = wrap_model(self.raw_model, cfg, self.dist, label_smoothed_nll)
            build = functools.partial(feed.build_batcher, self.data, self.train_split, cfg, self.dist)
            self.batcher = build()
            # The resumed epoch's batch list is the one its position counts in: its own weights'.
            self.kept_batcher = build(self.kept_weights[1]) if self.kept_weights else None
            resume_step = self.state.step if self.last_path.exists() else None
            if t.tensorboard and self.dist.is_main:
                self.board = TensorBoard(self.out / "tensorboard", resume_step)
            self.log = MetricsLog(self.out / "metrics.jsonl", resume_step, self.dist.is_main, self.board)
            self.progress = Progress(t, self.log, self.device, self.dist.is_main, self.last_path,
                                     self.state.elapsed)
        except BaseException:
            self.close(abandon=True)
            raise

    @property
    def stop_requested(self) -> bool:
        return self.stop.requested

    def close(self, abandon: bool = False) -> None:
        """Let another run have the directory (the lock also dies with the process). A run whose
        set-up failed (`abandon`) removes the directory when it made it: a new run that never
        started leaves nothing behind."""
        if self.board is not None:
            self.board.close()
        if abandon and self.made_out_dir:
            shutil.rmtree(self.out, ignore_errors=True)
        if self.lock is not None:
            self.lock.release()

    def _read_last_checkpoint(self) -> Checkpoint | None:
        if not self.last_path.exists():
            return None
        ck = Checkpoint.read(self.last_path)
        if ck.training is None or not ck.training.rng_ranks:
            raise CheckpointError(
                f"{self.last_path} holds no training state to resume from (no optimizer, counters or "
                f"RNG states: averaged weights?); move it away, or use another train.out_dir"
            )
        return ck

    def _build_model(self, fresh: bool) -> Transformer:
        seed = self.cfg.train.seed
        # Seed everything before the model exists, so initial weights depend on the seed only.
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        tok = self.data.tokenizer
        model = Transformer(self.cfg.model, tok.src_vocab_size, tok.tgt_vocab_size).to(self.device)
        if fresh and self.cfg.train.init_from:  # a resumed run has its own weights
            self._init_weights(model)
        # Every rank starts from the same weights, but each draws its own dropout masks.
        torch.manual_seed(seed + 1000 * self.dist.rank)
        return model

    def _init_weights(self, model: Transformer) -> None:
        """Fine-tuning: the weights of train.init_from, which must fit this model config and the
        prepared token ids (prepared with its subword models); optimizer and schedule start afresh."""
        path = self.cfg.train.init_from  # its languages and model shape: checked by pretrained_vocab
        try:
            ck = Checkpoint.read(path)
            ck.check_subwords(self.data.tokenizer, self.cfg.prepared_dir, path,
                              "prepared without it, and its corpus out of reach?")
        except CheckpointError as e:
            raise CheckpointError(f"train.init_from: {e}") from None
        try:
            model.load_state_dict(ck.model)
        except RuntimeError as e:  # load_state_dict lists every mismatch; the first says enough
            raise CheckpointError(f"train.init_from: {path} does not fit the model: "
                                  f"{str(e).strip().splitlines()[0]}") from None
        if self.dist.is_main:
            step = ck.training.state.step if ck.training else "?"
            print(f"mt train: starting from the weights of {path} (step {step} "
                  f"of its run), with a fresh optimizer and schedule")

    def _resume(self, ck: Checkpoint) -> None:
        """Continue from checkpoint_last.pt (checked by _read_last_checkpoint and _check_resumable)."""
        assert ck.training is not None
        ck.check_subwords(self.data.tokenizer, self.cfg.prepared_dir, self.last_path, "prepared again since?")
        self.raw_model.load_state_dict(ck.model)
        self.optimizer.load_state_dict(ck.training.optimizer)
        if ck.training.scaler:  # empty when written without fp16 (bf16, CPU): the scaler starts afresh
            self.scaler.load_state_dict(ck.training.scaler)
        self.state = ck.training.state
        set_rng_state(ck.training.rng_ranks[self.dist.rank], self.device)
        if self.dist.is_main:
            s = self.state
            print(f"mt train: resuming from {self.last_path} at step {s.step}, epoch {s.epoch}")
        self._keep_epoch_weights(ck)

    def _keep_epoch_weights(self, ck: Checkpoint) -> None:
        """The resumed epoch's own source weights, when not the config's (mt.train.resume)."""
        s = self.state
        self.kept_weights = kept_epoch_weights(ck, self.cfg, s.epoch, s.batch_pos, self.dist.is_main)

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_state(self, metrics: dict[str, Any] | None, rngs: list[Any]) -> dict[str, Any]:
        tok = self.data.tokenizer
        training = Training(
            optimizer=self.optimizer.state_dict(),
            state=self.state,
            scaler=self.scaler.state_dict(),
            rng_ranks=rngs,  # each rank's own dropout stream, for exact multi-process resume
            metrics=metrics or {},
            world_size=self.dist.world_size,
            epoch_weights=(
                self.kept_weights[1]
                if self.kept_weights and self.kept_weights[0] == self.state.epoch
                else source_weights(to_dict(self.cfg))
            ),
        )
        config, model = to_dict(self.cfg), self.raw_model.state_dict()
        return Checkpoint(self.cfg.name, config, tok.src_proto, tok.tgt_proto, model, training).to_state()

    def save(self, metrics: dict[str, Any] | None = None, best: bool = False) -> None:
        """Write checkpoint_last (and best / step copies) atomically; rank 0 writes.

        Step copies (averaged at the end) come from validated saves only, those with
        `metrics`: the save of an interrupted run must not change which are averaged.
        checkpoint_last is written last: a crash before it is complete resumes from the
        previous one and redoes this save, so no best or step checkpoint is ever lost.
        """
        self.state.elapsed = self._elapsed()
        rngs = self.dist.gather(rng_state(self.device))
        if self.dist.is_main:
            state = self._checkpoint_state(metrics, rngs)
            if best:
                save_checkpoint(self.best_path, state)
            step_copy = self.cfg.train.keep_last and metrics is not None
            if step_copy:
                save_checkpoint(step_checkpoint_path(self.out, self.state.step), state)
            save_checkpoint(self.last_path, state)
            if step_copy:
                keep_last(self.out, self.cfg.train.keep_last)
        self.dist.barrier()

    # ------------------------------------------------------------------ one update

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def update(self, batches: list[Batch]) -> torch.Tensor:
        """One optimizer step over `batches` (this rank's share of the update).

        Returns the update's record on the device, RECORD's values in order; nothing here waits
        for the device (on one GPU), so the CPU runs ahead and prepares the next update. A
        non-finite loss or gradient norm skips the step on the device too: the fused AdamW
        kernel takes a found-inf flag, as it does from the fp16 grad scaler.
        """
        t = self.cfg.train
        self.model.train()
        tokens = float(sum(b.n_tgt_tokens for b in batches))
        # Filled on the device, not copied from the host: a copy of a host scalar waits for the GPU.
        # Every tensor a collective gets is on the model's device (NCCL takes no CPU tensors).
        n_tokens = torch.full((), tokens, device=self.device)
        self.dist.all_reduce_sum(n_tokens)  # the update's tokens over all ranks
        # DDP averages gradients over ranks; scaling by world_size makes that a sum. One
        # process knows its tokens on the host and divides by a plain number.
        norm = n_tokens / self.dist.world_size if self.dist.enabled else tokens
        loss_fn = self.compiled_loss or label_smoothed_nll
        loss_total = torch.zeros((), device=self.device)
        nll_total = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            batch = batch.to(self.device, non_blocking=True)  # pinned by the prefetcher on a GPU
            sync = i == len(batches) - 1
            with self.dist.no_sync(self.model, sync), self._autocast():
                logits = self.model(batch.src, batch.tgt_in)  # (B, T, V)
                loss, nll = loss_fn(logits, batch.tgt_out, t.label_smoothing)
            self.scaler.scale(loss / norm).backward()
            loss_total += loss.detach()
            nll_total += nll.detach()
        self.scaler.unscale_(self.optimizer)
        grad_norm = optim.grad_norm(self.raw_model, t.clip_norm)
        # A signal may reach some ranks only, or reach them at different moments: the stop is
        # decided over all ranks with the update's sums, so that every rank stops after it.
        stop = torch.full((), float(self.stop_requested), device=self.device)
        stats = torch.stack([loss_total, nll_total, stop]).float()
        self.dist.all_reduce_sum(stats)
        if self.scaler.is_enabled():
            # fp16: the scaler skips a step whose gradients overflow and lowers its scale; that
            # is how it finds its scale (the first steps at 2**16 often overflow), not divergence.
            finite = torch.isfinite(stats[0])
            self.scaler.step(self.optimizer)
        else:
            finite = torch.isfinite(stats[0]) & torch.isfinite(grad_norm)
            optim.step_if(self.optimizer, finite)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        per_token, flags = stats[:2] / n_tokens, torch.stack([stats[2], finite.float()])
        return torch.cat([per_token, grad_norm.float()[None], n_tokens[None], flags])

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Validation loss, and greedy BLEU/chrF on the detokenized validation split (rank 0)."""
        metrics: dict[str, Any] = {}
        if self.dist.is_main and self.valid_split is not None:
            metrics = self.valid_metrics(self.raw_model, draw=True)
        return self.dist.broadcast(metrics)

    def valid_metrics(self, model: Transformer, draw: bool = False) -> dict[str, Any]:
        """`model`'s validation metrics (rank 0; no collective); `draw`: its attention to TensorBoard."""
        return validation.valid_metrics(model, self.cfg, self.data, self.valid_split, self.device,
                                        self._autocast, self.board if draw else None, self.state.step)

    def _is_better(self, metrics: dict[str, Any]) -> bool:
        key = validation.best_key(metrics, self.cfg.train.best_metric)
        if key not in metrics:
            return True  # no validation split: the latest is the best we know
        if validation.improves(metrics[key], self.state.best, key):
            self.state.best, self.state.best_step = metrics[key], self.state.step
            return True
        return False

    def validate_and_save(self) -> None:
        """Validate, log, save checkpoints; sets stop.early when train.patience says stop."""
        metrics = self.validate()
        self.state.last_valid_step = self.state.step
        better = self._is_better(metrics)
        self.state.bad_validations = 0 if better else self.state.bad_validations + 1
        if self.dist.is_main:
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            tqdm.write(
                f"step {self.state.step} epoch {self.state.epoch}: {shown}{' (best)' if better else ''}"
            )
            # Logged before the checkpoint: a crash in between drops the line on resume
            # (it is past the last checkpoint) instead of losing it.
            self.log.write(step=self.state.step, epoch=self.state.epoch, kind="valid", **metrics)
        self.save(metrics, best=better)
        p = self.cfg.train.patience
        self.stop.early = bool(p and self.state.bad_validations >= p)

    def _maybe_validate_and_save(self, epoch_end: bool = False, final: bool = False) -> None:
        """The one place that writes checkpoints: every train.valid_every steps, at each epoch's
        end and when the run stops, validation then checkpoints; an interrupted run saves
        where it is without validating, so that it stops at once. The updates' records are
        read first, so that what is saved counts every update before it."""
        s, every = self.state, self.cfg.train.valid_every
        if not (final or epoch_end or (every and s.step % every == 0)):
            return
        self._settle()
        with self.progress.paused():
            if final:
                if self.stop_requested:
                    self.save()
                elif s.last_valid_step != s.step:
                    self.validate_and_save()
            else:
                self.validate_and_save()

    # ------------------------------------------------------------------ the loop

    def _elapsed(self) -> float:
        """Training seconds of this run, those before a resume included."""
        return self.progress.elapsed()

    def _updates(self, epoch: int, pos: int) -> Iterator[tuple[list[np.ndarray], int, int]]:
        """From (epoch, pos), each update's batches with the (epoch, position) after them."""
        return feed.updates(self._batcher_of, epoch, pos, self.cfg.train.accum_steps)

    def _batcher_of(self, epoch: int) -> TokenBatcher:
        """The batcher of `epoch`: a resumed epoch's own weights (kept_weights), else the config's."""
        kept = self.kept_weights is not None and epoch == self.kept_weights[0]
        return self.kept_batcher if kept and self.kept_batcher is not None else self.batcher

    def _collate_update(self, item: tuple[list[np.ndarray], int, int]) -> list[Batch]:
        """An update's batches as tensors (page-locked on a GPU, for asynchronous copies); runs
        on the prefetch thread."""
        t = self.cfg.train
        batches = [_collate(self.train_split, idx, t.pad_to_multiple, t.max_tokens) for idx in item[0]]
        return [b.pin_memory() for b in batches] if self.device.type == "cuda" else batches

    def _settle(self) -> None:
        """Read the records of the updates not read yet (one wait for the device) and act on
        them in order: stop flags, non-finite checks, log lines."""
        for out, step, epoch, lr in self.progress.read():
            if out["stop"] and not self.stop_requested:
                self.stop.signal = signal.SIGTERM  # another rank's (torchrun forwards SIGTERM to all)
            self.progress.check_finite(self.state, out, step)
            self.progress.log_train(self.state, out, step, epoch, lr)

    def fit(self) -> dict[str, Any]:
        t, s = self.cfg.train, self.state
        with self.stop.handling_signals():
            self.progress.start(s.step, s.elapsed)
            # On a GPU the next updates' batches are collated (and pinned) while the device works;
            # a CPU computes on all its cores, so there they are collated in turn.
            batches = Prefetcher(
                self._updates(s.epoch, s.batch_pos), self._collate_update, threaded=self.device.type == "cuda"
            )
            try:
                while (reason := self.stop.reason(t, s, self._elapsed())) is None:
                    (_, epoch, pos), collated = next(batches)
                    lr = lr_at(s.step + 1, t, self.cfg.model.d_model)
                    set_lr(self.optimizer, lr)
                    record = self.update(collated)
                    epoch_end = epoch != s.epoch
                    s.step, s.epoch, s.batch_pos = s.step + 1, epoch, pos
                    self.progress.advance(s.step, s.epoch, lr, record)
                    # On one GPU the records are read when a log line is due (or a checkpoint: see
                    # _maybe_validate_and_save); elsewhere after each update, as reading is free on a
                    # CPU and several ranks must agree on a stop after the same update.
                    if not self.defer_reads or s.step % t.log_every == 0:
                        self._settle()
                    self._maybe_validate_and_save(epoch_end)
                self._maybe_validate_and_save(final=True)
            finally:
                batches.close()
                self.progress.close()
        s.elapsed = self._elapsed()
        if reason == "interrupted" and self.dist.is_main:
            print(
                f"mt train: interrupted at step {s.step}; checkpoint saved to {self.last_path}.\n"
                f"  resume with the same command: mt {' '.join(sys.argv[1:])}",
                file=sys.stderr,
            )
        return {
            "steps": s.step,
            "epochs": s.epoch,
            "minutes": s.elapsed / 60,
            "stopped": reason,
            "best": s.best,
            "best_step": s.best_step,
            "signal": self.stop.signal,
        }


def train(cfg: Config) -> dict[str, Any]:
    """Train the experiment `cfg`; returns a summary (steps, time, best and test scores)."""
    trainer = Trainer(cfg)
    try:
        result = trainer.fit()
        if trainer.dist.is_main and result["stopped"] != "interrupted":
            finish(cfg, trainer, result)  # averaging, checkpoint_final.pt, the test, summary.json
    finally:
        trainer.close()
        trainer.dist.close()
    return result
