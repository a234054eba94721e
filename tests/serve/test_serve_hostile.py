"""`mt serve` against hostile clients, on loopback: one real server (`--checkpoint`, its decoder
process) with small limits, and clients that lie, stall, flood and hang up. During each attack
/health answers within 1 s on a connection of its own, the server's RSS stays under RSS_BOUND,
and nothing is a 500. Every loop is bounded; each test takes seconds.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path

import pytest
from helpers import free_port, post, read_answer, start_server, synthetic_pairs

SRC, _ = synthetic_pairs(8, seed=5)
LIMITS = {  # the server's, small enough to reach quickly
    "--max-lines": "8",
    "--max-chars": "200",
    "--max-attention-tokens": "24",
    "--max-queued-lines": "32",
    "--header-timeout-s": "1",
    "--body-timeout-s": "1",
    "--limit-concurrency": "48",
    "--max-body-bytes": "1000000",
}
RSS_BOUND = 300 * 2**20  # the server's own process (the decoder process is apart): about 100 MB idle
HEAVY = {"text": ["ein hund läuft im park mit einem ball " * 5] * 8, "beam": 16}


class Server:
    def __init__(self, proc, port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    def rss(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024

    def health(self) -> dict:
        conn = HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/health")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory) -> Iterator[Server]:
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = [x for kv in LIMITS.items() for x in kv]
    proc = start_server(port, "--checkpoint", str(checkpoint), *args, log=log)
    try:
        yield Server(proc, port, log)
    finally:
        proc.terminate()
        proc.wait(60)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "Traceback" not in text and '" 500 ' not in text, text[-3000:]  # nothing was a 500


@contextlib.contextmanager
def attacked(server: Server) -> Iterator[None]:
    """While the body runs, /health is asked every 50 ms on a keep-alive connection opened first
    (an attack may fill every other slot): each answer must come within 1 s; RSS is checked."""
    stop = threading.Event()
    slowest: list[float] = [0.0]
    failures: list[BaseException] = []
    conn = HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.connect()

    def watch() -> None:
        while not stop.wait(0.05):
            t0 = time.perf_counter()
            try:
                conn.request("GET", "/health")
                assert conn.getresponse().read()
            except Exception as e:  # recorded, raised in the test's thread
                failures.append(e)
                return
            slowest[0] = max(slowest[0], time.perf_counter() - t0)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        conn.close()
    assert not failures, failures
    assert slowest[0] < 1.0, f"/health took {slowest[0]:.2f} s during the attack"
    assert server.rss() < RSS_BOUND, f"RSS {server.rss() / 2**20:.0f} MB"


def request_head(path: str, length: int | None, extra: str = "") -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{size}{extra}\r\n"
    ).encode()


def test_a_body_over_the_limit_is_413_before_it_is_read(server):
    with attacked(server):
        rss = server.rss()
        with server.connect() as s:  # Content-Length: 10 GB, 10 bytes sent: answered at once
            t0 = time.perf_counter()
            s.sendall(request_head("/translate", 10**10) + b'{"text": ')
            status, body = read_answer(s)
            assert time.perf_counter() - t0 < 1
        assert status == 413 and body == {
            "error": "body: 10000000000 bytes (Content-Length); at most 1000000",
            "status": 413,
        }
        with server.connect() as s:  # no Content-Length: refused once 1 MB has streamed in
            s.sendall(request_head("/translate", None, "Transfer-Encoding: chunked\r\n"))
            chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
            with contextlib.suppress(OSError):  # the server stops reading, then closes
                for _ in range(200):  # 13 MB at most
                    s.sendall(chunk)
            status, body = read_answer(s)
        assert status == 413 and body["error"] == "body: more than 1000000 bytes"
        assert server.rss() - rss < 50 * 2**20


def test_a_lying_content_length_is_408_after_the_body_timeout(server):
    with attacked(server), server.connect() as s:
        t0 = time.perf_counter()
        s.sendall(request_head("/translate", 1000) + b'{"text": "ein hund"}')
        status, body = read_answer(s)
        assert 0.9 < time.perf_counter() - t0 < 3
    assert status == 408 and body["error"] == "body: not received within 1 s"


def test_a_list_of_a_hundred_thousand_lines_is_413(server):
    with attacked(server):
        status, body = post(server.port, "/translate", {"text": ["ein"] * 100_000})
    assert status == 413 and body["error"] == "text: 100000 lines; at most 8 per request"


def test_long_attention_inputs_are_413_and_short_ones_served(server):
    with attacked(server):
        status, body = post(server.port, "/attention", {"text": "ein hund " * 20})
        assert status == 413 and "source tokens; /attention takes at most 24" in body["error"]
        status, body = post(server.port, "/attention", {"text": "x" * 201})
        assert status == 413 and "at most 200" in body["error"]
        status, body = post(server.port, "/attention", {"text": SRC[0], "layer": 0, "head": "mean"})
        assert status == 200 and len(body["weights"]) == len(body["tgt_pieces"])


def test_slow_header_clients_are_cut_off_while_others_are_served(server):
    with attacked(server):
        socks = [server.connect() for _ in range(30)]
        try:
            for s in socks:
                s.sendall(b"POST /translate HTTP/1.1\r\nHost: t\r\n")  # and never the rest
            assert post(server.port, "/translate", {"text": SRC[0]})[0] == 200
            answers = [read_answer(s) for s in socks]  # each closed after the header timeout
        finally:
            for s in socks:
                s.close()
    assert all(
        a == (408, {"error": "request headers not received within 1 s", "status": 408}) for a in answers
    )


@pytest.mark.parametrize(
    "raw",
    [b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 40_000],  # headers never end
)
def test_a_malformed_request_or_huge_headers_are_a_400_in_json(server, raw):
    with attacked(server), server.connect() as s:
        s.sendall(raw)
        status, body = read_answer(s)
    assert status == 400 and body["error"].startswith("not a valid HTTP request (")


def test_connections_past_the_limit_get_a_503_in_json(server):
    with attacked(server):
        socks = [server.connect() for _ in range(60)]
        try:
            time.sleep(0.3)  # the refused have their answer; the others hear nothing for 1 s
            readable, _, _ = select.select(socks, [], [], 0)
            refused = [read_answer(s) for s in readable]
        finally:
            for s in socks:
                s.close()
    assert len(refused) >= 60 + 1 - 48  # the health watcher holds one connection
    assert all(
        status == 503 and "too many connections (at most 48)" in body["error"] for status, body in refused
    )


def test_clients_that_hang_up_have_their_work_dropped(server):
    with attacked(server):
        data = json.dumps(HEAVY).encode()
        for _ in range(20):
            with server.connect() as s:
                s.sendall(request_head("/translate", len(data)) + data)
                time.sleep(0.01)
            # closed: the request is cancelled, and dropped unless already decoding
        deadline = time.time() + 20
        while (health := server.health())["queued_lines"] > 0:
            assert time.time() < deadline, health
            time.sleep(0.05)
        assert health["dropped"] > 0
        t0 = time.perf_counter()
        assert post(server.port, "/translate", {"text": SRC[1]})[0] == 200
        assert time.perf_counter() - t0 < 5


def test_a_burst_is_answered_or_told_to_retry_never_a_500(server):
    with attacked(server), ThreadPoolExecutor(32) as pool:
        answers = list(
            pool.map(lambda i: post(server.port, "/translate", {"text": SRC, "beam": 2}), range(96))
        )
    statuses = {status for status, _ in answers}
    assert statuses <= {200, 429} and 429 in statuses, statuses
    assert all("too much work queued" in b["error"] for s, b in answers if s == 429)
    assert post(server.port, "/translate", {"text": SRC[0]})[0] == 200


def test_a_bad_line_among_good_ones_fails_only_its_own_request(server):
    def ask(i: int) -> tuple[int, dict]:
        if i == 4:
            with server.connect() as s:  # valid JSON with a lone surrogate
                data = b'{"text": ["x \\ud800"]}'
                s.sendall(request_head("/translate", len(data), "Connection: close\r\n") + data)
                return read_answer(s)
        return post(server.port, "/translate", {"text": [SRC[i % 8]], "beam": 1})

    with attacked(server), ThreadPoolExecutor(9) as pool:
        answers = list(pool.map(ask, range(9)))
    assert [s for s, _ in answers] == [200] * 4 + [422] + [200] * 4
    assert "line 1 is not valid Unicode (U+D800" in answers[4][1]["error"]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"text": "x", "beam": NaN}',
        b'{"text": "x", "beam": "5"}',
        b'{"text": "x", "beam": true}',
        b'{"text": "x", "nbest": 1e400}',
        b'{"text": "x", "extra": 1}',
        b'{"text": {"a": 1}}',
        b'{"text": "x", "beam": 99999999999999999999}',
        b"\xff\xfe",
        b"[" * 100_000,
    ],
)
def test_nan_and_mistyped_values_are_4xx_json(server, raw):
    with attacked(server), server.connect() as s:
        s.sendall(request_head("/translate", len(raw), "Connection: close\r\n") + raw)
        status, body = read_answer(s)
    assert status in (400, 413, 422) and body["status"] == status and body["error"], body
