"""What a translation attended to: cross-attention weights, and word alignments read from them.

`cross_attention` runs one teacher-forced decoder pass over a finished translation and
records, in every decoder layer, the softmax of the cross-attention scores: for each
produced token (EOS included), how much each head looked at each source token (EOS
included). The model's own forward pass is left untouched (it never materialises these
weights on its fast paths); forward hooks on the cross-attention modules recompute them
from the same projections.

`hard_alignment` turns them into fairseq-style word alignments: pairs `i-j`, source word
i aligned to target word j, both counted from 0 on whitespace-separated words. A target
word's attention is the mean over its subword tokens of the attention summed over each
source word's subword tokens; it aligns to the source word it attends to most. As in
fairseq, the heads of the last decoder layer are averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import Tensor

from mt.config import DecodeConfig
from mt.data.tokenizer import Tokenizer
from mt.model import CrossAttention, DecoderLayer, Transformer
from mt.special import BOS, EOS, PAD
from mt.translate.translator import Translator, pad_sources

WORD_START = "\u2581"  # SentencePiece's mark of a piece that begins a whitespace word


@dataclass
class Attention:
    """The cross-attention of one translation."""

    src_pieces: list[str]  # the source's subword pieces, then "</s>"
    tgt_pieces: list[str]  # the translation's subword pieces, then "</s>"
    weights: Tensor  # (layers, heads, len(tgt_pieces), len(src_pieces)), float32, rows sum to 1
    pairs: list[tuple[int, int]]  # hard alignment: (source word, target word)


@torch.inference_mode()
def cross_attention(model: Transformer, src: Tensor, hyps: Sequence[Sequence[int]]) -> list[Tensor]:
    """(B, S) right-padded sources (EOS included) and B outputs (no BOS/EOS) -> per sentence
    a (layers, heads, T, S_b) float32 tensor: T = its output length + 1 (the EOS step), S_b
    its source length. The model must be in eval mode (the caller's to set)."""
    width = max(len(h) for h in hyps) + 1
    tgt = torch.full((len(hyps), width), PAD, dtype=torch.long, device=src.device)
    for b, h in enumerate(hyps):
        tgt[b, : len(h) + 1] = torch.tensor([BOS, *h], dtype=torch.long)
    recorded: list[Tensor] = []

    def record(module: CrossAttention, args: tuple, output: Tensor) -> None:
        x, (k, _), mask = args  # (B, T, d), (B, H, S, hd), (B, 1, 1, S) or None
        B, T, d = x.shape
        q = module.q(x).view(B, T, module.heads, d // module.heads).transpose(1, 2)  # (B, H, T, hd)
        scores = (q.float() @ k.float().transpose(-1, -2)) * (d // module.heads) ** -0.5  # (B, H, T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        recorded.append(scores.softmax(-1))

    hooks = [cast(DecoderLayer, layer).cross_attn.register_forward_hook(record) for layer in model.decoder]
    try:
        model.decode(tgt, model.encode(src))
    finally:
        for hook in hooks:
            hook.remove()
    weights = torch.stack(recorded, 1).cpu()  # (B, L, H, T, S)
    src_lens = src.ne(PAD).sum(1).tolist()
    return [weights[b, :, :, : len(h) + 1, : src_lens[b]] for b, h in enumerate(hyps)]


def word_index(pieces: Sequence[str]) -> list[int]:
    """The whitespace word of each subword piece: a piece starting with '▁' starts a new one."""
    index, word = [], -1
    for piece in pieces:
        if piece.startswith(WORD_START) or word < 0:
            word += 1
        index.append(word)
    return index


def hard_alignment(
    weights: Tensor, src_pieces: Sequence[str], tgt_pieces: Sequence[str]
) -> list[tuple[int, int]]:
    """(T, S) attention of target pieces over source pieces (EOS rows and columns excluded by
    the caller) -> (source word, target word) pairs, one per target word, in target order."""
    if not src_pieces or not tgt_pieces:
        return []
    src_word, tgt_word = np.array(word_index(src_pieces)), np.array(word_index(tgt_pieces))
    w = weights.numpy()
    by_src_word = np.zeros((len(tgt_pieces), src_word.max() + 1))
    np.add.at(by_src_word.T, src_word, w.T)  # sum over each source word's pieces
    pairs = []
    for j in range(tgt_word.max() + 1):
        pairs.append((int(by_src_word[tgt_word == j].mean(0).argmax()), j))
    return pairs


def format_pairs(pairs: Sequence[tuple[int, int]]) -> str:
    """fairseq's format: 'i-j' pairs separated by spaces."""
    return " ".join(f"{i}-{j}" for i, j in pairs)


def attention_of(
    model: Transformer, tok: Tokenizer, src: Tensor, hyps: Sequence[Sequence[int]]
) -> list[Attention]:
    """Cross-attention and hard alignment of B finished translations (see `cross_attention`)."""
    out = []
    for row, hyp, weights in zip(src, hyps, cross_attention(model, src, hyps), strict=True):
        src_pieces = [tok.src.id_to_piece(t) for t in row.tolist() if t not in (PAD, EOS)]
        tgt_pieces = [tok.tgt.id_to_piece(int(t)) for t in hyp]
        last = weights[-1].mean(0)[: len(tgt_pieces), : len(src_pieces)]  # words only, no EOS
        pairs = hard_alignment(last, src_pieces, tgt_pieces)
        out.append(Attention([*src_pieces, "</s>"], [*tgt_pieces, "</s>"], weights, pairs))
    return out


def translate_and_attend(
    translator: Translator, lines: Sequence[str], decode: DecodeConfig, batch: int = 32
) -> list[tuple[str, Attention | None]]:
    """Each line's best translation with a resolved `decode` (mt.config.resolve_decoding) and
    what it attended to; a blank line gives ("", None)."""
    keep = [i for i, line in enumerate(lines) if line.strip()]
    ids = translator.tokenizer.encode_src([lines[i].strip() for i in keep])
    seqs = [np.asarray(s[: translator.max_src_len], dtype=np.int64) for s in ids]
    hyps = [hs[0].tokens for hs in translator.translate_ids(seqs, decode)]
    out: list[tuple[str, Attention | None]] = [("", None) for _ in lines]
    for start in range(0, len(keep), batch):
        part = slice(start, start + batch)
        src = pad_sources(seqs[part], translator.device)
        texts = translator.tokenizer.decode_tgt(hyps[part])
        attns = attention_of(translator.model, translator.tokenizer, src, hyps[part])
        for i, text, attn in zip(keep[part], texts, attns, strict=True):
            out[i] = (text, attn)
    return out
