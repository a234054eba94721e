"""`mt evaluate`: translate a test set and score it with sacreBLEU (BLEU and chrF).

Two forms:

    mt evaluate CONFIG [key=value ...] [--split test] [--checkpoint CK]
    mt evaluate --checkpoint CK --src FILE --ref FILE

The first scores the experiment's best checkpoint (`<out_dir>/checkpoint_best.pt`)
on a prepared split; `decode.*` overrides on its command line change the search
(e.g. `decode.alpha=0.6`). The second scores any checkpoint on any pair of files
(a CONFIG given with --src/--ref only supplies the default checkpoint).

Scores are computed on detokenized output against the raw references: BLEU with
sacreBLEU's defaults (13a tokenization, cased) and chrF, each reported with its
sacreBLEU signature so that numbers can be compared across papers. Next to the
checkpoint go `<stem>.<split>.beam<N>.hyp.txt` (the hypotheses, one per line) and
`<stem>.<split>.beam<N>.json` (scores, signatures and speed); for --src files the
source file's stem takes the place of the split, and a precision other than fp32
is added to the name (`...beam5.bf16.json`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sacrebleu.metrics import BLEU, CHRF

from mt.config import DecodeConfig, Precision, resolve_decoding
from mt.errors import DataError
from mt.files import write_atomic

if TYPE_CHECKING:
    from mt.translate.lines import TextTranslator


def score(hyps: list[str], refs: list[str]) -> dict[str, Any]:
    """Corpus BLEU and chrF of detokenized hypotheses against one reference each."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    # New metric objects per call: their signatures describe exactly this scoring.
    bleu, chrf = BLEU(), CHRF()
    b = bleu.corpus_score(hyps, [refs])
    c = chrf.corpus_score(hyps, [refs])
    return {
        "bleu": b.score,
        "chrf": c.score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "bleu_detail": str(b),  # n-gram precisions, brevity penalty, lengths
    }


def output_paths(ck_path: str | Path, name: str, beam: int, precision: str = "fp32") -> tuple[Path, Path]:
    """Where the hypotheses and the scores of an evaluation are written."""
    ck_path = Path(ck_path)
    base = f"{ck_path.stem}.{name}.beam{beam}" + ("" if precision == "fp32" else f".{precision}")
    return ck_path.with_name(base + ".hyp.txt"), ck_path.with_name(base + ".json")


def evaluate_checkpoint(
    ck_path: str | Path,
    src_lines: Sequence[str],
    ref_lines: Sequence[str],
    beam: int | None = None,
    max_tokens: int | None = None,
    device: str | None = None,
    name: str = "eval",
    *,
    decode: DecodeConfig | None = None,
    precision: Precision | None = None,
    write: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Translate `src_lines` with a checkpoint, score against `ref_lines`, write the results.

    `beam` None means the checkpoint's decode.beam (or `decode.beam` when `decode` is
    given, which then replaces the checkpoint's decoding settings); likewise `precision`
    (else decode.precision, else the checkpoint's). With `write`, the hypotheses and a
    JSON of the returned dict go next to the checkpoint (see `output_paths`). The dict
    holds bleu, chrf, their signatures, beam, precision, sentences, seconds (translation
    only, not loading) and sentences_per_second.
    """
    from mt.device import pick_device
    from mt.translate.translator import Translator

    _check_lines(src_lines, ref_lines, name)
    if precision is None and decode is not None:
        precision = decode.precision
    translator = Translator.from_checkpoint(ck_path, pick_device(device), precision)
    precision = translator.config.decode.precision
    settings = _settings(translator.config.decode, decode, beam, max_tokens)
    return _evaluate(translator, ck_path, src_lines, ref_lines, settings, name, precision, write, progress)


def evaluate_export(
    model_dir: str | Path,
    src_lines: Sequence[str],
    ref_lines: Sequence[str],
    beam: int | None = None,
    max_tokens: int | None = None,
    device: str | None = None,
    name: str = "eval",
    *,
    decode: DecodeConfig | None = None,
    compute_type: str | None = None,
    write: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """`evaluate_checkpoint` for a CTranslate2 export (`mt evaluate --model DIR`), translated by
    CTranslate2 with `compute_type` (default: the export's weight type), which takes the place of
    the precision in the result and the file names (next to DIR: `DIR.<name>.beam<N>.<type>.json`)."""
    from mt.export import read_manifest
    from mt.export.ct2_translator import CT2Translator

    _check_lines(src_lines, ref_lines, name)
    translator = CT2Translator.from_export(model_dir, device, compute_type=compute_type)
    settings = _settings(translator.config.decode, decode, beam, max_tokens)
    if compute_type in (None, "default"):
        compute_type = read_manifest(model_dir).quantization or "float32"
    label = f"ct2-{compute_type}"
    return _evaluate(
        translator, Path(model_dir), src_lines, ref_lines, settings, name, label, write, progress
    )


def _settings(
    own: DecodeConfig, decode: DecodeConfig | None, beam: int | None, max_tokens: int | None
) -> DecodeConfig:
    """The evaluation's decoding: `decode` (else the model's own) in the model's precision, with
    `beam` and `max_tokens` resolved, one hypothesis per line."""
    base = own if decode is None else dataclasses.replace(decode, precision=own.precision)
    return resolve_decoding(base, beam, 1, max_tokens)


def _check_lines(src_lines: Sequence[str], ref_lines: Sequence[str], name: str) -> None:
    if len(src_lines) != len(ref_lines):
        raise DataError(f"{name}: {len(src_lines)} source lines but {len(ref_lines)} references")
    if not src_lines:
        raise DataError(f"{name}: nothing to evaluate (no sentences)")


def _evaluate(
    translator: TextTranslator,
    ck_path: Path | str,
    src_lines: Sequence[str],
    ref_lines: Sequence[str],
    decode: DecodeConfig,
    name: str,
    precision: str,
    write: bool,
    progress: bool,
) -> dict[str, Any]:
    from mt.translate.lines import translate_lines

    beam = decode.beam
    t0 = time.perf_counter()
    hyps = translate_lines(translator, src_lines, decode, progress=progress)
    seconds = time.perf_counter() - t0

    result: dict[str, Any] = {
        "checkpoint": str(ck_path),
        "name": name,
        **score(hyps, list(ref_lines)),
        "beam": beam,
        "precision": precision,
        "sentences": len(src_lines),
        "seconds": round(seconds, 3),
        "sentences_per_second": round(len(src_lines) / max(seconds, 1e-9), 2),
    }
    if write:
        hyp_path, json_path = output_paths(ck_path, name, beam, precision)
        write_atomic(hyp_path, "".join(h + "\n" for h in hyps))
        result["hyp_file"] = str(hyp_path)
        result["json_file"] = str(json_path)
        write_atomic(json_path, json.dumps(result, indent=2) + "\n")
    return result


def summary(result: dict[str, Any]) -> str:
    """One line: what was scored, the scores, and the speed."""
    line = (
        f"{result['name']}: BLEU {result['bleu']:.2f} chrF {result['chrf']:.2f} "
        f"(beam {result['beam']}, {result['precision']}, {result['sentences']} sentences, "
        f"{result['seconds']:.1f}s, "
        f"{result['sentences_per_second']:.1f} sent/s)"
    )
    return line + (f" -> {result['hyp_file']}" if "hyp_file" in result else "")


def report(result: dict[str, Any]) -> str:
    """The scores with their sacreBLEU signatures, then the one-line summary."""
    return "\n".join(
        [
            result["bleu_detail"],
            f"  signature: {result['bleu_signature']}",
            f"chrF2 = {result['chrf']:.2f}",
            f"  signature: {result['chrf_signature']}",
            summary(result),
        ]
    )
