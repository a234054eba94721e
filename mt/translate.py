"""`mt translate`: raw text in, translations out, one line per line.

The contract is N lines in, N lines out, in order, whatever the lines contain:

* Lines are split on "\\n" only. Other characters that Python's `str.splitlines`
  treats as line breaks (\\x0b, \\x1c, U+2028, ...) stay inside their line, and a
  trailing "\\r" (CRLF files) is removed. A missing final newline changes nothing.
* An empty or whitespace-only line gives an empty line. A line longer than the
  model's maximum is translated from its first tokens, with a warning on stderr.
* Output lines never contain "\\n" or "\\r": a hypothesis containing one gets a
  space instead, so the output can always be split back into N lines.
* With --nbest K > 1 each input line still gives one output line, made of K
  tab-separated (hypothesis, score) pairs: `hyp1<TAB>score1<TAB>hyp2<TAB>score2 ...`
  (tabs inside a hypothesis become spaces). An empty input line gives an empty line.

Input must be UTF-8 (a leading byte-order mark is ignored). With --errors strict
an undecodable byte stops the run with an error naming the file and line; with
--errors replace it becomes U+FFFD and translation goes on.

--output is written to a temporary file next to it that replaces it only when
complete: a failed or interrupted run leaves an existing file as it was. When
stdin is a terminal and there is no --input, each typed line is translated as
soon as Enter is pressed (an interactive session, until Ctrl-D).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from mt.errors import DataError, MTError

if TYPE_CHECKING:  # torch is imported only when a model is loaded: errors in options come fast
    from mt.translator import Translator

BOM = "\ufeff"


# --------------------------------------------------------------------------- reading


def decode_lines(data: bytes, where: str, errors: str = "strict", hint: str = "") -> list[str]:
    """UTF-8 bytes -> lines, split on "\\n" only, a trailing "\\r" removed from each.

    `where` names the input in error messages (a file name or "stdin"); `hint`
    is appended to the message of an undecodable byte (e.g. which option helps).
    """
    try:
        text = data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line_no = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{where}: line {line_no} is not valid UTF-8 (byte 0x{data[e.start]:02x} at byte "
            f"{e.start - line_start + 1} of the line){hint}"
        ) from None
    text = text.removeprefix(BOM)  # editors on Windows like to start UTF-8 files with one
    if not text:
        return []
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()  # the final newline ends the last line; it does not start a new one
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_lines(path: str | Path, errors: str = "strict", hint: str = "") -> list[str]:
    """The lines of a UTF-8 text file (see `decode_lines`); unreadable files raise DataError."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"input file not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    return decode_lines(data, str(path), errors, hint)


# --------------------------------------------------------------------------- writing


class AtomicOutput:
    """A file that appears at `path` complete or not at all.

    The temporary file is created on construction, so an unwritable path fails
    before any (long) work is done; `commit` writes, fsyncs and renames it over
    `path`. Leaving the `with` block without a commit removes the temporary file
    and leaves an existing `path` untouched.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise MTError(f"cannot write output {self.path}: it is a directory")
        # Same directory as the target: os.replace is atomic only within one file system.
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self._open = True
        try:
            self._file = open(self.tmp, "wb")  # closed by commit or discard
        except OSError as e:
            raise MTError(f"cannot write output {self.path}: {e.strerror or e}") from None

    def commit(self, data: bytes) -> None:
        try:
            with self._file as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(self.tmp, self.path)
            self._open = False
        except OSError as e:
            self.discard()
            raise MTError(f"cannot write output {self.path}: {e.strerror or e}") from None

    def discard(self) -> None:
        self._open = False
        self._file.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._open:  # not committed: an error, Ctrl-C, or the caller forgot
            self.discard()


def write_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically (see AtomicOutput)."""
    with AtomicOutput(path) as out:
        out.commit(text.encode("utf-8"))


def _write_stdout(text: str) -> None:
    # Bytes, so the output is UTF-8 with "\n" whatever the locale or platform says.
    sys.stdout.flush()
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is not None:
        buffer.write(text.encode("utf-8"))
        buffer.flush()
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


# --------------------------------------------------------------------------- formatting


def one_line(text: str) -> str:
    """A hypothesis as a single output line: line breaks become spaces."""
    return text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


def format_nbest(hyps: Sequence[tuple[str, float]], nbest: int) -> str:
    """One output line: the hypothesis alone, or `hyp<TAB>score` pairs when nbest > 1."""
    if nbest == 1:
        return one_line(hyps[0][0])
    return "\t".join(f"{one_line(t).replace(chr(9), ' ')}\t{s:.4f}" for t, s in hyps)


def translate_lines(
    translator: Translator,
    lines: Sequence[str],
    beam: int | None = None,
    nbest: int = 1,
    max_tokens: int | None = None,
    progress: bool = False,
) -> list[str]:
    """Output lines (without newlines) for `lines`, exactly one per input line, in order."""
    hyps = translator.translate_nbest(lines, beam=beam, nbest=nbest, max_tokens=max_tokens, progress=progress)
    if len(hyps) != len(lines):  # the contract the whole command exists for
        raise RuntimeError(f"translator returned {len(hyps)} results for {len(lines)} lines")
    # A blank line gives a blank line, also with --nbest (not a lone "<TAB>score").
    return [format_nbest(h, nbest) if line.strip() else "" for line, h in zip(lines, hyps, strict=True)]


# --------------------------------------------------------------------------- command


def check_options(beam: int | None, max_tokens: int | None, nbest: int = 1) -> None:
    """Range checks of decoding options given on the command line."""
    if beam is not None and beam < 1:
        raise MTError(f"--beam must be >= 1, got {beam}")
    if nbest < 1:
        raise MTError(f"--nbest must be >= 1, got {nbest}")
    if max_tokens is not None and max_tokens < 1:
        raise MTError(f"--max-tokens must be >= 1, got {max_tokens}")


def _interactive(translator: Translator, args: argparse.Namespace) -> None:
    """Translate each line as it is typed, until end of input."""
    print("mt translate: type a sentence and press Enter (Ctrl-D to quit)", file=sys.stderr)
    n = 0
    while True:
        sys.stderr.write("> ")
        sys.stderr.flush()
        raw = sys.stdin.buffer.readline()
        if not raw:
            sys.stderr.write("\n")
            return
        n += 1
        try:
            lines = decode_lines(raw, "stdin", args.errors, hint="; retype it, or use --errors replace")
        except MTError as e:  # a typo should not end the session
            print(f"mt translate: {e}", file=sys.stderr)
            continue
        out = translate_lines(translator, lines or [""], args.beam, args.nbest, args.max_tokens)
        _write_stdout(out[0] + "\n")


def translate_cli(args: argparse.Namespace) -> None:
    """`mt translate`: see the module docstring."""
    check_options(args.beam, args.max_tokens, args.nbest)
    hint = "; fix the input or pass --errors replace"
    # A person typing at a terminal gets each line translated at once; with --output they
    # get the file they asked for, from what they type until Ctrl-D.
    interactive = args.input is None and args.output is None and sys.stdin.isatty()
    lines: list[str] = []
    if args.input is not None:
        lines = read_lines(args.input, args.errors, hint)
    elif not interactive:
        if sys.stdin.isatty():
            print("mt translate: reading stdin until Ctrl-D", file=sys.stderr)
        lines = decode_lines(sys.stdin.buffer.read(), "stdin", args.errors, hint)

    # Opened before the model is loaded, so a bad output path fails in a second, not after the work.
    with AtomicOutput(args.output) if args.output else contextlib.nullcontext() as out:
        from mt.device import pick_device
        from mt.translator import Translator

        translator = Translator.from_checkpoint(args.checkpoint, pick_device(args.device), args.precision)
        if interactive:
            _interactive(translator, args)
            return
        result = translate_lines(translator, lines, args.beam, args.nbest, args.max_tokens, progress=True)
        text = "".join(line + "\n" for line in result)
        if out is not None:
            out.commit(text.encode("utf-8"))
        else:
            _write_stdout(text)
