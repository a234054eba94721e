"""`mt serve`'s batcher: shared decoding calls, stopping, dropped and late requests, draining."""

from __future__ import annotations

import asyncio

import pytest
from helpers import SERVE_SRC, SwitchEngine

from mt.config import resolve_decoding
from mt.serve.batcher import Batcher, Busy, ServeLimits

# --------------------------------------------------------------------------- the batcher


def test_concurrent_requests_share_decoding_calls(translator):
    async def run() -> tuple[list, int]:
        batcher = Batcher(translator, ServeLimits(batch_window_ms=50))
        batcher.start()
        try:
            outs = await asyncio.gather(
                *(
                    batcher.translate([line], resolve_decoding(translator.config.decode, 2, 1))
                    for line in SERVE_SRC
                )
            )
        finally:
            await batcher.stop()
        return outs, batcher.calls

    outs, calls = asyncio.run(run())
    assert [o[0][0][0] for o in outs] == translator.translate(SERVE_SRC, beam=2)
    assert calls < len(SERVE_SRC)  # batched: fewer decoding calls than requests


def test_a_stopping_batcher_finishes_its_queue_then_refuses(translator):
    async def run() -> tuple[list, int]:
        batcher = Batcher(translator, ServeLimits(batch_window_ms=20))
        batcher.start()
        pending = [
            asyncio.ensure_future(batcher.translate([line], resolve_decoding(translator.config.decode, 1, 1)))
            for line in SERVE_SRC[:3]
        ]
        await asyncio.sleep(0)
        await batcher.stop()
        done = [p.result()[0][0][0] for p in pending]
        with pytest.raises(Exception, match="shutting down"):
            await batcher.translate(["x"], resolve_decoding(translator.config.decode, 1, 1))
        return done, batcher.queued_lines

    done, queued = asyncio.run(run())
    assert done == translator.translate(SERVE_SRC[:3], beam=1) and queued == 0


def test_a_request_whose_client_is_gone_is_dropped_before_decoding(translator):
    engine = SwitchEngine(translator)

    async def run() -> Batcher:
        batcher = Batcher(engine, ServeLimits(batch_window_ms=1))
        batcher.start()
        engine.go.clear()
        first = asyncio.ensure_future(
            batcher.translate([SERVE_SRC[0]], resolve_decoding(translator.config.decode, 1, 1))
        )  # decoding, held
        await asyncio.sleep(0.1)
        gone = asyncio.ensure_future(
            batcher.translate([SERVE_SRC[1]], resolve_decoding(translator.config.decode, 1, 1))
        )  # queued behind it
        await asyncio.sleep(0.05)
        gone.cancel()  # what app.py does when its client hangs up
        await asyncio.sleep(0.05)
        assert batcher.queued_lines == 2  # still counted until the worker drops it
        engine.go.set()
        await first
        await batcher.stop()
        return batcher

    batcher = asyncio.run(run())
    assert engine.decoded == [SERVE_SRC[0]] and batcher.dropped == 1 and batcher.queued_lines == 0


def test_a_request_past_its_deadline_is_a_504_and_is_not_decoded(translator):
    engine = SwitchEngine(translator)

    async def run() -> Batcher:
        batcher = Batcher(engine, ServeLimits(batch_window_ms=1, request_timeout_s=0.2))
        batcher.start()
        engine.go.clear()
        first = asyncio.ensure_future(
            batcher.translate([SERVE_SRC[0]], resolve_decoding(translator.config.decode, 1, 1))
        )
        await asyncio.sleep(0.05)  # decoding, held
        with pytest.raises(Busy, match="not translated within 0.2 s") as late:
            await batcher.translate([SERVE_SRC[1]], resolve_decoding(translator.config.decode, 1, 1))
        assert late.value.status == 504
        engine.go.set()
        with pytest.raises(Busy):  # the first one timed out too, while decoding
            await first
        await batcher.stop()
        return batcher

    batcher = asyncio.run(run())
    assert engine.decoded == [SERVE_SRC[0]] and batcher.timeouts == 2 and batcher.queued_cost == 0


def test_shutting_down_answers_503_and_past_the_drain_deadline_pending_work_gets_503(translator):
    engine = SwitchEngine(translator)

    async def run() -> Batcher:
        batcher = Batcher(engine, ServeLimits(batch_window_ms=1, drain_timeout_s=0.3))
        batcher.start()
        engine.go.clear()
        pending = [
            asyncio.ensure_future(batcher.translate([line], resolve_decoding(translator.config.decode, 1, 1)))
            for line in SERVE_SRC[:2]
        ]
        await asyncio.sleep(0.1)
        batcher.begin_shutdown()  # SIGTERM: from now on new work is refused
        with pytest.raises(Busy, match="shutting down") as refused:
            await batcher.translate(["ein hund"], resolve_decoding(translator.config.decode, 1, 1))
        assert refused.value.status == 503
        for p in pending:  # the one decoding (held) and the one queued: both 503 at the deadline
            with pytest.raises(Busy, match="shut down before this request was translated") as dropped:
                await p
            assert dropped.value.status == 503
        await batcher.stop()
        return batcher

    batcher = asyncio.run(run())
    assert batcher.abandoned == 2 and engine.aborted and batcher.queued_lines == 0
