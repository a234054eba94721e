"""Training-throughput benchmark: our Transformer against a plain torch.nn.Transformer.

    python scripts/bench_train.py [CONFIG] [key=value ...] [--batches 30]

Both models have the dimensions of the config's model and train on the same
batches of the prepared training split, interleaved batch by batch so that
machine noise hits both alike. Prints target tokens per second and the ratio.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from mt.batching import TokenBatcher, make_batch
from mt.config import ModelConfig, load_config
from mt.dataset import load_prepared
from mt.loss import label_smoothed_nll
from mt.model import Transformer
from mt.prepare import prepare
from mt.special import PAD


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="configs/multi30k_de_en.yaml")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    prepare(cfg, quiet=True)
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
