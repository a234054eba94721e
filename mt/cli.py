"""The `mt` command: prepare, train, translate, evaluate, compare, average, export, serve.

Each command is a module mt/commands/<name>.py with `add_parser(sub)` and `run(args)`; only the
chosen command's module is imported (`mt --help` lists the commands from the table below, without
importing any), so a command starts without loading what the others need.

Errors a user can fix (`MTError`) are printed as one line without a traceback
and exit with status 2; anything else is a bug and keeps its traceback. Ctrl-C
exits with 130 and SIGTERM with 143, both after the same clean-up (temporary files
removed, existing outputs left as they were).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from mt.errors import MTError

# name: the one-line help of `mt --help`; the parser and the work are in mt/commands/<name>.py.
COMMANDS = {
    "prepare": "clean, learn subwords and cache the corpus of an experiment",
    "train": "train a model (resumes from checkpoint_last.pt in the output directory)",
    "translate": "translate text with a checkpoint or a CTranslate2 export, one line in, one line out",
    "evaluate": "translate a test set and score it with sacreBLEU (BLEU, chrF)",
    "compare": "compare training runs: config differences, scores, paired bootstrap significance",
    "average": "average the weights of several checkpoints",
    "export": "export a checkpoint to CTranslate2 or Hugging Face Transformers",
    "serve": "serve a checkpoint over HTTP, with a page that shows what the model attends to",
}


def chosen_command(argv: Sequence[str]) -> str | None:
    """The command that argv names, if any: the first argument that is not an option (the top-level
    parser has no options but -h, which prints the list)."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of `mt`, with the full parser of `command` only (its module imported); the other
    commands have a placeholder that carries their one-line help."""
    p = argparse.ArgumentParser(
        prog="mt", description="Machine translation: prepare data, train, translate, evaluate."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, line in COMMANDS.items():
        if name == command:
            importlib.import_module(f"mt.commands.{name}").add_parser(sub)
        else:
            sub.add_parser(name, help=line)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread. A KeyboardInterrupt, so that whatever cleans up after
    Ctrl-C (`finally` blocks, `with` exits: temporary files) does so after `kill` too, where
    the default action would end the process on the spot."""


def _raise_terminated(owner: int, signum: int, frame: FrameType | None) -> None:
    if os.getpid() != owner:  # a forked worker (`datasets`) inherited the handler: die as by default
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = chosen_command(argv)
    args = build_parser(command).parse_args(argv)
    run = importlib.import_module(f"mt.commands.{args.command}").run
    # A plain handler, which the trainer's own (during fit) replaces and then restores.
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal.signal's rule
    handler = functools.partial(_raise_terminated, os.getpid())
    previous = signal.signal(signal.SIGTERM, handler) if in_main_thread else None
    try:
        return run(args)
    except MTError as e:
        print(f"mt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"mt {args.command}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"mt {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); silence the flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        if in_main_thread:  # None: a handler not set from Python; the default is the closest
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
