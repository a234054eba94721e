"""Lines in, lines out: what every translator shares, whatever runs the model.

`mt translate` translates with a checkpoint (mt.translate.translator.Translator, PyTorch) or with a
CTranslate2 export (mt.export.ct2_translator.CT2Translator). Both keep one contract, which
lives here so that neither can drift from it: source lines are stripped, encoded and cut to
the model's length with a warning naming the line (`encode_lines`); sentences are sorted by
length and cut into batches of at most `max_tokens` padded tokens (`length_batches`, with
`batch_budget` for batches decoded side by side); and every input line gives exactly one
output line, in order (`translate_lines`). Nothing here imports torch, so a CTranslate2
export translates without loading it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from mt.data.tokenizer import Tokenizer


class TextTranslator(Protocol):
    """What `translate_lines` needs of a translator."""

    def translate_nbest(
        self,
        lines: Sequence[str],
        beam: int | None = None,
        nbest: int = 1,
        max_tokens: int | None = None,
        progress: bool = False,
    ) -> list[list[tuple[str, float]]]: ...


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
    translator: TextTranslator,
    lines: Sequence[str],
    beam: int | None = None,
    nbest: int = 1,
    max_tokens: int | None = None,
    progress: bool = False,
) -> list[str]:
    """Output lines (without newlines) for `lines`, exactly one per input line, in order."""
    hyps = translator.translate_nbest(lines, beam=beam, nbest=nbest, max_tokens=max_tokens, progress=progress)
    if len(hyps) != len(lines):  # the contract `mt translate` exists for
        raise RuntimeError(f"translator returned {len(hyps)} results for {len(lines)} lines")
    # A blank line gives a blank line, also with --nbest (not a lone "<TAB>score").
    return [format_nbest(h, nbest) if line.strip() else "" for line, h in zip(lines, hyps, strict=True)]
