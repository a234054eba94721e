"""The `mt export` command: a checkpoint as a CTranslate2 or Hugging Face Transformers model.

    mt export ctranslate2 --checkpoint CK --output DIR [--quantization Q] [--length-penalty fairseq]
    mt export hf --checkpoint CK --output DIR [--length-penalty fairseq]

Q: int8, int8_float32, int8_float16, int8_bfloat16, float16 or bfloat16.

What each writes, and why it computes exactly what the checkpoint computes: mt/export/. The
export extra's packages are checked first, so a missing one is a line naming the install
command before any model is loaded.
"""

from __future__ import annotations

import argparse
import sys

from mt.export import require


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        description="Write a self-contained directory (model, vocabularies, SentencePiece models, a README "
        "with a runnable example) that computes exactly what the checkpoint computes. Needs the export "
        "extra. An existing DIR is replaced only if it is an earlier export.",
    )
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
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
    return p


def run(args: argparse.Namespace) -> int:
    """`mt export FORMAT`: see the module docstring."""
    what = f"mt export {args.format}"
    if args.format == "ctranslate2":
        require("ctranslate2", what)
        from mt.export.ct2 import export_ctranslate2

        out = export_ctranslate2(args.checkpoint, args.output, args.quantization, args.length_penalty)
        how = f"translate with: mt translate --model {out}"
    else:
        for module in ("transformers", "safetensors"):
            require(module, what)
        from mt.export.hf import export_hf

        out = export_hf(args.checkpoint, args.output, args.length_penalty)
        how = "load with AutoModelForSeq2SeqLM / AutoTokenizer"
    print(f"mt export: wrote {out}; {how} (see {out}/README.md)", file=sys.stderr)
    return 0
