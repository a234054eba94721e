"""The one-shot GPU check: the real trainer and translator on a GPU, every figure printed as it comes.

    scripts/gpu_check.sh                  # on the lent GPU machine (see README, "GPU check")
    scripts/gpu_check.sh --cpu            # the same sequence on this CPU, small sizes
    python scripts/gpu_check.py --travel  # what would travel to the GPU machine, against 64 MiB

A GPU machine is lent for about 15 minutes per task, all tries included, and fetches
nothing; so this script needs only the working tree, a prepared cache (`--data`) and
optionally a trained weights-only checkpoint (`--weights`, e.g. a `checkpoint_avg.pt`).
Each part runs in a process of its own with its own time budget, and the whole check ends
within --total seconds (420): a part that overruns its budget is killed and reported as
STUCK, with the figures it printed before, and the next part runs. The parts, in order:

 1. the machine: torch, the GPU (asserted, unless --cpu), and the measured bf16 matmul peak;
 2. the GPU tests (`tests/test_gpu.py`), when pytest is importable there;
 3. a synthetic training step at the iwslt2017_de_en model size, 8k target tokens, eager
    and compiled (its compile time apart): target tokens/s and model FLOPs utilisation (MFU);
 4. the real trainer (`Trainer.fit`: prefetching, bf16 autocast, fused AdamW, logging, the
    epoch ends' validation) on the prepared cache at --sizes target tokens per batch, eager
    and compiled (configs/iwslt2017_de_en_gpu.yaml: train.pad_to_multiple, static shapes):
    its steady-state tokens/s, time per update and MFU after a warm-up window (compile time
    apart), next to a bare forward/backward/step on the same batches (scripts/bench_train.py);
 5. `Translator` on the GPU, after a warm-up: beam 5 and greedy sentences/s and BLEU on the
    test split, in bf16 and fp32, with the --weights model (else one trained in part 4).

MFU = model FLOPs / time / peak. Model FLOPs count the matmuls of forward and backward
(3x forward), with causal self-attention counted at half (only the lower triangle is
needed), as PaLM's appendix B does; embeddings, norms and softmax are left out, and so is
padding: only real tokens count. It is given against the spec peak (--peak-tflops, 989
dense bf16 for an H100/H200 SXM) and against the bf16 matmul peak measured in part 1
(about 790 on an H200).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from mt.config import ModelConfig, load_config
from mt.model import Transformer
from mt.special import BOS, EOS
from mt.train.loss import label_smoothed_nll

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "iwslt2017_de_en_gpu.yaml"
TRAVEL_LIMIT = 64 * 2**20
CPU_MODEL = ["model.d_model=64", "model.ffn_dim=128", "model.layers=2", "model.heads=2"]
PEAK = "@measured-peak "  # how part 1 hands the measured peak to the parts after it


def row(label: str, *values: str) -> None:
    """One figure, printed (and flushed) as soon as it is measured."""
    print(f"  {label:<46}" + "".join(f" {v:>19}" for v in values), flush=True)


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
    row("matmul peak (bf16 on GPU, fp32 on CPU)", f"{peak / 1e12:.1f} TFLOP/s")
    if device.type == "cuda":
        print(f"{PEAK}{peak}", flush=True)


def gpu_tests(args: argparse.Namespace, device: torch.device) -> None:
    if importlib.util.find_spec("pytest") is None:
        row("tests/test_gpu.py", "skipped: no pytest here")
        return
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
        cwd=REPO, env=_env(), capture_output=True, text=True,
    )
    print(proc.stdout[-2000:] + proc.stderr[-2000:], flush=True)
    row("tests/test_gpu.py", "passed" if proc.returncode == 0 else f"FAILED (rc {proc.returncode})")
    if proc.returncode != 0:
        raise RuntimeError("tests/test_gpu.py failed")


def synthetic_training(args: argparse.Namespace, device: torch.device) -> None:
    cfg = load_config(CONFIG, ["model.dropout=0.1", *(CPU_MODEL if args.cpu else [])])
    vocab, length = 10_000, 25
    n = max(1, args.synthetic_tokens // (length + 1))
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
    eager_step = 0.0
    for name, m in (("eager", model), ("compiled", torch.compile(model, dynamic=False))):
        def step(m: torch.nn.Module = m) -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss, _ = label_smoothed_nll(m(src, tin), tout, 0.1)
            (loss / tout.numel()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t0 = time.perf_counter()
        for _ in range(3):  # warm-up (and compilation)
            step()
        sync(device)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.synthetic_steps):
            step()
        sync(device)
        secs = (time.perf_counter() - t0) / args.synthetic_steps
        eager_step = eager_step or secs
        row(f"synthetic train step, {name}", f"{tout.numel() / secs:,.0f} tgt tok/s",
            f"{1000 * secs:.1f} ms/step", *mfu_values(flops / secs, args))
        if name == "compiled":
            row("  compile time", f"{max(warm - 3 * eager_step, 0.0):.1f} s")


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep + path if path else ''}", "HF_HUB_OFFLINE": "1"}


def real_training(args: argparse.Namespace, device: torch.device) -> None:
    from bench_train import trainer_against_bare  # scripts/, this script's directory

    meta = json.loads((args.data / "meta.json").read_text(encoding="utf-8"))
    train_split = meta["splits"]["train"]
    s_len = train_split["src_tokens"] / train_split["kept"] + 1  # + EOS
    t_len = train_split["tgt_tokens"] / train_split["kept"] + 1  # + BOS / EOS
    # Eager first (quick), then compiled, the large batches first: what matters most comes
    # first when the part's budget runs out.
    runs = [(size, False) for size in args.sizes]
    runs += [(size, True) for size in sorted(args.sizes, reverse=True)]
    started = time.monotonic()
    for size, compiled in runs:
        name = f"{size / 1024:g}k tokens, {'compiled' if compiled else 'eager'}"
        left = args.budget - (time.monotonic() - started)
        if left < (60 if compiled and not args.cpu else 10):
            row(f"mt train {name}", f"not run: {left:.0f} s left of the part's budget")
            continue
        overrides = [
            f"data.prepared_dir={args.data}", "data.local_dir=", "data.num_proc=1",
            f"train.device={device.type}", f"train.precision={'bf16' if device.type == 'cuda' else 'fp32'}",
            f"train.compile={str(compiled).lower()}", f"train.max_tokens={size}",
            f"train.pad_to_multiple={args.pad_to_multiple}", *(CPU_MODEL if args.cpu else []),
        ]
        cfg = load_config(CONFIG, overrides)
        keep = args.scratch / "trained" if not compiled and not (args.scratch / "trained").exists() else None
        torch._dynamo.reset()
        r = trainer_against_bare(cfg, args.warmup_updates, args.rounds, keep)
        flops_token = train_flops(cfg.model, 1, s_len, t_len, meta["tgt_vocab_size"]) / t_len
        step = r["update_tokens"] / r["trainer_tok_s"]
        row(f"mt train {name}", f"{r['trainer_tok_s']:,.0f} tgt tok/s", f"{1000 * step:.1f} ms/update",
            *mfu_values(r["trainer_tok_s"] * flops_token, args))
        row(f"  bare step, the same {r['updates']} updates", f"{r['bare_tok_s']:,.0f} tgt tok/s",
            f"trainer {100 * r['trainer_tok_s'] / r['bare_tok_s']:.0f}% of it",
            *mfu_values(r["bare_tok_s"] * flops_token, args))
        row("  warm-up" + (", and the compile time in it" if compiled else ""), f"{r['warmup_s']:.1f} s",
            f"compile ~{r['compile_s']:.1f} s" if compiled else "",
            f"{r['shapes'][0]} shapes, {r['shapes'][1]} new after")
        if r["syncs"] is not None:
            row(f"  host waits inside the {r['updates']} measured updates", str(r["syncs"]),
                "(none expected)")


def decoding(args: argparse.Namespace, device: torch.device) -> None:
    from mt.files import read_lines
    from mt.translate.evaluate import score
    from mt.translate.translator import Translator

    trained = args.scratch / "trained" / "checkpoint_last.pt"
    weights = args.weights if args.weights and args.weights.is_file() else trained
    if not weights.is_file():
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


# --------------------------------------------------------------------------- each part in its own process


@dataclasses.dataclass
class Part:
    title: str
    budget: float  # seconds, on a GPU (--cpu: the same)
    run: Callable[[argparse.Namespace, torch.device], None]
    elastic: bool = False  # also gets what the parts before it left unused


PARTS = {
    "1": Part("the machine", 30, check_machine),
    "2": Part("GPU tests", 50, gpu_tests),
    "3": Part("synthetic training step, iwslt2017_de_en size", 70, synthetic_training),
    "4": Part("mt train against a bare step, eager and compiled", 200, real_training, elastic=True),
    "5": Part("Translator on the test split", 50, decoding),
}


def run_part(key: str, args: argparse.Namespace, budget: float) -> str:
    """Part `key` in a child process (this script with --part), its output passed through as it
    comes; killed, with everything it started, when it overruns `budget`. Returns passed,
    FAILED or STUCK."""
    print(f"\n== {key}. {PARTS[key].title} (budget {budget:.0f} s)", flush=True)
    # sys.argv[0]: the script that was run (this one, or a test's driver that wraps it).
    cmd = [sys.executable, str(Path(sys.argv[0]).resolve()), *sys.argv[1:], "--part", key, "--measured-peak",
           str(args.measured_peak), "--scratch", str(args.scratch), "--budget", str(budget)]
    t0 = time.monotonic()
    env = {**_env(), "TQDM_DISABLE": "1"}  # progress bars would fill the log
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)

    def relay() -> None:
        for raw in proc.stdout:  # bytes: a carriage return (a progress bar) does not end a line
            line = raw.decode("utf-8", errors="replace").split("\r")[-1]
            if line.startswith(PEAK):
                args.measured_peak = float(line[len(PEAK):])
            elif line.strip():
                print(line, end="" if line.endswith("\n") else "\n", flush=True)

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(timeout=5)
        print(f"   STUCK: not done within its budget of {budget:.0f} s; killed (the figures above "
              f"are what it measured), and the check goes on", flush=True)
        return "STUCK"
    reader.join(timeout=5)
    secs = time.monotonic() - t0
    if rc != 0:
        print(f"   FAILED after {secs:.0f} s (exit status {rc})", flush=True)
        return "FAILED"
    print(f"   ({secs:.0f} s)", flush=True)
    return "passed"


def child(args: argparse.Namespace) -> int:
    """One part, in this process: what run_part starts."""
    if args.backend:  # the compiled runs through another torch.compile backend (e.g. aot_eager)
        torch.compile = functools.partial(torch.compile, backend=args.backend)
    device = torch.device("cpu" if args.cpu else "cuda")
    try:
        PARTS[args.part].run(args, device)
    except Exception:  # printed for the log; the exit status tells the parent
        traceback.print_exc()
        return 1
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="the same sequence on the CPU, small sizes")
    ap.add_argument("--travel", action="store_true", help="only print what would travel, against 64 MiB")
    ap.add_argument("--data", type=Path, default=REPO / "data" / "prepared" / "multi30k_de_en",
                    help="a prepared cache (with test.src.txt/test.tgt.txt)")
    ap.add_argument("--weights", type=Path, default=REPO / "runs" / "multi30k_de_en" / "checkpoint_avg.pt",
                    help="a trained weights-only checkpoint for decoding (default: make train's average)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / "runs" / "gpu_check")))
    ap.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], default=[8192, 32768, 65536],
                    help="part 4: target tokens per batch, comma-separated")
    ap.add_argument("--warmup-updates", type=int, default=0,
                    help="part 4: updates before measuring (0: one epoch, at most 50); also the window")
    ap.add_argument("--rounds", type=int, default=2, help="part 4: measured windows")
    # Multi30k's sentences are short (17 tokens on average, 56 at most): 16 gives 3-4 shapes
    # to compile per batch size at about 60% real target tokens; 8 gives 5 at about 70%.
    ap.add_argument("--pad-to-multiple", type=int, default=16, help="part 4: train.pad_to_multiple")
    ap.add_argument("--synthetic-tokens", type=int, default=8192)
    ap.add_argument("--synthetic-steps", type=int, default=30)
    ap.add_argument("--sentences", type=int, default=1000)
    ap.add_argument("--decode-tokens", type=int, default=None, help="decode.max_tokens (default: config)")
    ap.add_argument("--total", type=float, default=420.0, help="seconds for the whole check")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="every part's budget times this")
    ap.add_argument("--parts", default="12345", help="which parts to run, e.g. 34")
    ap.add_argument("--backend", default="",
                    help="torch.compile backend of the compiled runs (default: inductor)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="H100/H200 SXM dense bf16 spec")
    ap.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)  # run_part's child
    ap.add_argument("--measured-peak", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--scratch", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.data, args.weights = args.data.resolve(), args.weights.resolve()
    if args.travel:
        carried = [args.data, *([args.weights] if args.weights.is_file() else [])]
        return 0 if travel(carried) <= TRAVEL_LIMIT else 1
    if args.cpu:
        args.sizes = sorted({max(512, min(size // 32, 1024)) for size in args.sizes})
        args.warmup_updates = args.warmup_updates or 3
        args.synthetic_tokens = min(args.synthetic_tokens, 1024)
        args.synthetic_steps = min(args.synthetic_steps, 2)
        args.sentences = min(args.sentences, 100)
    if args.part:
        return child(args)
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; pass --cpu for a run on the CPU", file=sys.stderr)
        return 2
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    # Run directories and checkpoints go to a scratch directory, not to --out: $OUT comes back.
    args.scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    print(f"gpu_check on {'cpu' if args.cpu else 'cuda'}, at most {args.total:.0f} s; "
          f"results also in {args.out}", flush=True)
    results = {}
    try:
        for i, key in enumerate(args.parts):
            left = args.total - 5 - (time.monotonic() - start)  # 5 s for the summary
            later = sum(PARTS[k].budget * args.budget_scale for k in args.parts[i + 1 :])
            own = PARTS[key].budget * args.budget_scale
            budget = min(left, max(left - later, own) if PARTS[key].elastic else own)
            if budget < 5:
                print(f"\n== {key}. {PARTS[key].title}: not run, {left:.0f} s left of the check", flush=True)
                results[key] = "not run"
                continue
            results[key] = run_part(key, args, budget)
    finally:
        shutil.rmtree(args.scratch, ignore_errors=True)
    passed = sum(r == "passed" for r in results.values())
    shown = ", ".join(f"{k} {r}" for k, r in results.items())
    print(f"\ngpu_check: {passed} of {len(results)} parts passed ({shown}) in "
          f"{time.monotonic() - start:.0f} s", flush=True)
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
