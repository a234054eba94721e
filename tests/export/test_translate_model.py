"""`mt translate --model` (and `mt evaluate --model`) on a CTranslate2 export keep the contract of
`mt translate --checkpoint`: the checkpoint's lines, its errors, no torch, and compute types.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ctranslate2
import pytest
from helpers import (
    SOURCES,
    build_checkpoint,
    error_line,
    export,
    subprocess_env,
    tiny_config,
    write_lines,
)

from mt.cli import main
from mt.export import MANIFEST, read_manifest
from mt.export.ct2_translator import CT2Translator

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
