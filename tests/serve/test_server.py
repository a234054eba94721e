"""`mt serve` as a real process: the page in a real browser, exports, SIGTERM, bad options,
the decoder process, slow readers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import SERVE_LIMITS, SERVE_SRC, error_line, free_port, post, start_server

from mt.config import resolve_decoding
from mt.errors import MTError
from mt.serve.app import create_app
from mt.serve.batcher import ServeLimits

# --------------------------------------------------------------------------- the real thing


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
    port = free_port()
    server = start_server(port, "--checkpoint", str(checkpoint))
    try:
        shot = tmp_path / "serve.png"
        translation = drive_page(f"http://127.0.0.1:{port}/", SERVE_SRC[0], shot, chromium)
        assert translation == translator.translate([SERVE_SRC[0]], beam=5)[0]
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
    with TestClient(create_app(ct2, SERVE_LIMITS)) as c:
        r = c.post("/translate", json={"text": SERVE_SRC[:3], "beam": 2})
        assert r.status_code == 200, r.text
        assert r.json() == {"translations": ct2.translate(SERVE_SRC[:3], beam=2)}
        r = c.post("/attention", json={"text": SERVE_SRC[0]})
        assert r.status_code == 422 and "needs a checkpoint" in r.json()["error"]


def test_serving_a_model_never_imports_torch(checkpoint, tmp_path):
    from mt.cli import main

    export = tmp_path / "ct2"
    assert main(["export", "ctranslate2", "--checkpoint", str(checkpoint), "--output", str(export)]) == 0
    port = free_port()
    server = start_server(port, "--model", str(export), python=("-X", "importtime"))
    try:
        status, body = post(port, "/translate", {"text": SERVE_SRC[:2], "beam": 1})
        assert status == 200 and len(body["translations"]) == 2
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=60)
    assert server.returncode == 0, err[-3000:]
    imported = {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in err.splitlines()
        if line.startswith("import time:")
    }
    assert "ctranslate2" in imported and "fastapi" in imported and "torch" not in imported


def test_sigterm_finishes_in_time_or_answers_503_and_exits_non_zero(checkpoint):
    port = free_port()
    # One request per decoding call, 16 of them queued: each takes 0.1 s or more of the tiny
    # model's time on our CPUs (64 over-long lines at beam 16), so at most a few can finish within
    # the 0.2 s drain, whatever the CPU; the rest must be answered 503.
    requests, lines = 16, 64
    server = start_server(
        port,
        "--checkpoint",
        str(checkpoint),
        "--drain-timeout-s",
        "0.2",
        "--max-batch-lines",
        str(lines),
        "--max-queued-cost",
        "10000000",
    )
    heavy = {"text": ["ein hund läuft im park mit einem ball " * 40] * lines, "beam": 16}
    with ThreadPoolExecutor(requests) as pool:
        asks = [pool.submit(post, port, "/translate", heavy) for _ in range(requests)]
        deadline = time.time() + 30
        while (
            json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health").read())["queued_lines"]
            < requests * lines
        ):
            assert time.time() < deadline
            time.sleep(0.02)
        server.send_signal(signal.SIGTERM)
        answers = [a.result() for a in asks]
    _, err = server.communicate(timeout=60)
    dropped = [body for status, body in answers if status == 503]
    done = [body for status, body in answers if status == 200]
    assert len(dropped) >= requests // 2 and len(dropped) + len(done) == requests, answers
    assert all(len(body["translations"]) == lines for body in done)
    assert all(body["error"] == "the server shut down before this request was translated" for body in dropped)
    assert server.returncode == 2
    assert error_line(err.split("Finished server process")[-1], "serve").endswith(
        f"{len(dropped)} request(s) were still pending at the drain deadline (0.2 s, --drain-timeout-s) "
        "and were answered 503"
    )


def test_a_port_out_of_range_is_one_line(checkpoint, capsys):
    from mt.cli import main

    assert main(["serve", "--checkpoint", str(checkpoint), "--port", "99999"]) == 2
    assert error_line(capsys.readouterr().err, "serve") == (
        "mt serve: error: --port 99999: a port is a number from 0 to 65535"
    )


def test_a_model_that_cannot_honour_its_beam_search_is_refused_when_it_loads(checkpoint, tmp_path, capsys):
    from mt.cli import main

    export = tmp_path / "ct2"
    assert main(["export", "ctranslate2", "--checkpoint", str(checkpoint), "--output", str(export)]) == 0
    manifest = json.loads((export / "mt_export.json").read_text())
    manifest["config"]["decode"]["length_penalty"] = "gnmt"  # as exports made before the refusal
    (export / "mt_export.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["serve", "--model", str(export), "--port", str(free_port())]) == 2
    line = error_line(capsys.readouterr().err, "serve")
    assert "decode.length_penalty 'gnmt' has no CTranslate2 equivalent" in line and "--max-beam 1" in line


def test_the_decoder_process_answers_as_the_checkpoint_and_is_replaced_when_it_dies(checkpoint, translator):
    from mt.serve.decoder_process import ProcessEngine

    engine = ProcessEngine(checkpoint, "cpu", None)
    try:
        assert engine.config.name == translator.config.name and engine.device == "cpu"
        got, want = (
            engine.translate_nbest(SERVE_SRC[:3], resolve_decoding(translator.config.decode, 2, 2)),
            translator.translate_nbest(SERVE_SRC[:3], beam=2, nbest=2),
        )
        assert [[t for t, _ in hs] for hs in got] == [[t for t, _ in hs] for hs in want]
        assert [s for hs in got for _, s in hs] == pytest.approx([s for hs in want for _, s in hs], abs=1e-5)
        os.kill(engine.process.pid, signal.SIGKILL)  # as the kernel's OOM killer would
        engine.process.join(10)
        assert [
            hs[0][0]
            for hs in engine.translate_nbest(SERVE_SRC[:3], resolve_decoding(translator.config.decode, 1, 1))
        ] == translator.translate(SERVE_SRC[:3], beam=1)
        assert engine.restarts == 1
        with pytest.raises(MTError, match="nothing to translate"):
            engine.attention_body(
                "   ", resolve_decoding(translator.config.decode, 1), None, None
            )  # an MTError in the child is one here
    finally:
        engine.close()
    assert not engine.process.is_alive()


def test_a_client_that_does_not_read_its_answer_is_let_go_after_the_body_timeout(caplog):
    from mt.serve.app import Guard

    async def app(scope, receive, send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * 10**6})

    async def receive() -> dict:
        await asyncio.sleep(0)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def never_drains(message: dict) -> None:  # the client's window stays shut
        if message["type"] == "http.response.body":
            await asyncio.Event().wait()

    scope = {"type": "http", "method": "GET", "path": "/big", "headers": []}
    guard = Guard(app, ServeLimits(body_timeout_s=0.2))
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="mt.serve"):
        asyncio.run(asyncio.wait_for(guard(scope, receive, never_drains), 5))
    assert time.perf_counter() - t0 < 2
    assert "a client did not read its answer to /big within 0.2 s" in caplog.text
