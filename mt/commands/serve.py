"""The `mt serve` command: load a checkpoint or an export, then serve it over HTTP (see mt.serve.batcher).

A checkpoint decodes in a decoder process of its own (mt.serve.decoder_process; `--decoder thread`
keeps it in the server's process, as before, for comparison); a CTranslate2 export decodes in
a thread of the server's process, and the server never imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util

from mt.commands.options import COMPUTE_TYPE_HELP, PRECISION_HELP, PRECISIONS
from mt.errors import MTError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        description="POST /translate, POST /attention, GET /health, GET / (the page). Concurrent requests "
        "are translated together; errors are JSON (400, 408, 413, 422, 429, 503, 504). Put a reverse "
        "proxy in front of any bind other than loopback.",
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="checkpoint file (.pt)")
    model.add_argument(
        "--model", help="a CTranslate2 export (mt export ctranslate2): /translate only, no /attention"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--precision", choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--compute-type", metavar="TYPE", help=COMPUTE_TYPE_HELP)
    p.add_argument(
        "--decoder",
        choices=["process", "thread"],
        default="process",
        help="with --checkpoint: decode in a process of its own (default; batches grow with the load) "
        "or in a thread of the server's process (the event loop then shares its GIL)",
    )
    add_limit_options(p)
    return p


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    """One option per ServeLimits field, with its default from there."""
    from mt.serve.batcher import ServeLimits

    for f in dataclasses.fields(ServeLimits):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(f.default),
            default=f.default,
            metavar="S" if f.name.endswith("_s") else "N",
            help=f"{f.metadata['help']} (default: {f.default})",
        )


def run(args: argparse.Namespace) -> int:
    """`mt serve`: see mt/serve/batcher.py."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:  # checked first, so that a missing extra is one line
        raise MTError(
            f"mt serve needs the `serve` extra ({', '.join(missing)} missing): pip install -e '.[serve]'"
        )
    from mt.serve.app import serve
    from mt.serve.batcher import LocalEngine, ServeLimits

    if not 0 <= args.port <= 65535:
        raise MTError(f"--port {args.port}: a port is a number from 0 to 65535")
    limits = ServeLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeLimits)})
    for f in dataclasses.fields(ServeLimits):
        if not getattr(limits, f.name) > 0:  # `not >` also catches NaN
            raise MTError(f"--{f.name.replace('_', '-')} must be > 0, got {getattr(limits, f.name)}")
    if args.model and args.precision:
        raise MTError("--precision goes with --checkpoint; an export has the precision it was exported with")
    if args.checkpoint and args.compute_type:
        raise MTError(
            "--compute-type goes with --model (a CTranslate2 export); use --precision for a checkpoint"
        )
    if args.model and args.decoder != "process":
        raise MTError("--decoder goes with --checkpoint; an export decodes in CTranslate2's own threads")
    engine: object
    if args.model:
        from mt.export.ct2_translator import CT2Translator

        translator = CT2Translator.from_export(args.model, args.device, compute_type=args.compute_type)
        if limits.max_beam > 1 and (problem := translator.beam_problem()) is not None:
            # Refused now rather than in every request: the model cannot do what its config says.
            raise MTError(f"{args.model}: {problem}; or serve it with --max-beam 1 (greedy only)")
        engine = LocalEngine(translator)
    elif args.decoder == "thread":
        from mt.device import pick_device
        from mt.translate.translator import Translator

        engine = LocalEngine(
            Translator.from_checkpoint(args.checkpoint, pick_device(args.device), args.precision)
        )
    else:
        from mt.serve.decoder_process import ProcessEngine

        engine = ProcessEngine(args.checkpoint, args.device, args.precision)
    print(f"mt serve: {args.checkpoint or args.model}; http://{args.host}:{args.port}/", flush=True)
    abandoned = serve(engine, args.host, args.port, limits)
    if abandoned:
        raise MTError(
            f"{abandoned} request(s) were still pending at the drain deadline ({limits.drain_timeout_s:g} s, "
            f"--drain-timeout-s) and were answered 503"
        )
    return 0
