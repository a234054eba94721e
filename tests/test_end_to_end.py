"""The whole pipeline through the CLI on the real default corpus, with configs/tiny.yaml:
prepare, train a few steps, resume, translate a file, score the test split."""

import json

import pytest
from helpers import MULTI30K, REPO

from mt.checkpoint import load_checkpoint
from mt.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MULTI30K / "train.de.gz").exists(), reason=f"Multi30k not found at {MULTI30K}"),
]


def test_prepare_train_resume_translate_evaluate(tmp_path, capsys):
    cfg = str(REPO / "configs" / "tiny.yaml")
    common = [
        f"data.local_dir={MULTI30K}",
        f"data.prepared_dir={tmp_path / 'prepared'}",
        f"train.out_dir={tmp_path / 'run'}",
        "train.threads=1",
    ]
    assert main(["prepare", cfg, *common]) == 0
    meta = json.loads((tmp_path / "prepared" / "meta.json").read_text())
    assert meta["splits"]["train"]["read"] == 2000
    assert meta["splits"]["valid"]["kept"] == 1014 and meta["splits"]["test"]["kept"] == 1000
    assert main(["prepare", cfg, *common]) == 0
    assert "up to date" in capsys.readouterr().out

    assert main(["train", cfg, *common, "train.max_steps=20"]) == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")["state"]["step"] == 20
    assert main(["train", cfg, *common, "train.max_steps=30"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "test BLEU" in out
    assert load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")["state"]["step"] == 30

    src = tmp_path / "in.de"
    src.write_text("Ein Hund läuft.\n\n   \nZwei Männer spielen Fußball im Park.")  # no final newline
    hyp = tmp_path / "out.en"
    ck = str(tmp_path / "run" / "checkpoint_best.pt")
    assert main(["translate", "--checkpoint", ck, "--input", str(src), "--output", str(hyp)]) == 0
    lines = hyp.read_text().split("\n")
    assert len(lines) == 5 and lines[-1] == "" and lines[1] == lines[2] == ""

    assert main(["evaluate", cfg, *common, "--split", "test", "--beam", "1"]) == 0
    results = list((tmp_path / "run").glob("checkpoint_best.test.beam1*.json"))
    assert results and 0 <= json.loads(results[0].read_text())["bleu"] <= 100
