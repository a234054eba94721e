"""`mt serve`: translations over HTTP, and a page that shows what the model attends to.

This module holds the serving machinery (limits, the engines that decode, the batcher);
mt/serve/app.py the HTTP side (the app, its guards, the server); mt/serve/decoder_process.py the decoder
process that runs a checkpoint.

    mt serve --checkpoint runs/multi30k_de_en/checkpoint_best.pt [--host 127.0.0.1] [--port 8000]
    mt serve --model exports/de-en-int8 [--compute-type int8]

An ASGI app (FastAPI, served by uvicorn):

    POST /translate  {"text": "..." | ["...", ...], "beam": 5, "nbest": 1}
                     -> {"translations": ["...", ...]}            (nbest 1)
                     -> {"translations": [[{"text", "score"}, ...], ...]}   (nbest > 1)
    POST /attention  {"text": "...", "beam": 5, "layer": "mean" | L, "head": "mean" | H}
                     -> the translation, its subword pieces, the cross-attention weights of the
                     chosen layer and head (or their mean; 3 decimals), and the word alignment:
                     at most max_attention_tokens source pieces, and as many target pieces as
                     decode.max_len_a/b allow for them (a few hundred KB of JSON at most)
    GET  /health     {"status": "ok", ...};   GET /openapi.json;   GET / the page (no external assets)

Decoding runs outside the event loop's GIL: a checkpoint in a decoder process of its own, a
CTranslate2 export in a thread (CTranslate2 releases the GIL). While one call decodes, the
event loop keeps reading requests, so the next call takes all that arrived meanwhile (up to
`max_batch_lines`): the batch grows with the load. Every sentence is decoded on its own, so
a line's translation does not depend on the lines it was batched with: the output equals
`mt translate`'s. A call that fails is retried request by request, so one bad line fails
only its own request.

Errors are JSON, `{"error": message, "status": code}` (a 500 adds an `id`, logged with its
traceback). Limits: a body over `max_body_bytes` (413, from Content-Length before reading,
or from the bytes read); more than `max_lines` lines or a line over `max_chars` characters
(413); an /attention source over `max_attention_tokens` tokens (413); bad JSON, NaN or bad
UTF-8 (400); a value of the wrong type, out of range, or an unknown key (422); more than
`max_queued_lines` lines or `max_queued_cost` work (source tokens x beam) waiting (429); no
answer within `request_timeout_s` (504); shutting down (503). A request whose client hung up
is dropped before it is decoded. Ctrl-C or SIGTERM stops accepting connections and finishes
what is in flight; what is not done `drain_timeout_s` later is answered 503, and the command
then exits non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from mt.config import Config, DecodeConfig
from mt.data.tokenizer import Tokenizer
from mt.errors import MTError

if TYPE_CHECKING:  # torch is imported when a model is loaded, not when the CLI parses options
    from mt.translate.lines import TextTranslator

log = logging.getLogger("mt.serve")


@dataclass
class ServeLimits:
    """What one server accepts; every default in one place (the CLI options mirror these)."""

    # Each field's `help` is its --option's (mt/commands/serve.py).
    max_lines: int = field(default=64, metadata={"help": "lines per request (413)"})
    max_chars: int = field(default=2000, metadata={"help": "characters per line (413)"})
    max_attention_tokens: int = field(
        default=256, metadata={"help": "source tokens of an /attention request (413)"}
    )
    max_body_bytes: int = field(
        default=1_000_000, metadata={"help": "a request's body, checked while read (413)"}
    )
    max_queued_lines: int = field(default=1024, metadata={"help": "lines waiting, over all requests (429)"})
    max_queued_cost: int = field(
        default=400_000,
        metadata={"help": "work waiting: (source tokens + 1) x beam, over all requests (429)"},
    )
    max_beam: int = field(default=16, metadata={"help": "the largest beam a request may ask for (422)"})
    batch_window_ms: float = field(
        default=5.0, metadata={"help": "how long a lone request waits for company"}
    )
    max_batch_lines: int = field(default=256, metadata={"help": "lines per decoding call"})
    request_timeout_s: float = field(default=120.0, metadata={"help": "to answer a request (504)"})
    limit_concurrency: int = field(default=256, metadata={"help": "open connections; more get a 503 at once"})
    header_timeout_s: float = field(default=10.0, metadata={"help": "for a client to send its headers (408)"})
    body_timeout_s: float = field(default=30.0, metadata={"help": "for a client to send its body (408)"})
    drain_timeout_s: float = field(
        default=30.0,
        metadata={"help": "on Ctrl-C or SIGTERM, to finish what is pending; the rest gets a 503"},
    )


class RequestError(Exception):
    """A request answered with an error of its own: `status` and a message naming the cause."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Busy(RequestError):
    """A request refused or abandoned by the batcher: 429 (queue full), 503 (shutting down),
    504 (past its deadline), 413 (more work than the queue holds)."""


class DecoderFailure(Exception):
    """An unexpected error while decoding; `trace` is its traceback (from the decoder process
    when there is one), logged with the id of the 500 that answers it."""

    def __init__(self, message: str, trace: str = "") -> None:
        super().__init__(message)
        self.trace = trace


# --------------------------------------------------------------------------- engines


class Engine(Protocol):
    """What decodes for the batcher: its calls run on the batcher's one worker thread."""

    config: Config
    tokenizer: Tokenizer
    device: str
    attention: bool  # whether it can answer /attention (a checkpoint can; an export cannot)

    def translate_nbest(
        self, lines: Sequence[str], decode: DecodeConfig
    ) -> list[list[tuple[str, float]]]: ...

    def attention_body(
        self, text: str, decode: DecodeConfig, layer: int | None, head: int | None
    ) -> bytes: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


def attention_body(
    translator: Any, text: str, decode: DecodeConfig, layer: int | None, head: int | None
) -> bytes:
    """The JSON body of /attention: `translator`'s translation of `text`, its pieces, the cross-
    attention weights of one layer and head (None: their mean) with 3 decimals, and the word
    alignment. Built where the model runs (never on the event loop): it is the large part."""
    from mt.translate.alignment import translate_and_attend

    ((translation, attn),) = translate_and_attend(translator, [text], decode)
    if attn is None:  # a blank line: app.py refuses those before they are queued
        raise MTError("text: nothing to translate")
    w = attn.weights
    w = w.mean(0) if layer is None else w[layer]
    w = w.mean(0) if head is None else w[head]
    layers, heads = attn.weights.shape[:2]
    body = {
        "translation": translation,
        "src_pieces": attn.src_pieces,
        "tgt_pieces": attn.tgt_pieces,
        "layers": int(layers),
        "heads": int(heads),
        "layer": "mean" if layer is None else layer,
        "head": "mean" if head is None else head,
        "weights": [[round(x, 3) for x in row] for row in w.tolist()],
        "alignment": [list(p) for p in attn.pairs],
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class LocalEngine:
    """A translator in this process: a CTranslate2 export (which releases the GIL while it
    decodes), or a checkpoint (tests, and `--decoder thread`)."""

    def __init__(self, translator: TextTranslator) -> None:
        from mt.export.ct2_translator import CT2Translator

        self.translator = translator
        self.config: Config = translator.config
        self.tokenizer: Tokenizer = translator.tokenizer
        self.device = str(getattr(translator, "device", "ctranslate2"))
        if isinstance(translator, CT2Translator):
            self.device = f"ctranslate2 {translator.model.device} ({translator.model.compute_type})"
        self.attention = not isinstance(translator, CT2Translator)

    def translate_nbest(self, lines: Sequence[str], decode: DecodeConfig) -> list[list[tuple[str, float]]]:
        return self.translator.translate_nbest(lines, decode=decode)

    def attention_body(self, text: str, decode: DecodeConfig, layer: int | None, head: int | None) -> bytes:
        return attention_body(self.translator, text, decode, layer, head)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass  # a call in a thread cannot be stopped: it finishes, and its answer is dropped


def as_engine(engine: Engine | TextTranslator) -> Engine:
    """An Engine, or a translator wrapped as one (run in this process)."""
    return engine if hasattr(engine, "attention_body") else LocalEngine(engine)  # type: ignore[return-value]


# --------------------------------------------------------------------------- the batcher


@dataclass(eq=False)
class _Job:
    lines: list[str]
    decode: DecodeConfig  # resolved (mt.config.resolve_decoding)
    cost: int
    future: asyncio.Future = field(repr=False)
    attention: tuple[int | None, int | None] | None = None  # (layer, head) of an /attention job
    gone: bool = False  # its client hung up or its deadline passed: not worth decoding


class Batcher:
    """Collects concurrent requests into decoding calls on one worker thread."""

    def __init__(self, engine: Engine | TextTranslator, limits: ServeLimits) -> None:
        self.engine, self.limits = as_engine(engine), limits
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.pending: set[_Job] = set()  # queued or decoding, until answered
        self.queued_lines = 0
        self.queued_cost = 0
        self.calls = 0  # decoding calls made: fewer than requests when batching works
        self.lines = 0  # lines decoded: lines / calls is the mean batch
        self.dropped = 0  # requests whose client hung up (or deadline passed) before decoding
        self.timeouts = 0  # requests answered 504
        self.abandoned = 0  # requests answered 503 at the drain deadline
        self.closing = False
        self._task: asyncio.Task | None = None
        self._drained = asyncio.Event()
        # One thread decodes, for /translate and /attention alike: one model, one search at a time.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="mt-decode")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def cost(self, lines: Sequence[str], beam: int) -> int:
        """The work of `lines` at `beam`: (source tokens + EOS) x beam, summed."""
        cap = self.engine.config.model.max_positions
        ids = self.engine.tokenizer.encode_src([line.strip() for line in lines])
        return sum(min(len(s) + 1, cap) * beam for s in ids)

    # ------------------------------------------------------------------ submitting

    async def translate(
        self, lines: list[str], decode: DecodeConfig, cost: int | None = None
    ) -> list[list[tuple[str, float]]]:
        """The decode.nbest (text, score) pairs of each line, with a resolved `decode`; Busy when
        refused or abandoned."""
        return await self._submit(lines, decode, cost, None)

    async def attention(
        self, text: str, decode: DecodeConfig, layer: int | None, head: int | None, cost: int | None = None
    ) -> bytes:
        """The JSON body of /attention (see `attention_body`), with a resolved `decode`."""
        return await self._submit([text], decode, cost, (layer, head))

    async def _submit(
        self,
        lines: list[str],
        decode: DecodeConfig,
        cost: int | None,
        attention: tuple[int | None, int | None] | None,
    ) -> Any:
        if self.closing:
            raise Busy(503, "the server is shutting down")
        if cost is None:
            cost = self.cost(lines, decode.beam)
        limit = self.limits.max_queued_cost
        if cost > limit:
            raise Busy(413, f"this request is {cost} units of work (source tokens x beam); at most {limit}")
        if self.queued_lines + len(lines) > self.limits.max_queued_lines:
            raise Busy(429, f"too much work queued ({self.queued_lines} lines); retry shortly")
        if self.queued_cost + cost > limit:
            raise Busy(429, f"too much work queued ({self.queued_cost} units); retry shortly")
        job = _Job(lines, decode, cost, asyncio.get_running_loop().create_future(), attention)
        self.queued_lines += len(lines)
        self.queued_cost += cost
        self.pending.add(job)
        self.queue.put_nowait(job)
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.limits.request_timeout_s)
        except TimeoutError:
            job.gone = True
            self.timeouts += 1
            raise Busy(
                504, f"not translated within {self.limits.request_timeout_s:g} s; retry later"
            ) from None
        except asyncio.CancelledError:  # the client hung up (app.py cancels its request)
            job.gone = True
            raise

    def _finish(self, job: _Job, result: Any = None, error: BaseException | None = None) -> None:
        if job not in self.pending:
            return
        self.pending.discard(job)
        self.queued_lines -= len(job.lines)
        self.queued_cost -= job.cost
        if job.gone:  # nobody waits for the answer (and an unread exception would be logged)
            job.future.cancel()
        elif not job.future.done():
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
        if self.closing and not self.pending:
            self._drained.set()

    # ------------------------------------------------------------------ decoding

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            deadline = loop.time() + self.limits.batch_window_ms / 1000
            size = len(jobs[0].lines)
            while size < self.limits.max_batch_lines:
                if self.queue.empty():  # wait for company only while nothing is decoding anyway
                    if (left := deadline - loop.time()) <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(self.queue.get(), left)
                    except TimeoutError:
                        break
                else:
                    job = self.queue.get_nowait()
                jobs.append(job)
                size += len(job.lines)
            live = []
            for job in jobs:
                if job.gone and job in self.pending:  # hung up or timed out: not decoded
                    self.dropped += 1
                    self._finish(job)
                elif job in self.pending:  # (not: abandoned at the drain deadline)
                    live.append(job)
            groups: dict[tuple, list[_Job]] = {}
            for job in live:
                if job.attention is not None:
                    await self._decode_group([job])
                else:  # one call per decoding setting (beam, nbest): a search's, not a line's
                    groups.setdefault(astuple(job.decode), []).append(job)
            for group in groups.values():
                await self._decode_group(group)

    async def _decode_group(self, group: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        job = group[0]
        try:
            self.calls += 1
            self.lines += sum(len(j.lines) for j in group)
            # Per job: its attention page's body, or per line its nbest (translation, score) pairs.
            out: list[bytes | list[list[tuple[str, float]]]]
            if job.attention is not None:
                out = [
                    await loop.run_in_executor(
                        self.executor, self.engine.attention_body, job.lines[0], job.decode, *job.attention
                    )
                ]
            else:
                lines = [line for j in group for line in j.lines]
                flat = await loop.run_in_executor(
                    self.executor, self.engine.translate_nbest, lines, job.decode
                )
                out, start = [], 0
                for j in group:
                    out.append(flat[start : start + len(j.lines)])
                    start += len(j.lines)
        except Exception as e:
            if len(group) > 1 and not self.closing:
                # Which request broke it? Each alone: only that one fails.
                for j in group:
                    if j in self.pending:
                        await self._decode_group([j])
                return
            for j in group:
                self._finish(j, error=e)
        else:
            for j, result in zip(group, out, strict=True):
                self._finish(j, result)

    # ------------------------------------------------------------------ stopping

    def begin_shutdown(self) -> None:
        """Refuse new work; what is pending has `drain_timeout_s` to finish, then is answered 503
        (and a decoder process is stopped). Called when the server is asked to stop."""
        if self.closing:
            return
        self.closing = True
        if not self.pending:
            self._drained.set()
        asyncio.get_running_loop().call_later(self.limits.drain_timeout_s, self._abandon)

    def _abandon(self) -> None:
        if not self.pending:
            return
        log.error(
            "drain deadline (%g s) passed: answering %d request(s) 503",
            self.limits.drain_timeout_s,
            len(self.pending),
        )
        for job in list(self.pending):
            self.abandoned += 1
            self._finish(job, error=Busy(503, "the server shut down before this request was translated"))
        self.engine.abort()

    async def stop(self) -> None:
        """Refuse new work, finish (or abandon, past the drain deadline) what is pending, then
        stop the worker."""
        self.begin_shutdown()
        await self._drained.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.executor.shutdown(wait=not self.abandoned, cancel_futures=True)
        self.engine.close()
