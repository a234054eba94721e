"""`mt serve`: translations over HTTP, and a page that shows what the model attends to.

This module holds the serving machinery (limits, the batcher); mt/app.py the HTTP app.

    mt serve --checkpoint runs/multi30k_de_en/checkpoint_best.pt [--host 127.0.0.1] [--port 8000]

An ASGI app (FastAPI, served by uvicorn):

    POST /translate  {"text": "..." | ["...", ...], "beam": 5, "nbest": 1}
                     -> {"translations": ["...", ...]}            (nbest 1)
                     -> {"translations": [[{"text", "score"}, ...], ...]}   (nbest > 1)
    POST /attention  {"text": "...", "beam": 5} -> the translation, its subword pieces, the
                     cross-attention weights of every layer and head, and the word alignment
    GET  /health     {"status": "ok", ...};   GET /openapi.json;   GET / the page (no external assets)

Requests that arrive together are translated together: a `Batcher` collects the lines of
the requests that come within `batch_window_ms` of each other (up to `max_batch_lines`) into
one decoding call, on one worker thread, so throughput grows with load instead of requests
queueing one at a time. Every sentence is decoded on its own, so a line's translation does
not depend on the lines it was batched with: the output equals `mt translate`'s.

Limits, each a JSON error with its status: more than `max_lines` lines or a line of more than
`max_chars` characters, 413; a bad value (beam, nbest, an empty list), 422; bad JSON or bad
UTF-8, 400 or 422; more than `max_queued_lines` lines waiting, 429; shutting down, 503.
Ctrl-C or SIGTERM stops accepting connections, finishes what is in flight, then exits.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported when a model is loaded, not when the CLI parses options
    from mt.lines import TextTranslator

@dataclass
class ServeLimits:
    """What one server accepts; every default in one place (the CLI options mirror these)."""

    max_lines: int = 64  # lines per request
    max_chars: int = 2000  # characters per line
    max_queued_lines: int = 1024  # lines waiting to be translated, over all requests
    max_beam: int = 16
    batch_window_ms: float = 5.0  # how long the first waiting request waits for company
    max_batch_lines: int = 256  # lines per decoding call


class Busy(Exception):
    """The queue is full (429) or the server is shutting down (503)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Job:
    lines: list[str]
    beam: int | None
    nbest: int
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Collects concurrent requests into decoding calls on one worker thread."""

    def __init__(self, translator: TextTranslator, limits: ServeLimits) -> None:
        self.translator, self.limits = translator, limits
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.queued_lines = 0
        self.calls = 0  # decoding calls made: fewer than requests when batching works
        self.lines = 0  # lines decoded: lines / calls is the mean batch
        self.closing = False
        self._task: asyncio.Task | None = None
        # One thread decodes, for /translate and /attention alike: one model, one search at a time.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="mt-decode")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Refuse new work, finish what is queued, then stop the worker."""
        self.closing = True
        await self.queue.join()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.executor.shutdown(wait=True)

    async def translate(
        self, lines: list[str], beam: int | None, nbest: int
    ) -> list[list[tuple[str, float]]]:
        if self.closing:
            raise Busy(503, "the server is shutting down")
        if self.queued_lines + len(lines) > self.limits.max_queued_lines:
            raise Busy(429, f"too much work queued ({self.queued_lines} lines); retry shortly")
        self.queued_lines += len(lines)
        job = _Job(lines, beam, nbest, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            deadline = loop.time() + self.limits.batch_window_ms / 1000
            size = len(jobs[0].lines)
            while size < self.limits.max_batch_lines and (left := deadline - loop.time()) > 0:
                try:
                    job = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    break
                jobs.append(job)
                size += len(job.lines)
            # One call per (beam, nbest): those are settings of the search, not of a line.
            groups: dict[tuple[int | None, int], list[_Job]] = {}
            for job in jobs:
                groups.setdefault((job.beam, job.nbest), []).append(job)
            for (beam, nbest), group in groups.items():
                lines = [line for job in group for line in job.lines]
                try:
                    self.calls += 1
                    self.lines += len(lines)
                    out = await loop.run_in_executor(self.executor, self._decode, lines, beam, nbest)
                except Exception as e:  # handed to each waiting request, which answers 500
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(e)
                else:
                    start = 0
                    for job in group:
                        if not job.future.done():
                            job.future.set_result(out[start : start + len(job.lines)])
                        start += len(job.lines)
                finally:
                    for job in group:
                        self.queued_lines -= len(job.lines)
                        self.queue.task_done()

    def _decode(self, lines: list[str], beam: int | None, nbest: int) -> list[list[tuple[str, float]]]:
        return self.translator.translate_nbest(lines, beam=beam, nbest=nbest)
