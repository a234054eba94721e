"""Translating with a CTranslate2 export: `mt translate --model DIR`, under a checkpoint's contract.

`CT2Translator` is to a CTranslate2 export what mt.translate.translator.Translator is to a checkpoint,
with the same `translate_nbest` / `translate`, so `mt translate` keeps its contract through
mt.translate.lines (N lines in, N lines out, in order, blank lines kept, over-long lines cut with a
warning) and its errors. It never imports torch: the export runs on CTranslate2 alone.

Decoding follows the export's decode settings (the checkpoint's), as CTranslate2 can express
them: PAD and BOS are suppressed and `min_len` holds as in mt.translate.search; beam scores are
normalised by len**alpha with EOS counted, as decode.length_penalty "fairseq" (GNMT's penalty
has no CTranslate2 equivalent: `mt export` refuses it, and beam search with an export that
holds it is an error). `compute_type` is CTranslate2's (e.g. float16 for a float32 export on a
GPU). Lengths: CTranslate2 takes one maximum per batch, so each batch gets its longest
sentence's limit and every output is cut to its own sentence's (mt.translate.lines.max_output_length).
For greedy search that gives mt's output token for token (greedy outputs are prefixes of longer
runs); beam search differs where CTranslate2 stops (as soon as `beam` hypotheses have ended)
before an unfinished hypothesis would have won.

Batches are cut and run by Translator's loop (mt.translate.lines.decode_in_batches) and, on a CPU,
decoded side by side by CTranslate2's `inter_threads` workers, one batch each, on `intra_threads`
threads: W workers (decode.inter_threads, 0 = one per core) with cores / W threads each.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mt.config import Config, DecodeConfig
from mt.data.tokenizer import Tokenizer
from mt.errors import ExportError, MTError
from mt.export import read_manifest, require
from mt.special import BOS, PAD
from mt.translate.lines import decode_in_batches, max_output_length, resolved, translate_text

if TYPE_CHECKING:  # an optional dependency (the export extra), imported when a model loads
    import ctranslate2

# CTranslate2's compute types: "default" keeps the export's weight type, "auto" takes the
# fastest the device supports; the others convert the weights when the model loads.
COMPUTE_TYPES = (
    "default",
    "auto",
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
    "int16",
    "float16",
    "bfloat16",
    "float32",
)
Output = tuple[list[int], float]  # target ids (no BOS/EOS) and CTranslate2's score


def ct2_device(name: str | None) -> tuple[str, int]:
    """A --device name as CTranslate2 takes it: (device, index). auto/None: CUDA when it has one."""
    ctranslate2 = require("ctranslate2", "mt translate --model")
    if name in (None, "", "auto"):
        return ("cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"), 0
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise MTError(f"--device {name}: not a device name; use cpu, cuda or cuda:N")
    if kind == "cuda":
        count = ctranslate2.get_cuda_device_count()
        if count == 0:
            raise MTError(f"--device {name}: CUDA is not available to CTranslate2 here; use --device cpu")
        if int(index or 0) >= count:
            raise MTError(f"--device {name}: this machine has {count} CUDA device(s)")
    return kind, int(index or 0)


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class CT2Translator:
    """A CTranslate2 export, its tokenizer and decoding settings: everything needed to translate."""

    def __init__(
        self, model: ctranslate2.Translator, tokenizer: Tokenizer, config: Config, workers: int
    ) -> None:
        """`model` runs `workers` batches at once."""
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.workers = workers
        self.max_src_len = config.model.max_positions - 1  # as Translator: EOS takes the last position
        tgt = tokenizer.tgt
        self._suppress = [[tgt.id_to_piece(PAD)], [tgt.id_to_piece(BOS)]]

    @classmethod
    def from_export(
        cls,
        directory: str | Path,
        device: str | None = None,
        inter_threads: int | None = None,
        compute_type: str | None = None,
    ) -> CT2Translator:
        """Load the CTranslate2 export in `directory` (see mt.export) on `device` (cpu, cuda, cuda:N;
        default: CUDA when CTranslate2 has it). `inter_threads` overrides decode.inter_threads;
        `compute_type` is CTranslate2's (default: the export's weight type; see COMPUTE_TYPES)."""
        manifest = read_manifest(directory)
        if manifest.engine != "ctranslate2":
            raise ExportError(
                f"{directory} is a {manifest.engine} export; --model takes a CTranslate2 export "
                f"(mt export ctranslate2)"
            )
        ctranslate2 = require("ctranslate2", "mt translate --model")
        kind, index = ct2_device(device)
        directory = Path(directory)
        try:
            tokenizer = Tokenizer(
                (directory / "source.spm").read_bytes(), (directory / "target.spm").read_bytes()
            )
        except OSError as e:
            reason = e.strerror or e
            raise ExportError(f"cannot read the SentencePiece models of {directory}: {reason}") from None
        config = manifest.config
        if kind == "cpu":
            cores = cpu_cores()
            requested = config.decode.inter_threads if inter_threads is None else inter_threads
            workers = max(1, min(requested or cores, cores))
            threads = {"inter_threads": workers, "intra_threads": max(1, cores // workers)}
        else:
            workers, threads = 1, {}
        if compute_type is not None and compute_type not in ("default", "auto"):
            if compute_type not in COMPUTE_TYPES:
                raise MTError(f"--compute-type {compute_type}: expected one of {', '.join(COMPUTE_TYPES)}")
            supported = sorted(ctranslate2.get_supported_compute_types(kind, index))
            if compute_type not in supported:
                raise MTError(
                    f"--compute-type {compute_type}: not supported on {kind} here (supported: "
                    f"{', '.join(supported)}, default, auto)"
                )
        try:
            model = ctranslate2.Translator(
                str(directory),
                device=kind,
                device_index=index,
                compute_type=compute_type or "default",
                **threads,
            )
        except (RuntimeError, ValueError) as e:  # a model.bin that is missing, truncated or foreign
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"{directory}: CTranslate2 cannot load this model ({first})") from None
        return cls(model, tokenizer, config, workers)

    # ------------------------------------------------------------------ token ids

    def beam_problem(self) -> str | None:
        """Why this export cannot run beam search as its config says, or None. Exports made
        before `mt export` refused the GNMT penalty can hold one."""
        penalty = self.config.decode.length_penalty
        if penalty == "fairseq":
            return None
        return (
            f"decode.length_penalty {penalty!r} has no CTranslate2 equivalent (its beam search divides "
            f"by len**alpha, the 'fairseq' penalty): re-export with --length-penalty fairseq"
        )

    def _options(self, decode: DecodeConfig) -> dict[str, object]:
        if decode.beam > 1 and (problem := self.beam_problem()) is not None:
            raise MTError(f"{problem}, translate with --beam 1, or with the checkpoint")
        return {
            "beam_size": decode.beam,
            "num_hypotheses": decode.nbest,
            "length_penalty": decode.alpha,
            "min_decoding_length": decode.min_len,
            "max_input_length": 0,  # inputs are cut to the model's length before (encode_lines)
            "suppress_sequences": self._suppress,
            "return_scores": True,
        }

    def translate_ids(
        self, seqs: Sequence[np.ndarray], decode: DecodeConfig, progress: bool = False
    ) -> list[list[Output]]:
        """Translate token-id sequences (no specials) with a resolved `decode`
        (mt.config.resolve_decoding); decode.nbest (ids, score) per input, in order.

        Batches are cut and run as mt.translate.translator.Translator's are
        (mt.translate.lines.decode_in_batches): on a CPU, one thread per CTranslate2 worker
        hands it a batch at a time, which CTranslate2 decodes with the GIL released.
        """
        if not 1 <= decode.nbest <= decode.beam:
            raise ValueError(f"nbest must be in [1, beam={decode.beam}], got {decode.nbest}")
        options = self._options(decode)
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        cap = self.config.model.max_positions
        limits = [max_output_length(int(n) + 1, decode.max_len_a, decode.max_len_b, cap) for n in lengths]
        src = self.tokenizer.src
        tgt = self.tokenizer.tgt

        def decode_batch(idx: np.ndarray) -> list[list[Output]]:
            pieces = [[src.id_to_piece(int(t)) for t in seqs[i]] for i in idx]
            longest = max(limits[i] for i in idx)
            outs = self.model.translate_batch(pieces, max_decoding_length=longest, **options)
            results = []
            for i, out in zip(idx, outs, strict=True):
                hyps = zip(out.hypotheses, out.scores, strict=True)  # without EOS (return_end_token)
                results.append(
                    [([tgt.piece_to_id(p) for p in hyp][: limits[i]], score) for hyp, score in hyps]
                )
            return results

        return decode_in_batches(
            lengths, decode.max_tokens, decode_batch, self.workers, ThreadPoolExecutor, progress
        )

    # ------------------------------------------------------------------ text

    def translate_nbest(
        self,
        lines: Sequence[str],
        beam: int | None = None,
        nbest: int = 1,
        max_tokens: int | None = None,
        progress: bool = False,
        *,
        decode: DecodeConfig | None = None,
    ) -> list[list[tuple[str, float]]]:
        """The nbest (text, score) pairs per line, best first; an empty line gives [('', 0.0)].
        `decode` and the options as in mt.translate.translator.Translator.translate_nbest."""
        decode = resolved(self.config.decode, decode, beam, nbest, max_tokens)
        def scored(seqs: list[np.ndarray]) -> list[list[Output]]:
            return self.translate_ids(seqs, decode, progress=progress)

        return translate_text(self.tokenizer, lines, self.max_src_len, scored)

    def translate(
        self,
        lines: Sequence[str],
        beam: int | None = None,
        max_tokens: int | None = None,
        progress: bool = False,
    ) -> list[str]:
        """One translation per line, in order; empty or blank lines give empty strings."""
        return [h[0][0] for h in self.translate_nbest(lines, beam, 1, max_tokens, progress)]
