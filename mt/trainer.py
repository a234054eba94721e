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
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mt.batching import Batch, TokenBatcher, make_batch
from mt.checkpoint import (
    keep_last,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_checkpoint_path,
)
from mt.config import Config, save_config, to_dict
from mt.dataset import Prepared, PreparedSplit, load_prepared
from mt.device import decode_precision, pick_device, train_autocast_dtype
from mt.distributed import Dist
from mt.errors import CheckpointError, MTError
from mt.evaluate import score
from mt.loss import label_smoothed_nll
from mt.model import Transformer
from mt.prepare import is_up_to_date, prepare, process_alive
from mt.schedule import lr_at, set_lr
from mt.translator import translate_ids

MAX_NONFINITE_IN_ROW = 5


@dataclass
class TrainState:
    """Counters that, with the weights, optimizer and RNG, pin down where a run is."""

    step: int = 0  # updates done
    epoch: int = 0
    batch_pos: int = 0  # batches of this epoch already consumed (on this rank)
    best: float | None = None  # best validation value of train.best_metric
    best_step: int = 0
    bad_validations: int = 0  # validations in a row without improvement
    elapsed: float = 0.0  # training seconds before this process started
    nonfinite_in_row: int = 0
    last_valid_step: int = -1
    # Token-weighted sums since the last log line (checkpointed, so a resumed run logs alike).
    win_loss: float = 0.0
    win_nll: float = 0.0
    win_tokens: float = 0.0


# --------------------------------------------------------------------------- set-up


def _optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    # No weight decay on biases, norms and embeddings' padding-free 1-D parameters.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    t = cfg.train
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(t.betas[0], t.betas[1]),
        eps=t.eps,
        # The fused kernel is about twice as fast as the per-tensor loop, on CPU too.
        fused=device.type in ("cuda", "cpu"),
    )


def _load_data(cfg: Config, dist: Dist) -> Prepared:
    if dist.is_main and not is_up_to_date(cfg):
        print(f"mt train: data for '{cfg.name}' is not prepared (or out of date); preparing it first")
        prepare(cfg)
    dist.barrier()
    return load_prepared(cfg.prepared_dir)


def _collate(split: PreparedSplit, idx: np.ndarray) -> Batch:
    return make_batch([split.src(i) for i in idx], [split.tgt(i) for i in idx], idx)


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line torn by a crash mid-write."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class MetricsLog:
    """metrics.jsonl in the run directory; on resume, lines past the checkpoint (and lines
    torn by a crash) are dropped."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if resume_step is None:
            path.write_text("", encoding="utf-8")
        elif path.exists():
            kept = [
                line
                for line in path.read_text(encoding="utf-8").splitlines()
                if (step := _step_of(line)) is not None and step <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, **record: Any) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------- the trainer


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.dist = Dist.from_env()
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.device = self.dist.device(pick_device(t.device, "train.device"))
        decode_precision(cfg.decode.precision, self.device)  # errors now, not at the final test
        self.amp_dtype = train_autocast_dtype(t.precision, self.device)
        self.data = _load_data(cfg, self.dist)
        self.train_split = self.data.split("train")
        self.valid_split = self.data.split("valid") if "valid" in self.data.meta["splits"] else None
        tok = self.data.tokenizer

        # Seed everything before the model exists, so initial weights depend on the seed only.
        random.seed(t.seed)
        np.random.seed(t.seed)
        torch.manual_seed(t.seed)
        self.model = Transformer(cfg.model, tok.src_vocab_size, tok.tgt_vocab_size).to(self.device)
        # Every rank starts from the same weights, but each draws its own dropout masks.
        torch.manual_seed(t.seed + 1000 * self.dist.rank)
        self.optimizer = _optimizer(self.model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.state = TrainState()
        self.out = cfg.out_dir
        self.last_path = self.out / "checkpoint_last.pt"
        self.best_path = self.out / "checkpoint_best.pt"

        resumed = self.last_path.exists()
        if resumed:
            self._resume()
        if self.dist.is_main:
            self._make_out_dir()
            save_config(cfg, self.out / "config.yaml")
        self.dist.barrier()

        self.ddp = self.dist.wrap(self.model)
        if t.compile:
            # Batch shapes vary from step to step; dynamic shapes avoid a recompile for each.
            self.ddp = torch.compile(self.ddp, dynamic=True)
        try:
            self.batcher = TokenBatcher(
                self.train_split.src_lens,
                self.train_split.tgt_lens,
                t.max_tokens,
                t.seed,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
            )
        except ValueError as e:
            raise MTError(f"train.max_tokens: {e}") from None
        self.log = MetricsLog(
            self.out / "metrics.jsonl", self.state.step if resumed else None, self.dist.is_main
        )
        self.stop_requested = False

    def _make_out_dir(self) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            # Temporary files of runs killed mid-save are never checkpoints; clear them away.
            for tmp in self.out.glob("*.pt.tmp-*"):
                pid = tmp.name.rsplit("-", 1)[-1]
                if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
                    tmp.unlink(missing_ok=True)
            probe = self.out / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise MTError(f"train.out_dir: cannot write to {self.out}: {e.strerror or e}") from None

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_state(self, metrics: dict[str, Any] | None, rngs: list[Any]) -> dict[str, Any]:
        tok = self.data.tokenizer
        return {
            "name": self.cfg.name,
            "config": to_dict(self.cfg),
            "spm_src": tok.src_proto,
            "spm_tgt": tok.tgt_proto,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": asdict(self.state),
            "rng": rngs[0],
            "rng_ranks": rngs,  # each rank's own dropout stream, for exact multi-process resume
            "metrics": metrics or {},
            "world_size": self.dist.world_size,
        }

    def save(self, metrics: dict[str, Any] | None = None, best: bool = False) -> None:
        """Write checkpoint_last (and best / step copies) atomically; rank 0 writes.

        checkpoint_last is written last: a crash before it is complete resumes from the
        previous one and redoes this save, so no best or step checkpoint is ever lost.
        """
        rngs = self.dist.gather(rng_state())
        if self.dist.is_main:
            state = self._checkpoint_state(metrics, rngs)
            if best:
                save_checkpoint(self.best_path, state)
            if self.cfg.train.keep_last:
                save_checkpoint(step_checkpoint_path(self.out, self.state.step), state)
            save_checkpoint(self.last_path, state)
            if self.cfg.train.keep_last:
                keep_last(self.out, self.cfg.train.keep_last)
        self.dist.barrier()

    def _resume(self) -> None:
        ck = load_checkpoint(self.last_path, map_location="cpu")
        if ck["config"]["model"] != to_dict(self.cfg)["model"]:
            raise CheckpointError(
                f"{self.last_path} was trained with a different model config; use another "
                f"train.out_dir or delete the directory to start over"
            )
        if ck.get("world_size", 1) != self.dist.world_size:
            raise CheckpointError(
                f"{self.last_path} was written by a run on {ck['world_size']} processes; resume with the "
                f"same number (now {self.dist.world_size}) to continue exactly"
            )
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        self.state = TrainState(**ck["state"])
        set_rng_state(ck["rng_ranks"][self.dist.rank])
        if self.dist.is_main:
            s = self.state
            print(f"mt train: resuming from {self.last_path} at step {s.step}, epoch {s.epoch}")

    # ------------------------------------------------------------------ one update

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def update(self, batches: list[Batch]) -> dict[str, float]:
        """One optimizer step over `batches` (this rank's share of the update)."""
        t = self.cfg.train
        self.model.train()
        n_tokens = torch.tensor(float(sum(b.n_tgt_tokens for b in batches)))
        self.dist.all_reduce_sum(n_tokens)  # the update's tokens over all ranks
        # DDP averages gradients over ranks; scaling by world_size makes that a sum.
        norm = float(n_tokens) / self.dist.world_size
        loss_total = torch.zeros((), device=self.device)
        nll_total = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            if self.device.type == "cuda":  # pinned memory lets the copy overlap with compute
                batch = batch.pin_memory()
            batch = batch.to(self.device, non_blocking=True)
            sync = i == len(batches) - 1
            with self.dist.no_sync(self.ddp, sync), self._autocast():
                logits = self.ddp(batch.src, batch.tgt_in)  # (B, T, V)
                loss, nll = label_smoothed_nll(logits, batch.tgt_out, t.label_smoothing)
            self.scaler.scale(loss / norm).backward()
            loss_total += loss.detach()
            nll_total += nll.detach()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), t.clip_norm if t.clip_norm > 0 else float("inf")
        )
        stats = torch.stack([loss_total, nll_total]).float()
        self.dist.all_reduce_sum(stats)
        loss_tok, nll_tok = (stats / n_tokens.to(stats.device)).tolist()
        finite = math.isfinite(loss_tok) and bool(torch.isfinite(grad_norm))
        if finite or self.scaler.is_enabled():
            # With fp16 the scaler itself skips steps with overflowing gradients.
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss": loss_tok,
            "nll": nll_tok,
            "grad_norm": float(grad_norm),
            "finite": finite,
            "tokens": float(n_tokens),
        }

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Validation loss, and greedy BLEU/chrF on the detokenized validation split (rank 0)."""
        metrics: dict[str, Any] = {}
        if self.dist.is_main and self.valid_split is not None:
            self.model.eval()
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
                    logits = self.model(batch.src, batch.tgt_in)
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
                hyps = translate_ids(self.model, seqs, self.cfg.decode, beam=1, device=self.device)
                texts = self.data.tokenizer.decode_tgt([h[0].tokens for h in hyps])
                s = score(texts, self.data.text("valid", "tgt"))
                metrics.update(valid_bleu=s["bleu"], valid_chrf=s["chrf"])
        return self.dist.broadcast(metrics)

    def _is_better(self, metrics: dict[str, Any]) -> bool:
        key = {"bleu": "valid_bleu", "chrf": "valid_chrf", "loss": "valid_loss"}[self.cfg.train.best_metric]
        if key not in metrics:
            key = "valid_loss"
        if key not in metrics:
            return True  # no validation split: the latest is the best we know
        value = metrics[key]
        higher = key != "valid_loss"
        if self.state.best is None or (value > self.state.best if higher else value < self.state.best):
            self.state.best, self.state.best_step = value, self.state.step
            return True
        return False

    def validate_and_save(self) -> bool:
        """Validate, save checkpoints; returns True when early stopping says stop."""
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
        return bool(p and self.state.bad_validations >= p)

    # ------------------------------------------------------------------ the loop

    def _budget_left(self, t0: float) -> bool:
        t, s = self.cfg.train, self.state
        if t.max_steps and s.step >= t.max_steps:
            return False
        if t.max_epochs and s.epoch >= t.max_epochs:
            return False
        if t.max_minutes and s.elapsed + (time.time() - t0) >= t.max_minutes * 60:
            return False
        return True

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.stop_requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_requested = True
        if self.dist.is_main:
            print(
                "\nmt train: stopping after this update and saving a checkpoint (Ctrl-C again to abort)",
                file=sys.stderr,
            )

    def fit(self) -> dict[str, Any]:
        t, s = self.cfg.train, self.state
        t0 = time.time()
        previous = signal.signal(signal.SIGINT, self._on_sigint) if self.dist.is_main else None
        bar = tqdm(
            total=t.max_steps or None,
            initial=s.step,
            desc="train",
            unit="step",
            disable=not self.dist.is_main,
            dynamic_ncols=True,
        )
        tok_count, tok_t0, stop_early = 0.0, time.time(), False
        set_lr(self.optimizer, lr_at(s.step + 1, t, self.cfg.model.d_model))
        try:
            while self._budget_left(t0) and not stop_early and not self.stop_requested:
                batches = self.batcher.epoch_batches(s.epoch)
                while s.batch_pos < len(batches) and self._budget_left(t0) and not self.stop_requested:
                    chunk = batches[s.batch_pos : s.batch_pos + t.accum_steps]
                    lr = self.optimizer.param_groups[0]["lr"]
                    out = self.update([_collate(self.train_split, idx) for idx in chunk])
                    s.batch_pos += len(chunk)
                    s.step += 1
                    set_lr(self.optimizer, lr_at(s.step + 1, t, self.cfg.model.d_model))
                    self._check_finite(out)
                    tok_count += out["tokens"]
                    if out["finite"]:
                        s.win_loss += out["loss"] * out["tokens"]
                        s.win_nll += out["nll"] * out["tokens"]
                        s.win_tokens += out["tokens"]
                    bar.update(1)
                    if s.step % t.log_every == 0:
                        # Averages over the updates since the last line, weighted by tokens.
                        tok_s = tok_count / max(time.time() - tok_t0, 1e-9)
                        n = max(s.win_tokens, 1.0)
                        loss, nll = s.win_loss / n, s.win_nll / n
                        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
                        self.log.write(
                            step=s.step,
                            epoch=s.epoch,
                            kind="train",
                            loss=loss,
                            nll=nll,
                            ppl=math.exp(min(nll, 50.0)),
                            lr=lr,
                            grad_norm=out["grad_norm"],
                            tok_s=tok_s,
                        )
                        tok_count, tok_t0 = 0.0, time.time()
                        s.win_loss = s.win_nll = s.win_tokens = 0.0
                    if t.valid_every and s.step % t.valid_every == 0:
                        s.elapsed += time.time() - t0
                        t0 = time.time()
                        if stop_early := self.validate_and_save():
                            break
                if s.batch_pos >= len(batches):  # epoch end
                    s.epoch += 1
                    s.batch_pos = 0
                    s.elapsed += time.time() - t0
                    t0 = time.time()
                    if s.last_valid_step != s.step:
                        stop_early = self.validate_and_save()
                    else:
                        self.save()  # the epoch and position changed since the last save
            s.elapsed += time.time() - t0
            t0 = time.time()
            if self.stop_requested:
                self.save()
            elif s.last_valid_step != s.step:
                self.validate_and_save()
        finally:
            bar.close()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        if self.stop_requested:
            if self.dist.is_main:
                print(
                    f"mt train: interrupted at step {s.step}; checkpoint saved to {self.last_path}.\n"
                    f"  resume with the same command: mt {' '.join(sys.argv[1:])}",
                    file=sys.stderr,
                )
        reason = (
            "interrupted" if self.stop_requested else "early stopping" if stop_early else "budget reached"
        )
        return {
            "steps": s.step,
            "epochs": s.epoch,
            "minutes": s.elapsed / 60,
            "stopped": reason,
            "best": s.best,
            "best_step": s.best_step,
        }

    def _check_finite(self, out: dict[str, float]) -> None:
        s = self.state
        if out["finite"]:
            s.nonfinite_in_row = 0
            return
        s.nonfinite_in_row += 1
        if self.dist.is_main:
            tqdm.write(
                f"mt train: warning: non-finite loss or gradient at step {s.step} "
                f"(loss {out['loss']}, grad norm {out['grad_norm']}); update skipped",
                file=sys.stderr,
            )
        if s.nonfinite_in_row >= MAX_NONFINITE_IN_ROW:
            raise MTError(
                f"training diverged: {s.nonfinite_in_row} non-finite losses in a row up to step {s.step}; "
                f"the last good checkpoint is {self.last_path}. Try a lower train.lr or train.clip_norm=1"
            )


def train(cfg: Config) -> dict[str, Any]:
    """Train the experiment `cfg`; returns a summary (steps, time, best and test scores)."""
    trainer = Trainer(cfg)
    try:
        result = trainer.fit()
        if trainer.dist.is_main and result["stopped"] != "interrupted":
            from mt.plot import plot_metrics

            plot_metrics(trainer.out / "metrics.jsonl", trainer.out / "curves.png")
            result["test"] = final_test(cfg, trainer)
            (trainer.out / "summary.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    finally:
        trainer.dist.close()
    return result


def average_last(trainer: Trainer) -> Path | None:
    """Average the last train.keep_last step checkpoints into checkpoint_avg.pt."""
    from mt.average import average_checkpoints
    from mt.checkpoint import step_checkpoints

    paths = [str(p) for _, p in step_checkpoints(trainer.out)][-trainer.cfg.train.keep_last :]
    if len(paths) < 2:
        return None
    out = trainer.out / "checkpoint_avg.pt"
    average_checkpoints(paths, str(out), quiet=True)
    print(f"averaged {len(paths)} checkpoints ({', '.join(Path(p).name for p in paths)}) into {out}")
    return out


def final_test(cfg: Config, trainer: Trainer) -> dict[str, Any]:
    """Score the best (and averaged) checkpoint on the test split, beam and greedy; print all."""
    from mt.evaluate import evaluate_checkpoint

    if "test" not in trainer.data.meta["splits"] or not trainer.best_path.exists():
        return {}
    src, ref = trainer.data.text("test", "src"), trainer.data.text("test", "tgt")
    candidates = {"best": trainer.best_path}
    avg = average_last(trainer) if cfg.train.keep_last > 1 else None
    if avg is not None:
        candidates["averaged"] = avg
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
