"""Decoding-speed benchmark: our search against Hugging Face `generate()` with the same weights.

    python scripts/bench_decode.py [CONFIG] [key=value ...] [--checkpoint CK] [--split test]
                                   [--precision fp32 bf16]

Translates the prepared split (Multi30k test_2016_flickr for the default config: 1,000
sentences) with beam 5 and greedy, with our incremental search and with `transformers`'
`generate()` on a model of the same dimensions carrying the same weights:
`MBartForConditionalGeneration` for a pre-norm model, `MarianMTModel` for a post-norm one.
Both get the same length-sorted batches of token ids; tokenization is not timed. Runs are
interleaved (ours, theirs, ours, theirs) so machine noise hits both alike; the faster of the
repeats counts. Each precision casts both models alike (bf16: `model.to(torch.bfloat16)`,
as `torch_dtype=torch.bfloat16` does in `transformers`), so the ratios compare equal
arithmetic; the last lines also compare our bf16 with their fp32. BLEU and mean output
length are printed for both as a sanity check: MBart adds a LayerNorm on the embeddings
that our model does not have (its weights are left at identity scale), so its outputs
differ slightly from ours for a pre-norm model, while Marian computes exactly our
post-norm model.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from mt.config import load_config
from mt.dataset import load_prepared
from mt.device import DTYPES, cpu_description, decode_precision
from mt.evaluate import score
from mt.model import Transformer
from mt.prepare import prepare
from mt.special import BOS, EOS, PAD
from mt.translator import Translator, _length_batches, _pad


def _copy(dst: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    with torch.no_grad():
        dst.weight.copy_(weight)
        if bias is not None:
            dst.bias.copy_(bias)


def _copy_split(attn: torch.nn.Module, names: tuple[str, ...], fused: torch.nn.Linear) -> None:
    """Our fused projection (q|k|v or k|v stacked on the output axis) -> HF's separate ones."""
    parts = zip(names, fused.weight.chunk(len(names)), fused.bias.chunk(len(names)), strict=True)
    for name, w, b in parts:
        _copy(getattr(attn, name), w, b)


def _copy_ffn(theirs: torch.nn.Module, ours: torch.nn.Module) -> None:
    _copy(theirs.fc1, ours.ffn.fc1.weight, ours.ffn.fc1.bias)
    _copy(theirs.fc2, ours.ffn.fc2.weight, ours.ffn.fc2.bias)
    _copy(theirs.final_layer_norm, ours.ffn_norm.weight, ours.ffn_norm.bias)


def to_hf(model: Transformer):  # -> transformers PreTrainedModel
    """A Hugging Face model computing (nearly, see the module doc) what `model` computes."""
    from transformers import MarianConfig, MarianMTModel, MBartConfig, MBartForConditionalGeneration

    c = model.cfg
    vocab = model.tgt_embed.num_embeddings
    common = dict(
        vocab_size=vocab,
        d_model=c.d_model,
        encoder_layers=c.layers,
        decoder_layers=c.decoder_layers or c.layers,
        encoder_attention_heads=c.heads,
        decoder_attention_heads=c.heads,
        encoder_ffn_dim=c.ffn_dim,
        decoder_ffn_dim=c.ffn_dim,
        activation_function=c.activation,
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
        tie_word_embeddings=True,
    )
    if c.pre_norm:
        hf = MBartForConditionalGeneration(MBartConfig(**common))
    else:
        hf = MarianMTModel(MarianConfig(**common, share_encoder_decoder_embeddings=True))
    hf.eval()
    core = hf.model
    table = model.pos_table if model.pos_embed is None else model.pos_embed.weight
    with torch.no_grad():
        core.shared.weight.copy_(model.tgt_embed.weight)
        core.encoder.embed_tokens.weight.copy_(model.src_embed.weight)
        core.decoder.embed_tokens.weight.copy_(model.tgt_embed.weight)
        hf.lm_head.weight.copy_(model.out_proj.weight)
        for pos in (core.encoder.embed_positions, core.decoder.embed_positions):
            offset = getattr(pos, "offset", 0)  # MBart's learned positions start at index 2
            pos.weight[offset : offset + len(table)].copy_(table[: pos.weight.size(0) - offset])
    if c.pre_norm:
        _copy(core.encoder.layer_norm, model.enc_norm.weight, model.enc_norm.bias)
        _copy(core.decoder.layer_norm, model.dec_norm.weight, model.dec_norm.bias)
    for ours, theirs in zip(model.encoder, core.encoder.layers, strict=True):
        _copy_split(theirs.self_attn, ("q_proj", "k_proj", "v_proj"), ours.attn.qkv)
        _copy(theirs.self_attn.out_proj, ours.attn.out.weight, ours.attn.out.bias)
        _copy(theirs.self_attn_layer_norm, ours.attn_norm.weight, ours.attn_norm.bias)
        _copy_ffn(theirs, ours)
    for ours, theirs in zip(model.decoder, core.decoder.layers, strict=True):
        _copy_split(theirs.self_attn, ("q_proj", "k_proj", "v_proj"), ours.self_attn.qkv)
        _copy(theirs.self_attn.out_proj, ours.self_attn.out.weight, ours.self_attn.out.bias)
        _copy(theirs.self_attn_layer_norm, ours.self_norm.weight, ours.self_norm.bias)
        _copy(theirs.encoder_attn.q_proj, ours.cross_attn.q.weight, ours.cross_attn.q.bias)
        _copy_split(theirs.encoder_attn, ("k_proj", "v_proj"), ours.cross_attn.kv)
        _copy(theirs.encoder_attn.out_proj, ours.cross_attn.out.weight, ours.cross_attn.out.bias)
        _copy(theirs.encoder_attn_layer_norm, ours.cross_norm.weight, ours.cross_norm.bias)
        _copy_ffn(theirs, ours)
    return hf


@torch.inference_mode()
def hf_translate(hf, seqs: list[np.ndarray], beam: int, a: float, b: int, max_tokens: int) -> list[list[int]]:
    lengths = np.array([len(s) for s in seqs])
    out: list[list[int]] = [[] for _ in seqs]
    for idx in _length_batches(lengths, max_tokens):
        src = _pad([seqs[i] for i in idx], torch.device("cpu"))
        gen = hf.generate(
            input_ids=src,
            attention_mask=src.ne(PAD),
            num_beams=beam,
            do_sample=False,
            max_new_tokens=int(a * src.size(1) + b),
            min_new_tokens=1,
            length_penalty=1.0,
            early_stopping=True,
        )
        for i, row in zip(idx, gen.tolist(), strict=True):
            toks = [t for t in row[1:] if t not in (PAD, BOS)]
            out[i] = toks[: toks.index(EOS)] if EOS in toks else toks
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="configs/multi30k_de_en.yaml")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--checkpoint", help="default: <out_dir>/checkpoint_best.pt")
    ap.add_argument("--split", default="test")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    prepare(cfg, quiet=True)
    data = load_prepared(cfg.prepared_dir)
    ck = Path(args.checkpoint or cfg.out_dir / "checkpoint_best.pt")
    if ck.exists():
        tr = Translator.from_checkpoint(ck, "cpu", "fp32")
        model, note = tr.model, f"trained checkpoint {ck}"
    else:
        torch.manual_seed(0)
        v = data.tokenizer.tgt_vocab_size
        model, note = (
            Transformer(cfg.model, v, v).eval(),
            f"UNTRAINED model ({ck} not found: run `make train`)",
        )
    split = data.split(args.split)
    seqs = [np.asarray(split.src(i), dtype=np.int64) for i in range(len(split))]
    refs = data.text(args.split, "tgt")
    dec = cfg.decode
    hf32 = to_hf(model)
    kind = type(hf32).__name__
    print(f"\ndecoding {len(seqs)} sentences of '{args.split}', {torch.get_num_threads()} threads; {note}")
    auto = decode_precision("auto", torch.device("cpu"))
    print(f"CPU: {cpu_description()}; decode.precision auto picks {auto} here")
    print(f"  {'':<46}{'seconds':>9}{'sent/s':>9}{'BLEU':>7}{'mean len':>9}")
    times: dict[tuple[str, str, int], float] = {}
    for precision in args.precision:
        # Copies, so that each precision starts from the fp32 weights. Ours decodes through the
        # Translator, as `mt translate` does (batches side by side on CPU threads).
        cfg.decode.precision = precision
        ours = Translator(copy.deepcopy(model), data.tokenizer, cfg, torch.device("cpu"))
        theirs = copy.deepcopy(hf32).to(DTYPES[precision])
        for beam in (5, 1):
            search = "beam 5" if beam == 5 else "greedy"
            best = {"mt": float("inf"), kind: float("inf")}
            outs: dict[str, list[list[int]]] = {}
            for _ in range(args.repeats):
                t = time.perf_counter()
                hyps = ours.translate_ids(seqs, beam=beam)
                best["mt"] = min(best["mt"], time.perf_counter() - t)
                outs["mt"] = [h[0].tokens for h in hyps]
                t = time.perf_counter()
                outs[kind] = hf_translate(theirs, seqs, beam, dec.max_len_a, dec.max_len_b, dec.max_tokens)
                best[kind] = min(best[kind], time.perf_counter() - t)
            for name, secs in best.items():
                times[name, precision, beam] = secs
                texts = data.tokenizer.decode_tgt(outs[name])
                bleu = score(texts, refs)["bleu"]
                mean_len = np.mean([len(o) for o in outs[name]])
                label = f"{search} {precision}  {name}"
                print(f"  {label:<46}{secs:>9.2f}{len(seqs) / secs:>9.0f}{bleu:>7.2f}{mean_len:>9.1f}")
            print(f"  {'':<4}speed-up mt / {kind}, both {precision}: {best[kind] / best['mt']:.2f}x")
    print("\n  targets: beam 5 <= 8 s and greedy <= 4 s for 1,000 sentences; >= 2x Hugging Face")
    if "bf16" in args.precision and "fp32" in args.precision:
        for beam, search in ((5, "beam 5"), (1, "greedy")):
            ratio = times[kind, "fp32", beam] / times["mt", "bf16", beam]
            print(f"  {search}: mt bf16 / {kind} fp32: {ratio:.2f}x")


if __name__ == "__main__":
    main()
