"""Checkpoints: atomic saves that never lose the previous one, plain-data loading, RNG state,
keeping the last N; one schema (Checkpoint) that every reader goes through, under which a
checkpoint written before it translates, averages, fine-tunes and resumes as it did; and every
bad file (damaged, foreign, not fitting the model, or one whose unpickling would run code) is
one error line from the commands that load it."""

import errno
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.make_checkpoint_v1 import CONFIG, CORPUS, EXPECTED, SOURCES
from helpers import corpus_config, error_line, make_corpus, one_thread

import mt.checkpoint as ckpt
import mt.data.prepare
from mt.checkpoint import (
    Checkpoint,
    TrainState,
    keep_last,
    load_checkpoint,
    load_model,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_checkpoints,
)
from mt.cli import main
from mt.errors import CheckpointError
from mt.train.average import average_checkpoints
from mt.translate.translator import Translator

# checkpoint_last.pt of a run of `mt train` written before the schema (fixtures/make_checkpoint_v1.py).
V1 = Path(__file__).parent / "fixtures" / "checkpoint_v1.pt"


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


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="needs Linux's /dev/full")
def test_a_full_disk_under_torchs_zip_writer_is_named_as_such(tmp_path, monkeypatch):
    """torch.save reports the ENOSPC of a file's write as "enforce fail at inline_container.cc
    ... unexpected pos": the error says what happened and names the file."""
    path = tmp_path / "checkpoint_last.pt"
    save_checkpoint(path, {"step": 1})
    before = path.read_bytes()

    class FullDisk(ckpt.AtomicFile):  # every write fails with ENOSPC, as on a full disk
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.file.close()
            self.file = open("/dev/full", "wb")  # closed by commit or discard

    monkeypatch.setattr(ckpt, "AtomicFile", FullDisk)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, {"step": 2, "weights": torch.zeros(10_000)})
    assert str(info.value) == f"cannot save checkpoint {path}: No space left on device"
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


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


# --------------------------------------------------------------------------- bad checkpoints via the CLI


def _translate_checkpoint(tmp_path: Path, ck: Path, capsys) -> tuple[int, str]:
    inp = tmp_path / "in.txt"
    inp.write_text("ein hund\n", encoding="utf-8")
    with one_thread():
        rc = main(["translate", "--checkpoint", str(ck), "--input", str(inp), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert out == ""
    return rc, err


def _bad_files(tmp_path: Path, checkpoint: Path) -> dict[str, Path]:
    good = checkpoint.read_bytes()
    files = {
        "truncated": good[: len(good) // 2],
        "cut short by a few bytes": good[:-7],
        "empty": b"",
        "text": b"hello, I am not a checkpoint\n",
        "random bytes": bytes(range(256)) * 8,
    }
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name.replace(' ', '_')}.pt"
        paths[name].write_bytes(data)
    paths["a tensor"] = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), paths["a tensor"])
    paths["someone else's state dict"] = tmp_path / "state_dict.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), paths["someone else's state dict"])
    return paths


def test_bad_checkpoint_files_are_one_line_errors(tmp_path, capsys, checkpoint):
    for name, path in _bad_files(tmp_path, checkpoint).items():
        rc, err = _translate_checkpoint(tmp_path, path, capsys)
        assert rc == 2, name
        assert err.count("\n") == 1 and err.startswith("mt translate: error: "), (name, err)
        assert str(path) in err, name


def test_a_directory_as_checkpoint_is_named_as_one_with_the_file_to_pass(tmp_path, capsys, checkpoint):
    run = tmp_path / "run"
    run.mkdir()
    rc, err = _translate_checkpoint(tmp_path, run, capsys)
    assert rc == 2
    assert err == f"mt translate: error: checkpoint {run} is a directory; pass a checkpoint file\n"
    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):  # the best is the one to translate with
        (run / name).write_bytes(checkpoint.read_bytes())
        rc, err = _translate_checkpoint(tmp_path, run, capsys)
        assert rc == 2 and err.endswith(f"is a directory; pass a checkpoint file, e.g. {run / name}\n"), err


def test_checkpoint_whose_config_is_not_a_mapping(tmp_path, capsys, checkpoint):
    ck = load_checkpoint(checkpoint)
    ck["config"] = ["not", "a", "mapping"]
    save_checkpoint(tmp_path / "bad.pt", ck)
    rc, err = _translate_checkpoint(tmp_path, tmp_path / "bad.pt", capsys)
    assert rc == 2 and err.count("\n") == 1, err


@pytest.mark.parametrize("damage", ["other shapes", "model not a dict"])
def test_checkpoint_with_weights_that_do_not_fit(tmp_path, capsys, checkpoint, damage):
    ck = load_checkpoint(checkpoint)
    if damage == "other shapes":  # e.g. a checkpoint written by another version of the model code
        ck["config"]["model"]["ffn_dim"] = 48
    else:
        ck["model"] = [1, 2, 3]
    save_checkpoint(tmp_path / "bad.pt", ck)
    rc, err = _translate_checkpoint(tmp_path, tmp_path / "bad.pt", capsys)
    assert rc == 2 and err.count("\n") == 1, err


class _Evil:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoints(tmp_path: Path, marker: Path) -> list[Path]:
    zipped = tmp_path / "evil_zip.pt"  # torch's zip format, inside a plausible checkpoint
    torch.save({"format": "mt-checkpoint", "version": 1, "model": {}, "payload": _Evil(marker)}, zipped)
    legacy = tmp_path / "evil_pickle.pt"  # a bare pickle, as torch's legacy format
    legacy.write_bytes(pickle.dumps(_Evil(marker)))
    return [zipped, legacy]


def test_checkpoint_that_would_run_code_is_refused(tmp_path, capsys, corpus, prepared_dir):
    marker = tmp_path / "PWNED"
    evil = _evil_checkpoints(tmp_path, marker)
    for path in evil:
        with pytest.raises(CheckpointError, match="not a plain-data PyTorch file"):
            load_checkpoint(path)
        rc, err = _translate_checkpoint(tmp_path, path, capsys)
        assert rc == 2 and err.count("\n") == 1, err
        # torch's advice, to load with weights_only=False, would run the file's code: not passed on.
        assert "never unpickles code" in err and "weights_only" not in err, err
        assert main(["average", "--output", str(tmp_path / "avg.pt"), str(path), str(path)]) == 2
        assert "not a plain-data PyTorch file" in capsys.readouterr().err

    # Resuming training from a planted checkpoint_last.pt.
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint_last.pt").write_bytes(evil[0].read_bytes())
    rc = main(["train", str(corpus_config(tmp_path, corpus)), "train.max_steps=2", "train.threads=1",
               f"data.prepared_dir={prepared_dir}"])
    assert rc == 2
    assert "not a plain-data PyTorch file" in error_line(capsys.readouterr().err, "train")
    assert not marker.exists(), "unpickling ran code"
    assert not (tmp_path / "avg.pt").exists()


def test_rng_state_of_a_cpu_run_leaves_cuda_alone(monkeypatch):
    """A CPU run on a machine with GPUs neither initialises CUDA nor saves the GPUs' states;
    a GPU rank saves only its own device's."""

    def untouchable(*args, **kwargs):
        raise AssertionError("CUDA was touched by a CPU run")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", untouchable)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", untouchable)
    monkeypatch.setattr(torch.cuda, "set_rng_state", untouchable)
    state = rng_state(torch.device("cpu"))
    assert "cuda" not in state
    set_rng_state({**state, "cuda": [torch.zeros(8, dtype=torch.uint8)]}, torch.device("cpu"))


# --------------------------------------------------------------------------- the schema


def _assert_same(a, b, where="state"):
    """Equal plain data, tensors compared by value."""
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_the_schema_writes_every_key_of_a_checkpoint_written_before_it_as_it_was():
    """The file format stays: a trainer's checkpoint read into the schema and written out again
    is the dict it was, key for key (in the same order) and tensor for tensor."""
    raw = torch.load(V1, weights_only=True)
    ck = Checkpoint.from_state(raw, V1)
    assert ck.name == "tiny" and ck.training is not None and ck.averaged_from is None
    assert ck.training.state == TrainState(**raw["state"]) and ck.training.state.step == 200
    assert ck.training.world_size == 1 and ck.training.epoch_weights == {}
    assert ck.training.rng_ranks[0] is raw["rng"]
    body = {k: v for k, v in raw.items() if k not in ("format", "version")}
    _assert_same(ck.to_state(), body)


def test_a_saved_checkpoint_reads_back_equal(tmp_path):
    ck = Checkpoint.read(V1)
    save_checkpoint(tmp_path / "again.pt", ck.to_state())
    back = Checkpoint.read(tmp_path / "again.pt")
    _assert_same(back.to_state(), ck.to_state())
    assert back.training.state == ck.training.state


def test_keys_that_older_checkpoints_lack_take_their_defaults(tmp_path):
    """Before every rank's RNG, the world size, the epoch's source weights and the name were
    recorded, checkpoints held one "rng"; a nameless one is named after its run directory."""
    raw = torch.load(V1, weights_only=True)
    for key in ("rng_ranks", "world_size", "epoch_weights", "name", "scaler", "metrics"):
        del raw[key]
    del raw["state"]["win_tokens"]
    ck = Checkpoint.from_state(raw, tmp_path / "my_run" / "checkpoint_last.pt")
    assert ck.name == "my_run"
    assert ck.training.rng_ranks == [raw["rng"]] and ck.training.world_size == 1
    assert ck.training.epoch_weights is None and ck.training.scaler == {} and ck.training.metrics == {}
    assert ck.training.state.win_tokens == 0.0 and ck.training.state.step == 200


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: raw.pop("spm_tgt"), r"not a model checkpoint \(no 'spm_tgt'\)"),
        (lambda raw: raw.update(spm_src="a path"), r"its 'spm_src' is a str, not a bytes"),
        (lambda raw: raw["state"].update(steps_taken=3), r"unknown training counters steps_taken"),
        (lambda raw: raw.update(state=[200]), r"its training state is not a mapping"),
    ],
    ids=["no target subwords", "subwords not bytes", "unknown counter", "counters not a mapping"],
)
def test_a_checkpoint_that_breaks_the_schema_is_named_with_what_is_wrong(tmp_path, damage, message):
    raw = torch.load(V1, weights_only=True)
    damage(raw)
    save_checkpoint(tmp_path / "bad.pt", raw)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(tmp_path / 'bad.pt'))}: {message}"):
        Checkpoint.read(tmp_path / "bad.pt")


def test_load_model_gives_the_config_tokenizer_and_model_in_the_precision_asked_for():
    config, tokenizer, model = load_model(V1, "cpu", "bf16")
    assert config.name == "tiny" and config.model.d_model == 16 and config.decode.precision == "bf16"
    assert tokenizer.src_proto == Checkpoint.read(V1).spm_src and tokenizer.joint
    assert not model.training and model.out_proj.weight.dtype == torch.bfloat16
    assert load_model(V1, "cpu").config.decode.precision == "fp32"  # the checkpoint's own


def test_a_checkpoint_written_before_the_schema_translates_as_it_did():
    tr = Translator.from_checkpoint(V1, "cpu", "fp32")
    for beam, expected in EXPECTED.items():
        assert tr.translate(SOURCES, beam=beam) == expected


def test_a_checkpoint_written_before_the_schema_averages(tmp_path, capsys):
    """Averaged with itself, it keeps its weights; the average has no training state and
    translates as the checkpoint does."""
    out = tmp_path / "avg.pt"
    average_checkpoints([str(V1), str(V1)], str(out), quiet=True)
    avg, v1 = Checkpoint.read(out), Checkpoint.read(V1)
    assert avg.training is None and avg.averaged_from == [str(V1), str(V1)] and avg.name == "tiny"
    assert avg.config == v1.config and avg.spm_src == v1.spm_src
    _assert_same(avg.model, v1.model)
    assert Translator.from_checkpoint(out, "cpu", "fp32").translate(SOURCES, beam=2) == EXPECTED[2]


def _v1_run(tmp_path: Path, monkeypatch) -> Path:
    """A directory laid out as the one the fixture's run was trained in (relative paths), with
    the fixture as its checkpoint_last.pt; its data is prepared with the fixture's subword
    models, as that run's was (they are not learned from the corpus: see the fixture's maker)."""
    make_corpus(tmp_path / "corpus", **CORPUS)
    (tmp_path / "tiny.yaml").write_text(CONFIG)
    (tmp_path / "run").mkdir()
    shutil.copyfile(V1, tmp_path / "run" / "checkpoint_last.pt")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "run" / "checkpoint_last.pt"


def test_a_run_written_before_the_schema_resumes(tmp_path, monkeypatch, capsys):
    last = _v1_run(tmp_path, monkeypatch)
    ck = Checkpoint.read(last)
    monkeypatch.setattr(mt.data.prepare, "_learn_subwords", lambda train, d: (ck.spm_src, ck.spm_tgt))
    assert main(["train", "tiny.yaml", "train.max_steps=210", "train.valid_every=0"]) == 0
    out = capsys.readouterr().out
    assert "resuming from run/checkpoint_last.pt at step 200, epoch 8" in out
    resumed = Checkpoint.read(last)
    s = resumed.training.state
    assert s.step == 210 and (s.epoch, s.batch_pos) > (8, 16) and s.last_valid_step == 210
    assert not torch.equal(resumed.model["tgt_embed.weight"], ck.model["tgt_embed.weight"])


def test_resuming_on_data_prepared_with_other_subword_models_is_refused(tmp_path, monkeypatch, capsys):
    """The one subword check, here for a resumed run (test_finetune has it for train.init_from)."""
    _v1_run(tmp_path, monkeypatch)  # prepared with models learned from the corpus: not the fixture's
    assert main(["train", "tiny.yaml", "train.max_steps=210"]) == 2
    line = error_line(capsys.readouterr().err, "train")
    assert "the prepared data in prepared has other subword models than run/checkpoint_last.pt" in line
    assert "(prepared again since?)" in line


def test_averaged_weights_in_checkpoint_last_are_refused_with_the_reason(tmp_path, monkeypatch, capsys):
    last = _v1_run(tmp_path, monkeypatch)
    average_checkpoints([str(V1)], str(last), quiet=True)
    assert main(["train", "tiny.yaml", "train.max_steps=210"]) == 2
    line = error_line(capsys.readouterr().err, "train")
    assert "run/checkpoint_last.pt holds no training state to resume from" in line
    assert not (tmp_path / "prepared").exists()  # refused before anything was prepared


def test_a_checkpoint_written_before_the_schema_fine_tunes(tmp_path, monkeypatch, capsys):
    """train.init_from: preparation takes its subword models, training starts from its weights."""
    _v1_run(tmp_path, monkeypatch)
    args = ["train", "tiny.yaml", f"train.init_from={V1}", "data.prepared_dir=tuned_data",
            "train.out_dir=tuned", "train.max_steps=2", "train.valid_every=0", "train.valid_bleu=false"]
    assert main(args) == 0
    assert f"starting from the weights of {V1} (step 200 of its run)" in capsys.readouterr().out
    v1, tuned = Checkpoint.read(V1), Checkpoint.read(tmp_path / "tuned" / "checkpoint_last.pt")
    assert (tuned.spm_src, tuned.spm_tgt) == (v1.spm_src, v1.spm_tgt)
    assert tuned.training.state.step == 2
