"""The decoder process of `mt serve --checkpoint`: the model decodes in a process of its own.

In the server's process the event loop reads requests and writes answers; a decoding thread
there would share its GIL (PyTorch's Python-side work per step takes it), so that requests
arriving during a decoding call wait, and batches stay small. Here the checkpoint is loaded
in a child process (spawned: no forked copy of the server's state), and the server's decoding
thread only sends it work over a pipe and waits for the answer without holding the GIL.

The server's process never imports torch: the child sends back the checkpoint's config and
SentencePiece models when it is ready, which is all the server needs (defaults, costs, limits).
An error while decoding comes back as MTError (the user's to fix: a 4xx) or as
DecoderFailure with the child's traceback (a 500 whose id is logged with it). `abort` stops
the child (the drain deadline): the call in flight ends with Busy 503. A child that dies
otherwise (killed for memory, a crash in native code) fails the call in flight (a 500, which
the batcher then retries request by request) and is started again for the next call.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from mt.config import DecodeConfig, Precision, from_dict, to_dict
from mt.data.tokenizer import Tokenizer
from mt.errors import MTError
from mt.serve.batcher import Busy, DecoderFailure, attention_body

log = logging.getLogger("mt.serve")


def _child(conn: Connection, checkpoint: str, device: str | None, precision: Precision | None) -> None:
    """The decoder process: load, say so, then answer calls until the pipe closes."""
    # Ctrl-C in a terminal reaches the whole process group: the server decides when to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # `abort`: stop between two steps of the search, cleaning up as on a normal exit (a SIGKILL
    # would leave the resource tracker warning about what the child had open).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        from mt.device import pick_device
        from mt.translate.translator import Translator

        translator = Translator.from_checkpoint(checkpoint, pick_device(device), precision)
    except MTError as e:
        conn.send(("mt_error", str(e), ""))
        return
    except Exception as e:
        conn.send(("failure", f"{type(e).__name__}: {e}", traceback.format_exc()))
        return
    tok = translator.tokenizer
    conn.send(
        (
            "ready",
            to_dict(translator.config),
            translator.config.name,
            tok.src_proto,
            None if tok.joint else tok.tgt_proto,
            str(translator.device),
        )
    )
    while True:
        try:
            kind, args = conn.recv()
        except (EOFError, OSError):  # the server closed the pipe: done
            return
        try:
            if kind == "translate":
                lines, decode = args
                result: Any = translator.translate_nbest(lines, decode=decode)
            else:
                result = attention_body(translator, *args)
            conn.send(("ok", result))
        except MTError as e:
            conn.send(("mt_error", str(e), ""))
        except Exception as e:
            conn.send(("failure", f"{type(e).__name__}: {e}", traceback.format_exc()))


class ProcessEngine:
    """A checkpoint decoding in a child process (see the module docstring)."""

    attention = True

    def __init__(self, checkpoint: str | Path, device: str | None, precision: Precision | None) -> None:
        self._args = (str(checkpoint), device, precision)
        self._lock = threading.Lock()
        self._aborted = False
        self.restarts = 0
        config, name, src, tgt, self.device = self._spawn()
        self.config = from_dict(config)
        self.config.name = name
        self.tokenizer = Tokenizer(src, tgt)

    def _spawn(self) -> tuple:
        """Start the child; its "ready" message."""
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_child, args=(child, *self._args), name="mt-decoder", daemon=True)
        self.process.start()
        child.close()
        return self._receive()

    def _receive(self) -> tuple:
        try:
            status, *rest = self._conn.recv()
        except (EOFError, OSError):
            if self._aborted:
                raise Busy(503, "the server shut down before this request was translated") from None
            code = self.process.exitcode
            raise DecoderFailure(f"the decoder process ended (exit code {code})") from None
        if status == "mt_error":
            raise MTError(rest[0])
        if status == "failure":
            raise DecoderFailure(rest[0], rest[1])
        return tuple(rest)

    def _call(self, kind: str, *args: Any) -> Any:
        with self._lock:
            if not self.process.is_alive() and not self._aborted:
                # It died (killed for memory, a crash in a native library): the call that was
                # in flight failed with a 500; the server goes on with a new one.
                log.error("the decoder process ended (exit code %s); starting another", self.process.exitcode)
                self._conn.close()
                self.restarts += 1
                self._spawn()
            try:
                self._conn.send((kind, args))
            except OSError:
                raise Busy(503, "the decoder process is gone") from None
            return self._receive()[0]

    def translate_nbest(self, lines: Sequence[str], decode: DecodeConfig) -> list[list[tuple[str, float]]]:
        return self._call("translate", list(lines), decode)

    def attention_body(self, text: str, decode: DecodeConfig, layer: int | None, head: int | None) -> bytes:
        return self._call("attention", text, decode, layer, head)

    def close(self) -> None:
        """Let the child finish and exit (it stops when the pipe closes)."""
        self._conn.close()
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    def abort(self) -> None:
        """Stop the child now: the call in flight ends with Busy 503."""
        self._aborted = True
        self.process.terminate()
