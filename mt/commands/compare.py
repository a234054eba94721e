"""The `mt compare` command: a table of runs (or checkpoints), their config differences, training,
validation and test scores with paired bootstrap resampling against the first; optionally the
validation curves overlaid (--output) and JSON for scripts (--json).

See mt.train.compare for what is read, checked and computed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mt.errors import MTError
from mt.files import AtomicFile
from mt.train.compare import Comparison, compare, curves, table, to_html, to_json
from mt.train.plot import FIGURE_FORMATS, check_plotting, validation_figure

OUTPUT_SUFFIXES = (*(f".{f}" for f in FIGURE_FORMATS), ".html")


def check_output(path: Path) -> None:
    """An --output that can be written, checked before any translating."""
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise MTError(f"--output {path}: name a {', '.join(OUTPUT_SUFFIXES)} file")
    check_plotting()


def write_output(c: Comparison, path: Path) -> None:
    """The validation curves as an image, or a page with the table and the curves (.html)."""
    suffix = path.suffix.lower()
    if suffix == ".html":
        svg = validation_figure(curves(c), "svg").decode("utf-8")
        data = to_html(c, svg[svg.index("<svg"):]).encode("utf-8")  # inline: no XML prolog
    else:
        data = validation_figure(curves(c), suffix[1:])
    with AtomicFile(path, "write") as out:
        out.commit(data)


def compare_cli(args: argparse.Namespace) -> Comparison:
    """`mt compare`: prints the table (or JSON with --json); returns the comparison."""
    if args.beam is not None and args.beam < 1:
        raise MTError(f"--beam must be >= 1, got {args.beam}")
    output = Path(args.output) if args.output else None
    if output is not None:
        check_output(output)
    c = compare(args.runs, split=args.split, beam=args.beam, resamples=args.resamples, device=args.device)
    if output is not None:
        write_output(c, output)
    print(json.dumps(to_json(c), indent=2) if args.json else table(c), end="" if not args.json else "\n")
    return c
