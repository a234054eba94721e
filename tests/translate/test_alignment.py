"""mt.translate.alignment: cross-attention weights of a translation, and word alignments from them."""

from __future__ import annotations

import pytest
import torch
from helpers import synthetic_pairs

from mt.config import resolve_decoding
from mt.model import _merge_heads
from mt.special import EOS, PAD
from mt.translate.alignment import (
    cross_attention,
    format_pairs,
    hard_alignment,
    translate_and_attend,
    word_index,
)
from mt.translate.translator import Translator


@pytest.fixture(scope="module")
def translator(checkpoint) -> Translator:
    return Translator.from_checkpoint(checkpoint, "cpu")


def _padded(rows: list[list[int]]) -> torch.Tensor:
    width = max(map(len, rows)) + 1
    return torch.tensor([r + [EOS] + [PAD] * (width - len(r) - 1) for r in rows])


def test_recomputed_weights_are_the_attention_the_model_applies(translator):
    """The hooks recompute softmax(q k^T / sqrt(hd)); applied to the values, they give exactly the
    cross-attention output of the model's own forward pass, padding masked."""
    model = translator.model
    src = _padded([[5, 6, 7, 8, 9], [10, 11]])
    hyps = [[12, 13, 14], [15]]
    seen = {}

    def keep(module, args, output):
        seen.setdefault("layer0", (args, output))

    hook = model.decoder[0].cross_attn.register_forward_hook(keep)
    try:
        weights = cross_attention(model, src, hyps)
    finally:
        hook.remove()
    (x, (k, v), mask), output = seen["layer0"]
    module = model.decoder[0].cross_attn
    for b, w in enumerate(weights):
        T, S = len(hyps[b]) + 1, int(src[b].ne(PAD).sum())
        assert w.shape == (len(model.decoder), module.heads, T, S)
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
        y = w[0] @ v[b, :, :S].float()  # (H, T, hd)
        mine = module.out(_merge_heads(y[None]))[0]
        torch.testing.assert_close(mine, output[b, :T].float(), rtol=1e-4, atol=1e-5)


def test_pieces_group_into_whitespace_words():
    assert word_index(["▁Ein", "▁Hund", "e", ".", "▁x"]) == [0, 1, 1, 1, 2]
    assert word_index(["ab", "▁c"]) == [0, 1]  # a first piece without '▁' still starts word 0


def test_each_target_word_aligns_to_the_source_word_it_attends_to_most():
    src, tgt = ["▁Ein", "▁Hund", "e", "."], ["▁Dogs", "▁run", "s"]
    weights = torch.tensor(
        [
            [0.1, 0.5, 0.3, 0.1],  # ▁Dogs: 'Hunde.' (pieces 1-3) gets 0.9
            [0.6, 0.2, 0.1, 0.1],  # ▁run and s (one word): mean over its pieces
            [0.5, 0.2, 0.2, 0.1],
        ]
    )
    assert hard_alignment(weights, src, tgt) == [(1, 0), (0, 1)]
    assert format_pairs([(1, 0), (0, 1)]) == "1-0 0-1"
    assert hard_alignment(weights[:0, :0], [], []) == []


def test_translations_with_attention_keep_blank_lines_and_match_translate(translator):
    lines = [*synthetic_pairs(3, seed=4)[0], "", "  "]
    out = translate_and_attend(translator, lines, resolve_decoding(translator.config.decode, beam=2))
    assert [text for text, _ in out] == translator.translate(lines, beam=2)
    assert out[3] == ("", None) and out[4] == ("", None)
    for line, (_, attn) in zip(lines[:3], out[:3], strict=True):
        assert attn.src_pieces[-1] == "</s>" and attn.tgt_pieces[-1] == "</s>"
        assert attn.weights.shape[2:] == (len(attn.tgt_pieces), len(attn.src_pieces))
        n_src_words, n_tgt_words = len(line.split()), max(word_index(attn.tgt_pieces[:-1]), default=-1) + 1
        assert [j for _, j in attn.pairs] == list(range(n_tgt_words))
        assert all(0 <= i < n_src_words for i, _ in attn.pairs)
