"""The `mt prepare` command: clean, learn subwords and cache the corpus of an experiment (mt.data.prepare)."""

from __future__ import annotations

import argparse

from mt.commands.options import OVERRIDES_HELP


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "prepare",
        description="Load the corpus (local files or the Hugging Face hub), clean the training split, "
        "train SentencePiece and cache the encoded splits under data/prepared/<config name>. "
        "Does nothing when the cache is up to date.",
    )
    p.add_argument("config", help="experiment YAML file, e.g. configs/multi30k_de_en.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    p.add_argument("--force", action="store_true", help="prepare again even if the cache is up to date")
    return p


def run(args: argparse.Namespace) -> int:
    from mt.config import load_config
    from mt.data.prepare import prepare

    prepare(load_config(args.config, args.overrides), force=args.force)
    return 0
