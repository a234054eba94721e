"""mt/cli.py and the command modules: one module per command, and only the chosen one imported."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import mt.commands
from mt.cli import COMMANDS, build_parser, chosen_command
from tests.helpers import error_line, subprocess_env

NOT_COMMANDS = {"__init__", "options"}  # mt/commands/ modules that are not a command


# `mt ARGS` that lists, at exit, the modules it imported (-X importtime misses importlib.import_module).
LISTING_MT = """
import atexit, sys
atexit.register(lambda: print(*("imported: " + m for m in sys.modules), sep="\\n", file=sys.stderr))
from mt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def imports_of(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """`mt ARGS` in a fresh interpreter, and the modules it imported."""
    run = subprocess.run(
        [sys.executable, "-c", LISTING_MT, *args],
        capture_output=True, text=True, env=subprocess_env(tmp_path), cwd=tmp_path, timeout=120,
    )
    lines = run.stderr.splitlines(keepends=True)
    imported = {line.removeprefix("imported: ").strip() for line in lines if line.startswith("imported: ")}
    assert imported, run.stderr
    run.stderr = "".join(line for line in lines if not line.startswith("imported: "))
    return run, imported


def test_every_command_module_has_add_parser_and_run():
    modules = {p.stem for p in Path(mt.commands.__file__).parent.glob("*.py")} - NOT_COMMANDS
    assert modules == set(COMMANDS)  # no module missing from the table, no entry without a module
    for name in COMMANDS:
        module = importlib.import_module(f"mt.commands.{name}")
        assert callable(module.run)
        sub = argparse.ArgumentParser(prog="mt").add_subparsers()
        parser = module.add_parser(sub)
        assert parser.prog == f"mt {name}" and sub.choices == {name: parser}


def test_the_command_is_the_first_argument_that_is_not_an_option():
    assert chosen_command(["translate", "--model", "m"]) == "translate"
    assert chosen_command(["--", "average", "--output", "o"]) == "average"
    assert chosen_command(["-h"]) is None and chosen_command([]) is None
    assert chosen_command(["bogus", "train"]) is None  # argparse says what is wrong with "bogus"


def test_only_the_chosen_command_gets_its_full_parser(capsys):
    parser = build_parser("average")
    assert parser.parse_args(["average", "--output", "o.pt", "a.pt"]).checkpoints == ["a.pt"]
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "config.yaml"])  # a placeholder: no arguments
    assert "unrecognized arguments: config.yaml" in capsys.readouterr().err


def test_help_lists_every_command_with_its_line_and_imports_none(tmp_path):
    run, imported = imports_of(["--help"], tmp_path)
    assert run.returncode == 0, run.stderr
    listed = " ".join(run.stdout.split())  # argparse wraps long help lines
    for name, line in COMMANDS.items():
        assert f"{name} {line}" in listed
    assert not {m for m in imported if m.startswith("mt.commands.")}
    assert "torch" not in imported


@pytest.mark.parametrize(
    ("args", "command"),
    [
        (["compare", "--help"], "compare"),
        (["compare", "--beam", "0", "run"], "compare"),  # before this layout: torch was loaded first
        (["average"], "average"),  # missing arguments: argparse's usage error
        (["evaluate", "--beam", "0", "--checkpoint", "c.pt", "--src", "s", "--ref", "r"], "evaluate"),
        (["export", "hf", "--help"], "export"),
        (["translate", "--model", "m", "--nbest", "0"], "translate"),
    ],
)
def test_a_command_imports_only_its_own_module_and_no_torch(args, command, tmp_path):
    run, imported = imports_of(args, tmp_path)
    assert run.returncode == (0 if "--help" in args else 2), run.stderr
    if run.returncode == 2 and not run.stderr.startswith("usage:"):
        error_line(run.stderr, command)
    commands = {m for m in imported if m.startswith("mt.commands.")} - {"mt.commands.options"}
    assert commands == {f"mt.commands.{command}"}
    assert "torch" not in imported and "mt.train.trainer" not in imported
