"""`mt export hf`: our Transformer as a Hugging Face Transformers model that computes exactly our
function, with a tokenizer made of our SentencePiece models.

The architecture. Both of ours scale embeddings by sqrt(d_model), add positions from 0, use
no layer norm on the embeddings, bias-ful projections scaled by 1/sqrt(head width), ReLU or
exact GELU, and one epsilon (1e-5). Transformers has one model for each of our layouts:

* post-norm: `MarianMTModel` (norm after each residual block, no final norms), with one
  embedding shared by encoder, decoder and output, or separate ones
  (`share_encoder_decoder_embeddings`, `tie_word_embeddings`). Separate vocabularies of
  different sizes both take the larger size (Transformers 4 sizes Marian's decoder by the
  encoder's vocabulary): the added rows are zeros, and the added target tokens get a logit
  bias of -inf, so they are never produced and leave every other probability as it was.
* pre-norm: `PegasusForConditionalGeneration` (norm before each block, a final norm on
  encoder and decoder). It is the one seq2seq family with pre-norm blocks and no embedding
  layer norm (MBart has one; M2M100's positions are computed, with an offset of 2, from its
  own sinusoids); Transformers 4 shares one embedding between its encoder and decoder.

Positions. Marian and Pegasus compute their sinusoids themselves (Marian never saves them),
with our frequencies but sin in the first half of the dimensions and cos in the second, where
ours interleave them. Permuting the model's dimensions (`residual_order`) makes them ours: a
permutation of the residual stream is an exact reparametrisation (every layer norm is
permutation-equivariant, and attention and feed-forward only see it through linear maps whose
rows or columns are permuted with it). Learned positions are written as they are; Pegasus
loads them, Marian would replace them by its sinusoids.

What none of them can express is an ExportError: learned positions in a post-norm model, and
a pre-norm model whose encoder has its own embedding (model.tie_embeddings false, or separate
source and target vocabularies).

Decoding settings go into `generation_config.json`: BOS starts the decoder, EOS ends, PAD and
BOS are suppressed and EOS until decode.min_len, as in mt.translate.search; greedy `generate()` then gives
our greedy output token for token (up to per-sentence length limits, which `generate()` lacks).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import (
    GenerationConfig,
    MarianConfig,
    MarianMTModel,
    MarianTokenizer,
    PegasusConfig,
    PegasusForConditionalGeneration,
    PreTrainedModel,
)

from mt.config import Config
from mt.data.tokenizer import Tokenizer
from mt.errors import ExportError
from mt.export import (
    Manifest,
    decode_for_export,
    load_checkpoint_model,
    penalty_note,
    readme_text,
    write_export,
)
from mt.model import DecoderLayer, EncoderLayer, Transformer
from mt.special import BOS, EOS, PAD, UNK


def check_expressible(model: Transformer) -> None:
    """An ExportError for what no Transformers architecture computes as we do."""
    cfg = model.cfg
    if not cfg.pre_norm and cfg.learned_positions:
        raise ExportError(
            "a post-norm model with learned positions has no Transformers equivalent (Marian, the "
            "post-norm family without an embedding layer norm, recomputes sinusoids on loading); "
            "export it to CTranslate2"
        )
    if cfg.pre_norm and model.src_embed.weight is not model.tgt_embed.weight:
        raise ExportError(
            "a pre-norm model whose encoder has its own embedding (model.tie_embeddings false, or "
            "separate source and target vocabularies) has no Transformers equivalent: Pegasus, the "
            "pre-norm family without an embedding layer norm, shares one between encoder and "
            "decoder; export it to CTranslate2"
        )


def residual_order(model: Transformer) -> torch.Tensor:
    """For each dimension of the Transformers model, ours: sinusoidal models put the sin dimensions
    (our even ones) first and the cos dimensions (odd) after, as Marian and Pegasus lay out the
    same frequencies; learned positions keep our order."""
    d = model.d_model
    if model.pos_embed is not None:
        return torch.arange(d)
    return torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])


def _common_config(model: Transformer) -> dict[str, Any]:
    c = model.cfg
    return dict(
        d_model=c.d_model,
        encoder_layers=len(model.encoder),
        decoder_layers=len(model.decoder),
        encoder_attention_heads=c.heads,
        decoder_attention_heads=c.heads,
        encoder_ffn_dim=c.ffn_dim,
        decoder_ffn_dim=c.ffn_dim,
        activation_function=c.activation,  # Transformers' "gelu" is the exact (erf) one, as ours
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        max_position_embeddings=c.max_positions,
        scale_embedding=True,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=BOS,
        forced_eos_token_id=None,
        tie_word_embeddings=model.out_proj.weight is model.tgt_embed.weight,
    )


class _Mapper:
    """Copies our weights into a Transformers model, in the order `residual_order` gives."""

    def __init__(self, order: torch.Tensor) -> None:
        self.p = order

    def reads(self, dst: nn.Linear, src: nn.Linear | torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """A linear map from the residual stream: its input columns follow the order."""
        weight = src.weight if isinstance(src, nn.Linear) else src
        bias = src.bias if isinstance(src, nn.Linear) else bias
        dst.weight.copy_(weight[:, self.p])
        if bias is not None:
            dst.bias.copy_(bias)

    def writes(self, dst: nn.Linear, src: nn.Linear) -> None:
        """A linear map into the residual stream: its output rows follow the order."""
        dst.weight.copy_(src.weight[self.p])
        dst.bias.copy_(src.bias[self.p])

    def norm(self, dst: nn.LayerNorm, src: nn.LayerNorm) -> None:
        dst.weight.copy_(src.weight[self.p])
        dst.bias.copy_(src.bias[self.p])

    def table(self, dst: nn.Embedding, src: torch.Tensor) -> None:
        dst.weight.copy_(src[: dst.weight.size(0), self.p])

    def split(self, attn: nn.Module, names: tuple[str, ...], fused: nn.Linear) -> None:
        """Our fused projection (q|k|v, or k|v, stacked on the output axis) -> separate ones."""
        parts = zip(names, fused.weight.chunk(len(names)), fused.bias.chunk(len(names)), strict=True)
        for name, w, b in parts:
            self.reads(getattr(attn, name), w, b)

    def ffn(self, theirs: Any, ours: EncoderLayer | DecoderLayer) -> None:  # theirs: a Transformers layer
        self.reads(theirs.fc1, ours.ffn.fc1)
        self.writes(theirs.fc2, ours.ffn.fc2)
        self.norm(theirs.final_layer_norm, ours.ffn_norm)


@torch.no_grad()
def to_transformers(model: Transformer) -> PreTrainedModel:
    """A Transformers model (eval mode, fp32) computing exactly what `model` computes."""
    check_expressible(model)
    # Transformers 4 gives Marian's decoder the encoder's vocabulary size: separate vocabularies
    # of different sizes both get the larger one, the rows added to the target side never produced.
    tgt_vocab = model.tgt_embed.num_embeddings
    vocab = max(model.src_embed.num_embeddings, tgt_vocab)
    common = _common_config(model)
    if model.cfg.pre_norm:  # shared source and target embedding (check_expressible)
        hf: PreTrainedModel = PegasusForConditionalGeneration(PegasusConfig(vocab_size=vocab, **common))
    else:
        shared = model.src_embed.weight is model.tgt_embed.weight
        config = MarianConfig(
            vocab_size=vocab, decoder_vocab_size=vocab, share_encoder_decoder_embeddings=shared, **common
        )
        hf = MarianMTModel(config)
    hf.eval()
    core = hf.model
    p = _Mapper(residual_order(model))
    table = model.pos_table if model.pos_embed is None else model.pos_embed.weight
    hf.lm_head.weight.zero_()
    hf.lm_head.weight[:tgt_vocab].copy_(model.out_proj.weight[:, p.p])
    assert isinstance(hf.final_logits_bias, torch.Tensor)  # a buffer, which nn.Module does not type
    hf.final_logits_bias.zero_()
    hf.final_logits_bias[:, tgt_vocab:] = float("-inf")  # rows of the larger source vocabulary
    # Every embedding, tied or not, gets its weights: the tied ones are one tensor anyway.
    for embedding, ours in (
        (core.encoder.embed_tokens, model.src_embed),
        (core.decoder.embed_tokens, model.tgt_embed),
        (getattr(core, "shared", None), model.src_embed),  # None in Marian without sharing
    ):
        if embedding is not None:
            embedding.weight.zero_()
            embedding.weight[: ours.num_embeddings].copy_(ours.weight[:, p.p])
    for pos in (core.encoder.embed_positions, core.decoder.embed_positions):
        p.table(pos, table)
    if model.cfg.pre_norm:
        assert isinstance(model.enc_norm, nn.LayerNorm) and isinstance(model.dec_norm, nn.LayerNorm)
        p.norm(core.encoder.layer_norm, model.enc_norm)
        p.norm(core.decoder.layer_norm, model.dec_norm)
    for ours, theirs in zip(cast(Iterable[EncoderLayer], model.encoder), core.encoder.layers, strict=True):
        p.split(theirs.self_attn, ("q_proj", "k_proj", "v_proj"), ours.attn.qkv)
        p.writes(theirs.self_attn.out_proj, ours.attn.out)
        p.norm(theirs.self_attn_layer_norm, ours.attn_norm)
        p.ffn(theirs, ours)
    for ours, theirs in zip(cast(Iterable[DecoderLayer], model.decoder), core.decoder.layers, strict=True):
        p.split(theirs.self_attn, ("q_proj", "k_proj", "v_proj"), ours.self_attn.qkv)
        p.writes(theirs.self_attn.out_proj, ours.self_attn.out)
        p.norm(theirs.self_attn_layer_norm, ours.self_norm)
        p.reads(theirs.encoder_attn.q_proj, ours.cross_attn.q)
        p.split(theirs.encoder_attn, ("k_proj", "v_proj"), ours.cross_attn.kv)
        p.writes(theirs.encoder_attn.out_proj, ours.cross_attn.out)
        p.norm(theirs.encoder_attn_layer_norm, ours.cross_norm)
        p.ffn(theirs, ours)
    return hf


def generation_config(config: Config) -> GenerationConfig:
    """Our decoding settings as `generate()` takes them (greedy is exactly ours; see the module doc)."""
    d = config.decode
    return GenerationConfig(
        decoder_start_token_id=BOS,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        forced_eos_token_id=None,
        suppress_tokens=[PAD, BOS],
        min_new_tokens=d.min_len,
        max_length=config.model.max_positions,
        num_beams=d.beam,
        # Transformers' beam scores divide by len**alpha, fairseq's penalty (decode_for_export
        # refuses GNMT's, which has no equivalent).
        length_penalty=d.alpha,
        early_stopping=False,  # as mt.translate.search: stop once no unfinished hypothesis can win
    )


# --------------------------------------------------------------------------- the directory

README = """\
## Use

```python
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

model_dir = "{directory}"
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
batch = tokenizer(["Ein Hund rennt durch den Schnee."], return_tensors="pt", padding=True, truncation=True)
out = model.generate(**batch, num_beams=1)  # greedy: mt's output token for token
print(tokenizer.batch_decode(out, skip_special_tokens=True))
```

`truncation=True` cuts inputs to the model's {max_positions} positions (mt cuts them too); without
it a longer input fails with an IndexError. With Transformers 4,
`pipeline("translation", model=model_dir)` works too (Transformers 5 removed that pipeline).
`generation_config.json` holds mt's decoding settings (beam {beam}, length penalty {alpha}; PAD
and BOS never produced); mt also limits each translation to {a} * (source tokens + EOS) + {b}
tokens, which `generate()` cannot do per sentence.

The model is `{arch}`, which computes exactly the exported model (its dimensions are stored in
another order, so that its built-in sinusoidal positions are ours); the tokenizer is
`MarianTokenizer` over mt's SentencePiece models (`source.spm`, `target.spm`), with the
same ids (`vocab.json`).
"""


def _tokenizer(directory: Path, tokenizer: Tokenizer, config: Config) -> MarianTokenizer:
    """A MarianTokenizer over our SentencePiece models: the same pieces and ids, EOS appended."""
    src, tgt = tokenizer.src, tokenizer.tgt
    (directory / "source.spm").write_bytes(tokenizer.src_proto)
    (directory / "target.spm").write_bytes(tokenizer.tgt_proto)
    vocabs = {"vocab.json": src} if tokenizer.joint else {"vocab.json": src, "target_vocab.json": tgt}
    for name, sp in vocabs.items():
        ids = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
        (directory / name).write_text(json.dumps(ids, ensure_ascii=False, indent=1), encoding="utf-8")
    with warnings.catch_warnings():
        # MarianTokenizer recommends sacremoses for a punctuation normaliser it never applies
        # when tokenizing: noise for our tokenizer.
        warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
        return MarianTokenizer(
            source_spm=str(directory / "source.spm"),
            target_spm=str(directory / "target.spm"),
            vocab=str(directory / "vocab.json"),
            target_vocab_file=None if tokenizer.joint else str(directory / "target_vocab.json"),
            separate_vocabs=not tokenizer.joint,
            source_lang=config.data.src_lang,
            target_lang=config.data.tgt_lang,
            unk_token=tgt.id_to_piece(UNK),
            eos_token=tgt.id_to_piece(EOS),
            pad_token=tgt.id_to_piece(PAD),
            model_max_length=config.model.max_positions,  # source tokens, EOS included
        )


def _io_reason(e: SafetensorError) -> str:
    """safetensors' "Error while serializing: I/O error: No space left on device (os error 28)"
    as the system says it: "No space left on device"."""
    code = re.search(r"\(os error (\d+)\)", str(e))
    return os.strerror(int(code.group(1))) if code else " ".join(str(e).split())


def export_hf(checkpoint: str | Path, output: str | Path, length_penalty: str | None = None) -> Path:
    """Write the Transformers export of `checkpoint` to the directory `output` (see mt.export);
    `length_penalty` as in mt.export.decode_for_export."""
    translator = load_checkpoint_model(checkpoint)
    note = penalty_note(translator.config.decode, "Transformers")
    translator.config.decode = decode_for_export(translator.config.decode, length_penalty, "Transformers")
    model, tokenizer, config = translator.model, translator.tokenizer, translator.config
    hf = to_transformers(model)
    hf.generation_config = generation_config(config)

    def fill(tmp: Path) -> None:
        try:
            hf.save_pretrained(tmp)  # config.json, generation_config.json, model.safetensors
        except SafetensorError as e:  # its I/O errors (a full disk) carry no errno, only text
            raise ExportError(f"cannot write {output}: model.safetensors: {_io_reason(e)}") from None
        _tokenizer(tmp, tokenizer, config).save_pretrained(tmp)
        d = config.decode
        body = README.format(
            directory=str(output), beam=d.beam, alpha=d.alpha, a=d.max_len_a, b=d.max_len_b,
            arch=type(hf).__name__, max_positions=config.model.max_positions,
        )
        title = f"Hugging Face Transformers model ({type(hf).__name__})"
        (tmp / "README.md").write_text(readme_text(title, body + note, checkpoint, config), encoding="utf-8")
        Manifest("transformers", str(checkpoint), config).write(tmp)

    return write_export(output, fill)
