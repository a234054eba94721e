"""`mt export ctranslate2`: our Transformer as a CTranslate2 model, through its converter API.

`CheckpointConverter` is a `ctranslate2.converters.Converter` whose `_load` returns a
`TransformerSpec` filled from our model, so CTranslate2's own code validates, quantizes and
writes it. How our model maps onto the spec (mt/model.py):

* pre-norm or post-norm layers, the same for encoder and decoder; pre-norm ends each stack in
  a layer norm (`from_config(pre_norm=...)` declares exactly those); ReLU or exact (erf) GELU.
* embeddings scaled by sqrt(d_model) (`scale_embeddings`), then the position table added.
  The table is written explicitly, sinusoidal or learned: CTranslate2's own sinusoids (sin
  and cos halves, positions from 1) are not ours (interleaved sin/cos, positions from 0).
* self-attention's fused q|k|v projection is CTranslate2's first linear as it is; cross-
  attention's q, fused k|v and output projections are its three linears. Attention scaling
  is 1/sqrt(head width) in both.
* source, target and output embeddings as they are: when tied they are one tensor, which
  CTranslate2 stores once (its converter aliases equal variables).
* special ids: the pieces of our SentencePiece model at UNK 1, BOS 2 and EOS 3 become its
  unk, bos (= decoder start) and eos tokens, and `add_source_eos` appends EOS to every source
  as mt.translate.translator does; PAD 0 needs no name (CTranslate2 masks padding by length).
  Decoding suppresses PAD and BOS, as mt.translate.search does (ct2_translator.py).

Our layer norms' epsilon goes into the config. Everything our ModelConfig can describe maps;
what cannot (an activation CTranslate2 lacks, weights beyond float16's range for
`--quantization float16` or `int8_float16`, GNMT's length penalty: mt.export.decode_for_export)
is an ExportError naming it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import cast

import torch
from ctranslate2.converters import Converter
from ctranslate2.specs import common_spec, transformer_spec
from torch import nn

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

QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "float16", "bfloat16")
ACTIVATIONS = {"relu": common_spec.Activation.RELU, "gelu": common_spec.Activation.GELU}
FLOAT16_MAX = 65504.0


def _copy(t: torch.Tensor) -> torch.Tensor:
    # A copy: CTranslate2's int8 quantization scales the arrays it is given in place, which would
    # change the model it was exported from.
    return t.detach().clone()


def _linear(spec: common_spec.LinearSpec, layer: nn.Linear) -> None:
    spec.weight = _copy(layer.weight)
    if layer.bias is not None:
        spec.bias = _copy(layer.bias)


def _norm(spec: common_spec.LayerNormSpec, layer: nn.LayerNorm) -> None:
    spec.gamma = _copy(layer.weight)
    spec.beta = _copy(layer.bias)


def check_expressible(model: Transformer, quantization: str | None) -> None:
    """An ExportError for what CTranslate2 cannot compute as we do."""
    cfg = model.cfg
    if cfg.activation not in ACTIVATIONS:
        raise ExportError(
            f"model.activation {cfg.activation!r} has no CTranslate2 equivalent here "
            f"(supported: {', '.join(ACTIVATIONS)})"
        )
    if quantization in ("float16", "int8_float16"):  # int8_float16 keeps what is not int8 in float16
        for name, tensor in model.state_dict().items():
            peak = float(tensor.abs().max()) if tensor.is_floating_point() and tensor.numel() else 0.0
            if peak > FLOAT16_MAX:
                raise ExportError(
                    f"--quantization {quantization} cannot hold weight {name} (|value| up to {peak:.4g}, "
                    f"float16 ends at {FLOAT16_MAX:g}); use bfloat16, int8 or no quantization"
                )


def transformer_spec_of(model: Transformer, tokenizer: Tokenizer) -> transformer_spec.TransformerSpec:
    """The TransformerSpec computing `model` (see the module docstring)."""
    cfg = model.cfg
    spec = transformer_spec.TransformerSpec.from_config(
        (len(model.encoder), len(model.decoder)),
        cfg.heads,
        pre_norm=cfg.pre_norm,
        activation=ACTIVATIONS[cfg.activation],
    )
    table = _copy(model.pos_table if model.pos_embed is None else model.pos_embed.weight)
    enc, dec = spec.encoder, spec.decoder
    enc.embeddings[0].weight = _copy(model.src_embed.weight)
    dec.embeddings.weight = _copy(model.tgt_embed.weight)
    dec.projection.weight = _copy(model.out_proj.weight)
    for side in (enc, dec):
        side.scale_embeddings = True  # x = sqrt(d) * embedding + position
        side.position_encodings.encodings = table
    if cfg.pre_norm:
        assert isinstance(model.enc_norm, nn.LayerNorm) and isinstance(model.dec_norm, nn.LayerNorm)
        _norm(enc.layer_norm, model.enc_norm)
        _norm(dec.layer_norm, model.dec_norm)
    for s, layer in zip(enc.layer, cast(Iterable[EncoderLayer], model.encoder), strict=True):
        _linear(s.self_attention.linear[0], layer.attn.qkv)
        _linear(s.self_attention.linear[1], layer.attn.out)
        _norm(s.self_attention.layer_norm, layer.attn_norm)
        _linear(s.ffn.linear_0, layer.ffn.fc1)
        _linear(s.ffn.linear_1, layer.ffn.fc2)
        _norm(s.ffn.layer_norm, layer.ffn_norm)
    for s, layer in zip(dec.layer, cast(Iterable[DecoderLayer], model.decoder), strict=True):
        _linear(s.self_attention.linear[0], layer.self_attn.qkv)
        _linear(s.self_attention.linear[1], layer.self_attn.out)
        _norm(s.self_attention.layer_norm, layer.self_norm)
        _linear(s.attention.linear[0], layer.cross_attn.q)
        _linear(s.attention.linear[1], layer.cross_attn.kv)
        _linear(s.attention.linear[2], layer.cross_attn.out)
        _norm(s.attention.layer_norm, layer.cross_norm)
        _linear(s.ffn.linear_0, layer.ffn.fc1)
        _linear(s.ffn.linear_1, layer.ffn.fc2)
        _norm(s.ffn.layer_norm, layer.ffn_norm)

    src, tgt = tokenizer.src, tokenizer.tgt
    spec.register_source_vocabulary([src.id_to_piece(i) for i in range(src.get_piece_size())])
    spec.register_target_vocabulary([tgt.id_to_piece(i) for i in range(tgt.get_piece_size())])
    config = spec.config
    config.unk_token = tgt.id_to_piece(UNK)
    config.bos_token = tgt.id_to_piece(BOS)
    config.eos_token = tgt.id_to_piece(EOS)
    config.decoder_start_token = tgt.id_to_piece(BOS)
    config.add_source_bos = False
    config.add_source_eos = True  # EOS ends every source (mt.translate.translator.pad_sources)
    config.layer_norm_epsilon = cast(EncoderLayer, model.encoder[0]).attn_norm.eps
    return spec


class CheckpointConverter(Converter):
    """ctranslate2's converter for one of our models: `convert(DIR, quantization=...)` writes it."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer

    def _load(self) -> transformer_spec.TransformerSpec:
        with torch.no_grad():
            return transformer_spec_of(self.model, self.tokenizer)


# --------------------------------------------------------------------------- the directory

README = """\
## Translate with mt

The same contract as a checkpoint (N lines in, N lines out, in order; blank lines kept):

    mt translate --model {directory} --input test.{src} --output test.{tgt}

## Translate with CTranslate2 alone

`pip install ctranslate2 sentencepiece`, then:

```python
import ctranslate2
import sentencepiece as spm

model_dir = "{directory}"
src = spm.SentencePieceProcessor(model_file=f"{{model_dir}}/source.spm")
tgt = spm.SentencePieceProcessor(model_file=f"{{model_dir}}/target.spm")
translator = ctranslate2.Translator(model_dir, device="cpu")
batch = src.encode(["Ein Hund rennt durch den Schnee."], out_type=str)
results = translator.translate_batch(
    batch,
    beam_size={beam},
    length_penalty={alpha},
    min_decoding_length={min_len},
    # mt's limit: {a} * (source tokens + EOS) + {b} tokens, EOS included
    max_decoding_length=max(min({max_positions}, int({a} * (len(s) + 1) + {b})) for s in batch),
    max_input_length={max_src},
    suppress_sequences=[[{pad!r}], [{bos!r}]],  # as mt: PAD and BOS are never produced
)
for result in results:
    print(tgt.decode(result.hypotheses[0]))
```

CTranslate2 appends the end-of-sentence token to each source itself (`add_source_eos` in
`config.json`). Greedy search (`beam_size=1`) gives mt's output token for token; beam search
ends as soon as `beam_size` hypotheses are finished, where mt waits while an unfinished one
could still win, so a few percent of lines differ.
"""


def _readme(
    directory: str, config: Config, tokenizer: Tokenizer, checkpoint: str, quantization: str | None
) -> str:
    d, m = config.decode, config.model
    body = README.format(
        directory=directory,
        src=config.data.src_lang,
        tgt=config.data.tgt_lang,
        beam=d.beam,
        alpha=d.alpha,
        min_len=d.min_len,
        a=d.max_len_a,
        b=d.max_len_b,
        max_positions=m.max_positions,
        max_src=m.max_positions - 1,
        pad=tokenizer.tgt.id_to_piece(PAD),
        bos=tokenizer.tgt.id_to_piece(BOS),
    )
    weights = f"weights in {quantization}" if quantization else "weights in float32"
    return readme_text(f"CTranslate2 model ({weights})", body, checkpoint, config)


def export_ctranslate2(
    checkpoint: str | Path,
    output: str | Path,
    quantization: str | None = None,
    length_penalty: str | None = None,
) -> Path:
    """Write the CTranslate2 export of `checkpoint` to the directory `output` (see mt.export).
    `length_penalty` "fairseq" replaces a GNMT penalty, which CTranslate2 lacks (see
    mt.export.decode_for_export)."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ExportError(f"--quantization {quantization}: expected one of {', '.join(QUANTIZATIONS)}")
    translator = load_checkpoint_model(checkpoint)
    note = penalty_note(translator.config.decode, "CTranslate2")
    translator.config.decode = decode_for_export(translator.config.decode, length_penalty, "CTranslate2")
    return write_ctranslate2(
        translator.model, translator.tokenizer, translator.config, output, quantization, str(checkpoint), note
    )


def write_ctranslate2(
    model: Transformer,
    tokenizer: Tokenizer,
    config: Config,
    output: str | Path,
    quantization: str | None = None,
    source: str = "",
    note: str = "",
) -> Path:
    """Write the CTranslate2 export of a loaded model (eval mode, fp32); `source` names where it
    came from, for the README and the manifest."""
    check_expressible(model, quantization)

    def fill(tmp: Path) -> None:
        try:
            CheckpointConverter(model, tokenizer).convert(str(tmp), quantization=quantization, force=True)
        except (ValueError, NotImplementedError) as e:  # the spec's own checks: shapes, vocabularies
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"CTranslate2 refused the model from {source}: {first}") from None
        (tmp / "source.spm").write_bytes(tokenizer.src_proto)
        (tmp / "target.spm").write_bytes(tokenizer.tgt_proto)
        readme = _readme(str(output), config, tokenizer, source, quantization) + note
        (tmp / "README.md").write_text(readme, encoding="utf-8")
        Manifest("ctranslate2", source, config, quantization).write(tmp)

    return write_export(output, fill)
