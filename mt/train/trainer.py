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
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

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
    step_checkpoints,
)
from mt.config import Config, resolve_decoding, save_config, to_dict
from mt.data.dataset import Prepared, PreparedSplit, load_prepared
from mt.data.prepare import is_up_to_date, prepare, pretrained_vocab, read_meta
from mt.data.sources import inputs_reachable, source_configs
from mt.device import decode_precision, pick_device, train_autocast_dtype
from mt.errors import CheckpointError, DataError, MTError
from mt.files import DirectoryLock, remove_stale, temp_path, write_atomic
from mt.model import Transformer
from mt.train.batching import Batch, Mixture, TokenBatcher, make_batch
from mt.train.board import TensorBoard
from mt.train.distributed import Dist
from mt.train.loss import label_smoothed_nll
from mt.train.prefetch import Prefetcher
from mt.train.schedule import lr_at, set_lr
from mt.translate.alignment import cross_attention
from mt.translate.evaluate import score
from mt.translate.translator import pad_sources, translate_ids

MAX_NONFINITE_IN_ROW = 5
# What Trainer.update returns, on the device, in this order: per-token loss and nll, gradient
# norm, target tokens (all ranks), stop flag (ranks asking to stop), 1.0 if the step was taken.
RECORD = ("loss", "nll", "grad_norm", "tokens", "stop", "finite")
BOARD_SENTENCES = 3  # validation sentences whose attention TensorBoard shows
# The data settings that decide what a checkpoint's token ids mean: a run may not resume with
# others (mt.config.DataConfig documents each).
DATA_KEYS_OF_IDS = {
    f"data.{k}"
    for k in (
        "src_lang", "tgt_lang", "local_dir", "local_splits", "hub", "hub_config", "hub_revision",
        "hub_data_dir", "hub_splits", "max_train_pairs", "sources", "eval_source", "spm_type",
        "joint_vocab", "vocab_size", "character_coverage", "spm_max_sentences",
    )
} | {"train.init_from"}  # whose subword models encode the data


def flatten(sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; data.sources becomes its list of names and one
    key per source setting (data.sources.<name>.<key>), so that a changed weight is told apart
    from a changed corpus."""
    flat = {}
    for s, values in sections.items():
        for k, v in values.items():
            if (s, k) == ("data", "sources"):
                flat["data.sources"] = [src["name"] for src in v]
                flat |= {f"data.sources.{src['name']}.{sk}": sv for src in v for sk, sv in src.items()}
            else:
                flat[f"{s}.{k}"] = v
    return flat


def source_weights(config: dict[str, Any]) -> dict[str, float]:
    """{source name: weight} of a config's data.sources (as to_dict gives it); {} for one corpus."""
    return {src["name"]: float(src["weight"]) for src in config["data"].get("sources", [])}


def changes_ids(key: str) -> bool:
    """Whether a flattened setting changes what the token ids of the prepared data mean. A source's
    weight does not: it changes how often an epoch shows its pairs, like a batch size would."""
    if key.startswith("data.sources."):
        return not key.endswith(".weight")
    return key in DATA_KEYS_OF_IDS


# --------------------------------------------------------------------------- set-up


def _collate(split: PreparedSplit, idx: np.ndarray, pad_to_multiple: int = 0, max_tokens: int = 0) -> Batch:
    return make_batch(
        [split.src(i) for i in idx], [split.tgt(i) for i in idx], idx, pad_to_multiple, max_tokens
    )


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


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Set-up is a sequence of small builders, in the order their dependencies need."""

    # Set by fit(), read by the methods it calls (declared here: some of those come first).
    _pending: list[tuple[int, int, float, torch.Tensor]]
    _tokens_seen: float
    _window_start: float
    _window_paused: float
    _bar: tqdm

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
        self.last_path = self.out / "checkpoint_last.pt"
        self.best_path = self.out / "checkpoint_best.pt"

        self.lock = self._claim_out_dir()  # one run per directory, from here until close()
        try:
            last = self._read_last_checkpoint()
            if last is not None:  # before preparing: a changed vocabulary must not rebuild the cache
                self._check_resumable(last)
            else:  # before preparing: a checkpoint to fine-tune that cannot be used prepares nothing
                pretrained_vocab(cfg)
            self.data = self._build_data()
            self.train_split = self.data.split("train")
            self.valid_split = self._valid_split()
            # Seeds the RNGs: weights depend on train.seed only, or are train.init_from's.
            self.raw_model = self._build_model(fresh=last is None)
            self.optimizer = self._build_optimizer()
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
            self.state = TrainState()
            # (epoch, source weights) when a resumed epoch keeps the weights it began with.
            self.kept_weights: tuple[int, dict[str, float]] | None = None
            if last is not None:
                self._resume(last)  # weights, optimizer, scaler, counters and RNG
            del last
            self._write_config()
            self.model = self._wrap(self.raw_model)  # what the updates call: DDP and/or compiled
            self.batcher = self._build_batcher()
            # The resumed epoch's batch list is the one its position counts in: its own weights'.
            self.kept_batcher = self._build_batcher(self.kept_weights[1]) if self.kept_weights else None
            resume_step = self.state.step if self.last_path.exists() else None
            self.board = self._build_board(resume_step)
            self.log = MetricsLog(self.out / "metrics.jsonl", resume_step, self.dist.is_main, self.board)
        except BaseException:
            self.close(abandon=True)
            raise
        self.stop_signal: int | None = None  # SIGINT or SIGTERM, once received
        self.early_stop = False

    @property
    def stop_requested(self) -> bool:
        return self.stop_signal is not None

    def close(self, abandon: bool = False) -> None:
        """Let another run have the directory (the lock also dies with the process). A run whose
        set-up failed (`abandon`) removes the directory when it made it: a new run that never
        started leaves nothing behind."""
        if (board := getattr(self, "board", None)) is not None:
            board.close()
        if abandon and getattr(self, "made_out_dir", False):
            shutil.rmtree(self.out, ignore_errors=True)
        if (lock := getattr(self, "lock", None)) is not None:
            lock.release()

    def _claim_out_dir(self) -> DirectoryLock | None:
        """Rank 0 locks the run directory and checks that it can write there; temporary files
        of runs killed mid-save (never checkpoints) are cleared away."""
        lock = None
        if self.dist.is_main:
            self.made_out_dir = not self.out.exists()
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise MTError(f"train.out_dir: cannot write to {self.out}: {e.strerror or e}") from None
            lock = DirectoryLock(self.out, "train.out_dir")
            lock.acquire()
            try:
                remove_stale(self.out, "*.pt.tmp-*")
                probe = self.out / f".write-test-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                lock.release()
                raise MTError(f"train.out_dir: cannot write to {self.out}: {e.strerror or e}") from None
        self.dist.barrier()
        return lock

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

    def _check_resumable(self, ck: Checkpoint) -> None:
        """A resumed run keeps what gives the checkpoint's weights and token ids their meaning:
        the model, the languages, the corpus and the subword settings. Other changes (budgets,
        validation, batch size, learning rate, ...) are allowed and named in the log."""
        then, now = flatten(ck.config), flatten(to_dict(self.cfg))
        changed = {k: (then[k], v) for k, v in now.items() if k in then and then[k] != v}
        model = {k: c for k, c in changed.items() if k.startswith("model.")}
        data = {k: c for k, c in changed.items() if changes_ids(k)}
        for fixed, what in ((model, "a different model config"), (data, "other data")):
            if fixed:
                shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in fixed.items())
                raise CheckpointError(
                    f"{self.last_path} was trained with {what} ({shown}, checkpoint -> now), which "
                    f"changes what its weights or token ids mean; resume with the checkpoint's values, "
                    f"or use another train.out_dir (or delete the directory) to start over"
                )
        assert ck.training is not None  # _read_last_checkpoint refuses a checkpoint without
        if (world_size := ck.training.world_size) != self.dist.world_size:
            raise CheckpointError(
                f"{self.last_path} was written by a run on {world_size} processes; resume with the "
                f"same number (now {self.dist.world_size}) to continue exactly"
            )
        if changed and self.dist.is_main:
            shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            print(f"mt train: resuming with changed settings: {shown}")

    def _build_data(self) -> Prepared:
        """The prepared cache; rank 0 prepares it first when it is missing or out of date.

        A cache whose corpus is out of reach (copied to a machine without the raw files, the
        hub offline) is used as it is: it cannot be checked, nor prepared again.
        """
        cfg, directory = self.cfg, self.cfg.prepared_dir
        if self.dist.is_main:
            if read_meta(directory) is not None and not inputs_reachable(cfg.data):
                print(
                    f"mt train: the corpus of '{cfg.name}' is out of reach (data.local_dir not found, "
                    f"hub offline); training on the prepared cache {directory} as it is"
                )
            elif not is_up_to_date(cfg):
                print(f"mt train: data for '{cfg.name}' is not prepared (or out of date); preparing it first")
                prepare(cfg)
        self.dist.barrier()
        return load_prepared(directory)

    def _valid_split(self) -> PreparedSplit:
        """The validation split, which a cache used as it is (its corpus out of reach) may lack:
        `mt prepare` refuses a corpus without one (mt.data.sources.no_valid_split says why)."""
        if "valid" not in self.data.meta["splits"]:
            raise DataError(
                f"data: the prepared data in {self.cfg.prepared_dir} has no 'valid' split; training needs "
                f"one to validate, keep the best checkpoint and stop early: add it and prepare again"
            )
        return self.data.split("valid")

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

    def _build_optimizer(self) -> torch.optim.Optimizer:
        # No weight decay on biases, norms and embeddings' padding-free 1-D parameters.
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        t = self.cfg.train
        return torch.optim.AdamW(
            [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=t.lr,
            betas=(t.betas[0], t.betas[1]),
            eps=t.eps,
            # The fused kernel is about twice as fast as the per-tensor loop, on CPU too.
            fused=self.device.type in ("cuda", "cpu"),
        )

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
        """New source weights take effect at the next epoch: the epoch being resumed keeps the
        batch list it began with (its weights are in the checkpoint), so that the position in it
        still means the batches not yet seen, none skipped and none repeated."""
        assert ck.training is not None
        then = ck.training.epoch_weights
        if then is None:  # older checkpoints: their config's
            then = source_weights(ck.config)
        now = source_weights(to_dict(self.cfg))
        if then == now:
            return
        e = self.state.epoch
        if self.state.batch_pos:
            self.kept_weights = (e, then)
            when = (f"epoch {e} goes on with the weights it began with; the new ones take effect at "
                    f"epoch {e + 1}")
        else:
            when = f"the new ones take effect now, at the start of epoch {e}"
        if self.dist.is_main:
            print(f"mt train: source weights changed ({then} -> {now}): {when}")

    def _write_config(self) -> None:
        """The resolved config, next to what it produced."""
        if self.dist.is_main:
            save_config(self.cfg, self.out / "config.yaml")
        self.dist.barrier()

    def _build_board(self, resume_step: int | None) -> TensorBoard | None:
        if not (self.cfg.train.tensorboard and self.dist.is_main):
            return None
        return TensorBoard(self.out / "tensorboard", resume_step)

    def _wrap(self, model: Transformer) -> torch.nn.Module:
        """What the updates call: DDP and/or compiled; the loss is compiled alongside (it fuses
        log-softmax, gather and sums, which would otherwise write (tokens, V) floats)."""
        wrapped = self.dist.wrap(model)
        self.compiled_loss = None
        t = self.cfg.train
        if t.compile:
            # With pad_to_multiple every batch has one of a few shapes: each is compiled once,
            # statically. Without, shapes vary from batch to batch: dynamic shapes.
            dynamic = not t.pad_to_multiple
            if dynamic and self.dist.is_main:
                print("mt train: train.compile without train.pad_to_multiple compiles for dynamic shapes, "
                      "slowly; train.pad_to_multiple=16 (or 32) gives a few static ones")
            if t.pad_to_multiple:
                shapes = -(-(self.cfg.data.max_len + 1) // t.pad_to_multiple)
                # Dynamo gives up compiling a function after recompile_limit shapes (8).
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, shapes + 1)
            # An OptimizedModule, a Module: torch annotates compile() as returning a plain callable.
            wrapped = cast(torch.nn.Module, torch.compile(wrapped, dynamic=dynamic))
            self.compiled_loss = torch.compile(label_smoothed_nll, dynamic=dynamic)
        return wrapped

    def _build_batcher(self, weights: dict[str, float] | None = None) -> TokenBatcher:
        t = self.cfg.train
        try:
            return TokenBatcher(
                self.train_split.src_lens,
                self.train_split.tgt_lens,
                t.max_tokens,
                t.seed,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                mixture=self._mixture(weights),
                pad_to_multiple=t.pad_to_multiple,
            )
        except ValueError as e:
            raise MTError(f"train.max_tokens: {e}") from None

    def _mixture(self, weights: dict[str, float] | None = None) -> Mixture | None:
        """The training split's sources (from the cache) with their weights (from the config,
        unless given)."""
        parts = self.data.train_sources()
        weights = weights or {s.name: s.weight for s in source_configs(self.cfg.data)}
        unknown = [name for name, _ in parts if name not in weights]
        if unknown:  # a cache used as it is, its corpus out of reach, prepared from other sources
            raise MTError(
                f"data.sources: the prepared data in {self.cfg.prepared_dir} holds source(s) "
                f"{', '.join(unknown)}, which the config does not name"
            )
        if not parts:  # a cache written before sources were recorded: every pair once
            return None
        return Mixture(tuple(n for _, n in parts), tuple(weights[name] for name, _ in parts))

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
        grad_norm = self._grad_norm()
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
            self._step_if(finite)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        per_token, flags = stats[:2] / n_tokens, torch.stack([stats[2], finite.float()])
        return torch.cat([per_token, grad_norm.float()[None], n_tokens[None], flags])

    def _grad_norm(self) -> torch.Tensor:
        """The gradients' total norm, clipped to train.clip_norm when that is set; without it the
        gradients are left alone (clip_grad_norm_ with an infinite bound multiplies every one by 1)."""
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if self.cfg.train.clip_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.train.clip_norm, norm)
        return norm

    def _step_if(self, finite: torch.Tensor) -> None:
        """optimizer.step() when `finite` holds. The fused kernel skips on the device (and
        leaves its step count alone); any other optimizer needs the flag on the host."""
        if self.optimizer.defaults.get("fused"):
            # read by torch.optim.AdamW.step, an attribute torch's annotations do not declare
            self.optimizer.found_inf = (~finite).float()  # type: ignore[attr-defined]
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf  # type: ignore[attr-defined]
        elif bool(finite):
            self.optimizer.step()

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Validation loss, and greedy BLEU/chrF on the detokenized validation split (rank 0)."""
        metrics: dict[str, Any] = {}
        if self.dist.is_main and self.valid_split is not None:
            metrics = self.valid_metrics(self.raw_model, draw=True)
        return self.dist.broadcast(metrics)

    @torch.no_grad()
    def valid_metrics(self, model: Transformer, draw: bool = False) -> dict[str, Any]:
        """The validation metrics of `model`, computed here (rank 0; no collective); `draw` adds the
        attention images to TensorBoard."""
        model.eval()  # the next update() puts the training model back in training mode
        split = self.valid_split
        # Validation keeps every line; one longer than the model's positions is cut to fit.
        n = self.cfg.model.max_positions - 1
        src_lens, tgt_lens = np.minimum(split.src_lens, n), np.minimum(split.tgt_lens, n)
        batcher = TokenBatcher(
            src_lens,
            tgt_lens,
            max(self.cfg.train.max_tokens, int(max(src_lens.max(), tgt_lens.max())) + 1),
            0,
            shuffle=False,
        )
        loss_sum = nll_sum = n_tok = 0.0
        for idx in batcher.epoch_batches(0):
            batch = make_batch([split.src(i)[:n] for i in idx], [split.tgt(i)[:n] for i in idx], idx)
            batch = batch.to(self.device)
            with self._autocast():
                logits = model(batch.src, batch.tgt_in)
            loss, nll = label_smoothed_nll(logits, batch.tgt_out, self.cfg.train.label_smoothing)
            loss_sum += float(loss)
            nll_sum += float(nll)
            n_tok += batch.n_tgt_tokens
        metrics = {
            "valid_loss": loss_sum / n_tok,
            "valid_nll": nll_sum / n_tok,
            "valid_ppl": math.exp(min(nll_sum / n_tok, 50.0)),
        }
        if self.cfg.train.valid_bleu:
            seqs = [split.src(i)[:n] for i in range(len(split))]
            hyps = translate_ids(model, seqs, resolve_decoding(self.cfg.decode, beam=1), self.device)
            texts = self.data.tokenizer.decode_tgt([h[0].tokens for h in hyps])
            s = score(texts, self.data.text("valid", "tgt"))
            metrics.update(valid_bleu=s["bleu"], valid_chrf=s["chrf"])
            if draw and self.board is not None:
                self._draw_attention(model, seqs[:BOARD_SENTENCES], [h[0].tokens for h in hyps])
        return metrics

    def _draw_attention(self, model: Transformer, seqs: list[np.ndarray], hyps: list[list[int]]) -> None:
        """The last decoder layer's cross-attention (heads averaged) of the first validation
        sentences' greedy translations, as TensorBoard images."""
        assert self.board is not None, "drawn only for train.tensorboard"
        src = pad_sources(seqs, self.device)
        for i, weights in enumerate(cross_attention(model, src, hyps[: len(seqs)])):
            self.board.attention(self.state.step, i, weights[-1].mean(0))

    def best_key(self, metrics: dict[str, Any]) -> str:
        """The metric that ranks checkpoints: train.best_metric's, or the loss without BLEU/chrF."""
        key = {"bleu": "valid_bleu", "chrf": "valid_chrf", "loss": "valid_loss"}[self.cfg.train.best_metric]
        return key if key in metrics else "valid_loss"

    def _is_better(self, metrics: dict[str, Any]) -> bool:
        key = self.best_key(metrics)
        if key not in metrics:
            return True  # no validation split: the latest is the best we know
        value = metrics[key]
        higher = key != "valid_loss"
        if self.state.best is None or (value > self.state.best if higher else value < self.state.best):
            self.state.best, self.state.best_step = value, self.state.step
            return True
        return False

    def validate_and_save(self) -> None:
        """Validate, log, save checkpoints; sets early_stop when train.patience says stop."""
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
        self.early_stop = bool(p and self.state.bad_validations >= p)

    def _maybe_validate_and_save(self, epoch_end: bool = False, final: bool = False) -> None:
        """The one place that writes checkpoints: every train.valid_every steps, at each epoch's
        end and when the run stops, validation then checkpoints; an interrupted run saves
        where it is without validating, so that it stops at once. The updates' records are
        read first, so that what is saved counts every update before it."""
        s, every = self.state, self.cfg.train.valid_every
        if not (final or epoch_end or (every and s.step % every == 0)):
            return
        self._settle()
        with self._paused():
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
        return self._elapsed_before + (time.time() - self._t0)

    def _stop_reason(self) -> str | None:
        """The one place that decides to stop; None while the run goes on."""
        t, s = self.cfg.train, self.state
        if self.stop_requested:
            return "interrupted"
        if self.early_stop:
            return "early stopping"
        if (
            (t.max_steps and s.step >= t.max_steps)
            or (t.max_epochs and s.epoch >= t.max_epochs)
            or (t.max_minutes and self._elapsed() >= t.max_minutes * 60)
        ):
            return "budget reached"
        return None

    def _updates(self, epoch: int, pos: int) -> Iterator[tuple[list[np.ndarray], int, int]]:
        """From (epoch, pos), each update's batches (train.accum_steps of them) with the
        (epoch, position) the run is at after them: an epoch's last update moves on to
        position 0 of the next epoch. The batch lists are pure functions of seed and epoch."""
        accum = self.cfg.train.accum_steps
        while True:
            batches = self._batcher_of(epoch).epoch_batches(epoch)
            while pos < len(batches):
                chunk = batches[pos : pos + accum]
                pos += len(chunk)
                yield chunk, *((epoch + 1, 0) if pos >= len(batches) else (epoch, pos))
            epoch, pos = epoch + 1, 0

    def _batcher_of(self, epoch: int) -> TokenBatcher:
        """The batcher of `epoch`: a resumed epoch's own weights (kept_weights), else the config's."""
        if self.kept_weights and self.kept_batcher is not None and epoch == self.kept_weights[0]:
            return self.kept_batcher
        return self.batcher

    def _on_signal(self, signum: int, frame: Any) -> None:
        """SIGINT (Ctrl-C) or SIGTERM (a scheduler, `docker stop`, `kill`): finish the update,
        save, say how to resume, exit. A second signal stops at once."""
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_signal = signum
        if self.dist.is_main:
            print(
                f"\nmt train: {signal.Signals(signum).name}: stopping after this update and saving a "
                f"checkpoint (send it again to abort)",
                file=sys.stderr,
            )

    def _collate_update(self, item: tuple[list[np.ndarray], int, int]) -> list[Batch]:
        """An update's batches as tensors (page-locked on a GPU, for asynchronous copies); runs
        on the prefetch thread."""
        t = self.cfg.train
        batches = [_collate(self.train_split, idx, t.pad_to_multiple, t.max_tokens) for idx in item[0]]
        return [b.pin_memory() for b in batches] if self.device.type == "cuda" else batches

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def _paused(self) -> Iterator[None]:
        """Time that is not training (validation, checkpoints): left out of the logged tok_s. The
        device first finishes the updates queued before, so that their time stays counted."""
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._window_paused += time.perf_counter() - t0

    def _settle(self) -> None:
        """Read the records of the updates not read yet (one wait for the device) and act on
        them in order: stop flags, non-finite checks, log lines."""
        if not self._pending:
            return
        values = torch.stack([record for *_, record in self._pending]).tolist()
        pending, self._pending = self._pending, []
        for (step, epoch, lr, _), row in zip(pending, values, strict=True):
            out = dict(zip(RECORD, row, strict=True))
            if out["stop"] and not self.stop_requested:
                self.stop_signal = signal.SIGTERM  # another rank's (torchrun forwards SIGTERM to all)
            self._check_finite(out, step)
            self._log_train(out, step, epoch, lr)

    def _log_train(self, out: dict[str, float], step: int, epoch: int, lr: float) -> None:
        """Every train.log_every steps: the losses averaged over the updates since the last line,
        weighted by tokens (the window's sums are checkpointed, so a resumed run logs alike), and
        tokens per second of training alone: validation and checkpoints are left out."""
        s = self.state
        if out["finite"]:
            s.win_loss += out["loss"] * out["tokens"]
            s.win_nll += out["nll"] * out["tokens"]
            s.win_tokens += out["tokens"]
        self._tokens_seen += out["tokens"]
        if step % self.cfg.train.log_every:
            return
        seconds = time.perf_counter() - self._window_start - self._window_paused
        tok_s = self._tokens_seen / max(seconds, 1e-9)
        n = max(s.win_tokens, 1.0)
        loss, nll = s.win_loss / n, s.win_nll / n
        self._bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
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
        self._tokens_seen, self._window_start, self._window_paused = 0.0, time.perf_counter(), 0.0
        s.win_loss = s.win_nll = s.win_tokens = 0.0

    def fit(self) -> dict[str, Any]:
        t, s = self.cfg.train, self.state
        self._t0, self._elapsed_before = time.time(), s.elapsed
        self._tokens_seen, self._window_start, self._window_paused = 0.0, time.perf_counter(), 0.0
        self._pending = []
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {signum: signal.signal(signum, self._on_signal) for signum in handled}
        self._bar = tqdm(
            total=t.max_steps or None,
            initial=s.step,
            desc="train",
            unit="step",
            disable=not self.dist.is_main,
            dynamic_ncols=True,
        )
        # On a GPU the next updates' batches are collated (and pinned) while the device works;
        # a CPU computes on all its cores, so there they are collated in turn.
        batches = Prefetcher(
            self._updates(s.epoch, s.batch_pos), self._collate_update, threaded=self.device.type == "cuda"
        )
        try:
            while (reason := self._stop_reason()) is None:
                (_, epoch, pos), collated = next(batches)
                lr = lr_at(s.step + 1, t, self.cfg.model.d_model)
                set_lr(self.optimizer, lr)
                record = self.update(collated)
                epoch_end = epoch != s.epoch
                s.step, s.epoch, s.batch_pos = s.step + 1, epoch, pos
                self._bar.update(1)
                self._pending.append((s.step, s.epoch, lr, record))
                # On one GPU the records are read when a log line is due (or a checkpoint: see
                # _maybe_validate_and_save); elsewhere after each update, as reading is free on a
                # CPU and several ranks must agree on a stop after the same update.
                if not self.defer_reads or s.step % t.log_every == 0:
                    self._settle()
                self._maybe_validate_and_save(epoch_end)
            self._maybe_validate_and_save(final=True)
        finally:
            batches.close()
            self._bar.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
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
            "signal": self.stop_signal,
        }

    def _check_finite(self, out: dict[str, float], step: int) -> None:
        s = self.state
        if out["finite"]:
            s.nonfinite_in_row = 0
            return
        s.nonfinite_in_row += 1
        if self.dist.is_main:
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


def train(cfg: Config) -> dict[str, Any]:
    """Train the experiment `cfg`; returns a summary (steps, time, best and test scores)."""
    trainer = Trainer(cfg)
    try:
        result = trainer.fit()
        if trainer.dist.is_main and result["stopped"] != "interrupted":
            from mt.train.plot import plot_metrics

            plot_metrics(trainer.out / "metrics.jsonl", trainer.out / "curves.png")
            average = average_last(trainer)
            if average is not None:
                result["average"] = average
            result["final_checkpoint"] = choose_final(trainer, average)
            result["test"] = final_test(cfg, trainer, trainer.out / AVERAGED if average else None)
            write_atomic(trainer.out / "summary.json", json.dumps(result, indent=2) + "\n")
    finally:
        trainer.close()
        trainer.dist.close()
    return result


AVERAGED = "checkpoint_avg.pt"
FINAL = "checkpoint_final.pt"  # a link to the better of checkpoint_best.pt and checkpoint_avg.pt


def end_checkpoints(trainer: Trainer) -> list[Path]:
    """The step checkpoints averaged at the end: the last train.keep_last of those from the last
    quarter of the run's steps. Older ones (a run that a time limit stopped early keeps step
    checkpoints from long before its end) would pull the average back towards a weaker model."""
    steps = trainer.state.step
    late = [p for step, p in step_checkpoints(trainer.out) if 4 * step >= 3 * steps and step <= steps]
    return late[-trainer.cfg.train.keep_last :] if trainer.cfg.train.keep_last else []


def average_last(trainer: Trainer) -> dict[str, Any] | None:
    """Average the end checkpoints (end_checkpoints) into checkpoint_avg.pt and validate it as
    the run validates its checkpoints; None when there are fewer than two to average."""
    from mt.train.average import average_checkpoints

    paths = end_checkpoints(trainer)
    if len(paths) < 2:
        return None
    out = trainer.out / AVERAGED
    average_checkpoints([str(p) for p in paths], str(out), quiet=True)
    tok = trainer.data.tokenizer
    model = Transformer(trainer.cfg.model, tok.src_vocab_size, tok.tgt_vocab_size).to(trainer.device)
    model.load_state_dict(Checkpoint.read(out, map_location=trainer.device).model)
    valid = trainer.valid_metrics(model)
    key = trainer.best_key(valid)
    best = trainer.state.best
    worse = best is not None and (valid[key] > best if key == "valid_loss" else valid[key] < best)
    names = ", ".join(p.name for p in paths)
    step = trainer.state.best_step
    against = "" if best is None else f" against {best:.4g} for the best checkpoint (step {step})"
    print(
        f"averaged {len(paths)} checkpoints ({names}) into {out}: {key} {valid[key]:.4g}{against}"
        + ("; the average is worse than the best on the validation set" if worse else "")
    )
    return {
        "checkpoints": [p.name for p in paths],
        "valid": valid,
        "metric": key,
        "best": best,
        "best_step": trainer.state.best_step,
        "worse_than_best": worse,
    }


def choose_final(trainer: Trainer, average: dict[str, Any] | None) -> str | None:
    """Point checkpoint_final.pt (a symbolic link, made atomically) at the averaged checkpoint,
    unless it is worse than the best on the validation set; `make translate` and `make evaluate`
    use it. Returns the name it points at."""
    name = AVERAGED if average is not None and not average["worse_than_best"] else trainer.best_path.name
    if not (trainer.out / name).exists():
        return None
    link = trainer.out / FINAL
    tmp = temp_path(link)
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(name, tmp)
        os.replace(tmp, link)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MTError(f"cannot write {link}: {e.strerror or e}") from None
    print(f"{link} -> {name} (what `make translate` and `make evaluate` use)")
    return name


def final_test(cfg: Config, trainer: Trainer, averaged: Path | None) -> dict[str, Any]:
    """Score the best (and averaged) checkpoint on the test split, beam and greedy; print all."""
    from mt.translate.evaluate import evaluate_checkpoint

    if "test" not in trainer.data.meta["splits"] or not trainer.best_path.exists():
        return {}
    src, ref = trainer.data.text("test", "src"), trainer.data.text("test", "tgt")
    candidates = {"best": trainer.best_path}
    if averaged is not None:
        candidates["averaged"] = averaged
    results = {}
    for label, path in candidates.items():
        for beam in sorted({cfg.decode.beam, 1}, reverse=True):
            r = evaluate_checkpoint(path, src, ref, beam=beam, device=str(trainer.device), name="test")
            results[f"{label}_beam{beam}"] = r
            print(
                f"test BLEU {r['bleu']:.2f} chrF {r['chrf']:.2f} ({label} checkpoint {path.name}, "
                f"{'greedy' if beam == 1 else f'beam {beam}'}, {r['precision']}, {r['seconds']:.1f}s; "
                f"{r['bleu_signature']})"
            )
    return results
