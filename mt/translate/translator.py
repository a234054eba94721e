"""Translating with a trained model: the Python API and the batching behind the CLI.

    from mt import Translator
    tr = Translator.from_checkpoint("runs/multi30k_de_en/checkpoint_best.pt")
    tr.translate(["Ein Hund läuft im Park."], beam=5)        # -> ["A dog runs in the park."]
    tr.translate_nbest(["Ein Hund läuft."], beam=5, nbest=3)   # -> [[(text, score), ...]]

Sentences are sorted by length and cut into batches of at most `max_tokens`
padded source tokens, then put back in input order, so one call with many
sentences is fast and its output is aligned with its input line for line.
Below the Python API (and the CLI, the evaluator, the server, training validation,
which resolve their options with mt.config.resolve_decoding), everything takes one
resolved DecodeConfig as it is.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mt.checkpoint import load_model
from mt.config import Config, DecodeConfig, Precision
from mt.data.tokenizer import Tokenizer
from mt.device import DTYPES, decode_precision, pick_device
from mt.model import Transformer, pack_linear_weights
from mt.special import EOS, PAD
from mt.translate.lines import decode_in_batches, encode_lines, resolved, translate_text

# The output-line contract lives in mt.translate.lines (no torch there); its names are importable here.
from mt.translate.lines import format_nbest as format_nbest
from mt.translate.lines import one_line as one_line
from mt.translate.lines import translate_lines as translate_lines
from mt.translate.search import Hypothesis, beam_search, greedy
from mt.workers import WorkerPool, can_fork_workers, start_worker


def pad_sources(seqs: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """Source ids + EOS, right-padded: (B, S)."""
    width = max(len(s) for s in seqs) + 1
    out = np.full((len(seqs), width), PAD, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
        out[i, len(s)] = EOS
    return torch.from_numpy(out).to(device)


# torch.set_num_threads sets the calling thread's count and also the default that threads
# started later take, which the pool's threads change; calls that overlap (a server sharing
# one Translator) take turns, so that none restores a count another one is relying on. Taking
# turns also leaves _JOB to one call at a time.
_THREAD_COUNT = threading.Lock()

# The batch decoder of the translate_ids call in progress, for forked decoder processes: they
# have it as their parent had it when it forked them.
_JOB: dict[str, Callable[[np.ndarray], list[list[Hypothesis]]]] = {}


def _start_decoder(parent_pid: int, threads: int) -> None:
    start_worker(parent_pid)
    torch.set_num_threads(threads)


def _decode_job(idx: np.ndarray) -> list[list[Hypothesis]]:
    return _JOB["decode_batch"](idx)


def cpu_workers(decode: DecodeConfig, device: torch.device) -> int:
    """How many batches Translator decodes at once: see DecodeConfig.inter_threads."""
    if device.type != "cpu":
        return 1
    return decode.inter_threads or torch.get_num_threads()


def search_batch(
    model: Transformer, seqs: Sequence[np.ndarray], decode: DecodeConfig, device: torch.device
) -> list[list[Hypothesis]]:
    """Search one batch of token-id sequences with a resolved `decode` (its beam and nbest):
    greedy for beam 1 with nbest 1, else beam search."""
    src = pad_sources([np.asarray(s) for s in seqs], device)
    d = decode
    settings: dict[str, Any] = dict(
        max_len_a=d.max_len_a,
        max_len_b=d.max_len_b,
        min_len=d.min_len,
        length_penalty=d.length_penalty,
        alpha=d.alpha,
    )
    if d.beam == 1 and d.nbest == 1:
        return [[h] for h in greedy(model, src, **settings)]
    return beam_search(model, src, beam=d.beam, nbest=d.nbest, **settings)


def translate_ids(
    model: Transformer,
    seqs: Sequence[np.ndarray],
    decode: DecodeConfig,
    device: torch.device | None = None,
    workers: int = 1,
    progress: bool = False,
) -> list[list[Hypothesis]]:
    """Translate token-id sequences (no specials) with a resolved `decode`
    (mt.config.resolve_decoding); returns decode.nbest hypotheses per input, in order.

    The model must be in eval mode (the caller's to set). Batches of at most decode.max_tokens
    padded tokens go through mt.translate.lines.decode_in_batches; with `workers` > 1 (on a
    CPU) that many workers decode them side by side, torch's threads shared out among them.
    Decoding is mostly small operations that one thread runs as fast as two, so W batches side
    by side beat one batch on W threads (measured: 15-25% on 2 cores).

    The workers are processes forked for the call where they can be (mt.workers), else
    threads. Each PyTorch call lets go of the GIL and takes it back, a decoder step makes some
    230 of them, and two threads decoding side by side wait for each other at each one: a
    one-row step took 2.4x as long with a second thread decoding beside it, a 30-row step 1.5x.
    Processes have a GIL each (greedy on 1,000 sentences, 2 cores: 1.80 s against 1.98 s).
    """
    device = device or next(model.parameters()).device
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)

    def decode_batch(idx: np.ndarray) -> list[list[Hypothesis]]:
        return search_batch(model, [seqs[i] for i in idx], decode, device)

    in_batches = functools.partial(decode_in_batches, lengths, decode.max_tokens, progress=progress)
    if workers <= 1:
        return in_batches(decode_batch)
    with _THREAD_COUNT:
        threads = torch.get_num_threads()
        if can_fork_workers():
            pack_linear_weights(model)  # before the fork, so that the processes share one copy
            _JOB["decode_batch"] = decode_batch

            def processes(w: int) -> WorkerPool:
                return WorkerPool(w, _start_decoder, (os.getpid(), max(1, threads // w)))

            try:
                return in_batches(_decode_job, workers, processes)
            finally:
                _JOB.clear()

        def pool(w: int) -> ThreadPoolExecutor:
            return ThreadPoolExecutor(w, initializer=torch.set_num_threads, initargs=(max(1, threads // w),))

        try:
            return in_batches(decode_batch, workers, pool)
        finally:
            torch.set_num_threads(threads)


class Translator:
    """A model, its tokenizer and decoding settings: everything needed to translate text."""

    def __init__(
        self, model: Transformer, tokenizer: Tokenizer, config: Config, device: torch.device
    ) -> None:
        """`config.decode.precision` sets the dtype the model is cast to; `auto` is resolved
        for `device` and the result recorded in `self.config.decode.precision`. The Translator
        takes the model for inference: eval mode, and frozen (no gradients), which lets its
        linear layers keep packed copies of their weights on a CPU (mt.model.Linear)."""
        precision = decode_precision(config.decode.precision, device)
        self.model = model.to(device=device, dtype=DTYPES[precision]).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        decode = dataclasses.replace(config.decode, precision=precision)
        self.config = dataclasses.replace(config, decode=decode)
        self.device = device
        # Positions beyond the model's table cannot be encoded: longer inputs are truncated.
        self.max_src_len = config.model.max_positions - 1

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device | None = None, precision: Precision | None = None
    ) -> Translator:
        """`precision` (auto, fp32, bf16, fp16) overrides the checkpoint's decode.precision."""
        dev = device if isinstance(device, torch.device) else pick_device(device)
        config, tokenizer, model = load_model(path, dev, precision)
        return cls(model, tokenizer, config, dev)

    def translate_ids(
        self, seqs: Sequence[np.ndarray], decode: DecodeConfig, progress: bool = False
    ) -> list[list[Hypothesis]]:
        """`translate_ids` with this translator's model and a resolved `decode`, on
        cpu_workers() threads on a CPU."""
        workers = cpu_workers(decode, self.device)
        return translate_ids(self.model, seqs, decode, self.device, workers, progress)

    def _encode(self, lines: Sequence[str], numbers: Sequence[int]) -> list[np.ndarray]:
        """Token ids of `lines`; `numbers` are their 1-based line numbers, for the warning."""
        return encode_lines(self.tokenizer, lines, numbers, self.max_src_len)

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
        `decode` (resolved: mt.config.resolve_decoding) is taken as it is; without it, `beam`,
        `nbest` and `max_tokens` are resolved against this translator's config.decode."""
        decode = resolved(self.config.decode, decode, beam, nbest, max_tokens)

        def scored(seqs: list[np.ndarray]) -> list[list[tuple[list[int], float]]]:
            hyps = self.translate_ids(seqs, decode, progress=progress)
            return [[(h.tokens, h.score) for h in hs] for hs in hyps]

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
