"""Training-throughput benchmarks.

    python scripts/bench_train.py [CONFIG] [key=value ...] [--batches 30]
    python scripts/bench_train.py [CONFIG] [key=value ...] --trainer [--warmup-updates 20]

Default: our Transformer against a plain torch.nn.Transformer. Both models have the
dimensions of the config's model and train on the same batches of the prepared training
split, interleaved batch by batch so that machine noise hits both alike. Prints target
tokens per second and the ratio.

--trainer: the real trainer against a bare training step, on any device (train.device):
`Trainer.fit()` itself (prefetching, update, logging, the epoch ends' validation and
checkpoints, whose time its tok_s leaves out) for a warm-up window and `--rounds` measured
windows of as many updates, then a bare forward/backward/optimizer step of the same model
and optimizer on the measured windows' batches, already on the device. The ratio is the
trainer's overhead; a compiled model (train.compile) is compiled in the warm-up, whose
time is printed apart. scripts/gpu_check.py runs the same measurement on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mt.config import Config, ModelConfig, load_config
from mt.data.dataset import load_prepared
from mt.data.prepare import prepare
from mt.model import Transformer
from mt.special import PAD
from mt.train.batching import TokenBatcher, make_batch
from mt.train.loss import label_smoothed_nll


class Reference(nn.Module):
    """A straightforward encoder-decoder built from torch.nn.Transformer."""

    def __init__(self, cfg: ModelConfig, vocab: int) -> None:
        super().__init__()
        self.d = cfg.d_model
        self.embed = nn.Embedding(vocab, cfg.d_model, padding_idx=PAD)
        self.core = nn.Transformer(
            d_model=cfg.d_model,
            nhead=cfg.heads,
            num_encoder_layers=cfg.layers,
            num_decoder_layers=cfg.decoder_layers or cfg.layers,
            dim_feedforward=cfg.ffn_dim,
            dropout=cfg.dropout,
            batch_first=True,
            norm_first=cfg.pre_norm,
        )
        self.proj = nn.Linear(cfg.d_model, vocab, bias=False)
        self.proj.weight = self.embed.weight
        pos = torch.arange(1024).unsqueeze(1)
        div = torch.exp(torch.arange(0, cfg.d_model, 2) * (-math.log(10000.0) / cfg.d_model))
        pe = torch.zeros(1024, cfg.d_model)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        self.register_buffer("pe", pe)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        s = self.embed(src) * math.sqrt(self.d) + self.pe[: src.size(1)]
        t = self.embed(tgt) * math.sqrt(self.d) + self.pe[: tgt.size(1)]
        causal = self.core.generate_square_subsequent_mask(tgt.size(1))
        h = self.core(
            s,
            t,
            tgt_mask=causal,
            src_key_padding_mask=src == PAD,
            tgt_key_padding_mask=tgt == PAD,
            memory_key_padding_mask=src == PAD,
        )
        return self.proj(h)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trainer_against_bare(
    cfg: Config, warmup_updates: int = 0, rounds: int = 2, out_dir: Path | None = None
) -> dict[str, Any]:
    """The real trainer's steady-state throughput next to a bare step's on the same batches.

    `cfg` is trained (in a temporary directory) in windows of `warmup_updates` updates (0: one
    epoch, at most 50): a warm-up of whole windows, until the next `rounds` windows hold no
    batch shape it has not seen (at most 4 windows: a compiled model then compiles nothing
    while measured), and `rounds` measured windows, whose logged tok_s (median) is the
    trainer's. Returns target tokens/s of both, the update's mean target tokens, the warm-up's
    seconds (compilation included) and what of it the steady state does not explain
    (compilation, mostly), and the number of batch shapes of the warm-up and of those first
    seen in the measured windows; on a GPU also the host waits inside the measured updates
    (none expected). Checkpoints are written only to `out_dir`, when given (their time is left
    out of tok_s either way).
    """
    from mt.train.trainer import Trainer, _collate, label_smoothed_nll

    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train))
        t = cfg.train
        t.out_dir, t.valid_every, t.valid_bleu = str(out_dir or Path(tmp) / "run"), 0, False
        t.keep_last, t.patience, t.max_epochs, t.max_minutes = 0, 0, 0, 0.0
        trainer = Trainer(cfg)
        if out_dir is None:
            trainer.save = lambda *args, **kwargs: None  # saves to a directory deleted after: skip them
        try:

            def collate(update: tuple[Any, ...]) -> list[Any]:
                split = trainer.train_split
                return [_collate(split, idx, t.pad_to_multiple, t.max_tokens) for idx in update[0]]

            per_epoch = -(-trainer.batcher.num_batches(0) // t.accum_steps)
            window = warmup_updates or min(per_epoch, 50)
            updates = list(itertools.islice(trainer._updates(0, 0), window * (4 + rounds)))
            shapes, tokens = [], []
            for u in updates:
                batches = collate(u)
                shapes.append({tuple(b.src.shape) for b in batches})
                tokens.append(sum(b.n_tgt_tokens for b in batches))
            warm = window
            while warm < 4 * window and _new_shapes(shapes, warm, rounds * window):
                warm += window
            total = warm + rounds * window
            t.max_steps, t.log_every = total, window
            with _syncs_in_updates(trainer, after_step=warm) as syncs:
                trainer.fit()
            rows = [json.loads(line) for line in (trainer.out / "metrics.jsonl").read_text().splitlines()]
            rates = [r["tok_s"] for r in rows if r["kind"] == "train"]
            bare = _bare_steps(trainer, [collate(u) for u in updates[warm:total]], label_smoothed_nll)
        finally:
            trainer.close()
    k = warm // window
    steady = statistics.median(rates[k:])
    warm_s = sum(sum(tokens[i * window : (i + 1) * window]) / rates[i] for i in range(k))
    return {
        "trainer_tok_s": steady,
        "bare_tok_s": sum(tokens[warm:total]) / bare,
        "update_tokens": sum(tokens[:total]) / total,
        "updates": total - warm,
        "warmup_s": warm_s,
        "compile_s": max(warm_s - sum(tokens[:warm]) / steady, 0.0),
        "shapes": (len(set().union(*shapes[:warm])), len(_new_shapes(shapes, warm, total - warm))),
        "syncs": syncs[0] if trainer.device.type == "cuda" else None,
    }


@contextlib.contextmanager
def _syncs_in_updates(trainer: Any, after_step: int) -> Iterator[list[int]]:
    """On a GPU, count the operations inside `trainer.update` (after step `after_step`) that
    make the host wait for the device (torch.cuda's sync debug mode): the update should have
    none. Yields a one-element list that holds the count at the end."""
    count = [0]
    if trainer.device.type != "cuda":
        yield count
        return
    real_update, inside = trainer.update, [False]

    def update(batches: list[Any]) -> Any:
        inside[0] = trainer.state.step >= after_step
        try:
            return real_update(batches)
        finally:
            inside[0] = False

    def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
        if inside[0] and "synchroniz" in str(message):
            count[0] += 1
        else:
            shown(message, category, *args, **kwargs)

    trainer.update = update
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        shown, warnings.showwarning = warnings.showwarning, show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield count
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = shown
            del trainer.update


def _new_shapes(shapes: list[set[Any]], start: int, n: int) -> set[Any]:
    """The batch shapes of updates start .. start + n - 1 that no update before them had."""
    return set().union(*shapes[start : start + n]) - set().union(*shapes[:start])


def _bare_steps(trainer: Any, updates: list[list[Any]], plain_loss: Any) -> float:
    """Seconds of forward/backward/optimizer steps over `updates`, their batches already on the
    device: the trainer's model, optimizer, autocast and loss, nothing else."""
    device, smoothing = trainer.device, trainer.cfg.train.label_smoothing
    loss_fn = trainer.compiled_loss or plain_loss
    on_device = [[b.to(device) for b in u] for u in updates]

    def step(batches: list[Any]) -> None:
        n = float(sum(b.n_tgt_tokens for b in batches))
        for b in batches:
            with trainer._autocast():
                loss, _ = loss_fn(trainer.model(b.src, b.tgt_in), b.tgt_out, smoothing)
            (loss / n).backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    trainer.model.train()
    for batches in on_device[:2]:  # the allocator's warm-up
        step(batches)
    _sync(device)
    t0 = time.perf_counter()
    for batches in on_device:
        step(batches)
    _sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="configs/multi30k_de_en.yaml")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--trainer", action="store_true", help="the real trainer against a bare step")
    ap.add_argument("--warmup-updates", type=int, default=0, help="--trainer: 0 = one epoch, at most 50")
    ap.add_argument("--rounds", type=int, default=2, help="--trainer: measured windows")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    prepare(cfg, quiet=True)
    if args.trainer:
        r = trainer_against_bare(cfg, args.warmup_updates, args.rounds)
        print(
            f"\nreal trainer against a bare step, {r['updates']} updates of {r['update_tokens']:.0f} target "
            f"tokens, {torch.get_num_threads()} threads, train.compile={cfg.train.compile}"
        )
        print(f"  {'mt train (Trainer.fit)':<26}{r['trainer_tok_s']:>10.0f} target tokens/s")
        print(f"  {'bare forward/backward/step':<26}{r['bare_tok_s']:>10.0f} target tokens/s")
        print(f"  trainer / bare: {r['trainer_tok_s'] / r['bare_tok_s']:.3f} (target >= 0.95)")
        print(f"  warm-up {r['warmup_s']:.1f} s (compile ~{r['compile_s']:.1f} s); batch shapes "
              f"{r['shapes'][0]}, {r['shapes'][1]} new after the warm-up")
        return
    data = load_prepared(cfg.prepared_dir)
    split = data.split("train")
    vocab = data.tokenizer.tgt_vocab_size
    batcher = TokenBatcher(split.src_lens, split.tgt_lens, cfg.train.max_tokens, cfg.train.seed)
    idx = batcher.epoch_batches(0)[: args.batches + args.warmup]
    batches = [make_batch([split.src(i) for i in b], [split.tgt(i) for i in b], b) for b in idx]

    torch.manual_seed(0)
    models = {"mt": Transformer(cfg.model, vocab, vocab), "torch.nn.Transformer": Reference(cfg.model, vocab)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.98)) for k, m in models.items()}
    secs = dict.fromkeys(models, 0.0)
    tokens = 0
    for i, b in enumerate(batches):
        for name, model in models.items():
            model.train()
            t = time.perf_counter()
            logits = model(b.src, b.tgt_in)
            loss, _ = label_smoothed_nll(logits, b.tgt_out, cfg.train.label_smoothing)
            (loss / b.n_tgt_tokens).backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if i >= args.warmup:
                secs[name] += time.perf_counter() - t
        if i >= args.warmup:
            tokens += b.n_tgt_tokens
    print(
        f"\ntraining throughput, {args.batches} batches of max_tokens={cfg.train.max_tokens}, "
        f"{torch.get_num_threads()} threads, d{cfg.model.d_model} {cfg.model.layers}+"
        f"{cfg.model.decoder_layers or cfg.model.layers} layers"
    )
    for name in models:
        print(f"  {name:<22}{tokens / secs[name]:>10.0f} target tokens/s")
    ratio = secs["torch.nn.Transformer"] / secs["mt"]
    print(f"  ratio mt / torch.nn.Transformer: {ratio:.2f}x (target >= 1.2x)")


if __name__ == "__main__":
    main()
