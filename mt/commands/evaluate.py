"""The `mt evaluate` command: score a checkpoint (or, with --model, a CTranslate2 export) on a
prepared split or on a pair of files.

See mt.translate.evaluate for what is computed and written.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mt.commands.options import COMPUTE_TYPE_HELP, OVERRIDES_HELP, PRECISION_HELP, PRECISIONS, check_options
from mt.errors import CheckpointError, DataError, MTError
from mt.files import STDIO, read_lines


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "evaluate",
        description="Either `mt evaluate CONFIG [--split test]` (the experiment's best checkpoint on a "
        "prepared split) or `mt evaluate --checkpoint CK --src FILE --ref FILE`; --model DIR scores a "
        "CTranslate2 export instead. Writes hypotheses and a JSON of the scores next to the checkpoint "
        "(or the export directory).",
    )
    p.add_argument("config", nargs="?", help="experiment YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    scored = p.add_mutually_exclusive_group()
    scored.add_argument("--checkpoint", help="checkpoint (default: <out_dir>/checkpoint_best.pt)")
    scored.add_argument(
        "--model", metavar="DIR", help="a CTranslate2 export (mt export ctranslate2), scored with CTranslate2"
    )
    p.add_argument("--split", default="test", help="prepared split to score (default: test)")
    p.add_argument("--src", help="source text file; - reads stdin")
    p.add_argument("--ref", help="reference text file; - reads stdin (not both)")
    p.add_argument("--beam", type=int, help="beam size (default: the config's decode.beam)")
    p.add_argument("--max-tokens", type=int, help="source tokens per batch")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--precision", choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--compute-type", metavar="TYPE", help=COMPUTE_TYPE_HELP)
    return p


def _prepared_split(config: str, cfg: Any, split: str) -> tuple[list[str], list[str]]:
    """Raw source and reference lines of a prepared split, with errors that say what to run."""
    from mt.data.dataset import load_prepared

    directory = cfg.prepared_dir
    if not (directory / "meta.json").is_file():
        raise DataError(f"{directory}: the data is not prepared; run `mt prepare {config}` first")
    data = load_prepared(directory)
    splits = list(data.meta.get("splits", {}))
    if split not in splits:
        raise DataError(f"{directory}: no split '{split}'; prepared splits are {', '.join(splits)}")
    if not (directory / f"{split}.src.txt").is_file():
        scorable = [s for s in splits if (directory / f"{s}.src.txt").is_file()]
        raise DataError(
            f"{directory}: split '{split}' keeps no raw text to score against "
            f"(only validation and test splits do: {', '.join(scorable) or 'none'})"
        )
    return data.text(split, "src"), data.text(split, "tgt")


def run(args: argparse.Namespace) -> int:
    """`mt evaluate`: see the module docstring. Prints the scores."""
    from mt.config import load_config
    from mt.translate.evaluate import evaluate_checkpoint, evaluate_export, report

    files = args.src is not None or args.ref is not None
    if files and (args.src is None or args.ref is None):
        raise MTError("--src and --ref go together: give both files")
    if args.config is None and not files:
        raise MTError("give an experiment CONFIG, or --checkpoint CK with --src FILE and --ref FILE")
    if args.config is None and args.checkpoint is None and args.model is None:
        raise MTError(
            "--src/--ref need --checkpoint CK or --model DIR (or a CONFIG, to take its best checkpoint)"
        )
    if args.model and args.precision:
        raise MTError("--precision goes with --checkpoint; an export runs with --compute-type")
    if args.checkpoint and args.compute_type:
        raise MTError(
            "--compute-type goes with --model (a CTranslate2 export); use --precision for a checkpoint"
        )
    if args.src == STDIO and args.ref == STDIO:
        raise MTError("--src and --ref cannot both be standard input (-): name a file for one of them")

    check_options(args.beam, args.max_tokens)
    cfg = load_config(args.config, args.overrides) if args.config is not None else None
    if args.model is not None:
        ck_path = Path(args.model)
    elif args.checkpoint is not None:
        ck_path = Path(args.checkpoint)
    else:
        assert cfg is not None
        ck_path = cfg.out_dir / "checkpoint_best.pt"
        if not ck_path.is_file():
            raise CheckpointError(
                f"no checkpoint {ck_path}; train one with `mt train {args.config}` or pass --checkpoint"
            )

    if files:
        src = read_lines(args.src)
        ref = read_lines(args.ref)
        if len(src) != len(ref):
            raise DataError(
                f"--src {args.src} has {len(src)} lines but --ref {args.ref} has {len(ref)}; "
                f"they must be line-aligned"
            )
        name = "stdin" if args.src == STDIO else Path(args.src).stem
    else:
        assert cfg is not None
        src, ref = _prepared_split(args.config, cfg, args.split)
        name = args.split

    decode = cfg.decode if cfg is not None and not files else None
    common = (ck_path, src, ref, args.beam, args.max_tokens, args.device, name)
    if args.model is not None:
        result = evaluate_export(*common, decode=decode, compute_type=args.compute_type, progress=True)
    else:
        result = evaluate_checkpoint(*common, decode=decode, precision=args.precision, progress=True)
    print(report(result))
    return 0
