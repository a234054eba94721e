"""The `mt compare` command: a table of runs (or checkpoints), their config differences, training,
validation and test scores with paired bootstrap resampling against the first; optionally the
validation curves overlaid (--output) and JSON for scripts (--json).

See mt.train.compare for what is read, checked and computed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from mt.commands.options import check_options
from mt.errors import MTError
from mt.files import AtomicFile
from mt.train.plot import FIGURE_FORMATS, check_plotting, validation_figure

if TYPE_CHECKING:  # mt.train.compare imports torch: `mt compare --help` and bad options come fast
    from mt.train.compare import Comparison

OUTPUT_SUFFIXES = (*(f".{f}" for f in FIGURE_FORMATS), ".html")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "compare",
        description="One table for runs of `mt train` (directories, standing for their best checkpoint, "
        "or checkpoints): the config keys that differ, steps, epochs, training time, best validation "
        "BLEU/chrF and their steps, test BLEU and chrF of the translations `mt train` wrote, each with "
        "sacreBLEU's paired bootstrap resampling against the first run (mean, 95% confidence interval, "
        "p-value; p < 0.05 is significant). Run it where the runs were trained: the references are read "
        "from their prepared data.",
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN", help="run directory or checkpoint; the first is the baseline"
    )
    p.add_argument(
        "--split",
        help="translate this prepared split (e.g. test, test2017) with each checkpoint now, writing the "
        "translations next to it as `mt evaluate` does (default: reuse the test translations of `mt train`)",
    )
    p.add_argument("--beam", type=int, help="beam size of the translations (default: each run's decode.beam)")
    p.add_argument(
        "--resamples", type=int, default=1000, help="bootstrap resamples (default: 1000, sacreBLEU's)"
    )
    p.add_argument(
        "--output",
        metavar="FILE",
        help="the validation curves overlaid: .png, .svg, .pdf, or .html (a page with table and curves)",
    )
    p.add_argument("--json", action="store_true", help="print the comparison as JSON instead of the table")
    p.add_argument("--device", help="with --split: cpu, cuda, cuda:1 (default: cuda when available)")
    return p


def check_output(path: Path) -> None:
    """An --output that can be written, checked before any translating."""
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise MTError(f"--output {path}: name a {', '.join(OUTPUT_SUFFIXES)} file")
    check_plotting()


def write_output(c: Comparison, path: Path) -> None:
    """The validation curves as an image, or a page with the table and the curves (.html)."""
    from mt.train.compare import curves, to_html

    suffix = path.suffix.lower()
    if suffix == ".html":
        svg = validation_figure(curves(c), "svg").decode("utf-8")
        data = to_html(c, svg[svg.index("<svg"):]).encode("utf-8")  # inline: no XML prolog
    else:
        data = validation_figure(curves(c), suffix[1:])
    with AtomicFile(path, "write") as out:
        out.commit(data)


def run(args: argparse.Namespace) -> int:
    """`mt compare`: prints the table (or JSON with --json)."""
    check_options(args.beam, None)
    output = Path(args.output) if args.output else None
    if output is not None:
        check_output(output)
    from mt.train.compare import compare, table, to_json

    c = compare(args.runs, split=args.split, beam=args.beam, resamples=args.resamples, device=args.device)
    if output is not None:
        write_output(c, output)
    print(json.dumps(to_json(c), indent=2) if args.json else table(c), end="" if not args.json else "\n")
    return 0
