"""Options that several commands share, written once: config overrides, precision, compute type,
and the range checks of the decoding options."""

from __future__ import annotations

import typing

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


def check_options(beam: int | None, max_tokens: int | None, nbest: int = 1) -> None:
    """Range checks of decoding options given on the command line."""
    if beam is not None and beam < 1:
        raise MTError(f"--beam must be >= 1, got {beam}")
    if nbest < 1:
        raise MTError(f"--nbest must be >= 1, got {nbest}")
    if max_tokens is not None and max_tokens < 1:
        raise MTError(f"--max-tokens must be >= 1, got {max_tokens}")
    if beam is not None and nbest > beam:
        raise MTError(f"--nbest {nbest} cannot exceed --beam {beam}")
