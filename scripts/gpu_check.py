"""The one-shot GPU check: the real trainer and translator on a GPU, every figure printed as it comes.

    scripts/gpu_check.sh                  # on the lent GPU machine (see README, "GPU check")
    scripts/gpu_check.sh --cpu            # the same sequence on this CPU, small sizes
    python scripts/gpu_check.py --travel  # what would travel to the GPU machine, against 64 MiB

A GPU machine is lent for about 15 minutes per task, all tries included, and fetches
nothing; so this script needs only the working tree, a prepared cache (`--data`) and
optionally a trained weights-only checkpoint (`--weights`, e.g. a `checkpoint_avg.pt`),
and each part runs even when one before it failed. The parts, in order:

 1. the machine: torch, the GPU (asserted, unless --cpu), and the measured bf16 matmul peak;
 2. the GPU tests (`tests/test_gpu.py`), when pytest is importable there;
 3. synthetic training steps at the iwslt2017_de_en model size, eager and compiled:
    target tokens/s and model FLOPs utilisation (MFU);
 4. `mt train` itself (Trainer: bf16 autocast, fused AdamW, pinned copies, checkpoints, RNG)
    for --steps updates on the prepared cache, compile off and on: tokens/s, MFU, validation;
 5. `Translator` on the GPU, after a warm-up: beam 5 and greedy sentences/s and BLEU on the
    test split, in bf16 and fp32, with the --weights model (else the one trained in 4).

MFU = model FLOPs / time / peak. Model FLOPs count the matmuls of forward and backward
(3x forward), with causal self-attention counted at half (only the lower triangle is
needed), as PaLM's appendix B does; embeddings, norms and softmax are left out. It is
given against the spec peak (--peak-tflops, 989 dense bf16 for an H100/H200 SXM) and
against the bf16 matmul peak measured in part 1 (about 790 on an H200).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from mt.config import ModelConfig, load_config
from mt.loss import label_smoothed_nll
from mt.model import Transformer
from mt.special import BOS, EOS

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "iwslt2017_de_en.yaml"
TRAVEL_LIMIT = 64 * 2**20
CPU_MODEL = ["model.d_model=64", "model.ffn_dim=128", "model.layers=2", "model.heads=2"]


def row(label: str, *values: str) -> None:
    """One figure, printed (and flushed) as soon as it is measured."""
    print(f"  {label:<46}" + "".join(f"{v:>20}" for v in values), flush=True)


def part(title: str, fn: Callable[[], None]) -> bool:
    """Run one part; a failure is printed and the next part still runs."""
    print(f"\n== {title}", flush=True)
    t0 = time.perf_counter()
    try:
        fn()
    except Exception:  # printed, not swallowed: the point is to go on to the next part
        traceback.print_exc()
        print(f"   FAILED after {time.perf_counter() - t0:.0f} s", flush=True)
        return False
    print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    return True


# --------------------------------------------------------------------------- FLOPs


def train_flops(c: ModelConfig, n: int, s: float, t: float, vocab: int) -> float:
    """Forward + backward matmul FLOPs (3x forward) of n pairs of s source and t target tokens."""
    d, f = c.d_model, c.ffn_dim
    le, ld = c.layers, c.decoder_layers or c.layers
    macs = le * n * s * (4 * d * d + 2 * d * f) + le * n * 2 * s * s * d  # encoder
    macs += ld * n * t * (6 * d * d + 2 * d * f) + ld * n * s * 2 * d * d  # decoder projections
    macs += ld * n * (t * t * d + 2 * t * s * d)  # causal self-attention at half, cross-attention
    macs += n * t * d * vocab  # output projection
    return 3 * 2 * macs


def matmul_peak(device: torch.device) -> float:
    """Measured bf16 matmul FLOP/s (8192^3 on a GPU)."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def mfu_values(flops_s: float, args: argparse.Namespace) -> tuple[str, str]:
    if args.cpu:
        return "", ""
    return f"MFU {100 * flops_s / (args.peak_tflops * 1e12):.1f}% spec", (
        f"{100 * flops_s / args.measured_peak:.1f}% measured" if args.measured_peak else ""
    )


# --------------------------------------------------------------------------- the parts


def check_machine(args: argparse.Namespace, device: torch.device) -> None:
    row("torch", torch.__version__)
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        row("GPU", torch.cuda.get_device_name(), f"{memory:.0f} GiB")
        row("bf16 supported", str(torch.cuda.is_bf16_supported()))
    peak = matmul_peak(device)
    args.measured_peak = peak if device.type == "cuda" else 0.0
    row("matmul peak (bf16 on GPU, fp32 on CPU)", f"{peak / 1e12:.1f} TFLOP/s")


def gpu_tests(args: argparse.Namespace) -> None:
    if importlib.util.find_spec("pytest") is None:
        row("tests/test_gpu.py", "skipped: no pytest here")
        return
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )
    print(proc.stdout[-2000:] + proc.stderr[-2000:], flush=True)
    row("tests/test_gpu.py", "passed" if proc.returncode == 0 else f"FAILED (rc {proc.returncode})")


def synthetic_training(args: argparse.Namespace, device: torch.device) -> None:
    cfg = load_config(CONFIG, ["model.dropout=0.1", *(CPU_MODEL if args.cpu else [])])
    vocab, length = 10_000, 25
    n = max(1, args.tokens // (length + 1))
    g = torch.Generator().manual_seed(0)
    body = torch.randint(4, vocab, (n, length), generator=g).to(device)
    src = torch.cat([torch.randint(4, vocab, (n, length), generator=g).to(device),
                     torch.full((n, 1), EOS, device=device)], 1)
    tin = torch.cat([torch.full((n, 1), BOS, device=device), body], 1)
    tout = torch.cat([body, torch.full((n, 1), EOS, device=device)], 1)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)
    model = Transformer(cfg.model, vocab, vocab).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), fused=True)
    row("model", f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters",
        f"{n} x {length + 1} tokens")
    flops = train_flops(cfg.model, n, length + 1, length + 1, vocab)
    for name, m in (("eager", model), ("compiled", torch.compile(model))):
        def step(m: torch.nn.Module = m) -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss, _ = label_smoothed_nll(m(src, tin), tout, 0.1)
            (loss / tout.numel()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):  # warm-up (and compilation)
            step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.synthetic_steps):
            step()
        sync(device)
        secs = (time.perf_counter() - t0) / args.synthetic_steps
        row(f"synthetic train step, {name}", f"{tout.numel() / secs:,.0f} tgt tok/s",
            f"{flops / secs / 1e12:.1f} TFLOP/s", *mfu_values(flops / secs, args))


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep + path if path else ''}", "HF_HUB_OFFLINE": "1"}


def real_training(args: argparse.Namespace, device: torch.device) -> None:
    meta = json.loads((args.data / "meta.json").read_text(encoding="utf-8"))
    train_split = meta["splits"]["train"]
    s_len = train_split["src_tokens"] / train_split["kept"] + 1  # + EOS
    t_len = train_split["tgt_tokens"] / train_split["kept"] + 1  # + BOS / EOS
    for compiled in (False, True):
        name = "compiled" if compiled else "eager"
        out = args.out / f"train_{name}"
        overrides = [
            f"data.prepared_dir={args.data}", "data.local_dir=", "data.num_proc=1",
            f"train.device={device.type}", f"train.precision={'bf16' if device.type == 'cuda' else 'fp32'}",
            f"train.compile={str(compiled).lower()}", f"train.max_steps={args.steps}", "train.max_epochs=0",
            f"train.valid_every={args.steps}", "train.keep_last=0", "train.patience=0",
            f"train.log_every={max(1, args.steps // 6)}", f"train.out_dir={out}",
            f"train.max_tokens={args.tokens}", *(CPU_MODEL if args.cpu else []),
        ]
        cmd = [sys.executable, "-m", "mt", "train", str(CONFIG), *overrides]
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=args.train_timeout
        )
        wall = time.perf_counter() - t0
        tail = (proc.stdout[-1500:] + proc.stderr[-1500:]).replace("\r", "\n").splitlines()
        print("\n".join(line for line in tail if line.strip() and "it/s]" not in line)[-2500:], flush=True)
        if proc.returncode != 0:
            raise RuntimeError(f"mt train ({name}) exited {proc.returncode}")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
        rates = [r["tok_s"] for r in rows if r["kind"] == "train"][1:]  # the first window holds warm-up
        tok_s = statistics.median(rates) if rates else float("nan")
        cfg = load_config(out / "config.yaml")
        vocab = meta["tgt_vocab_size"]
        flops_s = tok_s * train_flops(cfg.model, 1, s_len, t_len, vocab) / t_len
        row(f"mt train {args.steps} steps, {name}", f"{tok_s:,.0f} tgt tok/s",
            f"{flops_s / 1e12:.1f} TFLOP/s", *mfu_values(flops_s, args))
        valid = [r for r in rows if r["kind"] == "valid"][-1]
        row(f"  validation at step {valid['step']}", f"loss {valid['valid_loss']:.3f}",
            f"BLEU {valid.get('valid_bleu', float('nan')):.2f}", f"{wall:.0f} s in all")
        if not compiled:
            args.trained = out / "checkpoint_last.pt"


def decoding(args: argparse.Namespace, device: torch.device) -> None:
    from mt.evaluate import score
    from mt.files import read_lines
    from mt.translator import Translator

    weights = args.weights if args.weights and args.weights.is_file() else args.trained
    if weights is None:
        raise RuntimeError("no --weights and no model trained in part 4")
    src = read_lines(args.data / "test.src.txt")[: args.sentences]
    ref = read_lines(args.data / "test.tgt.txt")[: args.sentences]
    row("model", str(weights.name), f"{len(src)} sentences")
    for precision in ("bf16", "fp32") if device.type == "cuda" else ("fp32",):
        tr = Translator.from_checkpoint(weights, device, precision)
        for beam in (5, 1):
            tr.translate(src[:64], beam=beam)  # warm-up: kernels, allocator
            sync(device)
            t0 = time.perf_counter()
            hyps = tr.translate(src, beam=beam, max_tokens=args.decode_tokens)
            sync(device)
            secs = time.perf_counter() - t0
            search = "beam 5" if beam == 5 else "greedy"
            row(f"translate {search}, {precision}", f"{len(src) / secs:,.0f} sent/s", f"{secs:.2f} s",
                f"BLEU {score(hyps, ref)['bleu']:.2f}")


# --------------------------------------------------------------------------- what travels


def travel(carry: list[Path]) -> int:
    """Bytes the device tool would send: the working tree git knows of, plus the carried paths."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.split(b"\0")
    tree = sum((REPO / p.decode()).stat().st_size for p in listed if p and (REPO / p.decode()).is_file())
    row("working tree", f"{tree / 2**20:.1f} MiB")
    total = tree
    for path in carry:
        files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
        size = sum(f.stat().st_size for f in files)
        name = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        row(f"carry {name}", f"{size / 2**20:.1f} MiB")
        total += size
    row("in all", f"{total / 2**20:.1f} MiB", f"limit {TRAVEL_LIMIT / 2**20:.0f} MiB",
        "fits" if total <= TRAVEL_LIMIT else "TOO BIG")
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="the same sequence on the CPU, small sizes")
    ap.add_argument("--travel", action="store_true", help="only print what would travel, against 64 MiB")
    ap.add_argument("--data", type=Path, default=REPO / "data" / "prepared" / "multi30k_de_en",
                    help="a prepared cache (with test.src.txt/test.tgt.txt)")
    ap.add_argument("--weights", type=Path, default=REPO / "runs" / "multi30k_de_en" / "checkpoint_avg.pt",
                    help="a trained weights-only checkpoint for decoding (default: make train's average)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / "runs" / "gpu_check")))
    ap.add_argument("--steps", type=int, default=300, help="updates of each mt train run")
    ap.add_argument("--tokens", type=int, default=8192, help="target tokens per training batch")
    ap.add_argument("--synthetic-steps", type=int, default=30)
    ap.add_argument("--sentences", type=int, default=1000)
    ap.add_argument("--decode-tokens", type=int, default=None, help="decode.max_tokens (default: config)")
    ap.add_argument("--train-timeout", type=int, default=240)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="H100/H200 SXM dense bf16 spec")
    args = ap.parse_args()
    args.data, args.weights = args.data.resolve(), args.weights.resolve()
    if args.travel:
        carried = [args.data, *([args.weights] if args.weights.is_file() else [])]
        return 0 if travel(carried) <= TRAVEL_LIMIT else 1
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; pass --cpu for a run on the CPU", file=sys.stderr)
        return 2
    if args.cpu:
        args.steps, args.tokens = min(args.steps, 6), min(args.tokens, 1024)
        args.synthetic_steps, args.sentences = min(args.synthetic_steps, 2), min(args.sentences, 100)
    device = torch.device("cpu" if args.cpu else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    args.measured_peak, args.trained = 0.0, None
    print(f"gpu_check on {device}; results also in {args.out}", flush=True)
    results = [
        part("1. the machine", lambda: check_machine(args, device)),
        part("2. GPU tests", lambda: gpu_tests(args)),
        part("3. synthetic training, iwslt2017_de_en size", lambda: synthetic_training(args, device)),
        part("4. mt train on the prepared cache", lambda: real_training(args, device)),
        part("5. Translator on the test split", lambda: decoding(args, device)),
    ]
    print(f"\ngpu_check: {sum(results)} of {len(results)} parts passed", flush=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
