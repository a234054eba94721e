"""Decoding-speed benchmark: our search, Hugging Face `generate()` and CTranslate2 on the same weights.

    python scripts/bench_decode.py [CONFIG] [key=value ...] [--checkpoint CK] [--split test]
                                   [--precision fp32 bf16] [--repeats 2]

Translates the prepared split (Multi30k test_2016_flickr for the default config: 1,000
sentences) with beam 5 and greedy:

* mt: our incremental search, through the Translator as `mt translate` runs it (batches side
  by side on the CPU's threads).
* Transformers: `generate()` on the model `mt export hf` saves (mt.export.hf.to_transformers:
  Pegasus for a pre-norm model, Marian for a post-norm one), which computes exactly ours.
  Same length-sorted batches of token ids, one length limit per batch (the longest
  sentence's), each output then cut to its own sentence's limit as ours is.
* CTranslate2 (fp32 only: CTranslate2 has no bf16 on a CPU here): `mt export ctranslate2` of
  the same weights, in float32 and int8, through CT2Translator as `mt translate --model` runs
  it, in the two layouts that suit a CPU: one batch at a time on all threads, and one batch
  per core side by side on one thread each. CTranslate2 runs in a child process of its own:
  once it has run in a process, PyTorch's decoding in that process is 1.8x slower here (each
  brings its own OpenMP runtime), which would charge mt for CTranslate2's presence.

Tokenization is not timed. Runs are interleaved (every engine once, then again) so machine
noise hits all alike; the fastest of the repeats counts. Each precision casts mt and
Transformers alike (bf16: `model.to(torch.bfloat16)`), so ratios compare equal arithmetic.
Equality: for each engine, the share of sentences whose output is mt's (same precision),
token for token; BLEU and mean output length beside. For CTranslate2's beam search, the
lines that differ are sorted by cause, scored under our model: mt's output scores higher
(CTranslate2 ended that sentence's search as soon as `beam` hypotheses had ended, where mt
goes on while an unfinished one could still win), a length limit was reached, or a tie.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from mt.config import load_config, resolve_decoding
from mt.data.dataset import load_prepared
from mt.data.prepare import prepare
from mt.device import DTYPES, cpu_description, decode_precision
from mt.export.ct2 import write_ctranslate2
from mt.export.ct2_translator import CT2Translator
from mt.export.hf import generation_config, to_transformers
from mt.model import Transformer
from mt.special import BOS, EOS, PAD
from mt.translate.evaluate import score
from mt.translate.lines import length_batches, max_output_length
from mt.translate.translator import Translator, pad_sources

CT2_LAYOUTS = ("1 batch x 2 threads", "2 batches x 1 thread")  # for 2 cores; see ct2_workers


def ct2_workers(layout: str) -> int:
    """Batches side by side: 1, or one per thread torch uses (one per core)."""
    return 1 if layout.startswith("1 batch") else torch.get_num_threads()


def ct2_translate(directory: Path, workers: int, seqs: list[np.ndarray], beam: int) -> tuple[float, list]:
    """In the CTranslate2 child process: seconds to translate `seqs`, and the outputs."""
    ct2 = CT2Translator.from_export(directory, "cpu", inter_threads=workers)
    t = time.perf_counter()
    hyps = ct2.translate_ids(seqs, resolve_decoding(ct2.config.decode, beam=beam))
    return time.perf_counter() - t, [h[0][0] for h in hyps]


def limits_of(seqs: list[np.ndarray], dec, cap: int) -> list[int]:
    return [max_output_length(len(s) + 1, dec.max_len_a, dec.max_len_b, cap) for s in seqs]


@torch.inference_mode()
def hf_translate(hf, seqs: list[np.ndarray], beam: int, dec, cap: int) -> list[list[int]]:
    limits = limits_of(seqs, dec, cap)
    out: list[list[int]] = [[] for _ in seqs]
    for idx in length_batches(np.array([len(s) for s in seqs]), dec.max_tokens):
        src = pad_sources([seqs[i] for i in idx], torch.device("cpu"))
        gen = hf.generate(
            input_ids=src,
            attention_mask=src.ne(PAD),
            num_beams=beam,
            do_sample=False,
            max_new_tokens=max(limits[i] for i in idx),
            min_new_tokens=dec.min_len,
            **({"length_penalty": dec.alpha, "early_stopping": True} if beam > 1 else {}),
        )
        for i, row in zip(idx, gen.tolist(), strict=True):
            toks = row[1:]  # after BOS; rows that ended early are padded after their EOS
            out[i] = (toks[: toks.index(EOS)] if EOS in toks else toks)[: limits[i]]
    return out


@torch.inference_mode()
def our_score(model: Transformer, src: np.ndarray, tokens: list[int], limit: int, alpha: float) -> float:
    """The score mt's beam search gives `tokens` as a translation of `src` (fairseq's penalty)."""
    ended = len(tokens) < limit
    logits = model(pad_sources([src], torch.device("cpu")), torch.tensor([[BOS, *tokens]]))[0].float()
    target = torch.tensor([*tokens, EOS])
    lp = logits.log_softmax(-1)[torch.arange(len(target)), target]
    total = float(lp.sum() if ended else lp[:-1].sum())
    return total / (len(tokens) + ended) ** alpha


def beam_differences(
    model: Transformer, seqs: list[np.ndarray], ours: list, theirs: list[list[int]], dec, cap: int
) -> dict[str, int]:
    """Why CTranslate2's beam output differs from ours, line by line (see the module doc)."""
    causes: dict[str, int] = {}
    limits = limits_of(seqs, dec, cap)
    for s, h, t, limit in zip(seqs, ours, theirs, limits, strict=True):
        if h.tokens == t:
            continue
        if limit in (len(h.tokens), len(t)):
            cause = "a length limit was reached"
        else:
            gap = h.score - our_score(model, s, t, limit, dec.alpha)
            cause = (
                "mt's output scores higher: CTranslate2 ended the search earlier"
                if gap > 1e-4
                else "CTranslate2's output scores higher"
                if gap < -1e-4
                else "equal scores (a tie, or float rounding)"
            )
        causes[cause] = causes.get(cause, 0) + 1
    return causes


@torch.inference_mode()
def step_costs(
    model: Transformer, src_len: int = 14, past: int = 10, repeats: int = 30
) -> tuple[float, float]:
    """One decoder step's cost on this CPU, as a fixed part and a part per decoder row (seconds):
    steps at 1 and 32 rows, `past` tokens already in the cache, a line fitted through the fastest
    of `repeats` steps at each size. The fixed part is what batching cannot share out."""
    times = {}
    for rows in (1, 32):
        src = torch.randint(4, model.src_embed.num_embeddings, (rows, src_len))
        src[:, -1] = EOS
        memory, cache = model.encode(src), model.new_cache()
        prev = torch.full((rows, 1), BOS)
        for _ in range(past):
            model.decode(prev, memory, cache)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            model.decode(prev, memory, cache)
            best = min(best, time.perf_counter() - t)
            # Back to `past` cached tokens: every timed step is the same step, and writes its
            # keys and values in place as a beam search step does.
            for kv in cache.self_kv:
                kv.length = past
        times[rows] = best
    per_row = (times[32] - times[1]) / 31
    return times[1] - per_row, per_row


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
        cfg.model = tr.config.model
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
    dec, cap = cfg.decode, cfg.model.max_positions
    hf32 = to_transformers(model)
    hf32.generation_config = generation_config(cfg)  # suppresses PAD and BOS, as mt does
    hf32.generation_config.max_length = None  # each call sets max_new_tokens instead
    kind = type(hf32).__name__
    print(f"\ndecoding {len(seqs)} sentences of '{args.split}', {torch.get_num_threads()} threads; {note}")
    auto = decode_precision("auto", torch.device("cpu"))
    print(f"CPU: {cpu_description()}; decode.precision auto picks {auto} here")
    fixed, per_row = step_costs(model)
    print(f"mt decoder step (fp32): {fixed * 1e3:.2f} ms fixed + {per_row * 1e3:.3f} ms per decoder row")
    print(f"  {'':<46}{'seconds':>9}{'sent/s':>9}{'BLEU':>7}{'mean len':>9}{'same as mt':>12}")
    times: dict[tuple[str, str, int], float] = {}
    bleus: dict[tuple[str, str, int], float] = {}
    tmp = tempfile.TemporaryDirectory()
    child = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    exports = {  # the weights as `mt export ctranslate2 [--quantization int8]` writes them
        name: write_ctranslate2(model, data.tokenizer, cfg, Path(tmp.name) / name, q, note)
        for name, q in (("float32", None), ("int8", "int8"))
    }
    for precision in args.precision:
        # Copies, so that each precision starts from the fp32 weights.
        cfg.decode.precision = precision
        ours = Translator(copy.deepcopy(model), data.tokenizer, cfg, torch.device("cpu"))
        theirs = copy.deepcopy(hf32).to(DTYPES[precision])
        engines = {
            "mt": lambda beam, ours=ours: [
                h[0] for h in ours.translate_ids(seqs, resolve_decoding(ours.config.decode, beam=beam))
            ],
            kind: lambda beam, hf=theirs: hf_translate(hf, seqs, beam, dec, cap),
        }
        if precision == "fp32":
            for quantization, directory in exports.items():
                for layout in CT2_LAYOUTS:
                    engines[f"CTranslate2 {quantization}, {layout}"] = (directory, ct2_workers(layout))
        for beam in (5, 1):
            search = "beam 5" if beam == 5 else "greedy"
            best = dict.fromkeys(engines, float("inf"))
            outs: dict[str, list] = {}
            for _ in range(args.repeats):
                for name, run in engines.items():
                    if isinstance(run, tuple):  # CTranslate2, timed in its own process
                        secs, outs[name] = child.submit(ct2_translate, *run, seqs, beam).result()
                    else:
                        t = time.perf_counter()
                        outs[name] = run(beam)
                        secs = time.perf_counter() - t
                    best[name] = min(best[name], secs)
            mine = [h.tokens for h in outs["mt"]]
            for name, secs in best.items():
                tokens = mine if name == "mt" else outs[name]
                times[name, precision, beam] = secs
                bleus[name, precision, beam] = bleu = score(data.tokenizer.decode_tgt(tokens), refs)["bleu"]
                same = 100 * np.mean([a == b for a, b in zip(tokens, mine, strict=True)])
                mean_len = np.mean([len(o) for o in tokens])
                label = f"{search} {precision}  {name}"
                row = f"{secs:>9.2f}{len(seqs) / secs:>9.0f}{bleu:>7.2f}{mean_len:>9.1f}{same:>11.1f}%"
                print(f"  {label:<46}{row}")
            print(f"  {'':<4}speed-up mt / {kind}, both {precision}: {best[kind] / best['mt']:.2f}x")
            ct2 = [n for n in engines if n.startswith("CTranslate2")]
            for name in ct2:
                print(f"  {'':<4}speed-up {name} / mt {precision}: {best['mt'] / best[name]:.2f}x")
            if beam == 5 and ct2:
                name = f"CTranslate2 float32, {CT2_LAYOUTS[0]}"
                causes = beam_differences(model, seqs, outs["mt"], outs[name], dec, cap)
                differ = sum(causes.values())
                print(f"  {'':<4}beam 5 lines where CTranslate2 float32 differs from mt: {differ}")
                for cause, n in sorted(causes.items(), key=lambda c: -c[1]):
                    print(f"  {'':<8}{n:>4}  {cause}")
    child.shutdown()
    tmp.cleanup()

    print("\n  targets: beam 5 <= 8 s and greedy <= 4 s for 1,000 sentences; >= 2x Hugging Face")
    if "fp32" in args.precision:
        for beam, search in ((5, "beam 5"), (1, "greedy")):
            fastest = {
                q: min(CT2_LAYOUTS, key=lambda lay, q=q: times[f"CTranslate2 {q}, {lay}", "fp32", beam])
                for q in exports
            }
            f32, i8 = (f"CTranslate2 {q}, {fastest[q]}" for q in ("float32", "int8"))
            print(
                f"  {search}: mt fp32 runs at {times[f32, 'fp32', beam] / times['mt', 'fp32', beam]:.2f}x "
                f"CTranslate2 fp32's speed ({fastest['float32']}), "
                f"{times[i8, 'fp32', beam] / times['mt', 'fp32', beam]:.2f}x int8's ({fastest['int8']}); "
                f"BLEU int8 - fp32: {bleus[i8, 'fp32', beam] - bleus[f32, 'fp32', beam]:+.2f}, "
                f"CTranslate2 fp32 - mt: {bleus[f32, 'fp32', beam] - bleus['mt', 'fp32', beam]:+.2f}"
            )
    if "bf16" in args.precision and "fp32" in args.precision:
        for beam, search in ((5, "beam 5"), (1, "greedy")):
            ratio = times[kind, "fp32", beam] / times["mt", "bf16", beam]
            print(f"  {search}: mt bf16 / {kind} fp32: {ratio:.2f}x")


if __name__ == "__main__":
    main()
