"""GPU check: training throughput and model FLOPs utilisation, decoding speed, one table.

    python scripts/gpu_check.py            # on a GPU: iwslt2017_de_en model size, bf16
    python scripts/gpu_check.py --cpu      # smoke run of the same code on the CPU, small sizes

Synthetic batches (random token ids), so it needs no data set and no hub access.
MFU = achieved model FLOPs / peak dense bf16 FLOPs of the GPU (--peak-tflops).
Decoding is timed under bf16 autocast and with the model cast to bf16 (what
`mt translate --precision bf16` does).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from mt.config import DecodeConfig, load_config
from mt.loss import label_smoothed_nll
from mt.model import Transformer
from mt.search import beam_search, greedy
from mt.special import BOS, EOS

REPO = Path(__file__).resolve().parent.parent


def synthetic_batch(n_tokens: int, length: int, vocab: int, device: torch.device):
    """(src, tgt_in, tgt_out) of n_tokens // length sentences of `length` tokens (+ EOS/BOS)."""
    n = max(1, n_tokens // (length + 1))
    body = torch.randint(4, vocab, (n, length), device=device)
    eos = torch.full((n, 1), EOS, device=device)
    bos = torch.full((n, 1), BOS, device=device)
    src = torch.cat([torch.randint(4, vocab, (n, length), device=device), eos], 1)
    return src, torch.cat([bos, body], 1), torch.cat([body, eos], 1)


def train_flops(model: Transformer, n: int, s: int, t: int, vocab: int) -> float:
    """Forward + backward FLOPs (3x forward) of one batch of n pairs, source s and target t tokens."""
    c = model.cfg
    d, f = c.d_model, c.ffn_dim
    le, ld = c.layers, c.decoder_layers or c.layers
    macs = le * n * s * (4 * d * d + 2 * d * f) + le * n * 2 * s * s * d
    macs += ld * n * t * (6 * d * d + 2 * d * f) + ld * n * s * 2 * d * d
    macs += ld * n * (t * t * d + 2 * t * s * d) + n * t * d * vocab
    return 3 * 2 * macs


def bench_train(model, opt, steps, n_tokens, length, vocab, device, dtype) -> tuple[float, float]:
    src, tin, tout = synthetic_batch(n_tokens, length, vocab, device)
    model.train()

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _ = label_smoothed_nll(model(src, tin), tout, 0.1)
        (loss / tout.numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    flops = train_flops(model, src.size(0), src.size(1), tin.size(1), vocab) * steps
    return tout.numel() * steps / secs, flops / secs


def bench_decode(model, n_sent, length, vocab, device, dtype, beam) -> float:
    model.eval()
    src = torch.randint(4, vocab, (n_sent, length), device=device)
    src = torch.cat([src, torch.full((n_sent, 1), EOS, device=device)], 1)
    dec = DecodeConfig(max_len_a=1.0, max_len_b=5)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for i in range(0, n_sent, 250):
            chunk = src[i : i + 250]
            if beam == 1:
                greedy(model, chunk, max_len_a=dec.max_len_a, max_len_b=dec.max_len_b)
            else:
                beam_search(model, chunk, beam=beam, max_len_a=dec.max_len_a, max_len_b=dec.max_len_b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="smoke run on the CPU with small sizes")
    ap.add_argument("--config", default=str(REPO / "configs" / "iwslt2017_de_en.yaml"))
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per training batch")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sentences", type=int, default=1000)
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="H100/H200 SXM dense bf16")
    args = ap.parse_args()
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    overrides = ["model.dropout=0.1"]
    if device.type == "cpu":
        overrides += ["model.d_model=64", "model.ffn_dim=128", "model.layers=2"]
        args.tokens, args.steps, args.sentences = (
            min(args.tokens, 1024),
            min(args.steps, 3),
            min(args.sentences, 50),
        )
    cfg = load_config(args.config, overrides)
    vocab = cfg.data.vocab_size
    dtype = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)
    rows = []
    model = Transformer(cfg.model, vocab, vocab).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), fused=device.type == "cuda")
    params = sum(p.numel() for p in model.parameters())
    for name, m in [("eager", model)] + ([("compiled", torch.compile(model))] if args.compile else []):
        tok_s, flops = bench_train(m, opt, args.steps, args.tokens, 25, vocab, device, dtype)
        mfu = flops / (args.peak_tflops * 1e12) if device.type == "cuda" else float("nan")
        rows.append(
            (
                f"train {name} ({args.tokens}-token batches)",
                f"{tok_s:,.0f} tgt tok/s",
                f"{flops / 1e12:.1f} TFLOP/s",
                f"MFU {100 * mfu:.1f}%",
            )
        )
    cast = copy.deepcopy(model).to(torch.bfloat16)
    for how, m, amp in (("autocast" if dtype else "fp32", model, dtype), ("cast bf16", cast, None)):
        for beam in (5, 1):
            secs = bench_decode(m, args.sentences, 14, vocab, device, amp, beam)
            rows.append(
                (
                    f"decode beam {beam}, {args.sentences} sentences, {how}",
                    f"{secs:.2f} s",
                    f"{args.sentences / secs:,.0f} sent/s",
                    "",
                )
            )
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke run)"
    print(
        f"\nGPU check on {name}; model d{cfg.model.d_model} {cfg.model.layers}+{cfg.model.layers} layers, "
        f"{params / 1e6:.1f}M parameters, {'bf16' if dtype else 'fp32'}"
    )
    for r in rows:
        print(f"  {r[0]:<42}{r[1]:>18}{r[2]:>18}{r[3]:>12}")


if __name__ == "__main__":
    main()
