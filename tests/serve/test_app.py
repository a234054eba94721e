"""`mt serve`'s HTTP API through a test client: translations, errors of one JSON shape, limits."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers import SERVE_LIMITS, SERVE_SRC, SwitchEngine

from mt.config import resolve_decoding
from mt.serve.app import create_app
from mt.serve.batcher import Batcher, Busy, ServeLimits


@pytest.fixture
def client(translator):
    with TestClient(create_app(translator, SERVE_LIMITS)) as c:
        yield c


# --------------------------------------------------------------------------- the API


def test_translations_come_back_in_order_equal_to_mt_translate(client, translator):
    lines = [SERVE_SRC[0], "", SERVE_SRC[1], SERVE_SRC[2]]
    r = client.post("/translate", json={"text": lines, "beam": 2})
    assert r.status_code == 200, r.text
    assert r.json() == {"translations": translator.translate(lines, beam=2)}
    r = client.post("/translate", json={"text": SERVE_SRC[3]})  # one string, the model's beam
    assert r.json() == {"translations": translator.translate([SERVE_SRC[3]])}


def test_nbest_gives_scored_hypotheses_best_first(client, translator):
    r = client.post("/translate", json={"text": SERVE_SRC[:2], "beam": 3, "nbest": 3})
    assert r.status_code == 200, r.text
    got = r.json()["translations"]
    assert [[h["text"] for h in hs] for hs in got] == [
        [t for t, _ in hs] for hs in translator.translate_nbest(SERVE_SRC[:2], beam=3, nbest=3)
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

    ((text, attn),) = translate_and_attend(
        translator, [SERVE_SRC[0]], resolve_decoding(translator.config.decode, 2)
    )
    for layer, head in (("mean", "mean"), (0, 1), (0, "mean")):
        r = client.post("/attention", json={"text": SERVE_SRC[0], "beam": 2, "layer": layer, "head": head})
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
    r = client.post("/attention", json={"text": SERVE_SRC[0], "layer": 1})
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
    engine = SwitchEngine(translator)

    async def run() -> None:
        batcher = Batcher(engine, ServeLimits(max_queued_cost=40, batch_window_ms=1))
        batcher.start()
        engine.go.clear()
        held = asyncio.ensure_future(
            batcher.translate(["ein hund"], resolve_decoding(translator.config.decode, 2, 1))
        )  # decoding, held
        await asyncio.sleep(0.05)
        # The longest line that fits alone, which does not fit beside the first.
        words = max(n for n in range(1, 40) if batcher.cost(["ein " * n], 2) <= 40)
        assert batcher.queued_cost + batcher.cost(["ein " * words], 2) > 40
        for ask in (
            batcher.translate(["ein " * words], resolve_decoding(translator.config.decode, 2, 1)),
            batcher.attention("ein " * words, resolve_decoding(translator.config.decode, 2), None, None),
        ):
            with pytest.raises(Busy, match=r"too much work queued \(\d+ units\)") as full:
                await ask
            assert full.value.status == 429
        engine.go.set()
        await held
        assert await batcher.translate(
            ["ein " * words], resolve_decoding(translator.config.decode, 2, 1)
        )  # room again
        await batcher.stop()

    asyncio.run(run())


def test_one_bad_line_fails_only_its_own_request_with_a_json_500_and_a_logged_id(translator, caplog):
    engine = SwitchEngine(translator)
    engine.go.clear()  # everything queues up, then goes into one decoding call

    async def run() -> list:
        app = create_app(engine, ServeLimits(batch_window_ms=50))
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://t") as c,
        ):
            asks = [c.post("/translate", json={"text": [line], "beam": 1}) for line in SERVE_SRC[:6]]
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
    assert good == translator.translate(SERVE_SRC[:6], beam=1)
    bad = answers[3].json()
    assert set(bad) == {"error", "status", "id"} and bad["id"] in bad["error"]
    assert bad["id"] in caplog.text and "a bug met a bad line" in caplog.text and "Traceback" in caplog.text
    assert "this engine cannot do that" in answers[5].json()["error"]
