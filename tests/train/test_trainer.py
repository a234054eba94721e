"""Training: what a run writes, resuming, non-finite updates, checkpoints averaged and scored;
and the faults a run survives: SIGKILL at any moment or Ctrl-C (the same command resumes to
exactly the uninterrupted run), an unwritable output directory, a full disk while saving.

The kills are injected from outside, through tests/fault_driver.py (see helpers.run_mt).
"""

from __future__ import annotations

import errno
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    DRIVER,
    KILLED,
    REPO,
    corpus_config,
    corpus_files,
    error_line,
    run_mt,
    synthetic_pairs,
)

import mt.checkpoint as ckpt_mod
import mt.train.average
import mt.train.trainer as trainer_mod
from mt.checkpoint import load_checkpoint, save_checkpoint, step_checkpoints
from mt.cli import main
from mt.config import load_config
from mt.data.prepare import cache_lock, prepare
from mt.errors import CheckpointError, DataError, MTError
from mt.train.trainer import train

# `corpus` and `prepared_dir` are conftest's, shared by the module (read only).


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


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nonfinite_update_is_skipped_not_saved(tmp_path, corpus, prepared_dir, monkeypatch, capsys, where):
    """test_nonfinite_loss_is_skipped checks the warning and finite saved weights; this checks that the
    bad update really left weights and optimizer alone, also for a finite loss with a NaN gradient."""
    snapshots = []
    real_update = trainer_mod.Trainer.update

    def update(self, batches):
        before = {k: v.clone() for k, v in self.model.state_dict().items()}
        opt_steps = [float(s["step"]) for s in self.optimizer.state.values()]
        out = real_update(self, batches)
        snapshots.append((self.state.step + 1, before, opt_steps, self))
        return out

    real_nll, real_norm = trainer_mod.label_smoothed_nll, torch.nn.utils.get_total_norm
    calls = {"n": 0}

    def nll(logits, target, smoothing):
        calls["n"] += 1
        loss, n = real_nll(logits, target, smoothing)
        return (loss * float("nan"), n * float("nan")) if calls["n"] == 3 else (loss, n)

    def total_norm(grads, *args, **kwargs):  # the gradients' norm is taken once per update
        calls["n"] += 1
        grads = list(grads)
        if calls["n"] == 3:
            grads[0].fill_(float("nan"))
        return real_norm(grads, *args, **kwargs)

    monkeypatch.setattr(trainer_mod.Trainer, "update", update)
    if where == "loss":
        monkeypatch.setattr(trainer_mod, "label_smoothed_nll", nll)
    else:
        monkeypatch.setattr(trainer_mod.torch.nn.utils, "get_total_norm", total_norm)
    rc = main(["train", str(corpus_config(tmp_path, corpus)), "train.max_steps=4", "train.valid_every=0",
               "train.valid_bleu=false", "train.threads=1", f"data.prepared_dir={prepared_dir}"])
    assert rc == 0
    assert "non-finite loss or gradient at step 3" in capsys.readouterr().err
    step, before, opt_steps, trainer = snapshots[2]
    after_step3 = snapshots[3][1]  # the weights before update 4 are those after update 3
    assert step == 3
    for k, v in before.items():
        assert torch.equal(v, after_step3[k]), f"the skipped update changed {k}"
    assert [float(s["step"]) for s in trainer.optimizer.state.values()] == [x + 1 for x in opt_steps]
    ck = load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert all(
        torch.isfinite(t).all() for s in ck["optimizer"]["state"].values() for t in s.values()
        if isinstance(t, torch.Tensor)
    )


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


FUSED_ADAMW_ON_CPU = (2, 4)  # the first torch whose AdamW(fused=True) runs on the CPU


def test_the_torch_floor_has_the_fused_adamw_the_trainer_builds_on_the_cpu(tmp_path, corpus, prepared_dir):
    cfg = _cfg(tmp_path, corpus, "train.device=cpu", f"data.prepared_dir={prepared_dir}")
    trainer = trainer_mod.Trainer(cfg)
    try:
        fused = trainer.optimizer.defaults.get("fused")
    finally:
        trainer.close()
    floor = re.search(r'"torch>=(\d+)\.(\d+)', (REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert floor is not None
    if fused:  # an older torch allowed by pyproject.toml would fail at the first step
        assert (int(floor[1]), int(floor[2])) >= FUSED_ADAMW_ON_CPU, floor[0]


def test_a_prepared_cache_without_a_valid_split_is_refused(tmp_path, corpus):
    """A cache used as it is (its corpus out of reach) that has no validation split, as older
    versions prepared: training could not validate, so it does not start."""
    moved = shutil.copytree(corpus, tmp_path / "corpus")
    cfg = load_config(corpus_config(tmp_path, moved), ["train.max_steps=1"])
    prepare(cfg, quiet=True)
    meta_path = cfg.prepared_dir / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    del meta["splits"]["valid"]
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    shutil.rmtree(moved)
    with pytest.raises(DataError, match=f"the prepared data in {cfg.prepared_dir} has no 'valid' split"):
        train(cfg)
    assert not cfg.out_dir.exists()


def test_fp16_decoding_on_cpu_is_refused_before_training(tmp_path, corpus):
    cfg = _cfg(tmp_path, corpus, "train.device=cpu", "decode.precision=fp16")
    with pytest.raises(MTError, match="decode.precision=fp16 needs a GPU"):
        train(cfg)
    assert not cfg.out_dir.exists() and not cfg.prepared_dir.exists()  # nothing done


@pytest.mark.low_precision
def test_final_test_uses_decode_precision(tmp_path, corpus, capsys):
    cfg = _cfg(tmp_path, corpus, "train.max_steps=2", "train.valid_bleu=false", "decode.precision=bf16")
    result = train(cfg)
    assert result["test"]["best_beam2"]["precision"] == "bf16"
    assert (cfg.out_dir / "checkpoint_best.test.beam2.bf16.json").is_file()
    assert ", bf16, " in capsys.readouterr().out


def test_training_with_a_valid_line_longer_than_the_model(tmp_path, capsys):
    """The valid split keeps a 20,000-token line; validation must not crash on it."""
    src, tgt = synthetic_pairs(200, seed=0)
    vsrc, vtgt = synthetic_pairs(6, seed=1)
    vsrc[2] = "hund " * 20_000
    vtgt[4] = "dog " * 20_000
    corpus = corpus_files(tmp_path / "corpus", {"train": (src, tgt), "val": (vsrc, vtgt),
                                                "test": (vsrc, vtgt)})
    rc = main(["train", str(corpus_config(tmp_path, corpus)), "train.max_steps=2", "train.threads=1",
               "model.max_positions=64"])
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "valid"] == [2]


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


def _same(a: object, b: object, where: str = "") -> None:
    """Deep equality of checkpoint contents, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _content(path: Path) -> dict:
    """A checkpoint without what legitimately differs between two runs: paths and wall time."""
    ck = load_checkpoint(path)
    ck.pop("config")  # holds train.out_dir
    if "averaged_from" in ck:  # checkpoint_avg.pt (and checkpoint_final.pt, its link): their paths
        ck["averaged_from"] = [Path(p).name for p in ck["averaged_from"]]
    else:
        ck["state"].pop("elapsed")
    return ck


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    for r in rows:
        r.pop("tok_s", None)  # throughput, the one timing-dependent value
    return rows


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

    monkeypatch.setattr(trainer_mod, "open", full_after_step_4, raising=False)
    assert main(args) == 2
    line = error_line(capsys.readouterr().err, "train")
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert f"cannot write {metrics}: No space left on device" in line and "last checkpoint is intact" in line
    assert load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")["state"]["step"] == 4
    monkeypatch.undo()
    assert main(args) == 0  # room again: the same command resumes



# --------------------------------------------------------------------------- fp16 and the grad scaler


def test_fp16_steps_the_scaler_skips_for_overflow_are_not_divergence(tmp_path, corpus):
    """fp16 training starts at a large loss scale and backs off while gradients overflow; those
    skipped steps are how the scaler finds its scale, so they must not stop the run as
    non-finite losses do (five in a row)."""
    cfg = _cfg(tmp_path, corpus, "train.max_steps=8", "train.valid_every=0", "train.valid_bleu=false")
    trainer = trainer_mod.Trainer(cfg)
    # What an fp16 overflow looks like to the trainer: a finite loss, gradients that are not.
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
    overflows = {"left": 6}

    def overflow(grad: torch.Tensor) -> torch.Tensor:
        if overflows["left"] > 0:
            overflows["left"] -= 1
            return grad * float("inf")
        return grad

    trainer.raw_model.out_proj.weight.register_hook(overflow)
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    result = trainer.fit()  # six skipped steps in a row: more than MAX_NONFINITE_IN_ROW
    trainer.close()
    assert result["steps"] == 8 and result["stopped"] == "budget reached"
    assert trainer.scaler.get_scale() == 2.0**10  # it backed off once per overflow
    after = trainer.raw_model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # then the two others trained
    assert trainer.state.nonfinite_in_row == 0


def test_an_fp16_run_resumes_a_checkpoint_written_without_a_scaler(tmp_path, corpus):
    """A bf16 or CPU run saves an empty scaler state; an fp16 run resuming it starts its scaler afresh."""
    cfg = _cfg(tmp_path, corpus, "train.max_steps=2", "train.valid_every=0", "train.valid_bleu=false")
    train(cfg)
    assert load_checkpoint(cfg.out_dir / "checkpoint_last.pt")["scaler"] == {}
    resumed = trainer_mod.Trainer(_cfg(tmp_path, corpus, "train.max_steps=3", "train.valid_every=0"))
    try:
        resumed.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        resumed._resume(resumed._read_last_checkpoint())
        assert resumed.state.step == 2 and resumed.scaler.get_scale() == 2.0**16
    finally:
        resumed.close()


# --------------------------------------------------------------------------- TensorBoard


def test_tensorboard_gets_every_metric_and_the_attention_of_validation_sentences(tmp_path, corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, corpus, "train.max_steps=4", "train.valid_every=2", "train.tensorboard=true")
    train(cfg)
    events = EventAccumulator(str(cfg.out_dir / "tensorboard"), size_guidance={"images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {f"train/{k}" for k in ("loss", "lr", "tok_s", "grad_norm")} <= scalars
    assert {f"valid/{k}" for k in ("valid_loss", "valid_bleu", "valid_chrf")} <= scalars
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("valid/valid_loss")] == [2, 4]
    assert {"attention/valid_0", "attention/valid_1", "attention/valid_2"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("attention/valid_0")] == [2, 4]


def test_tensorboard_without_its_extra_is_one_line(tmp_path, corpus, monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "tensorboard" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(MTError, match=r"train.tensorboard needs the `tensorboard` extra: pip install"):
        train(_cfg(tmp_path, corpus, "train.max_steps=1", "train.tensorboard=true"))


# --------------------------------------------------------------------------- speed: figures, reads, compile


def _train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def test_tokens_per_second_leave_out_validation_and_checkpoints(tmp_path, corpus, monkeypatch):
    real = trainer_mod.Trainer.validate_and_save

    def slow_validation(self):
        time.sleep(1.5)
        real(self)

    monkeypatch.setattr(trainer_mod.Trainer, "validate_and_save", slow_validation)
    cfg = _cfg(tmp_path, corpus, "train.max_steps=4", "train.valid_every=2", "train.log_every=2",
               "train.valid_bleu=false")
    train(cfg)
    rows = _train_rows(cfg.out_dir)
    assert [r["step"] for r in rows] == [2, 4]
    # Steps 3-4 had the validation of step 2 in their window: counted, at most 800 tokens in
    # 1.5 s would be 533 tokens/s; two updates of this model take milliseconds.
    assert rows[1]["tok_s"] > 5 * 800 / 1.5, rows


def test_reading_update_records_late_as_on_a_gpu_trains_the_same_run(tmp_path, corpus, monkeypatch, capsys):
    """On one GPU the update records are read every train.log_every steps; the run, its log and its
    non-finite checks (the step is skipped on the device) are those of reading each record at once."""
    real = trainer_mod.label_smoothed_nll
    calls = {"n": 0}

    def nan_at_step_5(logits, target, smoothing):
        calls["n"] += torch.is_grad_enabled()  # training only, not validation
        loss, nll = real(logits, target, smoothing)
        return (loss * float("nan"), nll * float("nan")) if calls["n"] == 5 else (loss, nll)

    monkeypatch.setattr(trainer_mod, "label_smoothed_nll", nan_at_step_5)
    runs = {}
    for deferred in (False, True):
        calls["n"] = 0
        cfg = _cfg(tmp_path / str(deferred), corpus, "train.max_steps=9", "train.valid_every=4",
                   "train.log_every=3", "train.valid_bleu=false", "model.dropout=0.1")
        trainer = trainer_mod.Trainer(cfg)
        trainer.defer_reads = deferred
        try:
            trainer.fit()
        finally:
            trainer.close()
        assert "non-finite loss or gradient at step 5" in capsys.readouterr().err
        runs[deferred] = cfg.out_dir
    assert _metrics(runs[True]) == _metrics(runs[False])
    assert [r["step"] for r in _train_rows(runs[True])] == [3, 6, 9]
    a, b = (load_checkpoint(runs[d] / "checkpoint_last.pt") for d in (False, True))
    _same(a["model"], b["model"], "model")
    _same(a["optimizer"], b["optimizer"], "optimizer")
    assert a["state"] == {**b["state"], "elapsed": a["state"]["elapsed"]}


def test_gradients_are_scaled_only_when_clip_norm_is_set(tmp_path, corpus, monkeypatch):
    real = torch.nn.utils.clip_grads_with_norm_
    bounds = []

    def clip(params, max_norm, total_norm, *args, **kwargs):
        bounds.append(max_norm)
        return real(params, max_norm, total_norm, *args, **kwargs)

    monkeypatch.setattr(trainer_mod.torch.nn.utils, "clip_grads_with_norm_", clip)
    for clip_norm in (0.0, 0.5):
        trainer = trainer_mod.Trainer(_cfg(tmp_path / str(clip_norm), corpus, f"train.clip_norm={clip_norm}"))
        try:
            idx = trainer.batcher.epoch_batches(0)[0]
            record = trainer.update([trainer_mod._collate(trainer.train_split, idx)])
        finally:
            trainer.close()
        out = dict(zip(trainer_mod.RECORD, record.tolist(), strict=True))
        assert out["finite"] == 1.0 and out["grad_norm"] > 0.5  # the norm before clipping
    assert bounds == [0.5]


def _compiled_run(tmp_path, corpus, monkeypatch, backend, *overrides):
    """A compiled run through `backend`; returns its train rows and the compile counter."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    counter = CompileCounterWithBackend(backend)
    real_compile = torch.compile
    monkeypatch.setattr(trainer_mod.torch, "compile",
                        lambda fn, **kw: real_compile(fn, backend=counter, **kw))
    torch._dynamo.reset()
    counters.clear()
    cfg = _cfg(tmp_path, corpus, "train.compile=true", "train.pad_to_multiple=8", "train.valid_every=0",
               "train.valid_bleu=false", *overrides)
    trainer = trainer_mod.Trainer(cfg)
    try:
        widths = set()
        for epoch in range(2):
            for idx in trainer.batcher.epoch_batches(epoch):
                widths.add(trainer_mod._collate(trainer.train_split, idx, 8, 400).src.shape)
        trainer.fit()
    finally:
        trainer.close()
        monkeypatch.undo()
    breaks = dict(counters["graph_break"])
    torch._dynamo.reset()
    return _train_rows(cfg.out_dir), counter.frame_count, widths, breaks


def test_compiled_training_with_pad_to_multiple_compiles_each_batch_shape_once(tmp_path, corpus, monkeypatch):
    # 7 batches an epoch; two epochs: the second compiles nothing new.
    one_epoch, first, widths, breaks = _compiled_run(tmp_path / "a", corpus, monkeypatch, "aot_eager",
                                                     "train.max_steps=7")
    assert not breaks, breaks
    assert 2 <= first <= 2 * len(widths) <= 6, (first, widths)  # the model and the loss, per shape
    _, both, _, _ = _compiled_run(tmp_path / "b", corpus, monkeypatch, "aot_eager", "train.max_steps=14")
    assert both == first


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_and_eager_training_agree(tmp_path, corpus, monkeypatch, backend):
    common = ["train.pad_to_multiple=8", "train.valid_every=0", "train.valid_bleu=false", "train.max_steps=4"]
    compiled, _, _, _ = _compiled_run(tmp_path / "c", corpus, monkeypatch, backend, "train.max_steps=4")
    eager = _cfg(tmp_path / "e", corpus, *common)
    train(eager)
    losses = [r["loss"] for r in _train_rows(eager.out_dir)]
    assert [r["loss"] for r in compiled] == pytest.approx(losses, rel=1e-4)
