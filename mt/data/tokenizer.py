"""SentencePiece models for source and target: training and the runtime wrapper.

A joint vocabulary uses one model for both sides. Every model we train has the
same fixed special ids (mt/special.py), so a checkpoint only needs the model
protos to translate.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterable

import sentencepiece as spm

from mt.config import DataConfig
from mt.special import BOS, EOS, PAD, UNK


def train_spm(sentences: Iterable[str], cfg: DataConfig) -> bytes:
    """Train one SentencePiece model on `sentences`; returns the serialized model.

    A corpus too small for `cfg.vocab_size` gives a smaller vocabulary, with a warning on stderr.
    """
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=out,
        model_type=cfg.spm_type,
        vocab_size=cfg.vocab_size,
        character_coverage=cfg.character_coverage,
        input_sentence_size=cfg.spm_max_sentences,
        shuffle_input_sentence=False,  # we sample ourselves, deterministically
        pad_id=PAD,
        unk_id=UNK,
        bos_id=BOS,
        eos_id=EOS,
        # A small corpus may not support the requested size; take what it supports.
        hard_vocab_limit=False,
        max_sentence_length=1 << 16,
        num_threads=cfg.num_proc,
        minloglevel=2,
    )
    proto = out.getvalue()
    size = load_processor(proto).get_piece_size()
    if size < cfg.vocab_size:  # the model's embeddings follow the vocabulary, so this is no error
        print(
            f"mt: warning: data.vocab_size {cfg.vocab_size} is more than this corpus supports; "
            f"using {size}",
            file=sys.stderr,
        )
    return proto


def load_processor(proto: bytes) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=proto)


class Tokenizer:
    """Source and target SentencePiece processors (the same one when joint)."""

    def __init__(self, src_proto: bytes, tgt_proto: bytes | None = None) -> None:
        self.src_proto = src_proto
        self.tgt_proto = tgt_proto if tgt_proto is not None else src_proto
        self.joint = tgt_proto is None or tgt_proto == src_proto
        self.src = load_processor(self.src_proto)
        self.tgt = self.src if self.joint else load_processor(self.tgt_proto)

    @property
    def src_vocab_size(self) -> int:
        return self.src.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        return self.tgt.get_piece_size()

    def encode_src(self, lines: list[str]) -> list[list[int]]:
        return self.src.encode(lines, out_type=int)

    def encode_tgt(self, lines: list[str]) -> list[list[int]]:
        return self.tgt.encode(lines, out_type=int)

    def decode_tgt(self, ids: list[list[int]]) -> list[str]:
        return self.tgt.decode(ids)

