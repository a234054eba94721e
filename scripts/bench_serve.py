"""Load on loopback for `mt serve`: many concurrent clients, each decoder side by side.

    python scripts/bench_serve.py [--checkpoint CK] [--model DIR] [--requests 1000] [--clients 32]

For each way of decoding (`--decoder thread`, the server's process, as before 2026-12;
`--decoder process`, the default; and with --model a CTranslate2 export), starts `mt serve`
on a free port and measures:
  1. one request at a time (one client), for the baseline;
  2. --requests requests of one sentence each from --clients concurrent clients:
     requests/s, p50/p95 latency, errors, the mean lines per decoding call (from /health),
     and whether every answer equals `mt translate` on the same line (computed in-process);
then prints them side by side, with each mode's throughput over the thread mode's. Last, a
burst beyond the queue limit against a server with a small --max-queued-lines: it answers
429 (or 503), never 500, and keeps serving. Timings need a quiet machine: nothing else running.
A quick check that it runs: --requests 40 --clients 8 --source FILE with a tiny checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(port: int, *options: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mt", "serve", "--port", str(port), "--device", "cpu", *options],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # the access log: a pipe nobody reads would fill and stall it
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mt serve {' '.join(options)} exited {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("mt serve did not start within 120 s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)


def post(port: int, body: dict) -> tuple[int, dict, float]:
    """(status, JSON body, seconds) of one POST /translate."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/translate", data=data, headers={"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read()), time.perf_counter() - t0
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), time.perf_counter() - t0


def run_load(
    port: int, lines: list[str], clients: int, beam: int
) -> tuple[float, list[tuple[int, dict, float]]]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda line: post(port, {"text": line, "beam": beam}), lines))
    return time.perf_counter() - t0, results


@dataclass
class Row:
    mode: str
    one_rps: float
    many_rps: float
    p50: float
    p95: float
    batch: float
    errors: int
    equal: int


def measure(mode: str, options: list[str], lines: list[str], expected: dict[str, str], args) -> Row:
    port = free_port()
    server = start(port, *options)
    try:
        secs, results = run_load(port, lines[: min(100, len(lines))], 1, args.beam)
        one = len(results) / secs
        before = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health").read())
        secs, results = run_load(port, lines, args.clients, args.beam)
        after = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health").read())
    finally:
        stop(server)
    lat = sorted(r[2] for r in results)
    calls = after["decoding_calls"] - before["decoding_calls"]
    decoded = after["lines_decoded"] - before["lines_decoded"]
    equal = sum(
        r[0] == 200 and r[1]["translations"][0] == expected[line]
        for line, r in zip(lines, results, strict=True)
    )
    row = Row(
        mode,
        one,
        len(results) / secs,
        statistics.median(lat),
        lat[int(0.95 * (len(lat) - 1))],
        decoded / max(calls, 1),
        sum(r[0] != 200 for r in results),
        equal,
    )
    print(f"  measured {mode}", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=REPO / "runs/multi30k_de_en/checkpoint_best.pt")
    ap.add_argument("--model", type=Path, help="also a CTranslate2 export of that checkpoint")
    ap.add_argument("--source", type=Path, default=REPO / "data/prepared/multi30k_de_en/test.src.txt")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--batch-window-ms", type=float, help="passed to mt serve (default: its own)")
    args = ap.parse_args()
    from mt.files import read_lines
    from mt.translate.translator import Translator

    source = read_lines(args.source)
    lines = [source[i % len(source)] for i in range(args.requests)]
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):  # the CPU's name, for the README's figures
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    print(
        f"mt serve under load: {args.checkpoint}, {args.requests} one-line requests from {args.clients} "
        f"clients, beam {args.beam}, {os.cpu_count()} cores ({cpu})",
        flush=True,
    )
    distinct = sorted(set(lines))
    expected = dict(
        zip(
            distinct,
            Translator.from_checkpoint(args.checkpoint, "cpu").translate(distinct, args.beam),
            strict=True,
        )
    )
    window = ["--batch-window-ms", str(args.batch_window_ms)] if args.batch_window_ms else []
    ck = ["--checkpoint", str(args.checkpoint), *window]
    rows = [
        measure("checkpoint, --decoder thread", [*ck, "--decoder", "thread"], lines, expected, args),
        measure("checkpoint, --decoder process", [*ck, "--decoder", "process"], lines, expected, args),
    ]
    if args.model:
        from mt.export.ct2_translator import CT2Translator

        ct2 = dict(
            zip(
                distinct,
                CT2Translator.from_export(args.model, "cpu").translate(distinct, args.beam),
                strict=True,
            )
        )
        rows.append(
            measure("CTranslate2 export (--model)", ["--model", str(args.model), *window], lines, ct2, args)
        )

    base = rows[0].many_rps
    print(
        f"\n  {'mode':<32}{'1 client':>10}{f'{args.clients} clients':>12}{'p50':>9}{'p95':>9}"
        f"{'mean batch':>12}{'vs thread':>11}{'errors':>8}{'equal':>11}"
    )
    for r in rows:
        print(
            f"  {r.mode:<32}{r.one_rps:>8.1f}/s{r.many_rps:>10.1f}/s"
            f"{1000 * r.p50:>7.0f}ms{1000 * r.p95:>7.0f}ms{r.batch:>12.1f}{r.many_rps / base:>10.2f}x"
            f"{r.errors:>8}{f'{r.equal}/{len(lines)}':>11}"
        )

    port = free_port()
    server = start(port, *ck, "--max-queued-lines", "16")
    try:
        secs, results = run_load(port, lines[:200], 64, args.beam)
        codes = {code: sum(r[0] == code for r in results) for code in sorted({r[0] for r in results})}
        after = post(port, {"text": lines[0], "beam": args.beam})[0]
        print(
            f"\n  burst of {len(results)} from 64 clients, queue limit 16 lines: status counts {codes}; "
            f"a request after it: {after}",
            flush=True,
        )
        ok = 500 not in codes and after == 200
    finally:
        stop(server)
    return 0 if ok and all(r.equal == len(lines) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
