"""The faults a training run survives: SIGKILL at any moment or Ctrl-C (the same command resumes to
exactly the uninterrupted run), an unwritable output directory, a full disk while saving or logging,
a second run on a directory in use; and the resumes it refuses (data that changes the token ids).

The kills are injected from outside, through tests/fault_driver.py (see helpers.run_mt).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import DRIVER, KILLED, corpus_config, error_line, run_mt
from helpers import run_metrics as _metrics
from helpers import same_contents as _same
from helpers import train_config as _cfg

import mt.checkpoint as ckpt_mod
import mt.train.metrics_log
from mt.checkpoint import load_checkpoint, step_checkpoints
from mt.cli import main
from mt.data.prepare import cache_lock
from mt.errors import CheckpointError
from mt.train.trainer import train

# `corpus` and `prepared_dir` are conftest's, shared by the module (read only).


# --------------------------------------------------------------------------- unwritable or full output


@pytest.mark.parametrize("where", ["under a file", "in /proc"])
def test_unwritable_out_dir_is_a_clear_error(tmp_path, corpus, prepared_dir, capsys, where):
    # The tests run as root, where chmod does not stop writes: use places nobody can write.
    if where == "under a file":
        (tmp_path / "somefile").write_text("x")
        out_dir = tmp_path / "somefile" / "run"
    else:
        out_dir = Path("/proc/mt-test-run")
    rc = main(["train", str(corpus_config(tmp_path, corpus)), "train.max_steps=2", "train.threads=1",
               f"data.prepared_dir={prepared_dir}", f"train.out_dir={out_dir}"])
    assert rc == 2
    line = error_line(capsys.readouterr().err, "train")
    assert f"train.out_dir: cannot write to {out_dir}" in line


def test_disk_full_while_saving_keeps_previous_checkpoint(
    tmp_path, corpus, prepared_dir, monkeypatch, capsys
):
    last = tmp_path / "run" / "checkpoint_last.pt"
    real_save = ckpt_mod.torch.save
    seen = {"calls": 0, "before": b""}

    def save(obj, f, *args, **kwargs):
        seen["calls"] += 1
        if seen["calls"] == 3:  # the first file of the second checkpoint (step 4)
            seen["before"] = last.read_bytes()
            f.write(b"PK\x03\x04 a quarter of a zip")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", save)
    rc = main(["train", str(corpus_config(tmp_path, corpus)), "train.max_steps=6", "train.valid_every=2",
               "train.valid_bleu=false", "train.threads=1", f"data.prepared_dir={prepared_dir}"])
    assert rc == 2
    line = error_line(capsys.readouterr().err, "train")
    assert "cannot save checkpoint " + str(tmp_path / "run") in line and "No space left on device" in line
    assert seen["before"] and last.read_bytes() == seen["before"], "the previous checkpoint is unchanged"
    monkeypatch.undo()
    assert load_checkpoint(last)["state"]["step"] == 2
    assert not list(last.parent.glob("*.tmp-*"))


# --------------------------------------------------------------------------- killed at any moment, or Ctrl-C

# 14 steps of 7 batches an epoch: validations (and checkpoints) at steps 4, 7 (epoch end), 8, 12
# and 14 (end); keep_last keeps step checkpoints; dropout makes the RNG state matter; validation
# loss decides the best checkpoint (deterministic: it falls at every validation here).
RUN = [
    "train.max_steps=14", "train.valid_every=4", "train.max_tokens=400", "train.keep_last=2",
    "train.best_metric=loss", "model.dropout=0.1", "train.threads=1", "train.device=cpu",
    "data.local_splits={train: train, valid: val}",
]


def run_args(tmp_path: Path, corpus: Path, prepared_dir: Path) -> list[str]:
    return ["train", str(corpus_config(tmp_path, corpus)), *RUN, f"data.prepared_dir={prepared_dir}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, prepared_dir, mt_env) -> Path:
    """The run directory of the uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = run_mt(run_args(tmp, corpus, prepared_dir), tmp, mt_env)
    assert proc.returncode == 0, proc.stderr
    return tmp / "run"



def _content(path: Path) -> dict:
    """A checkpoint without what legitimately differs between two runs: paths and wall time."""
    ck = load_checkpoint(path)
    ck.pop("config")  # holds train.out_dir
    if "averaged_from" in ck:  # checkpoint_avg.pt (and checkpoint_final.pt, its link): their paths
        ck["averaged_from"] = [Path(p).name for p in ck["averaged_from"]]
    else:
        ck["state"].pop("elapsed")
    return ck



def assert_same_run(run: Path, reference: Path) -> None:
    """Final weights, optimizer, RNG, counters, best and step checkpoints and metrics all equal."""
    assert [r for r in _metrics(run) if r["kind"] == "train"] == [
        r for r in _metrics(reference) if r["kind"] == "train"
    ], "train losses differ"
    assert _metrics(run) == _metrics(reference), "validation records differ"
    names = sorted(p.name for p in reference.glob("*.pt"))
    assert sorted(p.name for p in run.glob("*.pt")) == names
    for name in names:
        _same(_content(run / name), _content(reference / name), name)


def assert_checkpoints_load(run: Path) -> list[str]:
    """Every checkpoint file on disk loads; temp files are never taken for checkpoints.

    Returns the names of the temp files left by a killed save."""
    for p in run.glob("*.pt"):
        load_checkpoint(p)
    listed = [p.name for _, p in step_checkpoints(run)]
    assert all(".tmp-" not in name for name in listed), listed
    return [p.name for p in run.glob("*.tmp-*")] if run.is_dir() else []


# Applied one after the other to one run directory: each run resumes what the previous
# one left, then is killed at its own point; the last, plain, run completes.
KILLS = [
    "update@3",  # during a step, before any checkpoint exists
    "metrics@5",  # half a line of metrics.jsonl written
    "validate@8",  # mid-validation
    "saved@8:checkpoint_last.pt",  # right after the checkpoint, before the validation is logged
    "save@12:checkpoint_last.pt",  # half of checkpoint_last.pt written
    "save@14:checkpoint_best.pt",  # half of the final checkpoint_best.pt written
]


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_equals_uninterrupted(
    tmp_path, corpus, prepared_dir, mt_env, reference
):
    args = run_args(tmp_path, corpus, prepared_dir)
    run = tmp_path / "run"
    temps: list[str] = []
    for fault in KILLS:
        proc = run_mt(args, tmp_path, mt_env, fault)
        assert proc.returncode == KILLED, f"{fault}: not killed (rc {proc.returncode})\n{proc.stderr[-3000:]}"
        temps += assert_checkpoints_load(run)
    assert temps, "the mid-save kills leave temp files (and they were not taken for checkpoints)"
    proc = run_mt(args, tmp_path, mt_env)  # the same command, no fault
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout
    assert_same_run(run, reference)


def _start_waiting_run(args: list[str], cwd: Path, env: dict[str, str], at: int) -> subprocess.Popen:
    """A run through the fault driver that, after step `at` (and its validation and checkpoint,
    if any), waits for a signal."""
    proc = subprocess.Popen(
        [sys.executable, str(DRIVER), f"interrupt@{at}", *args], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not (cwd / "WAITING").exists():
        time.sleep(0.05)
    return proc


# Ctrl-C, and SIGTERM (what a scheduler, `docker stop` or `kill` sends) after the last step
# checkpoint but one: the save it makes must not change which step checkpoints are averaged.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "at"), [(signal.SIGINT, 5), (signal.SIGTERM, 12)], ids=["ctrl-c", "sigterm-near-the-end"]
)
def test_a_stop_signal_saves_and_the_same_command_resumes(
    tmp_path, corpus, prepared_dir, mt_env, reference, sig, at
):
    args = run_args(tmp_path, corpus, prepared_dir)
    run = tmp_path / "run"
    proc = _start_waiting_run(args, tmp_path, mt_env, at)
    try:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    # A clean stop still exits 128 + the signal, as shells report it; the checkpoint is safe.
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err
    assert f"interrupted at step {at + 1}; checkpoint saved to" in err
    assert str(run / "checkpoint_last.pt") in err and "resume with the same command" in err
    assert load_checkpoint(run / "checkpoint_last.pt")["state"]["step"] == at + 1
    assert_checkpoints_load(run)

    proc2 = run_mt(args, tmp_path, mt_env)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert "resuming from" in proc2.stdout and f"at step {at + 1}" in proc2.stdout
    assert_same_run(run, reference)


# --------------------------------------------------------------------------- one run per directory


@pytest.mark.slow
def test_a_second_run_on_a_directory_in_use_is_refused_naming_the_first(
    tmp_path, corpus, prepared_dir, mt_env, capsys
):
    args = run_args(tmp_path, corpus, prepared_dir)
    first = _start_waiting_run(args, tmp_path, mt_env, 1)
    try:
        assert first.poll() is None
        assert main(args) == 2
        line = error_line(capsys.readouterr().err, "train")
        assert f"train.out_dir: {tmp_path / 'run'} is in use by process {first.pid} (mt " in line
    finally:
        first.kill()  # SIGKILL: no clean-up, and still no stale lock
        first.communicate(timeout=60)
    assert main(args) == 0  # the kill left no stale lock: the same command resumes


def test_a_second_prepare_of_one_cache_is_refused(tmp_path, corpus, capsys):
    cfg = _cfg(tmp_path, corpus)
    prepared = cfg.prepared_dir
    prepared.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(prepared):
        assert main(["prepare", str(tmp_path / "exp.yaml")]) == 2
    line = error_line(capsys.readouterr().err, "prepare")
    assert f"data.prepared_dir: {prepared} is in use by process {os.getpid()}" in line
    assert main(["prepare", str(tmp_path / "exp.yaml")]) == 0  # free again


# --------------------------------------------------------------------------- resuming other data


def test_resuming_with_data_that_changes_the_token_ids_is_refused(tmp_path, corpus, capsys):
    train(_cfg(tmp_path, corpus, "train.max_steps=2", "train.valid_bleu=false"))
    meta = (tmp_path / "prepared" / "meta.json").read_text(encoding="utf-8")
    for change, shown in (
        ("data.vocab_size=50", "data.vocab_size 60 -> 50"),
        ("data.max_train_pairs=100", "data.max_train_pairs 0 -> 100"),
        ("data.tgt_lang=fr", "data.tgt_lang 'en' -> 'fr'"),
    ):
        with pytest.raises(CheckpointError, match="was trained with other data") as e:
            train(_cfg(tmp_path, corpus, "train.max_steps=4", change))
        assert shown in str(e.value), str(e.value)
    # Refused before preparing: the cache of the run is as it was.
    assert (tmp_path / "prepared" / "meta.json").read_text(encoding="utf-8") == meta
    capsys.readouterr()
    result = train(_cfg(tmp_path, corpus, "train.max_steps=3", "train.lr=0.001", "train.valid_bleu=false"))
    assert result["steps"] == 3
    out = capsys.readouterr().out
    assert "resuming with changed settings: " in out and "train.lr 0.003 -> 0.001" in out


# --------------------------------------------------------------------------- a full disk


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_when_the_run_writes_its_config_is_one_line(
    tmp_path, corpus, prepared_dir, monkeypatch, capsys
):
    args = [str(corpus_config(tmp_path, corpus)), f"data.prepared_dir={prepared_dir}"]
    assert main(["prepare", *args]) == 0
    monkeypatch.setattr("mt.files.os.fsync", _enospc)  # the first file a run writes: config.yaml
    rc = main(["train", *args])
    assert rc == 2
    line = error_line(capsys.readouterr().err, "train")
    assert f"cannot write config {tmp_path / 'run' / 'config.yaml'}: No space left on device" in line
    assert not list((tmp_path / "run").glob("*.tmp-*"))


def test_a_full_disk_when_logging_metrics_keeps_the_last_checkpoint(
    tmp_path, corpus, prepared_dir, monkeypatch, capsys
):
    args = ["train", str(corpus_config(tmp_path, corpus)), f"data.prepared_dir={prepared_dir}",
            "train.max_steps=6", "train.valid_every=2", "train.valid_bleu=false", "train.log_every=3"]
    real_open = open

    def full_after_step_4(path, mode="r", *a, **kw):  # metrics.jsonl is the one file opened to append
        if "a" in mode and "\"step\": 4," in Path(path).read_text(encoding="utf-8"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr(mt.train.metrics_log, "open", full_after_step_4, raising=False)
    assert main(args) == 2
    line = error_line(capsys.readouterr().err, "train")
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert f"cannot write {metrics}: No space left on device" in line and "last checkpoint is intact" in line
    assert load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")["state"]["step"] == 4
    monkeypatch.undo()
    assert main(args) == 0  # room again: the same command resumes



