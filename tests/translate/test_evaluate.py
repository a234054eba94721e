"""`mt evaluate`: sacreBLEU scores, files next to the checkpoint, both command forms."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import sacrebleu
from helpers import build_checkpoint, corpus_config, make_corpus, synthetic_pairs

from mt.cli import main
from mt.config import load_config
from mt.data.dataset import load_prepared
from mt.data.prepare import prepare
from mt.translate.evaluate import evaluate_checkpoint, score
from mt.translate.translator import Translator


@pytest.fixture(scope="module")
def shared_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ck") / "tiny.pt")


@pytest.fixture
def checkpoint(tmp_path: Path, shared_checkpoint: Path) -> Path:
    # A private copy: evaluation writes its results next to the checkpoint.
    return Path(shutil.copy(shared_checkpoint, tmp_path / "model.pt"))


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_score_matches_sacrebleu():
    hyps = ["The cat sat on the mat.", "A dog runs in the park!", "Hello , world"]
    refs = ["The cat sat on the mat.", "The dog runs through the park.", "Hello, world!"]
    s = score(hyps, refs)
    assert s["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert s["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert "tok:13a" in s["bleu_signature"] and "case:mixed" in s["bleu_signature"]
    assert "nrefs:1" in s["chrf_signature"]
    assert score(refs, refs)["bleu"] == pytest.approx(100.0)
    with pytest.raises(ValueError):
        score(hyps, refs[:2])


def test_src_ref_form_writes_hypotheses_and_scores(tmp_path, capsys, checkpoint):
    src, ref = synthetic_pairs(8, seed=3)
    src_file, ref_file = _write(tmp_path / "news.de", src), _write(tmp_path / "news.en", ref)
    rc = main(["evaluate", "--checkpoint", str(checkpoint), "--src", str(src_file), "--ref", str(ref_file),
               "--beam", "2"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "BLEU = " in out and "signature: nrefs:1|case:mixed" in out and "chrF2 = " in out
    assert out.strip().splitlines()[-1].startswith("news: BLEU ")

    hyp_file, json_file = tmp_path / "model.news.beam2.hyp.txt", tmp_path / "model.news.beam2.json"
    hyps = hyp_file.read_text(encoding="utf-8").split("\n")[:-1]
    assert hyps == Translator.from_checkpoint(checkpoint, "cpu").translate(src, beam=2)
    result = json.loads(json_file.read_text(encoding="utf-8"))
    assert result["beam"] == 2 and result["sentences"] == 8
    assert result["bleu"] == pytest.approx(score(hyps, ref)["bleu"])
    assert 0 <= result["bleu"] <= 100 and 0 <= result["chrf"] <= 100
    assert "tok:13a" in result["bleu_signature"]
    assert result["seconds"] >= 0 and result["sentences_per_second"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model.pt", "news.de", "news.en", hyp_file.name, json_file.name]
    )  # no temp files


def test_default_beam_is_the_checkpoints(tmp_path, checkpoint):
    src, ref = synthetic_pairs(3, seed=4)
    result = evaluate_checkpoint(checkpoint, src, ref, device="cpu", name="x")
    assert result["beam"] == 2  # tiny_config's decode.beam
    assert (tmp_path / "model.x.beam2.hyp.txt").is_file()


def test_mismatched_line_counts_name_both_files(tmp_path, capsys, checkpoint):
    src_file = _write(tmp_path / "a.de", ["ein hund", "eine katze", "der mann"])
    ref_file = _write(tmp_path / "a.en", ["a dog", "a cat"])
    rc = main(["evaluate", "--checkpoint", str(checkpoint), "--src", str(src_file), "--ref", str(ref_file)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"--src {src_file} has 3 lines but --ref {ref_file} has 2" in err


def test_arguments_are_checked(tmp_path, capsys, checkpoint):
    assert main(["evaluate"]) == 2
    assert "give an experiment CONFIG" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--src", "x.de"]) == 2
    assert "--src and --ref go together" in capsys.readouterr().err


class _Stdin:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)


@pytest.mark.parametrize("piped", ["--src", "--ref"])
def test_dash_reads_sources_or_references_from_stdin_but_not_both(tmp_path, monkeypatch, capsys, checkpoint,
                                                                  piped):
    src, ref = synthetic_pairs(4, seed=3)
    files = {"--src": _write(tmp_path / "news.de", src), "--ref": _write(tmp_path / "news.en", ref)}
    monkeypatch.setattr(sys, "stdin", _Stdin(files[piped].read_bytes()))
    paths = {**{option: str(path) for option, path in files.items()}, piped: "-"}
    rc = main(["evaluate", "--checkpoint", str(checkpoint), "--beam", "2",
               "--src", paths["--src"], "--ref", paths["--ref"]])
    out, err = capsys.readouterr()
    assert rc == 0, err
    name = "stdin" if piped == "--src" else "news"  # names the files written next to the checkpoint
    result = json.loads((tmp_path / f"model.{name}.beam2.json").read_text(encoding="utf-8"))
    hyps = Translator.from_checkpoint(checkpoint, "cpu").translate(src, beam=2)
    assert result["sentences"] == 4 and result["bleu"] == pytest.approx(score(hyps, ref)["bleu"])

    assert main(["evaluate", "--checkpoint", str(checkpoint), "--src", "-", "--ref", "-"]) == 2
    assert "--src and --ref cannot both be standard input" in capsys.readouterr().err


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared tiny corpus and its config file (no checkpoint yet)."""
    root = tmp_path_factory.mktemp("exp")
    cfg_path = corpus_config(root, make_corpus(root / "corpus", n_train=80, n_valid=5, n_test=6))
    prepare(load_config(cfg_path), quiet=True)
    return cfg_path


def test_config_form_scores_the_best_checkpoint_on_a_prepared_split(capsys, experiment):
    cfg = load_config(experiment)
    ck = cfg.out_dir / "checkpoint_best.pt"
    ck.unlink(missing_ok=True)
    assert main(["evaluate", str(experiment)]) == 2
    err = capsys.readouterr().err
    assert str(ck) in err and f"mt train {experiment}" in err

    tok = load_prepared(cfg.prepared_dir).tokenizer
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    build_checkpoint(ck, cfg, tok.src_proto, tok.tgt_proto, steps=10)
    rc = main(["evaluate", str(experiment), "--split", "test"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads((cfg.out_dir / "checkpoint_best.test.beam2.json").read_text())
    assert result["sentences"] == 6 and result["beam"] == 2
    hyps = (cfg.out_dir / "checkpoint_best.test.beam2.hyp.txt").read_text(encoding="utf-8").split("\n")
    assert len(hyps) == 7  # six lines and the final newline

    # decode.* overrides change the search; other splits work; train keeps no raw text.
    assert main(["evaluate", str(experiment), "decode.beam=1", "--split", "valid"]) == 0
    assert (cfg.out_dir / "checkpoint_best.valid.beam1.json").is_file()
    capsys.readouterr()
    assert main(["evaluate", str(experiment), "--split", "train"]) == 2
    assert "keeps no raw text" in capsys.readouterr().err
    assert main(["evaluate", str(experiment), "--split", "dev"]) == 2
    assert "no split 'dev'" in capsys.readouterr().err


def test_config_form_says_to_prepare_first(tmp_path, capsys):
    cfg_path = corpus_config(tmp_path, make_corpus(tmp_path / "corpus", n_train=10, n_valid=2, n_test=2))
    cfg = load_config(cfg_path)
    cfg.out_dir.mkdir(parents=True)
    (cfg.out_dir / "checkpoint_best.pt").write_bytes(b"")  # not reached: the data check comes first
    assert main(["evaluate", str(cfg_path)]) == 2
    assert f"run `mt prepare {cfg_path}` first" in capsys.readouterr().err


@pytest.mark.low_precision
def test_precision_is_recorded_and_named(tmp_path, capsys, checkpoint):
    src, ref = synthetic_pairs(4, seed=6)
    src_file, ref_file = _write(tmp_path / "t.de", src), _write(tmp_path / "t.en", ref)
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--src", str(src_file), "--ref", str(ref_file)]
    assert main([*argv, "--precision", "bf16"]) == 0
    assert "(beam 2, bf16, 4 sentences" in capsys.readouterr().out
    result = json.loads((tmp_path / "model.t.beam2.bf16.json").read_text(encoding="utf-8"))
    assert result["precision"] == "bf16"
    assert (tmp_path / "model.t.beam2.bf16.hyp.txt").is_file()
    assert not (tmp_path / "model.t.beam2.json").exists()  # an fp32 result is not overwritten
