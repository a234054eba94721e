"""mt export ctranslate2: the export computes what its checkpoint computes (every layout
CTranslate2 can express, from tiny seeded models: the engine scores every token of our
translations with our log-probabilities, and its greedy search returns ours token for token),
quantized exports hold the checkpoint's weights, and the directory stands on its own. The
1,000-sentence checks (BLEU, beam search, int8, speed) are in scripts/bench_decode.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import ctranslate2
import numpy as np
import pytest
import torch
import transformers
from helpers import (
    SOURCES,
    assert_agree_up_to_near_ties,
    build_checkpoint,
    error_line,
    export,
    mt_greedy,
    mt_log_probs,
    readme_example,
    source_ids,
    subprocess_env,
    synthetic_pairs,
    tiny_config,
    write_lines,
)
from safetensors import SafetensorError

import mt.export.ct2
from mt.checkpoint import load_checkpoint, save_checkpoint
from mt.cli import main
from mt.config import resolve_decoding
from mt.errors import ExportError
from mt.export import MANIFEST, read_manifest
from mt.export.ct2 import check_expressible, transformer_spec_of, write_ctranslate2
from mt.export.ct2_translator import CT2Translator
from mt.special import BOS, EOS, UNK
from mt.translate.lines import max_output_length
from mt.translate.translator import Translator, pad_sources

# name -> ModelConfig fields; "separate": separate source and target SentencePiece models
# name -> ModelConfig fields; "separate": separate source and target SentencePiece models
CT2_LAYOUTS = {
    "pre-norm, tied, relu, sinusoidal": {},
    "post-norm, untied, gelu, learned, 2+1 layers": dict(
        pre_norm=False,
        tie_embeddings=False,
        activation="gelu",
        learned_positions=True,
        layers=2,
        decoder_layers=1,
    ),
    "pre-norm, separate vocabularies, gelu, learned": dict(
        activation="gelu", learned_positions=True, separate=True
    ),
    "post-norm, separate vocabularies, tied, relu, sinusoidal": dict(pre_norm=False, separate=True),
}


# --------------------------------------------------------------------------- CTranslate2: the model


@pytest.mark.parametrize("layout", CT2_LAYOUTS)
def test_ctranslate2_scores_every_token_with_the_checkpoints_log_probabilities(
    layout, checkpoint_of, tmp_path
):
    ck = checkpoint_of(**CT2_LAYOUTS[layout])
    out = export("ctranslate2", ck, tmp_path / "ct2")
    ours = Translator.from_checkpoint(ck, "cpu", "fp32")
    seqs = source_ids(ours)
    outputs = mt_greedy(ours, seqs)
    ct2 = CT2Translator.from_export(out, "cpu")
    src, tgt = ct2.tokenizer.src, ct2.tokenizer.tgt
    scored = ct2.model.score_batch(
        [[src.id_to_piece(int(t)) for t in s] for s in seqs],
        [[tgt.id_to_piece(t) for t in o] for o in outputs],
    )
    for theirs, expected in zip(scored, mt_log_probs(ours, seqs, outputs), strict=True):
        assert np.allclose(theirs.log_probs, expected, atol=1e-4), (theirs.log_probs, expected)


@pytest.mark.parametrize("layout", CT2_LAYOUTS)
def test_ctranslate2_greedy_search_is_mt_greedy_search_token_for_token(layout, checkpoint_of, tmp_path):
    ck = checkpoint_of(**CT2_LAYOUTS[layout])
    ours = Translator.from_checkpoint(ck, "cpu", "fp32")
    ct2 = CT2Translator.from_export(export("ctranslate2", ck, tmp_path / "ct2"), "cpu")
    seqs = source_ids(ours)
    assert [
        h[0][0] for h in ct2.translate_ids(seqs, resolve_decoding(ct2.config.decode, beam=1))
    ] == mt_greedy(ours, seqs)


def test_ctranslate2_beam_search_differs_from_ours_only_where_it_stops_earlier(checkpoint_of, tmp_path):
    """CTranslate2 ends a sentence once `beam` hypotheses have ended; mt waits while an unfinished
    one could still win. So where the two differ, ours scores at least as well under our model."""
    ck = checkpoint_of()
    ours = Translator.from_checkpoint(ck, "cpu", "fp32")
    ct2 = CT2Translator.from_export(export("ctranslate2", ck, tmp_path / "ct2"), "cpu")
    seqs = source_ids(ours)
    mine = [h[0] for h in ours.translate_ids(seqs, resolve_decoding(ours.config.decode, beam=3))]
    theirs = [h[0][0] for h in ct2.translate_ids(seqs, resolve_decoding(ct2.config.decode, beam=3))]
    differ = [(s, h, t) for s, h, t in zip(seqs, mine, theirs, strict=True) if h.tokens != t]
    d = ours.config.decode
    for s, h, t in differ:
        limit = max_output_length(len(s) + 1, d.max_len_a, d.max_len_b, ours.model.cfg.max_positions)
        ended = len(t) < limit
        lp = mt_log_probs(ours, [s], [t])[0]
        their_score = (lp.sum() if ended else lp[:-1].sum()) / (len(t) + ended)
        assert h.score >= their_score - 1e-4


def test_ctranslate2_spec_has_our_positions_special_ids_and_vocabularies(checkpoint_of, tmp_path):
    ck = checkpoint_of(**CT2_LAYOUTS["pre-norm, separate vocabularies, gelu, learned"])
    ours = Translator.from_checkpoint(ck, "cpu", "fp32")
    src, tgt = ours.tokenizer.src, ours.tokenizer.tgt
    spec = transformer_spec_of(ours.model, ours.tokenizer)
    assert torch.equal(spec.encoder.position_encodings.encodings, ours.model.pos_embed.weight)
    sinusoidal = Translator.from_checkpoint(checkpoint_of(), "cpu", "fp32")
    spec = transformer_spec_of(sinusoidal.model, sinusoidal.tokenizer)
    assert torch.equal(spec.decoder.position_encodings.encodings, sinusoidal.model.pos_table)

    out = export("ctranslate2", ck, tmp_path / "ct2")
    config = json.loads((out / "config.json").read_text())
    assert config["unk_token"] == tgt.id_to_piece(UNK)
    assert config["bos_token"] == config["decoder_start_token"] == tgt.id_to_piece(BOS)
    assert config["eos_token"] == tgt.id_to_piece(EOS)
    assert config["add_source_eos"] is True and config["add_source_bos"] is False
    assert config["layer_norm_epsilon"] == pytest.approx(1e-5)
    source = json.loads((out / "source_vocabulary.json").read_text())
    target = json.loads((out / "target_vocabulary.json").read_text())
    assert source == [src.id_to_piece(i) for i in range(src.get_piece_size())]
    assert target == [tgt.id_to_piece(i) for i in range(tgt.get_piece_size())]
    assert len(source) != len(target)


# Quantized exports are judged in two parts. What the export writes (the rounded weights and
# their scales) is checked with CTranslate2 computing in float32, which is the same arithmetic on
# every CPU: it must score our translations as we do and find them. How CTranslate2 then computes
# in int8 is the CPU's: oneDNN's int8 kernels without VNNI (AVX2 CPUs) saturate 16-bit sums, and on
# this tiny model that moves log-probabilities by up to 15 nats (measured under
# ONEDNN_MAX_CPU_ISA=AVX2: 11 of 32 outputs equal ours, against 32 with AVX-512 VNNI), so the int8
# arithmetic is only required to run. A model trained to peaked distributions (every greedy step of
# its training sources wins by at least 3.9 nats) leaves no near tie to flip.
QUANTIZED_WEIGHTS_ATOL = 0.02  # per-token log-probability; rounding to int8 moves them by <= 0.002


@pytest.fixture(scope="module")
def peaked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A checkpoint trained until its greedy outputs on its training sources win by clear
    margins, and those sources."""
    ck = build_checkpoint(tmp_path_factory.mktemp("peaked") / "tiny.pt", tiny_config(), steps=150, seed=0)
    return ck, synthetic_pairs(32, seed=0)[0]


def ct2_in_float32(directory: Path) -> CT2Translator:
    """An export with CTranslate2 computing in float32 whatever its weights are stored in."""
    ct2 = CT2Translator.from_export(directory, "cpu")
    ct2.model = ctranslate2.Translator(str(directory), device="cpu", compute_type="float32", intra_threads=1)
    return ct2


@pytest.mark.low_precision
def test_quantized_exports_are_smaller_and_hold_the_checkpoints_weights(peaked, tmp_path):
    ck, lines = peaked
    ours = Translator.from_checkpoint(ck, "cpu", "fp32")
    before = {k: v.clone() for k, v in ours.model.state_dict().items()}
    write_ctranslate2(ours.model, ours.tokenizer, ours.config, tmp_path / "in-process", "int8")
    assert all(torch.equal(v, before[k]) for k, v in ours.model.state_dict().items())  # left as it was
    full = export("ctranslate2", ck, tmp_path / "fp32")
    seqs = source_ids(ours, lines)
    reference = mt_greedy(ours, seqs)
    expected = mt_log_probs(ours, seqs, reference)
    sources = [pad_sources([s], torch.device("cpu")) for s in seqs]
    for quantization in ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "float16", "bfloat16"):
        out = export("ctranslate2", ck, tmp_path / quantization, "--quantization", quantization)
        assert read_manifest(out).quantization == quantization
        assert (out / "model.bin").stat().st_size < (full / "model.bin").stat().st_size
        small = ct2_in_float32(out)
        assert small.model.compute_type == "float32"
        src, tgt = small.tokenizer.src, small.tokenizer.tgt
        scored = small.model.score_batch(
            [[src.id_to_piece(int(t)) for t in s] for s in seqs],
            [[tgt.id_to_piece(t) for t in o] for o in reference],
        )
        errors = [np.abs(np.asarray(t.log_probs) - e) for t, e in zip(scored, expected, strict=True)]
        worst = max(float(e.max()) for e in errors)
        assert worst <= QUANTIZED_WEIGHTS_ATOL, (quantization, worst)
        got = [h[0][0] for h in small.translate_ids(seqs, resolve_decoding(small.config.decode, beam=1))]
        assert_agree_up_to_near_ties(ours.model, sources, reference, got, min_equal=len(seqs) - 1)


@pytest.mark.low_precision
def test_int8_exports_compute_in_int8_on_any_cpu(peaked, tmp_path):
    ck, lines = peaked
    ours = Translator.from_checkpoint(ck, "cpu", "fp32")
    seqs = source_ids(ours, lines)
    d, cap = ours.config.decode, ours.model.cfg.max_positions
    for quantization in ("int8", "int8_float32"):
        int8 = CT2Translator.from_export(
            export("ctranslate2", ck, tmp_path / quantization, "--quantization", quantization), "cpu"
        )
        assert int8.model.compute_type == "int8_float32"  # the CPU's int8 kernels, whichever they are
        outputs = int8.translate_ids(seqs, resolve_decoding(int8.config.decode, beam=1))
        assert len(outputs) == len(seqs)
        for s, [(ids, score)] in zip(seqs, outputs, strict=True):
            assert len(ids) <= max_output_length(len(s) + 1, d.max_len_a, d.max_len_b, cap)
            assert all(3 < t < ours.tokenizer.tgt_vocab_size for t in ids)
            assert math.isfinite(score)


# --------------------------------------------------------------------------- CTranslate2: the directory


def test_the_ctranslate2_directory_is_self_contained_and_its_readme_example_runs(checkpoint_of, tmp_path):
    ck = checkpoint_of(**CT2_LAYOUTS["post-norm, separate vocabularies, tied, relu, sinusoidal"])
    out = export("ctranslate2", ck, tmp_path / "export")
    ours = Translator.from_checkpoint(ck, "cpu", "fp32")
    (tmp_path / "elsewhere").mkdir()
    moved = shutil.move(out, tmp_path / "elsewhere" / "model")  # nothing in it refers to the checkpoint
    ck.rename(ck.with_suffix(".away"))
    try:
        names = {p.name for p in Path(moved).iterdir()}
        assert {"model.bin", "config.json", "source.spm", "target.spm", "README.md", MANIFEST} <= names
        assert {"source_vocabulary.json", "target_vocabulary.json"} <= names
        readme = (Path(moved) / "README.md").read_text()
        assert f"mt translate --model {tmp_path / 'export'}" in readme
        script = tmp_path / "example.py"
        script.write_text(readme_example(readme).replace(str(tmp_path / "export"), str(moved)))
        run = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            env=subprocess_env(tmp_path),
            check=True,
        )
        ct2 = CT2Translator.from_export(moved, "cpu")
        assert run.stdout == ct2.translate(["Ein Hund rennt durch den Schnee."])[0] + "\n"
        assert ct2.translate(SOURCES, beam=1) == ours.translate(SOURCES, beam=1)
    finally:
        ck.with_suffix(".away").rename(ck)


def test_an_export_replaces_an_earlier_export_and_no_other_directory(checkpoint_of, tmp_path, capsys):
    ck = checkpoint_of()
    out = export("ctranslate2", ck, tmp_path / "a")
    export("ctranslate2", ck, out, "--quantization", "int8")
    assert read_manifest(out).quantization == "int8"
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary directory left
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    file = tmp_path / "file"
    file.write_text("keep me too")
    for target, message in ((foreign, "exists and is not an mt export"), (file, "is a file")):
        capsys.readouterr()
        assert main(["export", "ctranslate2", "--checkpoint", str(ck), "--output", str(target)]) == 2
        assert message in error_line(capsys.readouterr().err, "export")
    assert (foreign / "notes.txt").read_text() == "keep me" and file.read_text() == "keep me too"


def test_an_export_that_fails_midway_leaves_the_earlier_one_whole(
    checkpoint_of, tmp_path, monkeypatch, capsys
):
    ck = checkpoint_of()
    out = export("ctranslate2", ck, tmp_path / "a")
    before = (out / "model.bin").read_bytes()

    def disk_full(self, output_dir, **kwargs):
        (Path(output_dir) / "model.bin").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mt.export.ct2.CheckpointConverter, "convert", disk_full)
    capsys.readouterr()
    assert (
        main(
            ["export", "ctranslate2", "--checkpoint", str(ck), "--output", str(out), "--quantization", "int8"]
        )
        == 2
    )
    assert error_line(capsys.readouterr().err, "export").endswith(
        f"cannot write {out}: No space left on device"
    )
    assert (out / "model.bin").read_bytes() == before and read_manifest(out).quantization is None
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_a_full_disk_while_writing_a_transformers_export_is_one_line(
    checkpoint_of, tmp_path, monkeypatch, capsys
):
    def disk_full(tensors, filename, metadata=None):  # what safetensors raises on a full disk
        Path(filename).write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)
    out = tmp_path / "hf"
    assert main(["export", "hf", "--checkpoint", str(checkpoint_of()), "--output", str(out)]) == 2
    assert error_line(capsys.readouterr().err, "export").endswith(
        f"cannot write {out}: model.safetensors: No space left on device"
    )
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone, nothing half-written


def test_an_export_under_a_file_says_that_the_parent_is_a_file(checkpoint_of, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.write_text("keep me")
    for out in (notes / "export", notes / "deeper" / "export"):
        capsys.readouterr()
        args = ["export", "ctranslate2", "--checkpoint", str(checkpoint_of()), "--output", str(out)]
        assert main(args) == 2
        assert error_line(capsys.readouterr().err, "export").endswith(
            f"--output {out}: its parent {notes} is a file, not a directory"
        )
    assert notes.read_text() == "keep me"


def test_an_export_checks_its_vocabularies_and_subword_models_when_it_is_read(
    checkpoint_of, tmp_path, capsys
):
    ck, other = checkpoint_of(), checkpoint_of(separate=True)
    ours = export("ctranslate2", ck, tmp_path / "ct2")
    foreign = export("ctranslate2", other, tmp_path / "other")
    parts = json.loads((ours / MANIFEST).read_text())["parts"]
    assert {"source.spm", "target.spm"} <= set(parts) and any(n.endswith("vocabulary.json") for n in parts)
    spm = (ours / "source.spm").read_bytes()
    assert parts["source.spm"] == {"size": len(spm), "sha256": hashlib.sha256(spm).hexdigest()}
    src = write_lines(tmp_path / "in.txt", SOURCES[:2])
    for name in [n for n in parts if n.endswith(".json")][:1] + ["source.spm", "target.spm"]:
        pristine = (ours / name).read_bytes()
        theirs = foreign / name if (foreign / name).exists() else foreign / "source_vocabulary.json"
        shutil.copyfile(theirs, ours / name)  # the parts of another model, as a user might mix them up
        capsys.readouterr()
        assert main(["translate", "--model", str(ours), "--input", str(src)]) == 2
        line = error_line(capsys.readouterr().err, "translate")
        assert f"{ours / name} is not the file this export was made with" in line, line
        (ours / name).write_bytes(pristine)
    CT2Translator.from_export(ours, "cpu")  # whole again
    # A Transformers export is checked alike, whichever part was swapped.
    hf = export("hf", ck, tmp_path / "hf")
    shutil.copyfile(foreign / "target.spm", hf / "target.spm")
    with pytest.raises(ExportError, match="target.spm is not the file this export was made with"):
        read_manifest(hf)
    # An export written before the parts were recorded loads as it did.
    manifest = json.loads((ours / MANIFEST).read_text())
    del manifest["parts"]
    (ours / MANIFEST).write_text(json.dumps(manifest))
    shutil.copyfile(foreign / "target.spm", ours / "target.spm")
    assert read_manifest(ours).parts is None


def test_what_ctranslate2_cannot_express_is_a_one_line_error(checkpoint_of, tmp_path, capsys):
    # Weights beyond float16's range: the checkpoint translates, a float16 export could not.
    state = load_checkpoint(checkpoint_of())
    state["model"]["decoder.0.ffn.fc2.bias"][0] = 1e5
    big = tmp_path / "big.pt"
    save_checkpoint(big, state)
    assert (
        main(
            [
                "export",
                "ctranslate2",
                "--checkpoint",
                str(big),
                "--output",
                str(tmp_path / "o"),
                "--quantization",
                "float16",
            ]
        )
        == 2
    )
    line = error_line(capsys.readouterr().err, "export")
    assert "cannot hold weight decoder.0.ffn.fc2.bias" in line and "use bfloat16" in line
    assert not (tmp_path / "o").exists()
    export("ctranslate2", big, tmp_path / "o", "--quantization", "bfloat16")
    # An activation our config may one day allow that CTranslate2 lacks.
    model = Translator.from_checkpoint(checkpoint_of(), "cpu", "fp32").model
    model.cfg.activation = "swiglu"
    with pytest.raises(ExportError, match="model.activation 'swiglu' has no CTranslate2 equivalent"):
        check_expressible(model, None)
