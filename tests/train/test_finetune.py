"""Fine-tuning (train.init_from): a new run starts from a trained checkpoint's weights with a
fresh optimizer and schedule, on data prepared with the checkpoint's SentencePiece models;
a model of another shape, other languages or other subword models is a clear error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import MULTI30K, REPO, corpus_files, error_line, multi30k_lines

from mt.cli import main
from mt.config import load_config
from mt.data.dataset import load_prepared
from mt.data.prepare import prepare
from mt.errors import CheckpointError
from mt.train.trainer import train

# The tiny experiment, quick to validate: loss only, on all of Multi30k's validation split.
TINY = ["train.valid_bleu=false", "train.max_steps=60", "train.valid_every=30", "train.keep_last=0"]


def _tiny(tmp_path, name, *overrides):
    return load_config(REPO / "configs" / "tiny.yaml", [
        f"data.local_dir={MULTI30K}", f"data.prepared_dir={tmp_path / name / 'prepared'}",
        f"train.out_dir={tmp_path / name / 'run'}", *TINY, *overrides,
    ])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny model trained on the first 2,000 pairs of Multi30k: its last checkpoint."""
    root = tmp_path_factory.mktemp("trained")
    cfg = _tiny(root, "base")
    train(cfg)
    return cfg.out_dir / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def other_slice(tmp_path_factory):
    """Multi30k's training pairs 2,000 to 2,999, and its validation and test splits as they are."""
    lines = {lang: multi30k_lines("train", lang)[2000:3000] for lang in ("de", "en")}
    return corpus_files(tmp_path_factory.mktemp("slice"), {
        "train": (list(lines["de"]), list(lines["en"])),
        "val": (list(multi30k_lines("val", "de")), list(multi30k_lines("val", "en"))),
        "test_2016_flickr": (list(multi30k_lines("test_2016_flickr", "de")),
                             list(multi30k_lines("test_2016_flickr", "en"))),
    })


def _first_valid_loss(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r["valid_loss"] for r in rows if r["kind"] == "valid")


def test_fine_tuning_starts_where_the_checkpoint_left_off_with_its_vocabulary(
    tmp_path, trained, other_slice, capsys
):
    ck = torch.load(trained, weights_only=True)
    # Another slice, another vocabulary size asked for, one cautious step, then validation.
    step = ["data.max_train_pairs=0", "train.lr=1e-5", "train.warmup_steps=0", "train.max_steps=1",
            "train.valid_every=1"]
    tuned = _tiny(tmp_path, "tuned", f"data.local_dir={other_slice}", f"train.init_from={trained}",
                  "data.vocab_size=100", *step)
    train(tuned)
    assert f"starting from the weights of {trained}" in capsys.readouterr().out
    data = load_prepared(tuned.prepared_dir)
    assert data.tokenizer.src_proto == ck["spm_src"] and data.tokenizer.tgt_proto == ck["spm_tgt"]
    assert data.meta["src_vocab_size"] == 200  # the checkpoint's, not data.vocab_size 100
    assert data.meta["splits"]["train"]["read"] == 1000

    fresh = _tiny(tmp_path, "fresh", f"data.local_dir={other_slice}", *step)
    train(fresh)
    left_off, tuned_loss, fresh_loss = ck["metrics"]["valid_loss"], _first_valid_loss(tuned.out_dir), \
        _first_valid_loss(fresh.out_dir)
    assert abs(tuned_loss - left_off) < 0.02 * left_off, (tuned_loss, left_off)
    assert fresh_loss > left_off + 0.3, (fresh_loss, left_off)
    tuned_ck = torch.load(tuned.out_dir / "checkpoint_last.pt", weights_only=True)
    assert tuned_ck["state"]["step"] == 1  # a new run: its own steps, schedule and optimizer
    assert len(tuned_ck["optimizer"]["state"]) > 0 and tuned_ck["optimizer"]["state"][0]["step"] == 1

    # The same command again resumes the fine-tuning run from its own checkpoint.
    capsys.readouterr()
    train(_tiny(tmp_path, "tuned", f"data.local_dir={other_slice}", f"train.init_from={trained}",
                "data.vocab_size=100", *step, "train.max_steps=2"))
    out = capsys.readouterr().out
    assert "resuming from" in out and "starting from the weights" not in out


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.d_model=32"], "has another model shape (model.d_model 16 -> 32, checkpoint -> config)"),
        (["model.layers=2", "model.dropout=0.2"], "(model.layers 1 -> 2, checkpoint -> config)"),
        (["data.tgt_lang=fr"], "translates de->en, but this config de->fr"),
    ],
    ids=["width", "depth (dropout may change)", "languages"],
)
def test_a_checkpoint_that_does_not_fit_is_refused_before_anything_is_prepared_or_left_behind(
    tmp_path, trained, other_slice, overrides, message, capsys
):
    cfg = _tiny(tmp_path, "misfit", f"data.local_dir={other_slice}", f"train.init_from={trained}", *overrides)
    with pytest.raises(CheckpointError, match="train.init_from: ") as e:
        train(cfg)
    assert message in str(e.value)
    assert not cfg.prepared_dir.exists() and not cfg.out_dir.exists() and cfg.out_dir.parent.is_dir()
    config = REPO / "configs" / "tiny.yaml"
    args = [f"data.local_dir={other_slice}", f"data.prepared_dir={cfg.prepared_dir}",
            f"train.out_dir={cfg.out_dir}", f"train.init_from={trained}", *overrides]
    assert main(["prepare", str(config), *args]) == 2  # mt prepare checks it alike
    assert message in error_line(capsys.readouterr().err, "prepare")
    assert not cfg.prepared_dir.exists()


def test_a_missing_checkpoint_to_fine_tune_is_one_line(tmp_path, capsys):
    config = REPO / "configs" / "tiny.yaml"
    overrides = [f"data.local_dir={MULTI30K}", f"data.prepared_dir={tmp_path / 'p'}",
                 f"train.out_dir={tmp_path / 'r'}", f"train.init_from={tmp_path / 'nope.pt'}"]
    for cmd in ("prepare", "train"):
        assert main([cmd, str(config), *overrides]) == 2
        line = error_line(capsys.readouterr().err, cmd)
        assert f"train.init_from: checkpoint not found: {tmp_path / 'nope.pt'}" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no prepared data, no empty run directory


def test_a_cache_with_other_subword_models_out_of_reach_is_refused(tmp_path, trained, other_slice):
    """A cache prepared without init_from, whose corpus is then out of reach (copied to another
    machine), cannot be prepared again: its token ids would mean other words to the model."""
    corpus = shutil.copytree(other_slice, tmp_path / "corpus")
    prepare(_tiny(tmp_path, "moved", f"data.local_dir={corpus}"), quiet=True)
    shutil.rmtree(corpus)
    cfg = _tiny(tmp_path, "moved", f"data.local_dir={corpus}", f"train.init_from={trained}")
    with pytest.raises(CheckpointError, match="has other subword models than"):
        train(cfg)
