"""mt export hf: a Transformers export (Pegasus for pre-norm, Marian for post-norm) computes the
checkpoint's logits, its greedy generate() is ours token for token, its tokenizer gives our ids,
and what Transformers cannot express is a one-line error.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from helpers import (
    SOURCES,
    error_line,
    export,
    mt_greedy,
    readme_example,
    source_ids,
)

from mt.cli import main
from mt.export import MANIFEST
from mt.special import BOS, EOS, PAD
from mt.translate.lines import max_output_length
from mt.translate.translator import Translator, pad_sources

HF_LAYOUTS = {  # Pegasus for pre-norm, Marian for post-norm
    "pre-norm, tied, relu, sinusoidal": {},
    "pre-norm, tied, gelu, learned": dict(activation="gelu", learned_positions=True),
    "post-norm, tied, relu, sinusoidal": dict(pre_norm=False),
    "post-norm, untied, gelu, sinusoidal, 2+1 layers": dict(
        pre_norm=False, tie_embeddings=False, activation="gelu", layers=2, decoder_layers=1
    ),
    "post-norm, separate vocabularies, tied, relu, sinusoidal": dict(pre_norm=False, separate=True),
}
NOT_IN_TRANSFORMERS = {
    "post-norm, learned positions": (
        dict(pre_norm=False, learned_positions=True),
        "post-norm model with learned",
    ),
    "pre-norm, untied": (dict(tie_embeddings=False), "encoder has its own embedding"),
    "pre-norm, separate vocabularies": (dict(separate=True), "encoder has its own embedding"),
}



# --------------------------------------------------------------------------- Transformers


def hf_load(directory: Path):
    """The export's tokenizer and model, loaded as a user loads them."""
    with warnings.catch_warnings():
        # MarianTokenizer recommends sacremoses for a punctuation normaliser it does not apply.
        warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    return tokenizer, transformers.AutoModelForSeq2SeqLM.from_pretrained(directory).eval()


@pytest.mark.parametrize("layout", HF_LAYOUTS)
def test_transformers_export_computes_the_checkpoints_logits(layout, checkpoint_of, tmp_path):
    ck = checkpoint_of(**HF_LAYOUTS[layout])
    _, hf = hf_load(export("hf", ck, tmp_path / "hf"))
    ours = Translator.from_checkpoint(ck, "cpu", "fp32")
    expected = "PegasusForConditionalGeneration" if ours.model.cfg.pre_norm else "MarianMTModel"
    assert type(hf).__name__ == expected
    seqs = source_ids(ours)
    outputs = mt_greedy(ours, seqs)
    src = pad_sources(seqs, torch.device("cpu"))
    tgt = torch.full((len(outputs), max(map(len, outputs)) + 1), PAD)
    for i, o in enumerate(outputs):
        tgt[i, : len(o) + 1] = torch.tensor([BOS, *o])
    with torch.inference_mode():
        mine = ours.model(src, tgt)
        theirs = hf(input_ids=src, attention_mask=src.ne(PAD), decoder_input_ids=tgt).logits
    real = tgt.ne(PAD)  # BOS and the output's tokens (after them, padding)
    vocab = mine.size(-1)  # a larger source vocabulary pads the target side: never produced
    assert torch.allclose(theirs[real][:, :vocab], mine[real], atol=1e-4)
    assert bool((theirs[real][:, vocab:] == float("-inf")).all())


@pytest.mark.parametrize("layout", HF_LAYOUTS)
def test_transformers_greedy_generate_is_mt_greedy_search_token_for_token(layout, checkpoint_of, tmp_path):
    ck = checkpoint_of(**HF_LAYOUTS[layout])
    _, hf = hf_load(export("hf", ck, tmp_path / "hf"))
    ours = Translator.from_checkpoint(ck, "cpu", "fp32")
    seqs = source_ids(ours)
    d = ours.config.decode
    limits = [max_output_length(len(s) + 1, d.max_len_a, d.max_len_b, 64) for s in seqs]
    src = pad_sources(seqs, torch.device("cpu"))
    with torch.inference_mode():  # one limit for the batch, then each output cut to its own
        rows = hf.generate(input_ids=src, attention_mask=src.ne(PAD), num_beams=1, max_new_tokens=max(limits))
    theirs = []
    for row, limit in zip(rows.tolist(), limits, strict=True):
        toks = row[1:]  # after BOS; a row that ended early is padded after its EOS
        theirs.append((toks[: toks.index(EOS)] if EOS in toks else toks)[:limit])
    assert theirs == mt_greedy(ours, seqs)


@pytest.mark.parametrize(
    "layout", ["pre-norm, tied, relu, sinusoidal", "post-norm, separate vocabularies, tied, relu, sinusoidal"]
)
def test_transformers_tokenizer_gives_our_ids_and_text(layout, checkpoint_of, tmp_path):
    ck = checkpoint_of(**HF_LAYOUTS[layout])
    tokenizer, _ = hf_load(export("hf", ck, tmp_path / "hf"))
    ours = Translator.from_checkpoint(ck, "cpu", "fp32")
    lines = [*SOURCES, "Ein  Hund,  ß und ẞ: 😀 ", "zwei\tkatzen"]
    assert tokenizer(lines)["input_ids"] == [[*ids, EOS] for ids in ours.tokenizer.encode_src(lines)]
    outputs = mt_greedy(ours, source_ids(ours))
    # The same text, but for the spaces around it, which MarianTokenizer strips (an output may end
    # in a lone word-boundary piece).
    texts = [t.strip() for t in ours.tokenizer.decode_tgt(outputs)]
    assert tokenizer.batch_decode(outputs, skip_special_tokens=True) == texts


def test_transformers_export_translates_text_as_mt_translate_does(checkpoint_of, tmp_path):
    ck = checkpoint_of()
    out = export("hf", ck, tmp_path / "hf")
    ours = Translator.from_checkpoint(ck, "cpu", "fp32")
    if "translation" in transformers.pipelines.SUPPORTED_TASKS:  # Transformers 4
        pipe = transformers.pipeline("translation", model=str(out))

        def translate(line: str, limit: int) -> str:
            return pipe([line], num_beams=1, max_new_tokens=limit)[0]["translation_text"]
    else:  # Transformers 5 removed the translation pipeline; this is its replacement (the README's)
        tokenizer, hf = hf_load(out)

        def translate(line: str, limit: int) -> str:
            row = hf.generate(**tokenizer([line], return_tensors="pt"), num_beams=1, max_new_tokens=limit)
            return tokenizer.batch_decode(row, skip_special_tokens=True)[0]

    d = ours.config.decode
    texts = []
    for line in SOURCES:  # one by one, each with mt's limit on its length
        n = len(ours.tokenizer.encode_src([line])[0]) + 1
        texts.append(
            translate(line, max_output_length(n, d.max_len_a, d.max_len_b, ours.model.cfg.max_positions))
        )
    assert texts == [t.strip() for t in ours.translate(SOURCES, beam=1)]  # MarianTokenizer strips
    config = json.loads((out / "generation_config.json").read_text())
    assert config["suppress_tokens"] == [PAD, BOS] and config["decoder_start_token_id"] == BOS
    # The README's example cuts inputs to the model's positions, as mt does: a long line translates.
    example = readme_example((out / "README.md").read_text())
    assert "truncation=True" in example
    tokenizer, hf = hf_load(out)
    long = " ".join(["hund"] * 3 * ours.model.cfg.max_positions)
    batch = tokenizer([long], return_tensors="pt", padding=True, truncation=True)
    assert batch["input_ids"].shape[1] == ours.model.cfg.max_positions
    assert hf.generate(**batch, num_beams=1, max_new_tokens=5).shape[0] == 1
    assert {
        "model.safetensors",
        "tokenizer_config.json",
        "source.spm",
        "target.spm",
        "README.md",
        MANIFEST,
    } <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize("layout", NOT_IN_TRANSFORMERS)
def test_what_transformers_cannot_express_is_a_one_line_error(layout, checkpoint_of, tmp_path, capsys):
    fields, message = NOT_IN_TRANSFORMERS[layout]
    ck = checkpoint_of(**fields)
    assert main(["export", "hf", "--checkpoint", str(ck), "--output", str(tmp_path / "hf")]) == 2
    line = error_line(capsys.readouterr().err, "export")
    assert message in line and "export it to CTranslate2" in line
    assert not (tmp_path / "hf").exists()
    export("ctranslate2", ck, tmp_path / "ct2")  # which can
