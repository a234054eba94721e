"""The `mt translate` command: raw text in, translations out, one line per line.

The model is a checkpoint (--checkpoint, run by PyTorch: mt.translate.translator) or a CTranslate2
export (--model DIR, run by CTranslate2 without loading torch: mt.export.ct2_translator);
everything below holds for both.

The contract is N lines in, N lines out, in order, whatever the lines contain:

* Lines are split on "\\n" only. Other characters that Python's `str.splitlines`
  treats as line breaks (\\x0b, \\x1c, U+2028, ...) stay inside their line, and a
  trailing "\\r" (CRLF files) is removed. A missing final newline changes nothing.
* An empty or whitespace-only line gives an empty line. A line longer than the
  model's maximum is translated from its first tokens, with a warning on stderr.
* Output lines never contain "\\n" or "\\r": a hypothesis containing one gets a
  space instead, so the output can always be split back into N lines.
* With --alignment each output line is followed by a tab and its word alignment, as
  fairseq prints it: `i-j` pairs, source word i aligned to target word j (mt.translate.alignment).
* With --nbest K > 1 each input line still gives one output line, made of K
  tab-separated (hypothesis, score) pairs: `hyp1<TAB>score1<TAB>hyp2<TAB>score2 ...`
  (tabs inside a hypothesis become spaces). An empty input line gives an empty line.

Input must be UTF-8 (a leading byte-order mark is ignored). With --errors strict
an undecodable byte stops the run with an error naming the file and line; with
--errors replace it becomes U+FFFD and translation goes on.

--output is written to a temporary file next to it that replaces it only when
complete: a failed or interrupted run leaves an existing file as it was (a FIFO or a
device is written in place: see mt.files.AtomicFile). `-` names standard input for
--input and standard output for --output, as leaving them out does. When stdin is a
terminal and there is no --input, each typed line is translated as soon as Enter is
pressed (an interactive session, until Ctrl-D).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import TYPE_CHECKING

from mt.commands.options import COMPUTE_TYPE_HELP, PRECISION_HELP, PRECISIONS, check_options
from mt.config import resolve_decoding
from mt.errors import MTError
from mt.files import STDIO, AtomicFile, decode_lines, read_lines, read_stdin

if TYPE_CHECKING:  # torch is imported only when a checkpoint is loaded: errors in options come fast
    from mt.translate.lines import TextTranslator


# --------------------------------------------------------------------------- writing


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


# --------------------------------------------------------------------------- command


def _output_lines(
    translator: TextTranslator, lines: list[str], args: argparse.Namespace, progress: bool
) -> list[str]:
    """One output line per input line: the translation(s), and with --alignment a tab and the
    word alignment (fairseq's `i-j` pairs); a blank line gives a blank line."""
    from mt.translate.lines import one_line, translate_lines

    decode = resolve_decoding(translator.config.decode, args.beam, args.nbest, args.max_tokens)
    if not args.alignment:
        return translate_lines(translator, lines, decode, progress=progress)
    from mt.translate.alignment import format_pairs, translate_and_attend
    from mt.translate.translator import Translator

    assert isinstance(translator, Translator), "translate_cli refuses --alignment with --model"
    out = translate_and_attend(translator, lines, decode)
    return [f"{one_line(text)}\t{format_pairs(attn.pairs)}" if attn else "" for text, attn in out]


def _interactive(translator: TextTranslator, args: argparse.Namespace) -> None:
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
        _write_stdout(_output_lines(translator, lines or [""], args, progress=False)[0] + "\n")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "translate",
        description="Translate raw text, one sentence per line: N lines in, N lines out, in order. "
        "Reads stdin and writes stdout unless --input/--output are given.",
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="checkpoint file (.pt)")
    model.add_argument(
        "--model",
        metavar="DIR",
        help="a CTranslate2 export (mt export ctranslate2), translated with CTranslate2: the same "
        "contract, CTranslate2's speed",
    )
    p.add_argument("--input", help="input text file; - or none: stdin")
    p.add_argument("--output", help="output file, written atomically; - or none: stdout")
    p.add_argument("--beam", type=int, help="beam size; 1 = greedy (default: the checkpoint's decode.beam)")
    p.add_argument("--nbest", type=int, default=1, help="print the K best, tab-separated with scores")
    p.add_argument("--max-tokens", type=int, help="source tokens per batch (default: decode.max_tokens)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--precision", choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--compute-type", metavar="TYPE", help=COMPUTE_TYPE_HELP)
    p.add_argument(
        "--errors",
        choices=["strict", "replace"],
        default="strict",
        help="undecodable UTF-8 input: stop with an error (strict) or replace the bad bytes",
    )
    p.add_argument(
        "--alignment",
        action="store_true",
        help="append a tab and the word alignment from cross-attention: fairseq's i-j pairs "
        "(source word i, target word j, whitespace words counted from 0)",
    )
    return p


def load_translator(args: argparse.Namespace) -> TextTranslator:
    """The checkpoint's Translator, or with --model the export's CT2Translator."""
    if args.model:
        from mt.export.ct2_translator import CT2Translator

        return CT2Translator.from_export(args.model, args.device, compute_type=args.compute_type)
    from mt.device import pick_device
    from mt.translate.translator import Translator

    return Translator.from_checkpoint(args.checkpoint, pick_device(args.device), args.precision)


def run(args: argparse.Namespace) -> int:
    """`mt translate`: see the module docstring."""
    check_options(args.beam, args.max_tokens, args.nbest)  # before any (slow) import of torch
    if args.model and args.precision:
        raise MTError(
            "--precision goes with --checkpoint; an export runs in the precision it was exported "
            "with (mt export ctranslate2 --quantization)"
        )
    if args.checkpoint and args.compute_type:
        raise MTError(
            "--compute-type goes with --model (a CTranslate2 export); use --precision for a checkpoint"
        )
    if args.alignment and args.nbest > 1:
        raise MTError("--alignment goes with one translation per line: drop --nbest")
    if args.alignment and args.model:
        raise MTError("--alignment goes with --checkpoint: it reads the model's cross-attention")
    hint = "; fix the input or pass --errors replace"
    source = None if args.input == STDIO else args.input
    dest = None if args.output == STDIO else args.output
    if source is None and sys.stdin is None:  # `mt translate <&-`
        raise MTError("no standard input (it is closed): pass --input FILE")
    # A person typing at a terminal gets each line translated at once; with --output they
    # get the file they asked for, from what they type until Ctrl-D.
    interactive = source is None and dest is None and sys.stdin.isatty()
    lines: list[str] = []
    if source is not None:
        lines = read_lines(source, args.errors, hint)
    elif not interactive:
        if sys.stdin.isatty():
            print("mt translate: reading stdin until Ctrl-D", file=sys.stderr)
        lines = decode_lines(read_stdin(), "stdin", args.errors, hint)

    # Opened before the model is loaded, so a bad output path fails in a second, not after the work.
    with AtomicFile(dest) if dest else contextlib.nullcontext() as out:
        translator = load_translator(args)
        if interactive:
            _interactive(translator, args)
            return 0
        result = _output_lines(translator, lines, args, progress=True)
        text = "".join(line + "\n" for line in result)
        if out is not None:
            out.commit(text.encode("utf-8"))
        else:
            _write_stdout(text)
    return 0
