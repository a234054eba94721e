"""Lines in, lines out: what every translator shares, whatever runs the model.

`mt translate` translates with a checkpoint (mt.translate.translator.Translator, PyTorch) or with a
CTranslate2 export (mt.export.ct2_translator.CT2Translator). Both keep one contract, which
lives here so that neither can drift from it: source lines are stripped, encoded and cut to
the model's length with a warning naming the line (`encode_lines`); sentences are sorted by
length and cut into batches of at most `max_tokens` padded tokens (`length_batches`, with
`batch_budget` for batches decoded side by side) and decoded by one loop (`decode_in_batches`);
and every input line gives exactly one output line, in order (`translate_lines`). Nothing
here imports torch, so a CTranslate2 export translates without loading it.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from typing import Protocol, TypeVar

import numpy as np
from tqdm import tqdm

from mt.config import Config, DecodeConfig, resolve_decoding
from mt.data.tokenizer import Tokenizer

R = TypeVar("R")


class TextTranslator(Protocol):
    """What `translate_lines` needs of a translator: its config (whose decode section the
    edges resolve options against) and `translate_nbest`, which takes a resolved `decode`
    as it is (beam, nbest and max_tokens are the Python API's, resolved against config.decode)."""

    config: Config
    tokenizer: Tokenizer

    def translate_nbest(
        self,
        lines: Sequence[str],
        beam: int | None = None,
        nbest: int = 1,
        max_tokens: int | None = None,
        progress: bool = False,
        *,
        decode: DecodeConfig | None = None,
    ) -> list[list[tuple[str, float]]]: ...


def resolved(
    default: DecodeConfig, decode: DecodeConfig | None, beam: int | None, nbest: int, max_tokens: int | None
) -> DecodeConfig:
    """The settings of a `translate_nbest` call: `decode` as it is, or (the Python API) `beam`,
    `nbest` and `max_tokens` resolved against the translator's `default`."""
    if decode is None:
        return resolve_decoding(default, beam, nbest, max_tokens)
    if (beam, nbest, max_tokens) != (None, 1, None):
        raise TypeError("give decode, or beam/nbest/max_tokens, not both")
    return decode


# --------------------------------------------------------------------------- input


def encode_lines(
    tokenizer: Tokenizer, lines: Sequence[str], numbers: Sequence[int], max_len: int
) -> list[np.ndarray]:
    """Source token ids (no specials) of `lines`, each cut to `max_len` tokens with a warning on
    stderr; `numbers` are the lines' 1-based numbers in the input, for the warning."""
    ids = tokenizer.encode_src([line.strip() for line in lines])
    out = []
    for n, s in zip(numbers, ids, strict=True):
        if len(s) > max_len:
            print(
                f"mt: warning: input line {n} has {len(s)} tokens; translating its first "
                f"{max_len} (the model's maximum)",
                file=sys.stderr,
            )
            s = s[:max_len]
        out.append(np.asarray(s, dtype=np.int64))
    return out


Scored = Sequence[tuple[list[int], float]]  # a sentence's hypotheses: target ids and score, best first


def translate_text(
    tokenizer: Tokenizer,
    lines: Sequence[str],
    max_len: int,
    translate_ids: Callable[[list[np.ndarray]], Sequence[Scored]],
) -> list[list[tuple[str, float]]]:
    """The text side every translator shares: blank lines give [('', 0.0)] and are not
    translated; the others are encoded (encode_lines), translated by `translate_ids`, and
    decoded to (text, score) pairs, best first, in the order of `lines`."""
    keep = [i for i, line in enumerate(lines) if line.strip()]
    hyps = translate_ids(encode_lines(tokenizer, [lines[i] for i in keep], [i + 1 for i in keep], max_len))
    out: list[list[tuple[str, float]]] = [[("", 0.0)] for _ in lines]
    for i, hs in zip(keep, hyps, strict=True):
        texts = tokenizer.decode_tgt([ids for ids, _ in hs])
        out[i] = [(t, score) for t, (_, score) in zip(texts, hs, strict=True)]
    return out

def length_batches(lengths: np.ndarray, max_tokens: int, max_sentences: int = 512) -> list[np.ndarray]:
    """Indices sorted by length, cut so that n * (longest + 1) <= max_tokens."""
    order = np.argsort(lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        end = start + 1
        while (
            end < len(order)
            and end - start < max_sentences
            and (end - start + 1) * (lengths[order[end]] + 1) <= max_tokens
        ):
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def max_output_length(src_len: int, max_len_a: float, max_len_b: int, cap: int) -> int:
    """The most tokens (EOS included) a translation of a source of `src_len` tokens (its EOS
    included) may have: max(1, int(a * src_len + b)), and never more than `cap`, the model's
    max_positions (producing token k feeds the decoder k positions)."""
    return min(cap, max(1, int(max_len_a * src_len + max_len_b)))


def longest_first(batches: list[np.ndarray], lengths: np.ndarray) -> list[np.ndarray]:
    """Batches in decreasing padded size, so that workers side by side finish together."""
    return sorted(batches, key=lambda b: -len(b) * (int(lengths[b].max()) + 1))


def batch_budget(lengths: np.ndarray, max_tokens: int, workers: int) -> int:
    """Tokens per batch when `workers` batches are decoded side by side: at most 1/4W of the
    input, so that the workers finish together (the longest batches go first)."""
    if workers <= 1:
        return max_tokens
    return min(max_tokens, max(1, int((lengths + 1).sum()) // (4 * workers)))


def decode_in_batches(
    lengths: np.ndarray,
    max_tokens: int,
    decode_batch: Callable[[np.ndarray], Sequence[R]],
    workers: int = 1,
    executor: Callable[[int], Executor] | None = None,
    progress: bool = False,
) -> list[R]:
    """The one batch loop of every translator: `decode_batch(idx)`'s results (one per sentence of
    `idx`, in its order) for each sentence of `lengths`, in input order.

    Sentences are sorted by length and cut into batches of at most `max_tokens` padded tokens,
    or for W `workers` side by side of at most 1/4W of the input (`batch_budget`), the longest
    first. With `executor` and more than one batch, min(W, batches) workers decode them:
    `executor(w)` is a pool of w threads, each with one batch running and at most one waiting,
    so that an error or Ctrl-C stops the run after the batches already submitted; the others
    are cancelled. Every sentence is decoded on its own, so the output depends on none of this.
    """
    batches = longest_first(length_batches(lengths, batch_budget(lengths, max_tokens, workers)), lengths)
    results: dict[int, R] = {}
    bar = tqdm(total=len(lengths), desc="translating", unit="sent", disable=not progress, file=sys.stderr)

    def put(idx: np.ndarray, out: Sequence[R]) -> None:
        for i, r in zip(idx.tolist(), out, strict=True):
            results[i] = r
        bar.update(len(idx))

    with bar:
        workers = min(workers, len(batches))
        if executor is None or workers <= 1:
            for idx in batches:
                put(idx, decode_batch(idx))
        else:
            pool = executor(workers)
            window: deque[tuple[np.ndarray, Future[Sequence[R]]]] = deque()
            try:
                for idx in batches:
                    window.append((idx, pool.submit(decode_batch, idx)))
                    while len(window) > 2 * workers:
                        put(*_done(window.popleft()))
                while window:
                    put(*_done(window.popleft()))
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    return [results[i] for i in range(len(lengths))]


def _done(item: tuple[np.ndarray, Future[Sequence[R]]]) -> tuple[np.ndarray, Sequence[R]]:
    idx, future = item
    return idx, future.result()


# --------------------------------------------------------------------------- output


def one_line(text: str) -> str:
    """A hypothesis as a single output line: line breaks become spaces."""
    return text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


def format_nbest(hyps: Sequence[tuple[str, float]], nbest: int) -> str:
    """One output line: the hypothesis alone, or `hyp<TAB>score` pairs when nbest > 1."""
    if nbest == 1:
        return one_line(hyps[0][0])
    return "\t".join(f"{one_line(t).replace(chr(9), ' ')}\t{s:.4f}" for t, s in hyps)


def translate_lines(
    translator: TextTranslator, lines: Sequence[str], decode: DecodeConfig, progress: bool = False
) -> list[str]:
    """Output lines (without newlines) for `lines`, exactly one per input line, in order, with
    `decode` resolved (mt.config.resolve_decoding): decode.nbest hypotheses on each line."""
    hyps = translator.translate_nbest(lines, progress=progress, decode=decode)
    if len(hyps) != len(lines):  # the contract `mt translate` exists for
        raise RuntimeError(f"translator returned {len(hyps)} results for {len(lines)} lines")
    # A blank line gives a blank line, also with --nbest (not a lone "<TAB>score").
    nbest = decode.nbest
    return [format_nbest(h, nbest) if line.strip() else "" for line, h in zip(lines, hyps, strict=True)]
