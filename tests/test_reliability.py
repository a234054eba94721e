"""Reliability: training survives crashes, bad input never loses data, checkpoints are safe to load.

The faults are injected from outside: a run is started as a subprocess through a small driver
script (written below) that monkeypatches one function of `mt` to SIGKILL its own process at a
precise point, so no test hooks live in the production code and the process gets no chance
to clean up. After each kill every checkpoint on disk must load, and resuming with the plain
command must give exactly the run that was never interrupted.
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import corpus_config, make_corpus, one_thread, synthetic_pairs, write_lines
from test_translate import build_checkpoint

import mt.checkpoint as ckpt_mod
import mt.trainer as trainer_mod
from mt.checkpoint import load_checkpoint, save_checkpoint, step_checkpoints
from mt.cli import main
from mt.config import load_config
from mt.dataset import load_prepared
from mt.errors import CheckpointError
from mt.prepare import is_up_to_date, prepare
from mt.translator import Translator

# --------------------------------------------------------------------------- the fault driver

DRIVER = r'''
"""Run the mt CLI with one fault injected: python driver.py FAULT MT-ARGS...

FAULT is KIND[@STEP][:FILE]. Each kind monkeypatches one function; "die" is SIGKILL, which
no handler, `finally` or atexit sees.
"""
import io
import json
import os
import signal
import sys
import time

import torch

import mt.prepare
import mt.trainer
import mt.translator
from mt.cli import main

kind, _, rest = sys.argv[1].partition("@")
at_text, _, name = rest.partition(":")
at = int(at_text) if at_text else None
Trainer = mt.trainer.Trainer


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if kind == "update":  # inside the update that makes step `at`, after the weights changed in memory
    real_update = Trainer.update

    def update(self, batches):
        out = real_update(self, batches)
        if self.state.step + 1 == at:
            die()
        return out

    Trainer.update = update
elif kind == "validate":  # mid-validation at step `at`: loss done, greedy decoding for BLEU under way
    real_validate, real_translate = Trainer.validate, mt.trainer.translate_ids
    current = {}

    def validate(self):
        current["step"] = self.state.step
        return real_validate(self)

    def translate_ids(*args, **kwargs):
        if current.get("step") == at:
            die()
        return real_translate(*args, **kwargs)

    Trainer.validate = validate
    mt.trainer.translate_ids = translate_ids
elif kind == "save":  # half of checkpoint file `name` of step `at` on disk, then killed
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        target = os.path.basename(getattr(f, "name", str(f)))
        if target.startswith(name + ".tmp-") and obj["state"]["step"] == at:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            die()
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
elif kind == "saved":  # just after checkpoint file `name` of step `at` is complete
    real_save_checkpoint = mt.trainer.save_checkpoint

    def save_checkpoint(path, state):
        real_save_checkpoint(path, state)
        if os.path.basename(str(path)) == name and state["state"]["step"] == at:
            die()

    mt.trainer.save_checkpoint = save_checkpoint
elif kind == "metrics":  # half of the metrics.jsonl line of step `at` written
    real_write = mt.trainer.MetricsLog.write

    def write(self, **record):
        if record["step"] == at:
            line = json.dumps(record) + "\n"
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line[: len(line) // 2])
            die()
        real_write(self, **record)

    mt.trainer.MetricsLog.write = write
elif kind == "interrupt":  # before the update after step `at`, wait for the test's Ctrl-C
    real_update = Trainer.update

    def update(self, batches):
        if self.state.step == at:
            deadline = time.time() + 120
            while not self.stop_requested and time.time() < deadline:
                time.sleep(0.02)
        return real_update(self, batches)

    Trainer.update = update
elif kind == "prepare":  # while the token arrays of the first split are written
    def write_arrays(*args, **kwargs):
        die()

    mt.prepare._write_arrays = write_arrays
elif kind == "swap":  # after the old cache was moved aside, before the new one is moved in
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if ".tmp-" in os.path.basename(str(src)) and os.path.isdir(src):
            die()
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace
elif kind == "translate":  # in the middle of translating
    def translate_nbest(self, *args, **kwargs):
        die()

    mt.translator.Translator.translate_nbest = translate_nbest
else:
    raise SystemExit(f"unknown fault {sys.argv[1]}")

sys.exit(main(sys.argv[2:]))
'''

KILLED = -signal.SIGKILL


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("driver") / "driver.py"
    path.write_text(DRIVER, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path_factory.mktemp("hf")),
        "TOKENIZERS_PARALLELISM": "false",
    }


def run_mt(args: list[str], cwd: Path, env: dict[str, str], driver: Path | None = None,
           fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m mt ARGS`, or the same through the fault driver."""
    cmd = [sys.executable, str(driver), fault, *args] if fault else [sys.executable, "-m", "mt", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- a shared corpus and run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"), n_train=300, n_valid=20, n_test=20)


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One prepared cache for all runs over `corpus` (its fingerprint is the same for all)."""
    return tmp_path_factory.mktemp("shared") / "prepared"


def exp(tmp_path: Path, corpus: Path) -> Path:
    return corpus_config(tmp_path, corpus)


# 14 steps of 7 batches an epoch: validations (and checkpoints) at steps 4, 7 (epoch end), 8, 12
# and 14 (end); keep_last keeps step checkpoints; dropout makes the RNG state matter; validation
# loss decides the best checkpoint (deterministic: it falls at every validation here).
RUN = [
    "train.max_steps=14", "train.valid_every=4", "train.max_tokens=400", "train.keep_last=2",
    "train.best_metric=loss", "model.dropout=0.1", "train.threads=1", "train.device=cpu",
    "data.local_splits={train: train, valid: val}",
]


def run_args(tmp_path: Path, corpus: Path, prepared_dir: Path) -> list[str]:
    return ["train", str(exp(tmp_path, corpus)), *RUN, f"data.prepared_dir={prepared_dir}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, prepared_dir, env) -> Path:
    """The run directory of the uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = run_mt(run_args(tmp, corpus, prepared_dir), tmp, env)
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


# --------------------------------------------------------------------------- kill at any moment

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
    tmp_path, corpus, prepared_dir, env, driver, reference
):
    args = run_args(tmp_path, corpus, prepared_dir)
    run = tmp_path / "run"
    temps: list[str] = []
    for fault in KILLS:
        proc = run_mt(args, tmp_path, env, driver, fault)
        assert proc.returncode == KILLED, f"{fault}: not killed (rc {proc.returncode})\n{proc.stderr[-3000:]}"
        temps += assert_checkpoints_load(run)
    assert temps, "the mid-save kills leave temp files (and they were not taken for checkpoints)"
    proc = run_mt(args, tmp_path, env)  # the same command, no fault
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout
    assert_same_run(run, reference)


@pytest.mark.slow
def test_ctrl_c_saves_and_the_same_command_resumes(tmp_path, corpus, prepared_dir, env, driver, reference):
    args = run_args(tmp_path, corpus, prepared_dir)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(driver), "interrupt@5", *args], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:  # until step 5 is logged
            metrics = run / "metrics.jsonl"
            if metrics.exists() and '"step": 5, ' in metrics.read_text(encoding="utf-8"):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    # A clean interrupt still exits 130, as shells report Ctrl-C; the checkpoint is safe.
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert "interrupted at step 6; checkpoint saved to" in err and str(run / "checkpoint_last.pt") in err
    assert "resume with the same command" in err
    assert load_checkpoint(run / "checkpoint_last.pt")["state"]["step"] == 6
    assert_checkpoints_load(run)

    proc2 = run_mt(args, tmp_path, env)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert "resuming from" in proc2.stdout and "at step 6" in proc2.stdout
    assert_same_run(run, reference)


# --------------------------------------------------------------------------- interrupted preparation


def _stale(prepared: Path) -> list[str]:
    return sorted(p.name for p in prepared.parent.glob(f".{prepared.name}.*"))


@pytest.mark.slow
def test_sigkill_during_prepare_leaves_old_cache_or_none(tmp_path, env, driver):
    corpus = make_corpus(tmp_path / "corpus", n_train=100, n_valid=10, n_test=10)
    config = exp(tmp_path, corpus)
    out = tmp_path / "prepared"

    # No cache yet: a killed run leaves none (and a temp directory that is not a cache).
    proc = run_mt(["prepare", str(config)], tmp_path, env, driver, "prepare")
    assert proc.returncode == KILLED, proc.stderr[-3000:]
    assert not out.exists()
    assert len(_stale(out)) == 1

    old_cfg = load_config(config)
    prepare(old_cfg, quiet=True)  # cleans up the dead run's temp directory
    assert _stale(out) == []
    old_meta = (out / "meta.json").read_text()

    # A complete cache: a run killed while writing arrays leaves it as it was.
    proc = run_mt(["prepare", str(config), "data.vocab_size=50"], tmp_path, env, driver, "prepare")
    assert proc.returncode == KILLED, proc.stderr[-3000:]
    assert (out / "meta.json").read_text() == old_meta and is_up_to_date(old_cfg)
    assert len(load_prepared(out).split("train")) == 100
    assert len(_stale(out)) == 1

    # Killed between moving the old cache aside and the new one in: no cache, never half of one.
    proc = run_mt(["prepare", str(config), "data.vocab_size=50"], tmp_path, env, driver, "swap")
    assert proc.returncode == KILLED, proc.stderr[-3000:]
    assert not out.exists() or (out / "meta.json").read_text() == old_meta
    assert not is_up_to_date(load_config(config, ["data.vocab_size=50"]))

    new_cfg = load_config(config, ["data.vocab_size=50"])
    prepare(new_cfg, quiet=True)
    assert _stale(out) == [], "stale temporary and old directories are removed"
    assert is_up_to_date(new_cfg) and len(load_prepared(out).split("valid")) == 10


# --------------------------------------------------------------------------- interrupted translation


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ck") / "tiny.pt")


SRC, _ = synthetic_pairs(6, seed=5)


@pytest.mark.slow
def test_sigkill_during_translate_keeps_output_whole(tmp_path, env, driver, checkpoint, capsys):
    inp = tmp_path / "in.txt"
    inp.write_text("".join(s + "\n" for s in SRC), encoding="utf-8")
    existing = tmp_path / "out.txt"
    existing.write_bytes(b"precious\n")
    fresh = tmp_path / "fresh.txt"
    for out in (existing, fresh):
        argv = ["translate", "--checkpoint", str(checkpoint), "--input", str(inp), "--output", str(out),
                "--device", "cpu"]
        proc = run_mt(argv, tmp_path, env, driver, "translate")
        assert proc.returncode == KILLED, proc.stderr[-3000:]
    assert existing.read_bytes() == b"precious\n", "an existing output is never destroyed"
    assert not fresh.exists(), "no partial output"

    with one_thread():
        rc = main(["translate", "--checkpoint", str(checkpoint), "--input", str(inp),
                   "--output", str(existing), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert len(existing.read_text(encoding="utf-8").split("\n")) == len(SRC) + 1


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _oom(*args, **kwargs):
    raise MemoryError


@pytest.mark.parametrize("fault", ["ctrl-c", "out of memory", "disk full"])
def test_failed_translate_keeps_existing_output(tmp_path, monkeypatch, capsys, checkpoint, fault):
    inp = tmp_path / "in.txt"
    inp.write_text("".join(s + "\n" for s in SRC), encoding="utf-8")
    out = tmp_path / "out.txt"
    out.write_bytes(b"precious\n")
    argv = ["translate", "--checkpoint", str(checkpoint), "--input", str(inp), "--output", str(out),
            "--device", "cpu"]
    with one_thread():
        if fault == "ctrl-c":
            monkeypatch.setattr(Translator, "translate_nbest", _interrupt)
            assert main(argv) == 130
        elif fault == "out of memory":
            monkeypatch.setattr(Translator, "translate_nbest", _oom)
            with pytest.raises(MemoryError):
                main(argv)
        else:  # the translation is done, writing it fails
            monkeypatch.setattr("mt.files.os.fsync", _enospc)
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert f"mt translate: error: cannot write output {out}: No space left on device" in err
    assert out.read_bytes() == b"precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]  # no temp file left


# --------------------------------------------------------------------------- unwritable or full output


def _error_line(err: str, cmd: str) -> str:
    """The CLI's error: one line, no traceback (progress bars may precede it)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"mt {cmd}: error: ")]
    assert len(lines) == 1, err
    assert err.rstrip("\n").endswith(lines[0]), "nothing after the error line"
    return lines[0]


@pytest.mark.parametrize("where", ["under a file", "in /proc"])
def test_unwritable_out_dir_is_a_clear_error(tmp_path, corpus, prepared_dir, capsys, where):
    # The tests run as root, where chmod does not stop writes: use places nobody can write.
    if where == "under a file":
        (tmp_path / "somefile").write_text("x")
        out_dir = tmp_path / "somefile" / "run"
    else:
        out_dir = Path("/proc/mt-test-run")
    rc = main(["train", str(exp(tmp_path, corpus)), "train.max_steps=2", "train.threads=1",
               f"data.prepared_dir={prepared_dir}", f"train.out_dir={out_dir}"])
    assert rc == 2
    line = _error_line(capsys.readouterr().err, "train")
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
    rc = main(["train", str(exp(tmp_path, corpus)), "train.max_steps=6", "train.valid_every=2",
               "train.valid_bleu=false", "train.threads=1", f"data.prepared_dir={prepared_dir}"])
    assert rc == 2
    line = _error_line(capsys.readouterr().err, "train")
    assert "cannot save checkpoint " + str(tmp_path / "run") in line and "No space left on device" in line
    assert seen["before"] and last.read_bytes() == seen["before"], "the previous checkpoint is unchanged"
    monkeypatch.undo()
    assert load_checkpoint(last)["state"]["step"] == 2
    assert not list(last.parent.glob("*.tmp-*"))


# --------------------------------------------------------------------------- non-finite loss


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nonfinite_update_is_skipped_not_saved(tmp_path, corpus, prepared_dir, monkeypatch, capsys, where):
    """tests/test_trainer.py checks the warning and finite saved weights; this checks that the
    bad update really left weights and optimizer alone, also for a finite loss with a NaN gradient."""
    snapshots = []
    real_update = trainer_mod.Trainer.update

    def update(self, batches):
        before = {k: v.clone() for k, v in self.model.state_dict().items()}
        opt_steps = [float(s["step"]) for s in self.optimizer.state.values()]
        out = real_update(self, batches)
        snapshots.append((self.state.step + 1, before, opt_steps, self))
        return out

    real_nll, real_clip = trainer_mod.label_smoothed_nll, torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def nll(logits, target, smoothing):
        calls["n"] += 1
        loss, n = real_nll(logits, target, smoothing)
        return (loss * float("nan"), n * float("nan")) if calls["n"] == 3 else (loss, n)

    def clip(params, max_norm):
        calls["n"] += 1
        params = list(params)
        if calls["n"] == 3:
            params[0].grad.fill_(float("nan"))
        return real_clip(params, max_norm)

    monkeypatch.setattr(trainer_mod.Trainer, "update", update)
    if where == "loss":
        monkeypatch.setattr(trainer_mod, "label_smoothed_nll", nll)
    else:
        monkeypatch.setattr(trainer_mod.torch.nn.utils, "clip_grad_norm_", clip)
    rc = main(["train", str(exp(tmp_path, corpus)), "train.max_steps=4", "train.valid_every=0",
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


# --------------------------------------------------------------------------- bad config via the CLI


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("train:\n  lrr: 0.1\n", [], "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        ("", ["train.warmup_step=10"], "'train.warmup_step' (did you mean 'train.warmup_steps'?)"),
        ("trian:\n  lr: 0.1\n", [], "unknown config section 'trian' (did you mean 'train'?)"),
        ("", ["decod.beam=2"], "unknown config section 'decod' (did you mean 'decode'?)"),
        ("", ["model.layers=two"], "model.layers: 'two' is not a valid value; expected int"),
        ("model:\n  dropout: high\n", [], "model.dropout: 'high' is not a valid value; expected float"),
        ("", ["train.valid_bleu=maybe"], "train.valid_bleu: 'maybe' is not a valid value; expected bool"),
        ("", ["model.dropout=-0.1"], "model.dropout: must be in [0, 1), got -0.1"),
        ("", ["decode.beam=0"], "decode.beam: must be >= 1, got 0"),
        ("", ["train.warmup_steps=-1"], "train.warmup_steps: must be >= 0, got -1"),
        ("", ["train.max_tokens=40"], "train.max_tokens: 40 is smaller than the longest allowed sentence"),
        ("train: {lr: [1, 2\n", [], "not valid YAML"),
        ("data:\n\tlocal_dir: x\n", [], "not valid YAML"),
        ("", ["train.betas=[0.9"], "override 'train.betas=[0.9': cannot parse value"),
        ("- 1\n- 2\n", None, "expected a mapping with sections"),
        ("model: 3\n", [], "section 'model' must be a mapping"),
    ],
)
@pytest.mark.parametrize("cmd", ["prepare", "train"])
def test_bad_config_is_one_line_via_the_cli(tmp_path, capsys, cmd, text, overrides, message):
    path = tmp_path / "exp.yaml"
    path.write_text(text if overrides is None else "data:\n  local_dir: x\n  max_len: 64\n" + text)
    assert main([cmd, str(path), *(overrides or [])]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"mt {cmd}: error: "), err
    assert message in err


def test_missing_or_undecodable_config_via_the_cli(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err == f"mt train: error: config file not found: {tmp_path / 'nope.yaml'}\n"
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"data:\n  local_dir: caf\xe9\n")
    assert main(["prepare", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "latin1.yaml: not valid YAML" in err


# --------------------------------------------------------------------------- bad data


def _corpus_files(root: Path, splits: dict[str, tuple[list[str], list[str]]], gz: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for stem, (src, tgt) in splits.items():
        write_lines(root / f"{stem}.de", src, gz)
        write_lines(root / f"{stem}.en", tgt, gz)
    return root


def _prepare_cli(tmp_path: Path, corpus: Path, capsys, *overrides: str) -> tuple[int, str]:
    rc = main(["prepare", str(exp(tmp_path, corpus)), *overrides])
    return rc, capsys.readouterr().err


HOSTILE = [
    "der\x00hund",  # NUL
    "die\x07katze \x1b[31mrot\x1b[0m",  # bell, ANSI escapes
    "   ",  # only spaces
    "\t\x0b\x0c",  # only other whitespace
    "ein\rhund",  # a lone CR inside a line
    "a\x85b\u2028c\u2029d\x1ce",  # characters str.splitlines() would split on
    "hund " * 20_000,  # a 100,000-character line
    "שלום עולם",  # Hebrew
    "مرحبا بالعالم",  # Arabic
    "\u202eright-to-left override\u202c",
    "你好世界，一只狗在公园里跑",  # CJK
    "犬が公園を走っています",
    "\ufeffein hund",  # a BOM that is not at the start of the file is text
    "",  # empty
    "🐕 🐈 🇩🇪",  # emoji, flags
]


@pytest.mark.parametrize("gz", [False, True])
def test_hostile_lines_in_valid_and_test_are_kept_in_order(tmp_path, capsys, gz):
    """Valid and test splits keep every line in order, stripped; a lone CR inside a line becomes a
    space in the reference text (written one line per sentence). Training drops what it must, and
    the counts add up."""
    src, tgt = synthetic_pairs(len(HOSTILE), seed=1)
    train_src, train_tgt = synthetic_pairs(200, seed=0)
    train_src[: len(HOSTILE)] = HOSTILE
    train_tgt[50 : 50 + len(HOSTILE)] = HOSTILE
    corpus = _corpus_files(tmp_path / "corpus", {
        "train": (train_src, train_tgt),
        "val": (["\ufeff" + src[0], *src[1:]], HOSTILE),  # a BOM at the start of a file is not text
        "test": (HOSTILE, tgt),
    }, gz)
    # CJK needs more characters than a 60-piece vocabulary holds; see the next test.
    rc, err = _prepare_cli(tmp_path, corpus, capsys, "data.vocab_size=300", "data.character_coverage=0.9995")
    assert rc == 0, err
    data = load_prepared(tmp_path / "prepared")
    expected = [h.strip().replace("\r", " ") for h in HOSTILE]
    assert data.text("valid", "tgt") == expected
    assert data.text("valid", "src") == src
    assert data.text("test", "src") == expected
    assert len(data.split("valid")) == len(data.split("test")) == len(HOSTILE)
    assert data.split("valid").tgt_lens[6] >= 20_000, "the long line is kept whole"
    st = data.meta["splits"]["train"]
    assert st["read"] == 200 and st["kept"] + sum(st["dropped"].values()) == 200
    assert st["dropped"]["empty"] >= 4 and st["dropped"]["too_long"] >= 1


def test_vocabulary_too_small_for_the_alphabet_is_a_data_error(tmp_path, capsys):
    src, tgt = synthetic_pairs(100, seed=0)
    cjk = [chr(0x4E00 + 7 * i) + chr(0x4E01 + 11 * i) for i in range(100)]  # 200 distinct characters
    corpus = _corpus_files(tmp_path / "corpus", {"train": (cjk, tgt), "val": (src[:5], tgt[:5]),
                                                 "test": (src[:5], tgt[:5])})
    rc, err = _prepare_cli(tmp_path, corpus, capsys)  # vocab_size 60
    assert rc == 2
    line = _error_line(err, "prepare")
    assert "data.vocab_size" in line and "character_coverage" in line
    assert not list(tmp_path.glob(".prepared*")), "no half-written cache"


def test_mismatched_plain_files_via_the_cli(tmp_path, capsys):
    src, tgt = synthetic_pairs(50, seed=0)
    corpus = _corpus_files(tmp_path / "corpus", {"train": (src, tgt[:-1]), "val": (src[:5], tgt[:5]),
                                                 "test": (src[:5], tgt[:5])})
    rc, err = _prepare_cli(tmp_path, corpus, capsys)
    assert rc == 2
    line = _error_line(err, "prepare")
    assert f"{corpus / 'train.de'} has 50 lines but {corpus / 'train.en'} has 49" in line


def test_undecodable_and_corrupt_files_name_the_file(tmp_path, capsys):
    src, tgt = synthetic_pairs(50, seed=0)
    corpus = _corpus_files(tmp_path / "corpus", {"train": (src, tgt), "val": (src[:5], tgt[:5]),
                                                 "test": (src[:5], tgt[:5])})
    good = (corpus / "val.en").read_bytes()
    (corpus / "val.en").write_bytes(good.replace(b"\n", b"\n\xc3\x28 \xff\n", 1)[: len(good) + 5])
    rc, err = _prepare_cli(tmp_path, corpus, capsys)
    assert rc == 2 and f"{corpus / 'val.en'}:2: not valid UTF-8" in _error_line(err, "prepare")
    (corpus / "val.en").write_bytes(good)

    zipped = gzip.compress(good * 20)
    (corpus / "test.en").unlink()
    for name, data in [
        ("truncated", zipped[: len(zipped) // 2]),
        ("not gzip", b"plain text, not gzip\n"),
        ("corrupt", zipped[:12] + bytes(b ^ 0x5A for b in zipped[12:40]) + zipped[40:]),
    ]:
        (corpus / "test.en.gz").write_bytes(data)
        rc, err = _prepare_cli(tmp_path, corpus, capsys)
        assert rc == 2, name
        assert f"{corpus / 'test.en.gz'}: cannot read" in _error_line(err, "prepare"), name


def test_empty_valid_split_via_the_cli(tmp_path, capsys):
    src, tgt = synthetic_pairs(50, seed=0)
    corpus = _corpus_files(tmp_path / "corpus", {"train": (src, tgt), "val": ([], []), "test": (src, tgt)})
    rc, err = _prepare_cli(tmp_path, corpus, capsys)
    assert rc == 2 and "split 'valid' is empty" in _error_line(err, "prepare")


def test_training_with_a_valid_line_longer_than_the_model(tmp_path, capsys):
    """The valid split keeps a 20,000-token line; validation must not crash on it."""
    src, tgt = synthetic_pairs(200, seed=0)
    vsrc, vtgt = synthetic_pairs(6, seed=1)
    vsrc[2] = "hund " * 20_000
    vtgt[4] = "dog " * 20_000
    corpus = _corpus_files(tmp_path / "corpus", {"train": (src, tgt), "val": (vsrc, vtgt),
                                                 "test": (vsrc, vtgt)})
    rc = main(["train", str(exp(tmp_path, corpus)), "train.max_steps=2", "train.threads=1",
               "model.max_positions=64"])
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "valid"] == [2]


# --------------------------------------------------------------------------- bad translation input


class _Stdin:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)

    def isatty(self) -> bool:
        return False


@pytest.mark.parametrize(
    "data, n",
    [
        (b"", 0),  # empty stdin
        (b"\xef\xbb\xbf", 0),  # only a BOM
        (b"\xef\xbb\xbf\n", 1),
        (b"\n\n\n", 3),  # only empty lines
        (b"\r\n\r\n", 2),
        (b" \t \n\x0b\x0c\n", 2),  # only whitespace
        (b"der\x00hund\ndie\x1b[1mkatze\n", 2),  # control characters
        ("你好世界\nשלום עולם\nمرحبا\n🐕".encode(), 4),  # unknown scripts, no final newline
        (("x" * 100_000 + "\n" + "hund " * 20_000).encode(), 2),  # no spaces at all; many tokens
        (b"ein \xff hund\n\xc3\n\xed\xa0\x80\n", 3),  # bad UTF-8, with --errors replace
    ],
)
def test_translate_stdin_n_lines_in_n_lines_out(monkeypatch, capsys, checkpoint, data, n):
    """tests/test_translate.py covers files; here the stdin path and more odd inputs."""
    monkeypatch.setattr(sys, "stdin", _Stdin(data))
    with one_thread():
        rc = main(["translate", "--checkpoint", str(checkpoint), "--device", "cpu", "--beam", "1",
                   "--errors", "replace"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.count("\n") == n and (out == "" or out.endswith("\n"))
    assert "\r" not in out


# --------------------------------------------------------------------------- bad checkpoints


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
        assert main(["average", "--output", str(tmp_path / "avg.pt"), str(path), str(path)]) == 2
        assert "not a plain-data PyTorch file" in capsys.readouterr().err

    # Resuming training from a planted checkpoint_last.pt.
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint_last.pt").write_bytes(evil[0].read_bytes())
    rc = main(["train", str(exp(tmp_path, corpus)), "train.max_steps=2", "train.threads=1",
               f"data.prepared_dir={prepared_dir}"])
    assert rc == 2
    assert "not a plain-data PyTorch file" in _error_line(capsys.readouterr().err, "train")
    assert not marker.exists(), "unpickling ran code"
    assert not (tmp_path / "avg.pt").exists()

