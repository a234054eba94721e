import errno
import os
import random
import re

import numpy as np
import pytest
import torch

import mt.checkpoint as ckpt
from mt.checkpoint import (
    keep_last,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_checkpoints,
)
from mt.errors import CheckpointError


def _state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": 7,
        "epoch": 1,
        "best": None,
        "spm": b"\x00\x01 sentencepiece proto",
        "config": {"train": {"lr": 5e-4, "betas": [0.9, 0.98]}},
        "rng": rng_state(),
    }


def test_round_trip(tmp_path):
    path = tmp_path / "checkpoint_last.pt"
    state = _state()
    save_checkpoint(path, state)
    back = load_checkpoint(path)
    assert back["format"] == "mt-checkpoint" and back["version"] == ckpt.VERSION
    assert back["step"] == 7 and back["best"] is None and back["spm"] == state["spm"]
    assert back["config"] == state["config"]
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    torch.optim.Adam(torch.nn.Linear(3, 2).parameters()).load_state_dict(back["optimizer"])
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pt"]
    save_checkpoint(path, back)  # a loaded checkpoint can be saved again
    assert load_checkpoint(path)["step"] == 7


def test_rejects_non_plain_state(tmp_path):
    with pytest.raises(TypeError, match="numpy"):
        save_checkpoint(tmp_path / "c.pt", {"epoch": np.int64(3)})
    with pytest.raises(TypeError, match=r"\['x'\]"):
        save_checkpoint(tmp_path / "c.pt", {"x": np.float64(1.0)})  # a float subclass, still rejected
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path / "c.pt", {"format": "mine"})
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_last.pt"
    save_checkpoint(path, {"step": 1})
    before = path.read_bytes()

    def partial_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(CheckpointError, match="No space left") as info:
        save_checkpoint(path, {"step": 2})
    assert str(path) in str(info.value)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1


def test_interrupt_removes_temp_file(tmp_path, monkeypatch):
    def interrupted(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "c.pt", {})
    assert list(tmp_path.iterdir()) == []


def test_missing_directory(tmp_path):
    path = tmp_path / "nope" / "c.pt"
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        save_checkpoint(path, {})


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_directory(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match=re.escape(str(d / "c.pt"))):
            save_checkpoint(d / "c.pt", {})
    finally:
        d.chmod(0o700)


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")

    good = tmp_path / "good.pt"
    save_checkpoint(good, {"w": torch.zeros(100)})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "text.pt"
    text.write_text("hello, I am not a checkpoint\n")
    foreign = tmp_path / "foreign.pt"
    torch.save(torch.zeros(3), foreign)
    foreign_dict = tmp_path / "foreign_dict.pt"
    torch.save({"model": {}}, foreign_dict)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "mt-checkpoint", "version": 1, "x": np.arange(3)}, pickled)
    newer = tmp_path / "newer.pt"
    torch.save({"format": "mt-checkpoint", "version": 99}, newer)

    for bad in (truncated, text, foreign, foreign_dict, pickled, newer):
        with pytest.raises(CheckpointError, match=re.escape(str(bad))):
            load_checkpoint(bad)


def _draws():
    return random.random(), np.random.rand(), torch.rand(3).tolist(), random.gauss(0, 1), np.random.randn()


def test_rng_round_trip(tmp_path):
    random.gauss(0, 1)  # leave a cached gaussian in Python's and NumPy's state
    np.random.randn()
    save_checkpoint(tmp_path / "c.pt", {"rng": rng_state()})
    first = _draws()
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert _draws() == first


def test_keep_last(tmp_path):
    for step in (100, 20, 3000, 5):
        save_checkpoint(ckpt.step_checkpoint_path(tmp_path, step), {"step": step})
    (tmp_path / "checkpoint_best.pt").write_bytes(b"")
    (tmp_path / "checkpoint_step7.pt.tmp-123").write_bytes(b"")
    removed = keep_last(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["checkpoint_step20.pt", "checkpoint_step5.pt"]
    assert [s for s, _ in step_checkpoints(tmp_path)] == [100, 3000]
    assert (tmp_path / "checkpoint_best.pt").exists() and (tmp_path / "checkpoint_step7.pt.tmp-123").exists()
    assert keep_last(tmp_path, 5) == []
    keep_last(tmp_path, 0)
    assert step_checkpoints(tmp_path) == []
