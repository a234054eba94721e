"""The HTTP app of `mt serve` (FastAPI): the endpoints, their errors, and the page.

See mt/serve.py for what each endpoint does, the limits and the batching.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field

from mt.lines import TextTranslator
from mt.serve import Batcher, Busy, ServeLimits
from mt.translator import Translator

PAGE = "serve_page.html"


class TranslateRequest(BaseModel):
    text: str | list[str] = Field(description="one line, or a list of lines")
    beam: int | None = Field(None, ge=1, description="1 = greedy; default: the model's decode.beam")
    nbest: int = Field(1, ge=1, description="hypotheses per line, with scores when > 1")


class AttentionRequest(BaseModel):
    text: str
    beam: int | None = Field(None, ge=1)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(translator: TextTranslator, limits: ServeLimits | None = None) -> FastAPI:
    """The ASGI app for `translator`."""
    limits = limits or ServeLimits()
    state: dict[str, Batcher] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = Batcher(translator, limits)
        batcher.start()
        state["batcher"] = batcher
        yield
        await batcher.stop()

    app = FastAPI(title="mt serve", description=__doc__.split("\n\n")[0], lifespan=lifespan)

    def check_lines(lines: list[str]) -> JSONResponse | None:
        if not lines:
            return _error(422, "text: give at least one line")
        if len(lines) > limits.max_lines:
            return _error(413, f"text: {len(lines)} lines; at most {limits.max_lines} per request")
        for n, line in enumerate(lines, 1):
            if len(line) > limits.max_chars:
                return _error(413, f"text: line {n} has {len(line)} characters; at most {limits.max_chars}")
            if "\n" in line or "\r" in line:
                return _error(422, f"text: line {n} contains a line break; send a list of lines")
        return None

    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Busy) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.post("/translate")
    async def translate(req: TranslateRequest) -> Any:
        lines = [req.text] if isinstance(req.text, str) else req.text
        if (problem := check_lines(lines)) is not None:
            return problem
        beam = req.beam if req.beam is not None else translator.config.decode.beam
        if beam > limits.max_beam:
            return _error(422, f"beam {beam}: at most {limits.max_beam}")
        if req.nbest > beam:
            return _error(422, f"nbest ({req.nbest}) cannot exceed beam ({beam})")
        out = await state["batcher"].translate(lines, beam, req.nbest)
        if req.nbest == 1:
            return {"translations": [hyps[0][0] for hyps in out]}
        return {"translations": [[{"text": t, "score": s} for t, s in hyps] for hyps in out]}

    @app.post("/attention")
    async def attention(req: AttentionRequest) -> Any:
        from mt.alignment import translate_and_attend

        if not isinstance(translator, Translator):
            return _error(422, "attention needs a checkpoint: serve with --checkpoint, not --model")
        if (problem := check_lines([req.text])) is not None:
            return problem
        if not req.text.strip():
            return _error(422, "text: nothing to translate")
        if req.beam is not None and req.beam > limits.max_beam:
            return _error(422, f"beam {req.beam}: at most {limits.max_beam}")
        batcher = state["batcher"]
        if batcher.closing:
            raise Busy(503, "the server is shutting down")
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(batcher.executor, translate_and_attend, translator, [req.text], req.beam)
        text, attn = (await done)[0]
        assert attn is not None
        return {
            "translation": text,
            "src_pieces": attn.src_pieces,
            "tgt_pieces": attn.tgt_pieces,
            "weights": [[[[round(w, 4) for w in row] for row in head] for head in layer]
                        for layer in attn.weights.tolist()],
            "alignment": [list(p) for p in attn.pairs],
        }

    @app.get("/health")
    async def health() -> dict[str, Any]:
        batcher = state.get("batcher")
        return {
            "status": "ok" if batcher is not None and not batcher.closing else "shutting down",
            "model": translator.config.name,
            "device": str(getattr(translator, "device", "ctranslate2")),
            "queued_lines": batcher.queued_lines if batcher else 0,
            "decoding_calls": batcher.calls if batcher else 0,
            "lines_decoded": batcher.lines if batcher else 0,
            "time": time.time(),
        }

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("mt").joinpath(PAGE).read_text(encoding="utf-8")

    return app


def serve(translator: TextTranslator, host: str, port: int, limits: ServeLimits | None = None) -> None:
    """Run the app until Ctrl-C or SIGTERM; what is in flight is finished first."""
    import uvicorn

    # One worker process: the model is loaded once; the Batcher keeps its one thread busy.
    app = create_app(translator, limits)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)
