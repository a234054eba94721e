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


def export_cli(args: argparse.Namespace) -> None:
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
