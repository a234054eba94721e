"""`mt average`: average the weights of several checkpoints of one model.

Averaging the last few checkpoints of a run is a cheap, standard gain (about half
a BLEU point). Floating-point tensors are summed in float64 and cast back to
their own dtype; integer and boolean buffers (counters, masks) cannot be
averaged meaningfully and are taken from the first checkpoint. Checkpoints are
loaded one at a time, so memory holds the sum and one checkpoint, not all of them.

All checkpoints must share the model config, the parameter names and shapes and
the SentencePiece models; the first mismatch is an error naming the odd file.
The output keeps the first checkpoint's config, name and vocabulary, the averaged
weights and an "averaged_from" list of the inputs; no optimizer or training state,
so it translates and evaluates but does not resume training.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from mt.checkpoint import Checkpoint, save_checkpoint
from mt.errors import CheckpointError, MTError
from mt.files import STDIO


def _check_compatible(first_path: str, first: Checkpoint, path: str, ck: Checkpoint) -> None:
    """Raise CheckpointError naming `path` when it cannot be averaged with the first checkpoint."""
    ref_model, model = first.config.get("model", {}), ck.config.get("model", {})
    diff = sorted(k for k in set(ref_model) | set(model) if ref_model.get(k) != model.get(k))
    if diff:
        shown = ", ".join(f"model.{k} {model.get(k)!r} vs {ref_model.get(k)!r}" for k in diff)
        raise CheckpointError(f"{path}: model config differs from {first_path}: {shown}")
    for key in ("spm_src", "spm_tgt"):
        if getattr(ck, key) != getattr(first, key):
            raise CheckpointError(
                f"{path}: its SentencePiece model ({key}) differs from {first_path}'s; "
                f"only checkpoints with the same vocabulary can be averaged"
            )
    ref_sd, sd = first.model, ck.model
    missing, extra = sorted(set(ref_sd) - set(sd)), sorted(set(sd) - set(ref_sd))
    if missing or extra:
        raise CheckpointError(
            f"{path}: parameter names differ from {first_path}: "
            f"missing {missing[:5] or 'none'}, unexpected {extra[:5] or 'none'}"
        )
    for name, ref in ref_sd.items():
        if tuple(sd[name].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{path}: parameter {name} has shape {tuple(sd[name].shape)}, "
                f"{first_path} has {tuple(ref.shape)}"
            )


def average_checkpoints(paths: Sequence[str], output: str, quiet: bool = False) -> None:
    """Write to `output` a checkpoint whose weights are the mean of those in `paths`."""
    paths = [str(p) for p in paths]
    if str(output) == STDIO:  # `-` is standard output elsewhere; a checkpoint on a terminal is no use
        raise MTError("--output -: a checkpoint cannot go to standard output; name a file")
    if not paths:
        raise MTError("average: give at least one checkpoint")
    first = Checkpoint.read(paths[0])
    # Float tensors are summed in float64: averaging many fp16/bf16/fp32 checkpoints in
    # their own precision loses the small differences that averaging is about.
    sums: dict[str, torch.Tensor] = {
        k: v.to(torch.float64) for k, v in first.model.items() if torch.is_floating_point(v)
    }
    for path in paths[1:]:
        ck = Checkpoint.read(path)
        _check_compatible(paths[0], first, path, ck)
        for k in sums:
            sums[k] += ck.model[k].to(torch.float64)
        del ck  # one checkpoint in memory at a time

    n = len(paths)
    averaged = {k: (sums[k] / n).to(v.dtype) if k in sums else v.clone() for k, v in first.model.items()}
    out = Checkpoint(first.name, first.config, first.spm_src, first.spm_tgt, averaged, averaged_from=paths)
    save_checkpoint(output, out.to_state())
    if not quiet:
        print(f"averaged {n} checkpoint{'s' * (n > 1)} -> {output}", file=sys.stderr)
