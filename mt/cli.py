"""The `mt` command: prepare, train, translate, evaluate, compare, average, export.

Errors a user can fix (`MTError`) are printed as one line without a traceback
and exit with status 2; anything else is a bug and keeps its traceback. Ctrl-C
exits with 130 and SIGTERM with 143, both after the same clean-up (temporary files
removed, existing outputs left as they were).
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import threading
import typing
from types import FrameType

from mt.config import Precision
from mt.errors import MTError

COMPUTE_TYPE_HELP = (
    "with --model: CTranslate2's compute type (default: the export's weight type; auto: the fastest "
    "the device supports; int8, int8_float32, int8_float16, int8_bfloat16, int16, float16, bfloat16, "
    "float32), e.g. float16 for a float32 export on a GPU"
)
OVERRIDES_HELP = "config overrides as section.key=value, e.g. train.lr=5e-4 model.layers=4"
PRECISIONS = typing.get_args(Precision)
PRECISION_HELP = (
    "weights and activations: fp32, bf16 (1.2-1.5x faster on CPUs with AVX512-BF16/AMX and on GPUs, "
    "about 5x slower on CPUs without), fp16 (GPU only), or auto (bf16 where it is native, else fp32); "
    "default: decode.precision of the CONFIG if given, else of the checkpoint"
)


def _cmd_prepare(args: argparse.Namespace) -> None:
    from mt.config import load_config
    from mt.data.prepare import prepare

    prepare(load_config(args.config, args.overrides), force=args.force)


def _cmd_train(args: argparse.Namespace) -> int:
    from mt.config import load_config
    from mt.train.trainer import train

    result = train(load_config(args.config, args.overrides))
    # Ctrl-C saved a checkpoint and stopped cleanly; still report the interruption, as shells do.
    return 128 + result["signal"] if result["stopped"] == "interrupted" else 0


def _cmd_translate(args: argparse.Namespace) -> None:
    from mt.commands.translate import translate_cli

    translate_cli(args)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from mt.commands.evaluate import evaluate_cli

    evaluate_cli(args)


def _cmd_compare(args: argparse.Namespace) -> None:
    from mt.commands.compare import compare_cli

    compare_cli(args)


def _cmd_average(args: argparse.Namespace) -> None:
    from mt.train.average import average_checkpoints

    average_checkpoints(args.checkpoints, args.output)


def _cmd_export(args: argparse.Namespace) -> None:
    from mt.commands.export import export_cli

    export_cli(args)


def _cmd_serve(args: argparse.Namespace) -> None:
    from mt.commands.serve import serve_cli

    serve_cli(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mt", description="Machine translation: prepare data, train, translate, evaluate."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser(
        "prepare",
        help="clean, learn subwords and cache the corpus of an experiment",
        description="Load the corpus (local files or the Hugging Face hub), clean the training split, "
        "train SentencePiece and cache the encoded splits under data/prepared/<config name>. "
        "Does nothing when the cache is up to date.",
    )
    q.add_argument("config", help="experiment YAML file, e.g. configs/multi30k_de_en.yaml")
    q.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    q.add_argument("--force", action="store_true", help="prepare again even if the cache is up to date")
    q.set_defaults(func=_cmd_prepare)

    t = sub.add_parser(
        "train",
        help="train a model (resumes from checkpoint_last.pt in the output directory)",
        description="Train the experiment's Transformer. Prepares the data first if needed. Running the "
        "same command again on an output directory with checkpoint_last.pt resumes exactly. "
        "Multi-GPU: torchrun --nproc_per_node N -m mt train CONFIG.",
    )
    t.add_argument("config", help="experiment YAML file")
    t.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    t.set_defaults(func=_cmd_train)

    r = sub.add_parser(
        "translate",
        help="translate text with a checkpoint or a CTranslate2 export, one line in, one line out",
        description="Translate raw text, one sentence per line: N lines in, N lines out, in order. "
        "Reads stdin and writes stdout unless --input/--output are given.",
    )
    model = r.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="checkpoint file (.pt)")
    model.add_argument(
        "--model",
        metavar="DIR",
        help="a CTranslate2 export (mt export ctranslate2), translated with CTranslate2: the same "
        "contract, CTranslate2's speed",
    )
    r.add_argument("--input", help="input text file; - or none: stdin")
    r.add_argument("--output", help="output file, written atomically; - or none: stdout")
    r.add_argument("--beam", type=int, help="beam size; 1 = greedy (default: the checkpoint's decode.beam)")
    r.add_argument("--nbest", type=int, default=1, help="print the K best, tab-separated with scores")
    r.add_argument("--max-tokens", type=int, help="source tokens per batch (default: decode.max_tokens)")
    r.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    r.add_argument("--precision", choices=PRECISIONS, help=PRECISION_HELP)
    r.add_argument("--compute-type", metavar="TYPE", help=COMPUTE_TYPE_HELP)
    r.add_argument(
        "--errors",
        choices=["strict", "replace"],
        default="strict",
        help="undecodable UTF-8 input: stop with an error (strict) or replace the bad bytes",
    )
    r.add_argument(
        "--alignment",
        action="store_true",
        help="append a tab and the word alignment from cross-attention: fairseq's i-j pairs "
        "(source word i, target word j, whitespace words counted from 0)",
    )
    r.set_defaults(func=_cmd_translate)

    e = sub.add_parser(
        "evaluate",
        help="translate a test set and score it with sacreBLEU (BLEU, chrF)",
        description="Either `mt evaluate CONFIG [--split test]` (the experiment's best checkpoint on a "
        "prepared split) or `mt evaluate --checkpoint CK --src FILE --ref FILE`; --model DIR scores a "
        "CTranslate2 export instead. Writes hypotheses and a JSON of the scores next to the checkpoint "
        "(or the export directory).",
    )
    e.add_argument("config", nargs="?", help="experiment YAML file")
    e.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    scored = e.add_mutually_exclusive_group()
    scored.add_argument("--checkpoint", help="checkpoint (default: <out_dir>/checkpoint_best.pt)")
    scored.add_argument(
        "--model", metavar="DIR", help="a CTranslate2 export (mt export ctranslate2), scored with CTranslate2"
    )
    e.add_argument("--split", default="test", help="prepared split to score (default: test)")
    e.add_argument("--src", help="source text file; - reads stdin")
    e.add_argument("--ref", help="reference text file; - reads stdin (not both)")
    e.add_argument("--beam", type=int, help="beam size (default: the config's decode.beam)")
    e.add_argument("--max-tokens", type=int, help="source tokens per batch")
    e.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    e.add_argument("--precision", choices=PRECISIONS, help=PRECISION_HELP)
    e.add_argument("--compute-type", metavar="TYPE", help=COMPUTE_TYPE_HELP)
    e.set_defaults(func=_cmd_evaluate)

    m = sub.add_parser(
        "compare",
        help="compare training runs: config differences, scores, paired bootstrap significance",
        description="One table for runs of `mt train` (directories, standing for their best checkpoint, "
        "or checkpoints): the config keys that differ, steps, epochs, training time, best validation "
        "BLEU/chrF and their steps, test BLEU and chrF of the translations `mt train` wrote, each with "
        "sacreBLEU's paired bootstrap resampling against the first run (mean, 95% confidence interval, "
        "p-value; p < 0.05 is significant). Run it where the runs were trained: the references are read "
        "from their prepared data.",
    )
    m.add_argument(
        "runs", nargs="+", metavar="RUN", help="run directory or checkpoint; the first is the baseline"
    )
    m.add_argument(
        "--split",
        help="translate this prepared split (e.g. test, test2017) with each checkpoint now, writing the "
        "translations next to it as `mt evaluate` does (default: reuse the test translations of `mt train`)",
    )
    m.add_argument("--beam", type=int, help="beam size of the translations (default: each run's decode.beam)")
    m.add_argument(
        "--resamples", type=int, default=1000, help="bootstrap resamples (default: 1000, sacreBLEU's)"
    )
    m.add_argument(
        "--output",
        metavar="FILE",
        help="the validation curves overlaid: .png, .svg, .pdf, or .html (a page with table and curves)",
    )
    m.add_argument("--json", action="store_true", help="print the comparison as JSON instead of the table")
    m.add_argument("--device", help="with --split: cpu, cuda, cuda:1 (default: cuda when available)")
    m.set_defaults(func=_cmd_compare)

    a = sub.add_parser(
        "average",
        help="average the weights of several checkpoints",
        description="Average model weights of checkpoints of one run (a standard gain of about half a "
        "BLEU point). The output keeps the first checkpoint's config and vocabulary.",
    )
    a.add_argument("--output", required=True, help="averaged checkpoint to write")
    a.add_argument("checkpoints", nargs="+", help="checkpoints to average")
    a.set_defaults(func=_cmd_average)

    x = sub.add_parser(
        "export",
        help="export a checkpoint to CTranslate2 or Hugging Face Transformers",
        description="Write a self-contained directory (model, vocabularies, SentencePiece models, a README "
        "with a runnable example) that computes exactly what the checkpoint computes. Needs the export "
        "extra. An existing DIR is replaced only if it is an earlier export.",
    )
    formats = x.add_subparsers(dest="format", required=True, metavar="FORMAT")
    c = formats.add_parser(
        "ctranslate2",
        help="a CTranslate2 model (for `mt translate --model`, or CTranslate2 itself)",
        description="Convert through CTranslate2's converter API. --quantization stores the weights in "
        "int8 (int8 and int8_float32 run alike on a CPU: int8 matrix products, float32 elsewhere), or in "
        "float16 or bfloat16 (for GPUs; a CPU runs those in float32).",
    )
    h = formats.add_parser(
        "hf",
        help="a Hugging Face Transformers model and tokenizer (AutoModelForSeq2SeqLM, AutoTokenizer)",
        description="Marian for a post-norm model, Pegasus for a pre-norm one, weights as safetensors, "
        "a tokenizer over the checkpoint's SentencePiece models.",
    )
    for f in (c, h):
        f.add_argument("--checkpoint", required=True, help="checkpoint file (.pt)")
        f.add_argument("--output", required=True, metavar="DIR", help="directory to write")
        f.set_defaults(func=_cmd_export)
    c.add_argument(
        "--quantization",
        choices=["int8", "int8_float32", "int8_float16", "int8_bfloat16", "float16", "bfloat16"],
        help="weight type (default: float32, as trained); int8 is the fastest on a CPU, int8_float16 "
        "and int8_bfloat16 on a GPU (int8 matrix products, 16-bit float elsewhere)",
    )
    for f in (c, h):
        f.add_argument(
            "--length-penalty",
            choices=["fairseq"],
            help="a checkpoint whose decode.length_penalty is gnmt cannot be exported as it is (neither "
            "engine has GNMT's penalty): export it with fairseq's len**alpha instead",
        )

    v = sub.add_parser(
        "serve",
        help="serve a checkpoint over HTTP, with a page that shows what the model attends to",
        description="POST /translate, POST /attention, GET /health, GET / (the page). Concurrent requests "
        "are translated together; errors are JSON (400, 408, 413, 422, 429, 503, 504). Put a reverse "
        "proxy in front of any bind other than loopback.",
    )
    model = v.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="checkpoint file (.pt)")
    model.add_argument(
        "--model", help="a CTranslate2 export (mt export ctranslate2): /translate only, no /attention"
    )
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    v.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    v.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    v.add_argument("--precision", choices=PRECISIONS, help=PRECISION_HELP)
    v.add_argument("--compute-type", metavar="TYPE", help=COMPUTE_TYPE_HELP)
    v.add_argument(
        "--decoder",
        choices=["process", "thread"],
        default="process",
        help="with --checkpoint: decode in a process of its own (default; batches grow with the load) "
        "or in a thread of the server's process (the event loop then shares its GIL)",
    )
    from mt.commands.serve import add_limit_options

    add_limit_options(v)
    v.set_defaults(func=_cmd_serve)
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
    args = build_parser().parse_args(argv)
    # A plain handler, which the trainer's own (during fit) replaces and then restores.
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal.signal's rule
    handler = functools.partial(_raise_terminated, os.getpid())
    previous = signal.signal(signal.SIGTERM, handler) if in_main_thread else None
    try:
        status = args.func(args)
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
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
