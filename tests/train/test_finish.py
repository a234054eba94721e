"""The end of a training run: the end checkpoints averaged and validated, checkpoint_final.pt
pointing at the better of the average and the best checkpoint, and the final test."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from helpers import REPO
from helpers import train_config as _cfg

import mt.train.average
from mt.checkpoint import load_checkpoint, save_checkpoint, step_checkpoints
from mt.train.trainer import train

# `corpus` and `prepared_dir` are conftest's, shared by the module (read only).


def test_the_end_checkpoints_are_averaged_validated_and_the_better_one_is_final(tmp_path, corpus, capsys):
    # Validations (and step checkpoints) at steps 2, 4, 6, 7 (the epoch's end) and 8; keep_last
    # keeps 4, 6, 7, 8, and the last quarter of the run's 8 steps begins at step 6.
    cfg = _cfg(tmp_path, corpus, "train.max_steps=8", "train.valid_every=2", "train.keep_last=4")
    result = train(cfg)
    run = cfg.out_dir
    steps = [p.name for _, p in step_checkpoints(run)]
    assert steps == [f"checkpoint_step{n}.pt" for n in (4, 6, 7, 8)]
    average = result["average"]
    assert average["checkpoints"] == steps[1:]
    assert average["metric"] == "valid_bleu" and {"valid_loss", "valid_bleu"} <= set(average["valid"])
    assert load_checkpoint(run / "checkpoint_avg.pt")["averaged_from"] == [str(run / s) for s in steps[1:]]
    final = "checkpoint_best.pt" if average["worse_than_best"] else "checkpoint_avg.pt"
    assert result["final_checkpoint"] == final and (run / "checkpoint_final.pt").resolve() == run / final
    assert json.loads((run / "summary.json").read_text())["final_checkpoint"] == final
    assert f"{run / 'checkpoint_final.pt'} -> {final}" in capsys.readouterr().out
    assert {"best_beam2", "best_beam1", "averaged_beam2", "averaged_beam1"} <= set(result["test"])


def test_an_average_worse_than_the_best_on_the_validation_set_is_said_and_not_final(
    tmp_path, corpus, monkeypatch, capsys
):
    real = mt.train.average.average_checkpoints

    def ruined(paths, output, quiet=False):  # an average that has lost what the model learned
        real(paths, output, quiet)
        ck = load_checkpoint(output)
        torch.manual_seed(0)
        ck["model"] = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in ck["model"].items()}
        save_checkpoint(output, ck)

    monkeypatch.setattr(mt.train.average, "average_checkpoints", ruined)
    cfg = _cfg(tmp_path, corpus, "train.max_steps=8", "train.valid_every=2", "train.keep_last=4",
               "train.best_metric=loss", "train.valid_bleu=false")
    result = train(cfg)
    run = cfg.out_dir
    assert result["average"]["worse_than_best"] and result["average"]["metric"] == "valid_loss"
    assert result["average"]["valid"]["valid_loss"] > result["average"]["best"] == result["best"]
    assert result["final_checkpoint"] == "checkpoint_best.pt"
    assert (run / "checkpoint_final.pt").resolve() == run / "checkpoint_best.pt"
    assert json.loads((run / "summary.json").read_text())["average"]["worse_than_best"] is True
    assert "the average is worse than the best on the validation set" in capsys.readouterr().out
    assert {"best_beam2", "averaged_beam2"} <= set(result["test"])  # both are still scored on test


def test_make_translate_and_evaluate_use_the_final_checkpoint_once_there_is_one(tmp_path):
    def commands() -> list[str]:
        out = subprocess.run(["make", "-n", "translate", "evaluate", f"RUN_DIR={tmp_path}"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
        return [line for line in out.splitlines() if "mt translate" in line or "mt evaluate" in line]

    assert all(f"--checkpoint {tmp_path / 'checkpoint_best.pt'}" in c for c in commands())  # mid-run
    (tmp_path / "checkpoint_final.pt").symlink_to("checkpoint_avg.pt")
    assert all(f"--checkpoint {tmp_path / 'checkpoint_final.pt'}" in c for c in commands())
    assert len(commands()) == 2


@pytest.mark.low_precision
def test_final_test_uses_decode_precision(tmp_path, corpus, capsys):
    cfg = _cfg(tmp_path, corpus, "train.max_steps=2", "train.valid_bleu=false", "decode.precision=bf16")
    result = train(cfg)
    assert result["test"]["best_beam2"]["precision"] == "bf16"
    assert (cfg.out_dir / "checkpoint_best.test.beam2.bf16.json").is_file()
    assert ", bf16, " in capsys.readouterr().out


