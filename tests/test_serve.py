"""`mt serve`: the HTTP API through a test client, the batcher, and the page in a real browser."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import REPO, synthetic_pairs

from mt.app import create_app
from mt.serve import Batcher, ServeLimits
from mt.translator import Translator

SRC, _ = synthetic_pairs(8, seed=21)
LIMITS = ServeLimits(max_lines=8, max_chars=200, max_queued_lines=16)


@pytest.fixture(scope="module")
def translator(checkpoint) -> Translator:
    return Translator.from_checkpoint(checkpoint, "cpu")


@pytest.fixture
def client(translator):
    with TestClient(create_app(translator, LIMITS)) as c:
        yield c


# --------------------------------------------------------------------------- the API


def test_translations_come_back_in_order_equal_to_mt_translate(client, translator):
    lines = [SRC[0], "", SRC[1], SRC[2]]
    r = client.post("/translate", json={"text": lines, "beam": 2})
    assert r.status_code == 200, r.text
    assert r.json() == {"translations": translator.translate(lines, beam=2)}
    r = client.post("/translate", json={"text": SRC[3]})  # one string, the model's beam
    assert r.json() == {"translations": translator.translate([SRC[3]])}


def test_nbest_gives_scored_hypotheses_best_first(client, translator):
    r = client.post("/translate", json={"text": SRC[:2], "beam": 3, "nbest": 3})
    assert r.status_code == 200, r.text
    got = r.json()["translations"]
    assert [[h["text"] for h in hs] for hs in got] == [
        [t for t, _ in hs] for hs in translator.translate_nbest(SRC[:2], beam=3, nbest=3)
    ]
    assert all(hs[0]["score"] >= hs[-1]["score"] for hs in got)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"text": ["x"] * 9}, 413, "9 lines; at most 8"),
        ({"text": "y" * 201}, 413, "line 1 has 201 characters; at most 200"),
        ({"text": []}, 422, "at least one line"),
        ({"text": "a\nb"}, 422, "line 1 contains a line break"),
        ({"text": "x", "beam": 2, "nbest": 3}, 422, "nbest (3) cannot exceed beam (2)"),
        ({"text": "x", "beam": 0}, 422, "beam"),
        ({"text": 5}, 422, "text"),
        ({"beam": 2}, 422, "text"),
    ],
)
def test_bad_requests_are_json_errors_with_their_status(client, body, status, message):
    r = client.post("/translate", json=body)
    assert r.status_code == status, r.text
    assert message in r.text
    assert client.post("/translate", json={"text": "ein hund"}).status_code == 200  # still serving


@pytest.mark.parametrize("raw", [b'{"text": "ein hund"', b'{"text": "\xff\xfe"}', b"\x00\x01", b""])
def test_bad_json_or_utf8_never_gives_a_500(client, raw):
    r = client.post("/translate", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code in (400, 422), r.text
    assert client.get("/health").json()["status"] == "ok"


def test_too_much_queued_work_is_429(translator):
    with TestClient(create_app(translator, ServeLimits(max_queued_lines=4))) as small:
        r = small.post("/translate", json={"text": ["ein hund"] * 5})
        assert r.status_code == 429 and "too much work queued" in r.json()["error"]
        assert small.post("/translate", json={"text": ["ein hund"] * 4}).status_code == 200


def test_health_schema_and_an_offline_page(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["queued_lines"] == 0
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/translate", "/attention", "/health"} <= set(paths)
    page = client.get("/").text
    assert "<canvas" in page and 'fetch("/attention"' in page
    assert "http://" not in page and "https://" not in page  # no external assets: works offline


def test_attention_gives_weights_pieces_and_alignment(client):
    r = client.post("/attention", json={"text": SRC[0], "beam": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    src, tgt, w = body["src_pieces"], body["tgt_pieces"], body["weights"]
    assert src[-1] == tgt[-1] == "</s>"
    assert len(w[0][0]) == len(tgt) and len(w[0][0][0]) == len(src)
    assert all(abs(sum(row) - 1) < 1e-2 for row in w[-1][0])
    assert [j for _, j in body["alignment"]] == list(range(len(body["alignment"])))
    assert client.post("/attention", json={"text": "  "}).status_code == 422


# --------------------------------------------------------------------------- the batcher


def test_concurrent_requests_share_decoding_calls(translator):
    async def run() -> tuple[list, int]:
        batcher = Batcher(translator, ServeLimits(batch_window_ms=50))
        batcher.start()
        try:
            outs = await asyncio.gather(*(batcher.translate([line], 2, 1) for line in SRC))
        finally:
            await batcher.stop()
        return outs, batcher.calls

    outs, calls = asyncio.run(run())
    assert [o[0][0][0] for o in outs] == translator.translate(SRC, beam=2)
    assert calls < len(SRC)  # batched: fewer decoding calls than requests


def test_a_stopping_batcher_finishes_its_queue_then_refuses(translator):
    async def run() -> tuple[list, int]:
        batcher = Batcher(translator, ServeLimits(batch_window_ms=20))
        batcher.start()
        pending = [asyncio.ensure_future(batcher.translate([line], 1, 1)) for line in SRC[:3]]
        await asyncio.sleep(0)
        await batcher.stop()
        done = [p.result()[0][0][0] for p in pending]
        with pytest.raises(Exception, match="shutting down"):
            await batcher.translate(["x"], 1, 1)
        return done, batcher.queued_lines

    done, queued = asyncio.run(run())
    assert done == translator.translate(SRC[:3], beam=1) and queued == 0


# --------------------------------------------------------------------------- the real thing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, port: int, *options: str) -> subprocess.Popen:
    """`mt serve` in a subprocess, once /health answers."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mt", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
         "--device", "cpu", *options],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mt serve exited {proc.returncode}: {proc.communicate()[1][-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("mt serve did not answer /health within 90 s")


def drive_page(url: str, text: str, screenshot: Path, chromium: str) -> str:
    """Open the page in headless Chromium, translate `text`, wait for the heatmap, switch to
    layer 1 and head 1 and back to their means, and save a screenshot; returns the translation."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            page.goto(url)
            page.fill("#source", text)
            page.click("#go")
            page.wait_for_selector("#heatmap[data-drawn=true]", timeout=60_000)
            translation = page.inner_text("#translation")
            page.select_option("#layer", "0")
            page.select_option("#head", "0")
            page.wait_for_selector("#heatmap[data-drawn=true]")
            page.select_option("#layer", "mean")
            page.select_option("#head", "mean")
            assert page.inner_text("#error") == ""
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return translation


@pytest.mark.slow
def test_the_page_in_a_real_browser_translates_and_draws_the_attention(checkpoint, translator, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium on this machine: apt-get install chromium (.ci/run does)")
    port = _free_port()
    server = start_server(checkpoint, port)
    try:
        shot = tmp_path / "serve.png"
        translation = drive_page(f"http://127.0.0.1:{port}/", SRC[0], shot, chromium)
        assert translation == translator.translate([SRC[0]], beam=5)[0]
        assert shot.stat().st_size > 10_000 and shot.read_bytes()[:4] == b"\x89PNG"
    finally:
        server.send_signal(signal.SIGTERM)  # drains what is in flight, then exits
        _, err = server.communicate(timeout=60)
    assert server.returncode == 0, err[-3000:]
    assert "Finished server process" in err


def test_a_ctranslate2_export_serves_translations_but_not_attention(checkpoint, tmp_path, capsys):
    from mt.cli import main
    from mt.export.ct2_translator import CT2Translator

    export = tmp_path / "ct2"
    assert main(["export", "ctranslate2", "--checkpoint", str(checkpoint), "--output", str(export)]) == 0
    ct2 = CT2Translator.from_export(export, "cpu")
    with TestClient(create_app(ct2, LIMITS)) as c:
        r = c.post("/translate", json={"text": SRC[:3], "beam": 2})
        assert r.status_code == 200, r.text
        assert r.json() == {"translations": ct2.translate(SRC[:3], beam=2)}
        r = c.post("/attention", json={"text": SRC[0]})
        assert r.status_code == 422 and "needs a checkpoint" in r.json()["error"]
