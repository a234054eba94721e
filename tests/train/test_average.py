"""`mt average`: the elementwise mean of compatible checkpoints, clear errors otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import build_checkpoint, error_line, tiny_config

from mt.checkpoint import load_checkpoint, save_checkpoint
from mt.cli import main
from mt.errors import CheckpointError, MTError
from mt.train.average import average_checkpoints
from mt.translate.translator import Translator


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("avg")
    return build_checkpoint(root / "a.pt", steps=5, seed=1), build_checkpoint(root / "b.pt", steps=5, seed=2)


def test_average_is_the_elementwise_mean(tmp_path, capsys, pair):
    out = tmp_path / "avg.pt"
    assert main(["average", "--output", str(out), str(pair[0]), str(pair[1])]) == 0
    assert str(out) in capsys.readouterr().err
    a, b, avg = load_checkpoint(pair[0]), load_checkpoint(pair[1]), load_checkpoint(out)
    assert avg["averaged_from"] == [str(pair[0]), str(pair[1])]
    assert "optimizer" not in avg and "state" not in avg
    assert avg["config"] == a["config"] and avg["name"] == a["name"] and avg["spm_src"] == a["spm_src"]
    assert avg["model"].keys() == a["model"].keys()
    assert not torch.equal(a["model"]["tgt_embed.weight"], b["model"]["tgt_embed.weight"])  # a real test
    for k, v in avg["model"].items():
        assert v.dtype == a["model"][k].dtype
        expected = (a["model"][k].double() + b["model"][k].double()) / 2
        torch.testing.assert_close(v, expected.to(v.dtype))

    # The averaged checkpoint loads and translates.
    tr = Translator.from_checkpoint(out, "cpu")
    got = tr.translate(["ein hund läuft im park", "", "die katze"], beam=2)
    assert len(got) == 3 and got[1] == ""


def test_one_checkpoint_averages_to_itself_and_integers_come_from_the_first(tmp_path, pair):
    out = tmp_path / "one.pt"
    average_checkpoints([str(pair[0])], str(out), quiet=True)
    a, avg = load_checkpoint(pair[0]), load_checkpoint(out)
    for k, v in a["model"].items():
        assert torch.equal(avg["model"][k], v)

    # An integer buffer (e.g. a step counter) is not averaged.
    paths = []
    for i, value in enumerate((3, 8)):
        ck = load_checkpoint(pair[i])
        ck["model"]["steps_seen"] = torch.tensor(value)
        paths.append(str(tmp_path / f"int{i}.pt"))
        save_checkpoint(paths[-1], ck)
    average_checkpoints(paths, str(out), quiet=True)
    assert load_checkpoint(out)["model"]["steps_seen"].item() == 3


def test_incompatible_checkpoints_are_named(tmp_path, capsys, pair):
    other = build_checkpoint(tmp_path / "wide.pt", tiny_config(ffn_dim=64), steps=0)
    expected = r"wide\.pt: model config differs from .*a\.pt: model\.ffn_dim 64 vs 32"
    with pytest.raises(CheckpointError, match=expected):
        average_checkpoints([str(pair[0]), str(other)], str(tmp_path / "x.pt"), quiet=True)

    # Same config, one tensor of another shape (e.g. a hand-edited or foreign state).
    ck = load_checkpoint(pair[1])
    name = next(k for k in ck["model"] if k.endswith("fc1.weight"))
    ck["model"][name] = torch.zeros(3, 3)
    save_checkpoint(tmp_path / "odd.pt", ck)
    assert main(["average", "--output", str(tmp_path / "x.pt"), str(pair[0]), str(tmp_path / "odd.pt")]) == 2
    err = capsys.readouterr().err
    assert "odd.pt: parameter" in err and name in err and "(3, 3)" in err

    del ck["model"][name]
    save_checkpoint(tmp_path / "fewer.pt", ck)
    with pytest.raises(CheckpointError, match=rf"fewer\.pt: parameter names differ .*missing \['{name}'\]"):
        average_checkpoints([str(pair[0]), str(tmp_path / "fewer.pt")], str(tmp_path / "x.pt"), quiet=True)
    assert not (tmp_path / "x.pt").exists()


def test_missing_files_and_empty_lists_are_errors(tmp_path, capsys, pair):
    with pytest.raises(MTError, match="at least one checkpoint"):
        average_checkpoints([], str(tmp_path / "x.pt"))
    assert main(["average", "--output", str(tmp_path / "x.pt"), str(pair[0]), str(tmp_path / "gone.pt")]) == 2
    assert f"checkpoint not found: {tmp_path / 'gone.pt'}" in capsys.readouterr().err
    no_model = tmp_path / "opt_only.pt"
    save_checkpoint(no_model, {"optimizer": {}})
    with pytest.raises(CheckpointError, match=r"opt_only\.pt: not a model checkpoint \(no 'config', 'model'"):
        average_checkpoints([str(no_model)], str(tmp_path / "x.pt"))


def test_standard_output_is_refused_as_the_output(tmp_path, pair, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["average", "--output", "-", str(pair[0]), str(pair[1])]) == 2
    line = error_line(capsys.readouterr().err, "average")
    assert "--output -: a checkpoint cannot go to standard output; name a file" in line
    assert list(tmp_path.iterdir()) == []  # no file named `-`
