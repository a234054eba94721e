"""The HTTP side of `mt serve` (FastAPI on uvicorn): the endpoints, their errors, the guards
that keep one client from hurting the others, the page, and the server.

See mt/serve/batcher.py for what each endpoint does, the limits and the batching. Here:

* `Guard`, an ASGI middleware, reads each body itself: over `max_body_bytes` it answers 413
  before parsing (at once from Content-Length, else as soon as the bytes read pass it), and
  408 past `body_timeout_s`. It then watches the connection: a client that hangs up has its
  request cancelled, so its work is dropped before it is decoded. Anything unexpected becomes
  a JSON 500 whose id is logged with the traceback. An answer the client does not read within
  `body_timeout_s` is abandoned (uvicorn then closes the connection).
* `guarded_protocol`: uvicorn's h11 protocol that answers a JSON 503 to connections past
  `limit_concurrency`, closes a connection whose request headers have not arrived
  `header_timeout_s` after it opened (or after its previous answer) with a JSON 408, and
  answers a malformed request (or headers over h11's 16 KB) with a JSON 400.
* Bodies are parsed strictly: JSON without NaN or Infinity, values of exactly the declared
  types (no "5" for 5, no true for 1), no unknown keys.

A reverse proxy (nginx, Caddy) belongs in front of any bind other than loopback: TLS,
per-client rate limits and slow-client buffering are its job, not this server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from importlib import resources
from types import FrameType
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from mt.config import resolve_decoding
from mt.errors import MTError
from mt.serve.batcher import Batcher, DecoderFailure, Engine, RequestError, ServeLimits, as_engine

PAGE = "page.html"
log = logging.getLogger("mt.serve")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TranslateRequest(_Strict):
    text: str | list[str] = Field(description="one line, or a list of lines")
    beam: int | None = Field(None, ge=1, description="1 = greedy; default: the model's decode.beam")
    nbest: int = Field(1, ge=1, description="hypotheses per line, with scores when > 1")


class AttentionRequest(_Strict):
    text: str = Field(description="one line")
    beam: int | None = Field(None, ge=1)
    layer: int | Literal["mean"] = Field("mean", description="decoder layer from 0, or the mean")
    head: int | Literal["mean"] = Field("mean", description="head from 0, or the mean")


M = TypeVar("M", bound=BaseModel)


def error_body(status: int, message: str, **extra: Any) -> dict[str, Any]:
    """The one shape of every error: {"error": message, "status": status, ...}."""
    return {"error": message, "status": status, **extra}


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(error_body(status, message, **extra), status_code=status)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _where(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as a key path: ('text', 'list[str]', 3) -> text[3]."""
    out = str(loc[0]) if loc else "body"
    for part in loc[1:]:
        if isinstance(part, int):
            out += f"[{part}]"
    return out


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_body(body: bytes, model: type[M]) -> M:
    """`body` as a `model`, or a RequestError naming the first thing wrong."""
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise RequestError(400, f"body: not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RequestError(400, f"body: not JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    except ValueError as e:  # NaN, Infinity
        raise RequestError(400, f"body: not JSON ({e})") from None
    except RecursionError:
        raise RequestError(400, "body: nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError(422, 'body: expected a JSON object such as {"text": "..."}')
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        field_errors = [x for x in errors if x["loc"] and x["loc"][0] == errors[0]["loc"][0]]
        first = max(field_errors, key=lambda x: len(x["loc"]))  # in a union, the branch that got furthest
        where = _where(first["loc"])
        if first["type"] == "extra_forbidden":
            raise RequestError(
                422, f"{where}: unknown key (expected {', '.join(model.model_fields)})"
            ) from None
        if first["type"] == "missing":
            raise RequestError(422, f"{where}: required") from None
        field = model.model_fields.get(str(first["loc"][0]))
        wanted = (
            f" (expected {field.description})"
            if field and field.description and len(first["loc"]) > 1
            else ""
        )
        message = first["msg"][0].lower() + first["msg"][1:]
        raise RequestError(422, f"{where}: {message}{wanted}, got {_shown(first['input'])}") from None


# --------------------------------------------------------------------------- the guard


async def send_json(send: Callable, status: int, body: dict[str, Any], close: bool = False) -> None:
    """An ASGI JSON answer; `close` asks the server to close the connection after it (a body
    that was not read cannot be followed by another request)."""
    data = json.dumps(body).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})


class SlowReader(Exception):
    """The client did not take its answer within body_timeout_s."""


class Guard:
    """Bounded bodies, dropped hang-ups and JSON 500s (see the module docstring)."""

    def __init__(self, app: Callable, limits: ServeLimits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = await self._read_body(scope, receive, send)
        if body is None:
            return
        started = False
        gone = asyncio.Event()
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            try:  # a client that does not read its answer would hold its connection forever
                await asyncio.wait_for(send(message), self.limits.body_timeout_s)
            except TimeoutError:
                raise SlowReader from None

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        task = asyncio.ensure_future(self.app(scope, replay, tracked))
        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():  # the client hung up first: its request is dropped
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return
            error = task.exception()
        except BaseException:
            task.cancel()
            raise
        finally:
            watcher.cancel()
        if isinstance(error, SlowReader):  # uvicorn closes a connection left mid-answer
            log.warning(
                "a client did not read its answer to %s within %g s",
                scope["path"],
                self.limits.body_timeout_s,
            )
        elif error is not None:
            await self._unexpected(scope, error, tracked if not started else None)

    async def _read_body(self, scope: dict, receive: Callable, send: Callable) -> bytes | None:
        """The whole body, or None once an error is answered (or the client is gone)."""
        limit = self.limits.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await send_json(send, 400, error_body(400, "Content-Length: not a number"), close=True)
                return None
            if int(declared) > limit:
                message = f"body: {int(declared)} bytes (Content-Length); at most {limit}"
                await send_json(send, 413, error_body(413, message), close=True)
                return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout_s
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                text = f"body: not received within {self.limits.body_timeout_s:g} s"
                await send_json(send, 408, error_body(408, text), close=True)
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await send_json(send, 413, error_body(413, f"body: more than {limit} bytes"), close=True)
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _unexpected(self, scope: dict, error: BaseException, send: Callable | None) -> None:
        """Log a failure with an id and its traceback; answer a JSON 500 naming the id."""
        ident = uuid.uuid4().hex[:12]
        trace = f"\n-- in the decoder process:\n{error.trace}" if isinstance(error, DecoderFailure) else ""
        log.error(
            "error %s in %s %s: %s%s",
            ident,
            scope["method"],
            scope["path"],
            error,
            trace,
            exc_info=(type(error), error, error.__traceback__),
        )
        if send is not None:
            body = error_body(500, f"internal error {ident} (logged by the server)", id=ident)
            await send_json(send, 500, body)


def guarded_protocol(limits: ServeLimits) -> type:
    """uvicorn's h11 protocol with a cap on connections and a header timeout (JSON answers)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    def raw(status: int, message: str) -> bytes:
        data = json.dumps(error_body(status, message)).encode("utf-8")
        head = (
            f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\nconnection: close\r\n\r\n"
        )
        return head.encode("ascii") + data

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > limits.limit_concurrency:
                log.warning("refused a connection: %d open (--limit-concurrency)", len(self.connections) - 1)
                transport.write(
                    raw(503, f"too many connections (at most {limits.limit_concurrency}); retry shortly")
                )
                transport.close()
                return
            self._arm(None)

        def send_400_response(self, msg: str) -> None:
            # uvicorn's is plain text: a malformed request, or headers over h11's 16 KB.
            self.transport.write(raw(400, f"not a valid HTTP request ({msg.rstrip('.')})"))
            self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm(self.cycle)

        def _arm(self, cycle: Any) -> None:
            self.loop.call_later(limits.header_timeout_s, self._headers_late, cycle)

        def _headers_late(self, cycle: Any) -> None:
            # No new request since the timer was set, and its headers are not all in.
            if (
                self.transport.is_closing()
                or self.cycle is not cycle
                or self.conn.their_state is not h11.IDLE
            ):
                return
            text = f"request headers not received within {limits.header_timeout_s:g} s"
            self.transport.write(raw(408, text))
            self.transport.close()

    return GuardedH11Protocol


# --------------------------------------------------------------------------- the app


def create_app(engine: Engine | Any, limits: ServeLimits | None = None) -> FastAPI:
    """The ASGI app for `engine` (a mt.serve.batcher Engine, or a translator, run in this process)."""
    limits = limits or ServeLimits()
    engine = as_engine(engine)
    config = engine.config
    decoder_layers = config.model.decoder_layers or config.model.layers

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = Batcher(engine, limits)
        batcher.start()
        app.state.batcher = batcher
        app.state.loop = asyncio.get_running_loop()
        yield
        await batcher.stop()

    app = FastAPI(title="mt serve", description=__doc__.split("\n\n")[0], lifespan=lifespan)
    app.state.batcher = None
    app.add_middleware(Guard, limits=limits)

    def check_lines(lines: list[str]) -> None:
        if not lines:
            raise RequestError(422, "text: give at least one line")
        if len(lines) > limits.max_lines:
            raise RequestError(413, f"text: {len(lines)} lines; at most {limits.max_lines} per request")
        for n, line in enumerate(lines, 1):
            if len(line) > limits.max_chars:
                raise RequestError(
                    413, f"text: line {n} has {len(line)} characters; at most {limits.max_chars}"
                )
            if "\n" in line or "\r" in line:
                raise RequestError(422, f"text: line {n} contains a line break; send a list of lines")
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as e:
                raise RequestError(
                    422,
                    f"text: line {n} is not valid Unicode (U+{ord(line[e.start]):04X} at character "
                    f"{e.start + 1}: a lone surrogate)",
                ) from None

    def check_beam(beam: int | None) -> int:
        beam = min(config.decode.beam, limits.max_beam) if beam is None else beam
        if beam > limits.max_beam:
            raise RequestError(422, f"beam {beam}: at most {limits.max_beam}")
        return beam

    def body_schema(model: type[BaseModel]) -> dict[str, Any]:
        schema = {"schema": model.model_json_schema()}
        return {"requestBody": {"required": True, "content": {"application/json": schema}}}

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(MTError)
    async def mt_error(request: Request, exc: MTError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        return _error(422, f"{_where(tuple(first['loc']))}: {first['msg']}")

    @app.post("/translate", openapi_extra=body_schema(TranslateRequest))
    async def translate(request: Request) -> Any:
        body = await request.body()
        req = parse_body(body, TranslateRequest)
        lines = [req.text] if isinstance(req.text, str) else req.text
        check_lines(lines)
        decode = resolve_decoding(config.decode, check_beam(req.beam), req.nbest)  # MTError: 422
        out = await app.state.batcher.translate(lines, decode)
        if req.nbest == 1:
            return {"translations": [hyps[0][0] for hyps in out]}
        return {"translations": [[{"text": t, "score": s} for t, s in hyps] for hyps in out]}

    @app.post("/attention", openapi_extra=body_schema(AttentionRequest))
    async def attention(request: Request) -> Response:
        if not engine.attention:
            raise RequestError(422, "attention needs a checkpoint: serve with --checkpoint, not --model")
        req = parse_body(await request.body(), AttentionRequest)
        check_lines([req.text])
        if not req.text.strip():
            raise RequestError(422, "text: nothing to translate")
        decode = resolve_decoding(config.decode, check_beam(req.beam))
        picked = []
        for name, value, count in (
            ("layer", req.layer, decoder_layers),
            ("head", req.head, config.model.heads),
        ):
            if value != "mean" and not 0 <= value < count:
                raise RequestError(
                    422, f'{name} {value}: the model has {count} (0 to {count - 1}, or "mean")'
                )
            picked.append(None if value == "mean" else value)
        tokens = len(engine.tokenizer.encode_src([req.text.strip()])[0])
        if tokens > limits.max_attention_tokens:
            raise RequestError(
                413, f"text: {tokens} source tokens; /attention takes at most {limits.max_attention_tokens}"
            )
        cost = (min(tokens, config.model.max_positions - 1) + 1) * decode.beam
        body = await app.state.batcher.attention(req.text, decode, *picked, cost=cost)
        return Response(body, media_type="application/json")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        batcher: Batcher | None = app.state.batcher
        return {
            "status": "ok" if batcher is not None and not batcher.closing else "shutting down",
            "model": config.name,
            "device": engine.device,
            "queued_lines": batcher.queued_lines if batcher else 0,
            "queued_cost": batcher.queued_cost if batcher else 0,
            "decoding_calls": batcher.calls if batcher else 0,
            "lines_decoded": batcher.lines if batcher else 0,
            "dropped": batcher.dropped if batcher else 0,
            "timeouts": batcher.timeouts if batcher else 0,
            "time": time.time(),
        }

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("mt.serve").joinpath(PAGE).read_text(encoding="utf-8")

    return app


# --------------------------------------------------------------------------- the server


def serve(engine: Engine | Any, host: str, port: int, limits: ServeLimits | None = None) -> int:
    """Run the app until Ctrl-C or SIGTERM: the server stops accepting connections, finishes
    what is pending within `drain_timeout_s` and answers the rest 503. Returns how many
    requests were answered 503 at that deadline (0: everything was finished)."""
    import uvicorn

    limits = limits or ServeLimits()
    app = create_app(engine, limits)
    if not log.handlers:  # errors with their ids, in the style of uvicorn's own lines
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:    mt serve: %(message)s"))
        log.addHandler(handler)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # uvicorn's, less re-raising the signal once it has stopped: the exit status is ours.
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            batcher = app.state.batcher
            if batcher is not None:  # 503s from now on; the drain deadline starts
                app.state.loop.call_soon_threadsafe(batcher.begin_shutdown)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        http=guarded_protocol(limits),
        timeout_graceful_shutdown=int(limits.drain_timeout_s) + 10,
    )
    Server(config).run()
    batcher = app.state.batcher
    return batcher.abandoned if batcher is not None else 0
