"""The `mt serve` command: load a checkpoint, then serve it over HTTP (see mt.serve)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util

from mt.errors import MTError


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    """One option per ServeLimits field, with its default from there."""
    from mt.serve import ServeLimits

    for f in dataclasses.fields(ServeLimits):
        parser.add_argument(
            "--" + f.name.replace("_", "-"), type=type(f.default), default=f.default, metavar="N",
            help=f"(default: {f.default})",
        )


def serve_cli(args: argparse.Namespace) -> None:
    """`mt serve`: see mt/serve.py."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:  # checked first, so that a missing extra is one line
        raise MTError(
            f"mt serve needs the `serve` extra ({', '.join(missing)} missing): pip install -e '.[serve]'"
        )
    from mt.app import serve
    from mt.commands.translate import load_translator
    from mt.serve import ServeLimits

    limits = ServeLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeLimits)})
    for f in dataclasses.fields(ServeLimits):
        if getattr(limits, f.name) <= 0:
            raise MTError(f"--{f.name.replace('_', '-')} must be > 0, got {getattr(limits, f.name)}")
    if args.model and args.precision:
        raise MTError("--precision goes with --checkpoint; an export has the precision it was exported with")
    translator = load_translator(args)
    print(f"mt serve: {args.checkpoint or args.model}; http://{args.host}:{args.port}/")
    serve(translator, args.host, args.port, limits)
