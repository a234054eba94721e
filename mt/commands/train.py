"""The `mt train` command: train the experiment's Transformer (mt.train.trainer), resuming where a
run on the same output directory stopped."""

from __future__ import annotations

import argparse

from mt.commands.options import OVERRIDES_HELP


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        description="Train the experiment's Transformer. Prepares the data first if needed. Running the "
        "same command again on an output directory with checkpoint_last.pt resumes exactly. "
        "Multi-GPU: torchrun --nproc_per_node N -m mt train CONFIG.",
    )
    p.add_argument("config", help="experiment YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    return p


def run(args: argparse.Namespace) -> int:
    from mt.config import load_config
    from mt.train.trainer import train

    result = train(load_config(args.config, args.overrides))
    # Ctrl-C saved a checkpoint and stopped cleanly; still report the interruption, as shells do.
    return 128 + result["signal"] if result["stopped"] == "interrupted" else 0
