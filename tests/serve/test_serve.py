"""`mt serve`: the HTTP API through a test client, the batcher, and the page in a real browser."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers import error_line, free_port, post, start_server, synthetic_pairs

from mt.errors import MTError
from mt.serve.app import create_app
from mt.serve.batcher import Batcher, Busy, LocalEngine, ServeLimits
from mt.translate.translator import Translator

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


def test_attention_gives_one_layer_and_head_or_their_mean_in_compact_numbers(client, translator):
    from mt.translate.alignment import translate_and_attend

    ((text, attn),) = translate_and_attend(translator, [SRC[0]], 2)
    for layer, head in (("mean", "mean"), (0, 1), (0, "mean")):
        r = client.post("/attention", json={"text": SRC[0], "beam": 2, "layer": layer, "head": head})
        assert r.status_code == 200, r.text
        body = r.json()
        src, tgt, w = body["src_pieces"], body["tgt_pieces"], body["weights"]
        assert body["translation"] == text and (body["layer"], body["head"]) == (layer, head)
        assert (body["layers"], body["heads"]) == (1, 2) and src[-1] == tgt[-1] == "</s>"
        assert len(w) == len(tgt) and all(len(row) == len(src) for row in w)  # (T, S): one map only
        full = attn.weights
        want = full.mean(0) if layer == "mean" else full[layer]
        want = want.mean(0) if head == "mean" else want[head]
        assert (
            max(
                abs(a - b)
                for ra, rb in zip(w, want.tolist(), strict=True)
                for a, b in zip(ra, rb, strict=True)
            )
            <= 5e-4
        )  # 3 decimals
        assert all(abs(sum(row) - 1) < 1e-2 for row in w)
        assert all(len(repr(x).split(".")[-1]) <= 3 for row in w for x in row)  # compact numbers
        assert [j for _, j in body["alignment"]] == list(range(len(body["alignment"])))
    assert client.post("/attention", json={"text": "  "}).status_code == 422
    r = client.post("/attention", json={"text": SRC[0], "layer": 1})
    assert r.status_code == 422 and "layer 1: the model has 1" in r.json()["error"]


@pytest.mark.parametrize(
    ("raw", "status", "message"),
    [
        (b'{"text": "x", "beam": NaN}', 400, "NaN is not JSON"),
        (b'{"text": "x", "beam": Infinity}', 400, "Infinity is not JSON"),
        (b'{"text": "x", "beam": "5"}', 422, "beam: input should be a valid integer"),
        (b'{"text": "x", "beam": true}', 422, "beam: input should be a valid integer"),
        (b'{"text": "x", "beam": 2.0}', 422, "beam: input should be a valid integer"),
        (b'{"text": "x", "nbest": "1"}', 422, "nbest"),
        (b'{"text": "x", "beem": 2}', 422, "beem: unknown key (expected text, beam, nbest)"),
        (b'{"text": ["x", 5]}', 422, "text[1]"),
        (b'["x"]', 422, "expected a JSON object"),
    ],
)
def test_values_are_taken_as_declared_no_coercion_no_unknown_keys(client, raw, status, message):
    r = client.post("/translate", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["status"] == status and message in r.json()["error"]


def test_every_error_is_json_of_one_shape(client):
    answers = [
        client.get("/nowhere"),
        client.get("/translate"),  # 405
        client.post("/translate", json={"text": ["x"] * 9}),
        client.post("/translate", content=b"{", headers={"Content-Type": "application/json"}),
    ]
    for r in answers:
        assert r.headers["content-type"] == "application/json", r.text
        body = r.json()
        assert set(body) == {"error", "status"} and body["status"] == r.status_code, body


def test_a_lone_surrogate_is_a_422_naming_its_line(client):
    r = client.post(
        "/translate",
        content=b'{"text": ["ein hund", "x \\ud800"]}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert "line 2 is not valid Unicode (U+D800 at character 3" in r.json()["error"]


def test_a_request_costlier_than_the_queue_is_413_and_a_full_queue_429(translator):
    with TestClient(create_app(translator, ServeLimits(max_queued_cost=40))) as small:
        r = small.post("/translate", json={"text": "ein " * 30, "beam": 2})
        assert (
            r.status_code == 413 and "units of work (source tokens x beam); at most 40" in r.json()["error"]
        )
        assert small.post("/translate", json={"text": "ein hund", "beam": 2}).status_code == 200
        r = small.post("/attention", json={"text": "ein " * 30, "beam": 2})  # /attention is counted too
        assert r.status_code == 413 and "units of work" in r.json()["error"]
    engine = Engine(translator)

    async def run() -> None:
        batcher = Batcher(engine, ServeLimits(max_queued_cost=40, batch_window_ms=1))
        batcher.start()
        engine.go.clear()
        held = asyncio.ensure_future(batcher.translate(["ein hund"], 2, 1))  # decoding, held
        await asyncio.sleep(0.05)
        # The longest line that fits alone, which does not fit beside the first.
        words = max(n for n in range(1, 40) if batcher.cost(["ein " * n], 2) <= 40)
        assert batcher.queued_cost + batcher.cost(["ein " * words], 2) > 40
        for ask in (
            batcher.translate(["ein " * words], 2, 1),
            batcher.attention("ein " * words, 2, None, None),
        ):
            with pytest.raises(Busy, match=r"too much work queued \(\d+ units\)") as full:
                await ask
            assert full.value.status == 429
        engine.go.set()
        await held
        assert await batcher.translate(["ein " * words], 2, 1)  # room again
        await batcher.stop()

    asyncio.run(run())


class Engine:
    """The test translator behind a switch: decoding waits for `go`, lines containing BAD raise,
    lines containing MT raise an MTError; every decoded line is recorded."""

    def __init__(self, translator: Translator) -> None:
        self.inner = LocalEngine(translator)
        self.config, self.tokenizer, self.device, self.attention = (
            translator.config,
            translator.tokenizer,
            "cpu",
            True,
        )
        self.go = threading.Event()
        self.go.set()
        self.decoded: list[str] = []
        self.aborted = False

    def translate_nbest(self, lines, beam, nbest):
        assert self.go.wait(30)
        if any("BAD" in line for line in lines):
            raise RuntimeError("a bug met a bad line")
        if any("MT" in line for line in lines):
            raise MTError("decode.something: this engine cannot do that")
        self.decoded += lines
        return self.inner.translate_nbest(lines, beam, nbest)

    def attention_body(self, text, beam, layer, head):
        return self.inner.attention_body(text, beam, layer, head)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True
        self.go.set()


def test_one_bad_line_fails_only_its_own_request_with_a_json_500_and_a_logged_id(translator, caplog):
    engine = Engine(translator)
    engine.go.clear()  # everything queues up, then goes into one decoding call

    async def run() -> list:
        app = create_app(engine, ServeLimits(batch_window_ms=50))
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://t") as c,
        ):
            asks = [c.post("/translate", json={"text": [line], "beam": 1}) for line in SRC[:6]]
            asks.insert(3, c.post("/translate", json={"text": ["ein BAD hund"], "beam": 1}))
            asks.insert(5, c.post("/translate", json={"text": ["ein MT hund"], "beam": 1}))
            pending = asyncio.gather(*asks)
            await asyncio.sleep(0.3)
            engine.go.set()
            return await pending

    with caplog.at_level(logging.ERROR, logger="mt.serve"):
        answers = asyncio.run(run())
    codes = [r.status_code for r in answers]
    assert codes == [200, 200, 200, 500, 200, 422, 200, 200], [r.text for r in answers]
    good = [r.json()["translations"][0] for r in answers if r.status_code == 200]
    assert good == translator.translate(SRC[:6], beam=1)
    bad = answers[3].json()
    assert set(bad) == {"error", "status", "id"} and bad["id"] in bad["error"]
    assert bad["id"] in caplog.text and "a bug met a bad line" in caplog.text and "Traceback" in caplog.text
    assert "this engine cannot do that" in answers[5].json()["error"]


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


def test_a_request_whose_client_is_gone_is_dropped_before_decoding(translator):
    engine = Engine(translator)

    async def run() -> Batcher:
        batcher = Batcher(engine, ServeLimits(batch_window_ms=1))
        batcher.start()
        engine.go.clear()
        first = asyncio.ensure_future(batcher.translate([SRC[0]], 1, 1))  # decoding, held
        await asyncio.sleep(0.1)
        gone = asyncio.ensure_future(batcher.translate([SRC[1]], 1, 1))  # queued behind it
        await asyncio.sleep(0.05)
        gone.cancel()  # what app.py does when its client hangs up
        await asyncio.sleep(0.05)
        assert batcher.queued_lines == 2  # still counted until the worker drops it
        engine.go.set()
        await first
        await batcher.stop()
        return batcher

    batcher = asyncio.run(run())
    assert engine.decoded == [SRC[0]] and batcher.dropped == 1 and batcher.queued_lines == 0


def test_a_request_past_its_deadline_is_a_504_and_is_not_decoded(translator):
    engine = Engine(translator)

    async def run() -> Batcher:
        batcher = Batcher(engine, ServeLimits(batch_window_ms=1, request_timeout_s=0.2))
        batcher.start()
        engine.go.clear()
        first = asyncio.ensure_future(batcher.translate([SRC[0]], 1, 1))
        await asyncio.sleep(0.05)  # decoding, held
        with pytest.raises(Busy, match="not translated within 0.2 s") as late:
            await batcher.translate([SRC[1]], 1, 1)
        assert late.value.status == 504
        engine.go.set()
        with pytest.raises(Busy):  # the first one timed out too, while decoding
            await first
        await batcher.stop()
        return batcher

    batcher = asyncio.run(run())
    assert engine.decoded == [SRC[0]] and batcher.timeouts == 2 and batcher.queued_cost == 0


def test_shutting_down_answers_503_and_past_the_drain_deadline_pending_work_gets_503(translator):
    engine = Engine(translator)

    async def run() -> Batcher:
        batcher = Batcher(engine, ServeLimits(batch_window_ms=1, drain_timeout_s=0.3))
        batcher.start()
        engine.go.clear()
        pending = [asyncio.ensure_future(batcher.translate([line], 1, 1)) for line in SRC[:2]]
        await asyncio.sleep(0.1)
        batcher.begin_shutdown()  # SIGTERM: from now on new work is refused
        with pytest.raises(Busy, match="shutting down") as refused:
            await batcher.translate(["ein hund"], 1, 1)
        assert refused.value.status == 503
        for p in pending:  # the one decoding (held) and the one queued: both 503 at the deadline
            with pytest.raises(Busy, match="shut down before this request was translated") as dropped:
                await p
            assert dropped.value.status == 503
        await batcher.stop()
        return batcher

    batcher = asyncio.run(run())
    assert batcher.abandoned == 2 and engine.aborted and batcher.queued_lines == 0


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


def test_serving_a_model_never_imports_torch(checkpoint, tmp_path):
    from mt.cli import main

    export = tmp_path / "ct2"
    assert main(["export", "ctranslate2", "--checkpoint", str(checkpoint), "--output", str(export)]) == 0
    port = free_port()
    server = start_server(port, "--model", str(export), python=("-X", "importtime"))
    try:
        status, body = post(port, "/translate", {"text": SRC[:2], "beam": 1})
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
    server = start_server(port, "--checkpoint", str(checkpoint), "--drain-timeout-s", "0.2")
    # 6 requests of 64 over-long lines at beam 16: seconds of work for the tiny model.
    heavy = {"text": ["ein hund läuft im park mit einem ball " * 40] * 64, "beam": 16}
    with ThreadPoolExecutor(6) as pool:
        asks = [pool.submit(post, port, "/translate", heavy) for _ in range(6)]
        deadline = time.time() + 30
        while (
            json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health").read())["queued_lines"] < 384
        ):
            assert time.time() < deadline
            time.sleep(0.02)
        server.send_signal(signal.SIGTERM)
        answers = [a.result() for a in asks]
    _, err = server.communicate(timeout=60)
    dropped = [body for status, body in answers if status == 503]
    assert len(dropped) >= 4 and {status for status, _ in answers} <= {200, 503}, answers
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
            engine.translate_nbest(SRC[:3], 2, 2),
            translator.translate_nbest(SRC[:3], beam=2, nbest=2),
        )
        assert [[t for t, _ in hs] for hs in got] == [[t for t, _ in hs] for hs in want]
        assert [s for hs in got for _, s in hs] == pytest.approx([s for hs in want for _, s in hs], abs=1e-5)
        os.kill(engine.process.pid, signal.SIGKILL)  # as the kernel's OOM killer would
        engine.process.join(10)
        assert [hs[0][0] for hs in engine.translate_nbest(SRC[:3], 1, 1)] == translator.translate(
            SRC[:3], beam=1
        )
        assert engine.restarts == 1
        with pytest.raises(MTError, match="nothing to translate"):
            engine.attention_body("   ", 1, None, None)  # an MTError in the child is one here
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
