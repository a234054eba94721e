import json
import math

import pytest
import torch
from conftest import corpus_config, make_corpus

import mt.trainer as trainer_mod
from mt.checkpoint import load_checkpoint
from mt.config import load_config
from mt.errors import MTError
from mt.trainer import train


@pytest.fixture
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), n_train=300, n_valid=20, n_test=20)


def _cfg(tmp_path, corpus, *overrides):
    return load_config(corpus_config(tmp_path, corpus), ["train.max_tokens=400", *overrides])


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


def test_train_writes_everything(tmp_path, corpus):
    cfg = _cfg(tmp_path, corpus, "train.max_steps=6", "train.valid_every=3")
    result = train(cfg)
    run = cfg.out_dir
    assert result["steps"] == 6
    for name in ("checkpoint_last.pt", "checkpoint_best.pt", "config.yaml", "metrics.jsonl", "curves.png"):
        assert (run / name).exists(), name
    ck = torch.load(run / "checkpoint_last.pt", weights_only=True)
    assert ck["state"]["step"] == 6 and ck["config"]["model"]["d_model"] == 16
    assert isinstance(ck["spm_src"], bytes)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in rows if r["kind"] == "valid"]
    assert [r["step"] for r in valid] == [3, 6]
    assert all(0 <= r["valid_bleu"] <= 100 and math.isfinite(r["valid_loss"]) for r in valid)
    assert "best_beam2" in result["test"] and "best_beam1" in result["test"]


def test_resumed_run_equals_uninterrupted(tmp_path, corpus):
    steps = ["train.valid_every=4", "model.dropout=0.1"]  # dropout: the RNG state must resume too
    full = _cfg(tmp_path / "a", corpus, "train.max_steps=14", *steps)
    train(full)
    part = _cfg(tmp_path / "b", corpus, "train.max_steps=5", *steps)
    train(part)
    assert load_checkpoint(part.out_dir / "checkpoint_last.pt")["state"]["step"] == 5
    rest = _cfg(tmp_path / "b", corpus, "train.max_steps=14", *steps)
    train(rest)
    a, b = (
        load_checkpoint(full.out_dir / "checkpoint_last.pt"),
        load_checkpoint(rest.out_dir / "checkpoint_last.pt"),
    )
    assert a["state"]["epoch"] >= 1, "the run should cross an epoch boundary"
    assert _losses(full.out_dir) == _losses(rest.out_dir)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_accumulation_matches_bigger_batches(tmp_path, corpus):
    # Two accumulated half-updates follow the same loss normalisation as one update.
    cfg = _cfg(tmp_path, corpus, "train.max_steps=3", "train.accum_steps=2", "train.valid_every=0")
    result = train(cfg)
    assert result["steps"] == 3
    ck = load_checkpoint(cfg.out_dir / "checkpoint_last.pt")
    assert ck["state"]["batch_pos"] == 6 or ck["state"]["epoch"] >= 1


def test_nonfinite_loss_is_skipped(tmp_path, corpus, monkeypatch, capsys):
    real = trainer_mod.label_smoothed_nll
    calls = {"n": 0}

    def sometimes_nan(logits, target, smoothing):
        calls["n"] += 1
        loss, nll = real(logits, target, smoothing)
        if calls["n"] == 2:
            return loss * float("nan"), nll * float("nan")
        return loss, nll

    monkeypatch.setattr(trainer_mod, "label_smoothed_nll", sometimes_nan)
    cfg = _cfg(tmp_path, corpus, "train.max_steps=4", "train.valid_every=0", "train.valid_bleu=false")
    train(cfg)
    assert "non-finite loss" in capsys.readouterr().err
    ck = load_checkpoint(cfg.out_dir / "checkpoint_last.pt")
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_diverging_run_stops_with_a_clear_error(tmp_path, corpus, monkeypatch):
    def always_nan(logits, target, smoothing):
        s = logits.float().sum() * float("nan")
        return s, s

    monkeypatch.setattr(trainer_mod, "label_smoothed_nll", always_nan)
    cfg = _cfg(tmp_path, corpus, "train.max_steps=20", "train.valid_every=0")
    with pytest.raises(MTError, match="non-finite losses in a row"):
        train(cfg)


def test_resume_with_other_model_config_is_refused(tmp_path, corpus):
    train(_cfg(tmp_path, corpus, "train.max_steps=2", "train.valid_bleu=false"))
    with pytest.raises(MTError, match="different model config"):
        train(_cfg(tmp_path, corpus, "train.max_steps=4", "model.ffn_dim=48"))


def test_unprepared_data_is_prepared_first(tmp_path, corpus, capsys):
    cfg = _cfg(tmp_path, corpus, "train.max_steps=1", "train.valid_bleu=false")
    assert not cfg.prepared_dir.exists()
    train(cfg)
    assert "preparing it first" in capsys.readouterr().out


def test_last_checkpoints_are_averaged_and_scored(tmp_path, corpus):
    cfg = _cfg(tmp_path, corpus, "train.max_steps=6", "train.valid_every=2", "train.keep_last=2")
    result = train(cfg)
    steps = sorted(p.name for p in cfg.out_dir.glob("checkpoint_step*.pt"))
    assert steps == ["checkpoint_step4.pt", "checkpoint_step6.pt"]
    assert (cfg.out_dir / "checkpoint_avg.pt").exists()
    assert {"best_beam2", "best_beam1", "averaged_beam2", "averaged_beam1"} <= set(result["test"])


def test_fp16_decoding_on_cpu_is_refused_before_training(tmp_path, corpus):
    cfg = _cfg(tmp_path, corpus, "train.device=cpu", "decode.precision=fp16")
    with pytest.raises(MTError, match="decode.precision=fp16 needs a GPU"):
        train(cfg)
    assert not cfg.out_dir.exists() and not cfg.prepared_dir.exists()  # nothing done


def test_final_test_uses_decode_precision(tmp_path, corpus, capsys):
    cfg = _cfg(tmp_path, corpus, "train.max_steps=2", "train.valid_bleu=false", "decode.precision=bf16")
    result = train(cfg)
    assert result["test"]["best_beam2"]["precision"] == "bf16"
    assert (cfg.out_dir / "checkpoint_best.test.beam2.bf16.json").is_file()
    assert ", bf16, " in capsys.readouterr().out
