"""mt export: a CTranslate2 or Transformers export computes what its checkpoint computes, and
`mt translate --model` keeps the contract of `mt translate --checkpoint`.

Every layout an engine can express is exported from a tiny seeded model (pre-norm and
post-norm; tied, untied and separate vocabularies; ReLU and GELU; sinusoidal and learned
positions) and checked twice: the engine scores every token of our translations with our
log-probabilities, and its greedy search returns our greedy output token for token. What an
engine cannot express is a one-line error. The 1,000-sentence checks (BLEU, beam search,
int8, speed) are in scripts/bench_decode.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import ctranslate2
import numpy as np
import pytest
import torch
import transformers
from helpers import (
    assert_agree_up_to_near_ties,
    build_checkpoint,
    error_line,
    subprocess_env,
    synthetic_pairs,
    tiny_config,
    tiny_spm_pair,
    write_lines,
)
from safetensors import SafetensorError

import mt.export.ct2
from mt.checkpoint import load_checkpoint, save_checkpoint
from mt.cli import main
from mt.errors import ExportError
from mt.export import MANIFEST, read_manifest
from mt.export.ct2 import check_expressible, transformer_spec_of, write_ctranslate2
from mt.export.ct2_translator import CT2Translator
from mt.special import BOS, EOS, PAD, UNK
from mt.translate.lines import max_output_length
from mt.translate.translator import Translator, pad_sources

SOURCES = synthetic_pairs(40, seed=7)[0]

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


@pytest.fixture(scope="module")
def checkpoint_of(tmp_path_factory: pytest.TempPathFactory):
    """A function: model layout (ModelConfig fields, plus `separate`) -> a tiny trained checkpoint."""
    made: dict[str, Path] = {}

    def make(**layout: object) -> Path:
        key = json.dumps(layout, sort_keys=True)
        if key not in made:
            fields = dict(layout)
            src, tgt = tiny_spm_pair() if fields.pop("separate", False) else (None, None)
            path = tmp_path_factory.mktemp("ck") / "tiny.pt"
            made[key] = build_checkpoint(path, tiny_config(**fields), src, tgt)
        return made[key]

    return make


def export(fmt: str, checkpoint: Path, out: Path, *extra: str) -> Path:
    assert main(["export", fmt, "--checkpoint", str(checkpoint), "--output", str(out), *extra]) == 0
    return out


def source_ids(translator: Translator | CT2Translator, lines: list[str] = SOURCES) -> list[np.ndarray]:
    return [np.asarray(s, dtype=np.int64) for s in translator.tokenizer.encode_src(lines)]


def mt_greedy(translator: Translator, seqs: list[np.ndarray]) -> list[list[int]]:
    return [h[0].tokens for h in translator.translate_ids(seqs, beam=1)]


@torch.inference_mode()
def mt_log_probs(
    translator: Translator, seqs: list[np.ndarray], outputs: list[list[int]]
) -> list[np.ndarray]:
    """Our log-probability of every token of each output, its EOS included."""
    out = []
    for s, o in zip(seqs, outputs, strict=True):
        logits = translator.model(pad_sources([s], torch.device("cpu")), torch.tensor([[BOS, *o]]))[0]
        out.append(logits.log_softmax(-1)[torch.arange(len(o) + 1), torch.tensor([*o, EOS])].numpy())
    return out


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
    assert [h[0][0] for h in ct2.translate_ids(seqs, beam=1)] == mt_greedy(ours, seqs)


def test_ctranslate2_beam_search_differs_from_ours_only_where_it_stops_earlier(checkpoint_of, tmp_path):
    """CTranslate2 ends a sentence once `beam` hypotheses have ended; mt waits while an unfinished
    one could still win. So where the two differ, ours scores at least as well under our model."""
    ck = checkpoint_of()
    ours = Translator.from_checkpoint(ck, "cpu", "fp32")
    ct2 = CT2Translator.from_export(export("ctranslate2", ck, tmp_path / "ct2"), "cpu")
    seqs = source_ids(ours)
    mine = [h[0] for h in ours.translate_ids(seqs, beam=3)]
    theirs = [h[0][0] for h in ct2.translate_ids(seqs, beam=3)]
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
        got = [h[0][0] for h in small.translate_ids(seqs, beam=1)]
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
        outputs = int8.translate_ids(seqs, beam=1)
        assert len(outputs) == len(seqs)
        for s, [(ids, score)] in zip(seqs, outputs, strict=True):
            assert len(ids) <= max_output_length(len(s) + 1, d.max_len_a, d.max_len_b, cap)
            assert all(3 < t < ours.tokenizer.tgt_vocab_size for t in ids)
            assert math.isfinite(score)


# --------------------------------------------------------------------------- CTranslate2: the directory


def readme_example(readme: str) -> str:
    (code,) = re.findall(r"```python\n(.*?)```", readme, re.S)
    return code


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


# --------------------------------------------------------------------------- mt translate --model


def contract_input(tmp_path: Path) -> Path:
    lines = [SOURCES[0], "", "   ", SOURCES[1] + "\r", " ".join(["hund"] * 80), SOURCES[2]]  # CRLF, over-long
    return write_lines(tmp_path / "in.txt", lines)


def test_translate_with_a_model_keeps_the_contract_and_gives_the_checkpoints_lines(
    checkpoint_of, tmp_path, capsys
):
    ck = checkpoint_of()
    model = export("ctranslate2", ck, tmp_path / "ct2")
    src = contract_input(tmp_path)
    outputs = {}
    for name, engine in (("checkpoint", ["--checkpoint", str(ck)]), ("model", ["--model", str(model)])):
        for extra in (["--beam", "1"], ["--beam", "3", "--nbest", "2"]):
            out = tmp_path / f"{name}{len(extra)}.txt"
            capsys.readouterr()
            assert main(["translate", *engine, "--input", str(src), "--output", str(out), *extra]) == 0
            assert "input line 5 has" in capsys.readouterr().err  # cut to the model's length, said so
            outputs[name, len(extra)] = out.read_text(encoding="utf-8").split("\n")
    for key in ("checkpoint", "model"):
        assert len(outputs[key, 2]) == 6 + 1 and outputs[key, 2][1:3] == ["", ""]
        nbest = outputs[key, 4]
        assert [len(line.split("\t")) for line in nbest[:6]] == [4, 1, 1, 4, 4, 4]
    assert outputs["model", 2] == outputs["checkpoint", 2]  # greedy: the same lines


def test_translate_with_a_model_does_not_load_torch(checkpoint_of, tmp_path):
    model = export("ctranslate2", checkpoint_of(), tmp_path / "ct2")
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mt", "translate", "--model", str(model), "--beam", "1"],
        input=f"{SOURCES[0]}\n\n",
        capture_output=True,
        text=True,
        env=subprocess_env(tmp_path),
        check=True,
    )
    assert len(run.stdout.split("\n")) == 3
    imported = [
        line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")
    ]
    packages = {name.split(".")[0] for name in imported}
    assert "ctranslate2" in packages and "torch" not in packages


def test_translate_with_a_model_gives_the_checkpoints_errors(checkpoint_of, tmp_path, capsys):
    ck = checkpoint_of()
    model = export("ctranslate2", ck, tmp_path / "ct2")
    hf = export("hf", ck, tmp_path / "hf")
    empty = tmp_path / "empty"
    empty.mkdir()
    good = write_lines(tmp_path / "in.txt", SOURCES[:2])
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"gut\n\xff\n")
    existing = tmp_path / "out.txt"
    existing.write_text("before\n")
    cases = [  # (arguments, what the line says)
        (["--model", str(tmp_path / "nowhere")], "no such directory"),
        (["--model", str(ck)], "is a file, not an export directory"),
        (["--model", str(empty)], "is not an mt export"),
        (["--model", str(hf)], "is a transformers export; --model takes a CTranslate2 export"),
        (["--model", str(model), "--precision", "fp32"], "--precision goes with --checkpoint"),
        (["--model", str(model), "--device", "tpu"], "--device tpu: not a device name"),
        (["--model", str(model), "--alignment"], "--alignment goes with --checkpoint"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["translate", *args, "--input", str(good), "--output", str(existing)]) == 2
        assert message in error_line(capsys.readouterr().err, "translate"), args
    for args in (["--input", str(bad)], ["--input", str(tmp_path / "missing.txt")], ["--beam", "0"]):
        lines = []
        for engine in (["--checkpoint", str(ck)], ["--model", str(model)]):
            capsys.readouterr()
            assert main(["translate", *engine, *args, "--output", str(existing)]) == 2
            lines.append(error_line(capsys.readouterr().err, "translate"))
        assert lines[0] == lines[1]
    assert existing.read_text() == "before\n"  # no failed run touched the output
    with pytest.raises(SystemExit):
        main(["translate", "--model", str(model), "--checkpoint", str(ck)])


def test_gnmts_length_penalty_is_refused_at_export_or_replaced_on_request_with_a_note(tmp_path, capsys):
    cfg = tiny_config()
    cfg.decode.length_penalty = "gnmt"
    ck = build_checkpoint(tmp_path / "gnmt.pt", cfg)
    for fmt in ("ctranslate2", "hf"):
        out = tmp_path / fmt
        assert main(["export", fmt, "--checkpoint", str(ck), "--output", str(out)]) == 2
        line = error_line(capsys.readouterr().err, "export")
        assert "decode.length_penalty 'gnmt' has no" in line and "--length-penalty fairseq" in line
        assert not out.exists()
        export(fmt, ck, out, "--length-penalty", "fairseq")
        assert read_manifest(out).config.decode.length_penalty == "fairseq"
        assert "this export uses fairseq's len**alpha instead" in (out / "README.md").read_text()
    hf_config = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert hf_config["length_penalty"] == cfg.decode.alpha
    src = write_lines(tmp_path / "in.txt", SOURCES[:2])
    model = tmp_path / "ctranslate2"
    assert main(["translate", "--model", str(model), "--input", str(src), "--beam", "2"]) == 0
    # An export made before the refusal still holds the GNMT penalty: beam search is refused.
    manifest = json.loads((model / MANIFEST).read_text())
    manifest["config"]["decode"]["length_penalty"] = "gnmt"
    (model / MANIFEST).write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["translate", "--model", str(model), "--input", str(src), "--beam", "2"]) == 2
    assert "decode.length_penalty 'gnmt' has no CTranslate2 equivalent" in error_line(
        capsys.readouterr().err, "translate"
    )
    assert main(["translate", "--model", str(model), "--input", str(src), "--beam", "1"]) == 0


@pytest.mark.low_precision
def test_int8_float16_and_int8_bfloat16_exports_load_and_translate_on_a_cpu(checkpoint_of, tmp_path):
    ck = checkpoint_of()
    full = export("ctranslate2", ck, tmp_path / "fp32")
    for quantization in ("int8_float16", "int8_bfloat16"):
        out = export("ctranslate2", ck, tmp_path / quantization, "--quantization", quantization)
        assert read_manifest(out).quantization == quantization
        assert (out / "model.bin").stat().st_size < (full / "model.bin").stat().st_size
        ct2 = CT2Translator.from_export(out, "cpu")
        assert ct2.model.compute_type == "int8_float32"  # what a CPU runs them in
        assert all(t.strip() for t in ct2.translate(SOURCES[:3], beam=1))


@pytest.mark.low_precision
def test_compute_type_chooses_ctranslate2s_arithmetic_and_says_what_a_device_lacks(
    checkpoint_of, tmp_path, capsys
):
    ck = checkpoint_of()
    model = export("ctranslate2", ck, tmp_path / "ct2")  # float32 weights
    assert CT2Translator.from_export(model, "cpu").model.compute_type == "float32"
    assert CT2Translator.from_export(model, "cpu", compute_type="int8").model.compute_type == "int8_float32"
    src = write_lines(tmp_path / "in.txt", SOURCES[:2])
    assert main(["translate", "--model", str(model), "--input", str(src), "--compute-type", "int8"]) == 0
    supported = sorted(ctranslate2.get_supported_compute_types("cpu"))
    cases = [
        (
            ["translate", "--model", str(model), "--input", str(src), "--compute-type", "fp8"],
            "--compute-type fp8: expected one of default, auto, int8,",
        ),
        (
            [
                "evaluate",
                "--checkpoint",
                str(ck),
                "--src",
                str(src),
                "--ref",
                str(src),
                "--compute-type",
                "int8",
            ],
            "--compute-type goes with --model",
        ),
        (
            ["translate", "--checkpoint", str(ck), "--input", str(src), "--compute-type", "int8"],
            "--compute-type goes with --model",
        ),
    ]
    if "float16" not in supported:  # most CPUs: CTranslate2 has no float16 kernels for them
        cases.append(
            (
                [
                    "translate",
                    "--model",
                    str(model),
                    "--input",
                    str(src),
                    "--device",
                    "cpu",
                    "--compute-type",
                    "float16",
                ],
                f"--compute-type float16: not supported on cpu here (supported: {', '.join(supported)}",
            )
        )
    for args, message in cases:
        capsys.readouterr()
        assert main(args) == 2, args
        assert message in error_line(capsys.readouterr().err, args[0]), args


@pytest.mark.low_precision
def test_evaluate_scores_a_model_as_it_scores_its_checkpoint(checkpoint_of, tmp_path, capsys):
    ck = checkpoint_of()
    model = export("ctranslate2", ck, tmp_path / "ct2", "--quantization", "int8")
    src = write_lines(tmp_path / "test.de", SOURCES)
    ref = write_lines(tmp_path / "test.en", [s.upper() for s in SOURCES])
    assert (
        main(["evaluate", "--checkpoint", str(ck), "--src", str(src), "--ref", str(ref), "--beam", "1"]) == 0
    )
    assert main(["evaluate", "--model", str(model), "--src", str(src), "--ref", str(ref), "--beam", "1"]) == 0
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(model),
                "--src",
                str(src),
                "--ref",
                str(ref),
                "--beam",
                "1",
                "--compute-type",
                "float32",
            ]
        )
        == 0
    )
    scores = json.loads((tmp_path / "ct2.test.beam1.ct2-int8.json").read_text())
    assert scores["beam"] == 1 and scores["precision"] == "ct2-int8" and scores["sentences"] == len(SOURCES)
    assert (tmp_path / "ct2.test.beam1.ct2-int8.hyp.txt").read_text().count("\n") == len(SOURCES)
    fp32 = json.loads((tmp_path / "ct2.test.beam1.ct2-float32.json").read_text())
    ours = json.loads(ck.with_name(f"{ck.stem}.test.beam1.json").read_text())
    assert fp32["bleu"] == ours["bleu"] and fp32["chrf"] == ours["chrf"]  # greedy: the same lines
    capsys.readouterr()
    assert (
        main(["evaluate", "--model", str(model), "--src", str(src), "--ref", str(ref), "--precision", "bf16"])
        == 2
    )
    assert "--precision goes with --checkpoint" in error_line(capsys.readouterr().err, "evaluate")


def test_a_missing_export_extra_is_one_line_naming_the_install_command(
    checkpoint_of, tmp_path, monkeypatch, capsys
):
    ck = checkpoint_of()
    model = export("ctranslate2", ck, tmp_path / "ct2")
    src = write_lines(tmp_path / "in.txt", SOURCES[:1])
    cases = [
        (
            "ctranslate2",
            "export",
            ["export", "ctranslate2", "--checkpoint", str(ck), "--output", str(tmp_path / "o")],
        ),
        (
            "transformers",
            "export",
            ["export", "hf", "--checkpoint", str(ck), "--output", str(tmp_path / "o")],
        ),
        ("ctranslate2", "translate", ["translate", "--model", str(model), "--input", str(src)]),
    ]
    for module, command, args in cases:
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)  # `import module` now fails as if not installed
            capsys.readouterr()
            assert main(args) == 2
            line = error_line(capsys.readouterr().err, command)
        assert f"needs {module}, which is not installed: pip install -e '.[export]'" in line
    assert not (tmp_path / "o").exists()


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
