"""Load on loopback for `mt serve`: many concurrent clients, the same answers as `mt translate`.

    python scripts/bench_serve.py [--checkpoint CK] [--requests 1000] [--clients 32]

Starts `mt serve` on a free port (the trained `make train` model by default, else the
checkpoint given), then:
  1. one request at a time (one client), for the baseline;
  2. --requests requests of one sentence each from --clients concurrent clients:
     requests/s, sentences/s, p50/p95 latency, errors, and whether every answer equals
     `mt translate` on the same line (computed in-process with the same checkpoint);
  3. a burst beyond the queue limit against a second server started with a small
     --max-queued-lines: it answers 429 (or 503), never 500, and keeps serving.
Prints the batching gain: concurrent throughput over one-at-a-time throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(checkpoint: Path, port: int, *options: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mt", "serve", "--checkpoint", str(checkpoint), "--port", str(port), *options],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mt serve exited {proc.returncode}: {proc.communicate()[1][-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("mt serve did not start within 120 s")


def post(port: int, body: dict) -> tuple[int, dict, float]:
    """(status, JSON body, seconds) of one POST /translate."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/translate", data=data, headers={"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
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


def report(label: str, secs: float, results: list[tuple[int, dict, float]]) -> float:
    lat = sorted(r[2] for r in results)
    errors = sum(r[0] != 200 for r in results)
    rps = len(results) / secs
    p95 = lat[int(0.95 * (len(lat) - 1))]
    print(f"  {label:<34}{rps:>8.1f} req/s {rps:>8.1f} sent/s   p50 {1000 * statistics.median(lat):>7.1f} ms"
          f"   p95 {1000 * p95:>7.1f} ms   errors {errors}", flush=True)
    return rps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=REPO / "runs/multi30k_de_en/checkpoint_best.pt")
    ap.add_argument("--source", type=Path, default=REPO / "data/prepared/multi30k_de_en/test.src.txt")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--batch-window-ms", type=float, help="passed to mt serve (default: its own)")
    args = ap.parse_args()
    from mt.files import read_lines
    from mt.translator import Translator

    source = read_lines(args.source)
    lines = [source[i % len(source)] for i in range(args.requests)]
    print(f"mt serve under load: {args.checkpoint}, {args.requests} one-line requests, beam {args.beam}, "
          f"{os.cpu_count()} cores", flush=True)
    distinct = sorted(set(lines))
    expected = Translator.from_checkpoint(args.checkpoint, "cpu").translate(distinct, beam=args.beam)
    expected_of = dict(zip(distinct, expected, strict=True))

    window = ["--batch-window-ms", str(args.batch_window_ms)] if args.batch_window_ms else []
    port = free_port()
    server = start(args.checkpoint, port, "--device", "cpu", *window)
    try:
        secs, results = run_load(port, lines[:100], 1, args.beam)
        one = report("1 client (100 requests)", secs, results)
        secs, results = run_load(port, lines, args.clients, args.beam)
        many = report(f"{args.clients} clients ({args.requests} requests)", secs, results)
        same = sum(
            r[0] == 200 and r[1]["translations"][0] == expected_of[line]
            for line, r in zip(lines, results, strict=True)
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
            health = json.loads(r.read())
        print(f"  mean lines per decoding call: {health['lines_decoded'] / health['decoding_calls']:.1f}")
        gain = many / one
        print(f"  answers equal to mt translate: {same}/{len(lines)}; batching gain {gain:.2f}x", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=120)

    port = free_port()
    server = start(args.checkpoint, port, "--device", "cpu", "--max-queued-lines", "16")
    try:
        secs, results = run_load(port, lines[:200], 64, args.beam)
        codes = {code: sum(r[0] == code for r in results) for code in sorted({r[0] for r in results})}
        after = post(port, {"text": lines[0], "beam": args.beam})[0]
        print(f"  burst of 200 from 64 clients, queue limit 16 lines: status counts {codes}; "
              f"a request after it: {after}", flush=True)
        ok = 500 not in codes and after == 200
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=120)
    return 0 if ok and same == len(lines) else 1


if __name__ == "__main__":
    sys.exit(main())
