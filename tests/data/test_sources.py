"""Where corpora come from: the shipped hub configs prepare as written from copies of their hub
repositories; a repository that needs a loading script, and every other load failure, is one
line naming the data set, the split and the cause; several corpora are prepared each on its own
and mixed by weight, as a pure function of seed and epoch, so resumed runs stay exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import (
    REPO,
    corpus_config,
    error_line,
    iwslt14_repository,
    iwslt2017_repository,
    make_corpus,
    multi30k_lines,
    synthetic_pairs,
    wmt14_repository,
    write_lines,
)

from mt.cli import main
from mt.config import DataConfig, SourceConfig, load_config
from mt.data.dataset import load_prepared
from mt.data.prepare import fingerprint, prepare
from mt.data.sources import inputs_reachable
from mt.errors import CheckpointError, DataError
from mt.train.batching import Mixture, TokenBatcher
from mt.train.trainer import train

PARQUET = "refs/convert/parquet"

# --------------------------------------------------------------------------- the hub, as written

SHIPPED = {
    "iwslt2017_de_en": lambda root: iwslt2017_repository(root, PARQUET),
    "iwslt14_de_en": lambda root: iwslt14_repository(root, PARQUET),
    "wmt14_en_de": wmt14_repository,
}


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_hub_configs_prepare_as_written_from_a_copy_of_their_repository(
    tmp_path, monkeypatch, capsys, name
):
    SHIPPED[name](tmp_path)
    # From here, `data.hub` as written (IWSLT/iwslt2017, ...) names the copy, and the cache goes
    # to data/prepared/<name> as it would for a user: the config gets no override at all.
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", str(REPO / "configs" / f"{name}.yaml")]) == 0, capsys.readouterr().err
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    data = load_prepared(tmp_path / "data" / "prepared" / name)
    src, tgt = cfg.data.src_lang, cfg.data.tgt_lang
    assert data.meta["splits"]["train"]["read"] == 300  # one folder (or config) only: the right one
    assert data.text("valid", "tgt") == list(multi30k_lines("val", tgt)[:20])
    assert data.text("test", "src") == list(multi30k_lines("test_2016_flickr", src)[:20])
    assert data.meta["splits"]["train"]["kept"] > 100


@pytest.mark.parametrize(
    "repository, config, script",
    [(iwslt2017_repository, "iwslt2017_de_en", "iwslt2017.py"),
     (iwslt14_repository, "iwslt14_de_en", "iwslt14-de-en.py")],
)
def test_a_repository_that_needs_a_loading_script_is_one_line_naming_the_parquet_revision(
    tmp_path, monkeypatch, capsys, repository, config, script
):
    repository(tmp_path, "main")
    monkeypatch.chdir(tmp_path)
    hub = load_config(REPO / "configs" / f"{config}.yaml").data.hub
    # The main branch, as the configs read it before: no revision, no folder.
    rc = main(["prepare", str(REPO / "configs" / f"{config}.yaml"), "data.hub_revision=null",
               "data.hub_data_dir=null"])
    line = error_line(capsys.readouterr().err, "prepare")
    assert rc == 2
    assert f"data.hub: '{hub}' needs a loading script ({script})" in line
    assert "data.hub_revision=refs/convert/parquet" in line and "data.hub_data_dir=" in line


@pytest.mark.parametrize(
    "overrides, split, cause",
    [
        # The conversion has one config, `default`: a config name is a mistake there.
        (["data.hub_config=iwslt2017-de-en"], "train",
         "ValueError: BuilderConfig 'iwslt2017-de-en' not found. Available: ['default']"),
        (["data.hub_splits={train: train, valid: dev, test: test}"], "dev", 'Unknown split "dev"'),
        (["data.hub_data_dir=iwslt2017-en-xx"], "train", "doesn't contain any data files"),
    ],
    ids=["config name", "split", "folder"],
)
def test_any_other_load_failure_is_one_line_naming_the_data_set_the_split_and_the_cause(
    tmp_path, monkeypatch, capsys, overrides, split, cause
):
    iwslt2017_repository(tmp_path, PARQUET)
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", str(REPO / "configs" / "iwslt2017_de_en.yaml"), *overrides]) == 2
    line = error_line(capsys.readouterr().err, "prepare")
    assert "data.hub: cannot load 'IWSLT/iwslt2017 (" in line and f"revision {PARQUET}" in line
    assert f"split '{split}'" in line and cause in line


def test_the_revision_and_folder_of_a_hub_data_set_are_part_of_the_fingerprint():
    base = DataConfig(hub="IWSLT/iwslt2017", hub_revision=PARQUET, hub_data_dir="iwslt2017-de-en")
    other_folder = DataConfig(hub="IWSLT/iwslt2017", hub_revision=PARQUET, hub_data_dir="iwslt2017-en-de")
    other_revision = DataConfig(hub="IWSLT/iwslt2017", hub_revision="main", hub_data_dir="iwslt2017-de-en")
    assert len({fingerprint(base), fingerprint(other_folder), fingerprint(other_revision)}) == 3


def test_every_kind_of_source_tells_whether_its_corpus_is_in_reach(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_copy = iwslt2017_repository(tmp_path, PARQUET)
    local = SourceConfig(name="local", local_dir=str(tmp_path))
    copy = SourceConfig(name="copy", hub=str(hub_copy), hub_revision=PARQUET)
    remote = SourceConfig(name="remote", hub="IWSLT/iwslt2017", hub_revision=PARQUET)
    assert inputs_reachable(DataConfig(sources=[local, copy]))
    assert not inputs_reachable(DataConfig(sources=[local, remote]))  # offline
    assert inputs_reachable(DataConfig(hub=str(hub_copy)))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert inputs_reachable(DataConfig(sources=[local, remote]))


# --------------------------------------------------------------------------- several sources


def _two_sources(tmp_path, weights=(2.0, 0.5), eval_source="iwslt", extra=()):
    """A local synthetic corpus `synth` (120 pairs, 3 of them empty on one side) and a copy of
    IWSLT 2017 at its parquet revision `iwslt` (300 pairs, and valid and test)."""
    synth, hub = tmp_path / "synth", tmp_path / "IWSLT" / "iwslt2017"
    if not synth.exists():  # the first run of the experiment
        make_corpus(synth, n_train=120)
        src, tgt = synthetic_pairs(120, 0)
        src[5], tgt[17], src[40] = "", "  ", "\t"
        write_lines(synth / "train.de", src, gz=True)
        write_lines(synth / "train.en", tgt, gz=True)
        iwslt2017_repository(tmp_path, PARQUET)
    sources = (
        f"[{{name: synth, local_dir: {synth}, local_splits: {{train: train}}, weight: {weights[0]}}}, "
        f"{{name: iwslt, hub: {hub}, hub_revision: {PARQUET}, hub_data_dir: iwslt2017-de-en, "
        f"weight: {weights[1]}}}]"
    )
    overrides = ["data.local_dir=null", f"data.sources={sources}", f"data.eval_source={eval_source}",
                 "data.vocab_size=200", "train.max_tokens=400", "train.valid_bleu=false", *extra]
    return load_config(corpus_config(tmp_path, tmp_path / "unused"), overrides)


def test_several_sources_are_cleaned_and_counted_each_on_its_own(tmp_path, capsys):
    cfg = _two_sources(tmp_path)
    out = prepare(cfg)
    meta = json.loads((out / "meta.json").read_text())
    synth, iwslt = meta["train_sources"]
    assert (synth["name"], synth["read"], synth["dropped"]["empty"]) == ("synth", 120, 3)
    assert (iwslt["name"], iwslt["read"]) == ("iwslt", 300)
    st = meta["splits"]["train"]
    assert st["read"] == 420 and st["kept"] == synth["kept"] + iwslt["kept"]
    assert len(load_prepared(out).split("train")) == st["kept"]
    # Validation and test come from the named source, the IWSLT copy.
    assert load_prepared(out).text("valid", "src") == list(multi30k_lines("val", "de")[:20])
    assert "synth: read 120, kept 117" in capsys.readouterr().out


def test_weights_set_how_often_an_epoch_shows_each_source():
    mix = Mixture(counts=(5, 100), weights=(2.0, 0.5))
    first = mix.epoch_pairs(seed=1, epoch=0)
    shown = np.bincount(first, minlength=105)
    assert (shown[:5] == 2).all()  # weight 2: every pair twice
    assert shown[5:].sum() == 50 and set(shown[5:]) == {0, 1}  # weight 0.5: half, each at most once
    again = Mixture(counts=(5, 100), weights=(2.0, 0.5)).epoch_pairs(seed=1, epoch=0)
    assert np.array_equal(first, again)  # a pure function of seed and epoch
    assert not np.array_equal(first, mix.epoch_pairs(seed=1, epoch=1))  # another half next epoch
    assert not np.array_equal(first, mix.epoch_pairs(seed=2, epoch=0))


def test_the_batches_of_a_mixture_are_a_pure_function_of_seed_and_epoch():
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(1, 30, 300), rng.integers(1, 30, 300)
    mix = Mixture(counts=(100, 200), weights=(3.0, 0.25))

    def batcher(rank=0, world=1):
        return TokenBatcher(src, tgt, 128, seed=7, mixture=mix, rank=rank, world_size=world)

    for epoch in (0, 3):
        batches = batcher().epoch_batches(epoch)
        assert all(np.array_equal(a, b) for a, b in zip(batches, batcher().epoch_batches(epoch), strict=True))
        assert sorted(np.concatenate(batches)) == sorted(mix.epoch_pairs(7, epoch))
        assert len(batches) == batcher().num_batches(epoch)
        ranks = [batcher(r, 2).epoch_batches(epoch) for r in range(2)]
        assert len(ranks[0]) == len(ranks[1])  # every rank takes as many steps
    # Weights of 1 mix nothing: the batches are exactly those of the whole split.
    plain = TokenBatcher(src, tgt, 128, seed=7).epoch_batches(2)
    trivial = TokenBatcher(src, tgt, 128, seed=7, mixture=Mixture((100, 200), (1.0, 1.0))).epoch_batches(2)
    assert all(np.array_equal(a, b) for a, b in zip(plain, trivial, strict=True))


def _losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


@pytest.mark.slow
def test_a_resumed_run_of_several_sources_equals_the_uninterrupted_one(tmp_path):
    budget = ["train.max_steps=8", "train.valid_every=4", "model.dropout=0.1"]
    whole = _two_sources(tmp_path / "whole", extra=budget)
    train(whole)
    halves = _two_sources(tmp_path / "halves", extra=[*budget, "train.max_steps=4"])
    train(halves)
    train(_two_sources(tmp_path / "halves", extra=budget))  # the same command, a longer budget
    assert _losses(whole.out_dir) == _losses(halves.out_dir)
    a = torch.load(whole.out_dir / "checkpoint_last.pt", weights_only=True)["model"]
    b = torch.load(halves.out_dir / "checkpoint_last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_changed_weight_resumes_but_a_changed_source_is_refused(tmp_path, capsys):
    train(_two_sources(tmp_path, extra=["train.max_steps=2"]))
    with pytest.raises(CheckpointError, match="was trained with other data") as e:
        train(_two_sources(tmp_path, eval_source="synth", extra=["train.max_steps=3"]))
    assert "data.eval_source 'iwslt' -> 'synth'" in str(e.value)
    capsys.readouterr()
    result = train(_two_sources(tmp_path, weights=(1.0, 3.0), extra=["train.max_steps=3"]))
    assert result["steps"] == 3
    out = capsys.readouterr().out
    assert "data.sources.synth.weight 2.0 -> 1.0" in out and "data.sources.iwslt.weight 0.5 -> 3.0" in out


def test_a_hub_source_keeps_the_first_max_train_pairs_of_its_training_split(tmp_path, monkeypatch):
    iwslt2017_repository(tmp_path, PARQUET)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs" / "iwslt2017_de_en.yaml", ["data.max_train_pairs=50"])
    data = load_prepared(prepare(cfg, quiet=True))
    assert data.meta["splits"]["train"]["read"] == 50
    first = multi30k_lines("train", "de")[0]
    assert data.tokenizer.src.decode(data.split("train").src(0).tolist()) == first


@pytest.mark.parametrize(
    "splits, pairs, first, valid",
    [
        ("{train: 'train[:280]', valid: 'train[280:]', test: test}", 0, 0, (280, 300)),
        ("{train: 'train[100:]', valid: 'train[:20]', test: test}", 50, 100, (0, 20)),
        ("{train: 'train[-90%:]', valid: 'train[:10%]', test: test}", 0, 30, (0, 30)),
    ],
    ids=["head and tail", "a tail cut by max_train_pairs", "percentages"],
)
def test_a_sliced_hub_split_reads_exactly_its_rows_so_validation_never_leaks_into_training(
    tmp_path, monkeypatch, splits, pairs, first, valid
):
    iwslt2017_repository(tmp_path, PARQUET)
    monkeypatch.chdir(tmp_path)
    overrides = [f"data.hub_splits={splits}", f"data.max_train_pairs={pairs}", "data.vocab_size=200"]
    cfg = load_config(REPO / "configs" / "iwslt2017_de_en.yaml", overrides)
    data = load_prepared(prepare(cfg, quiet=True))
    lines = multi30k_lines("train", "de")  # the copy's train split: Multi30k's first 300 pairs
    assert data.text("valid", "src") == list(lines[valid[0] : valid[1]])
    train_split = data.split("train")
    trained = {data.tokenizer.src.decode(train_split.src(i).tolist()) for i in range(len(train_split))}
    assert data.tokenizer.src.decode(train_split.src(0).tolist()) == lines[first]
    assert len(trained) == data.meta["splits"]["train"]["read"] == (pairs or 300 - (valid[1] - valid[0]))
    assert not trained & set(data.text("valid", "src")), "validation rows leaked into training"


def test_an_evaluation_source_without_a_valid_split_is_refused_before_anything_is_written(
    tmp_path, capsys
):
    cfg = _two_sources(tmp_path / "named", eval_source="synth")
    for run in (prepare, train):
        with pytest.raises(DataError) as e:
            run(cfg)
        assert str(e.value).startswith(
            "data.sources[0].local_splits: no 'valid' split of source 'synth', the evaluation source "
            "(data.eval_source) (train only)"
        ), str(e.value)
    assert not cfg.prepared_dir.exists() and not cfg.out_dir.exists()
    # One corpus: the same refusal, at prepare and train, one line each.
    corpus = make_corpus(tmp_path / "corpus", n_train=50)
    args = [str(corpus_config(tmp_path / "one", corpus)), "data.local_splits={train: train, test: test}"]
    for cmd in ("prepare", "train"):
        assert main([cmd, *args]) == 2
        line = error_line(capsys.readouterr().err, cmd)
        assert "data.local_splits: no 'valid' split (test, train only): training needs one" in line
    assert not (tmp_path / "one" / "prepared").exists() and not (tmp_path / "one" / "run").exists()


def _epochs(run):
    """{step: the epoch the run is in after it} of the train records."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["epoch"] for r in rows if r["kind"] == "train"}


@pytest.mark.slow
def test_new_weights_take_effect_at_the_next_epoch_and_the_resumed_epoch_keeps_its_batches(
    tmp_path, capsys
):
    # Weights (2, 0.5) cut 12 batches an epoch here, (1, 3) 43.
    budget = ["train.valid_every=0"]
    whole = _two_sources(tmp_path / "whole", extra=[*budget, "train.max_steps=12"])
    train(whole)
    run = _two_sources(tmp_path / "run", extra=[*budget, "train.max_steps=5"])
    train(run)
    capsys.readouterr()
    new = (1.0, 3.0)
    train(_two_sources(tmp_path / "run", weights=new, extra=[*budget, "train.max_steps=8"]))
    said = ("source weights changed ({'synth': 2.0, 'iwslt': 0.5} -> {'synth': 1.0, 'iwslt': 3.0}): epoch 0 "
            "goes on with the weights it began with; the new ones take effect at epoch 1")
    assert said in capsys.readouterr().out
    # Resumed again within the epoch: the checkpoint says which weights the epoch began with.
    train(_two_sources(tmp_path / "run", weights=new, extra=[*budget, "train.max_steps=55"]))
    assert said in capsys.readouterr().out
    assert _losses(run.out_dir)[:12] == _losses(whole.out_dir), "epoch 0 is the one it began as"
    epochs = _epochs(run.out_dir)
    assert [s for s in epochs if epochs[s] == 1] == list(range(12, 55)), "epoch 1: the new weights' batches"
    # At an epoch boundary the change takes effect at once.
    train(_two_sources(tmp_path / "run", extra=[*budget, "train.max_steps=56"]))  # back to (2, 0.5)
    assert "the new ones take effect now, at the start of epoch 2" in capsys.readouterr().out
