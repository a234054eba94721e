"""The `mt average` command: the averaged weights of several checkpoints of one run (mt.train.average)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "average",
        description="Average model weights of checkpoints of one run (a standard gain of about half a "
        "BLEU point). The output keeps the first checkpoint's config and vocabulary.",
    )
    p.add_argument("--output", required=True, help="averaged checkpoint to write")
    p.add_argument("checkpoints", nargs="+", help="checkpoints to average")
    return p


def run(args: argparse.Namespace) -> int:
    from mt.train.average import average_checkpoints

    average_checkpoints(args.checkpoints, args.output)
    return 0
