"""What the one-shot GPU check (scripts/gpu_check.py) relies on, checked here on the CPU: a
prepared cache travels alone (no corpus, no `datasets` there), and what travels fits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, corpus_config, make_corpus, subprocess_env

from mt.config import load_config
from mt.data.prepare import prepare

pytestmark = pytest.mark.slow
WITHOUT_DATASETS = Path(__file__).with_name("without_datasets.py")


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_prepared_cache_trains_and_translates_without_datasets_or_its_corpus(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_train=120, n_valid=10, n_test=10)
    exp = corpus_config(tmp_path, corpus)
    prepare(load_config(exp), quiet=True)
    gone = tmp_path / "corpus-not-here"
    corpus.rename(gone)  # as on a machine that got the cache alone
    env = subprocess_env(tmp_path / "hf")
    args = ["train", str(exp), "train.max_steps=2", "train.valid_every=0", "train.threads=1"]
    proc = _run([sys.executable, str(WITHOUT_DATASETS), *args], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "out of reach" in proc.stdout and "as it is" in proc.stdout

    src = tmp_path / "in.txt"
    src.write_text("ein hund läuft\nder mann sitzt\n", encoding="utf-8")
    ck = tmp_path / "run" / "checkpoint_last.pt"
    proc = _run([sys.executable, str(WITHOUT_DATASETS), "translate", "--checkpoint", str(ck), "--input",
                 str(src), "--device", "cpu"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.split("\n")) == 3

    # Preparing does need `datasets`: the guard is real.
    proc = _run([sys.executable, str(WITHOUT_DATASETS), "prepare", str(exp), f"data.local_dir={gone}",
                 "--force"], tmp_path, env)
    assert proc.returncode == 2 and "preparing data needs the `datasets` package" in proc.stderr


def test_what_travels_to_the_gpu_machine_is_measured_against_64_mib(tmp_path):
    data = tmp_path / "prepared"
    data.mkdir()
    (data / "train.src.npy").write_bytes(b"\0" * 2**20)
    big = tmp_path / "weights.pt"
    big.write_bytes(b"\0" * 70 * 2**20)
    cmd = [sys.executable, "scripts/gpu_check.py", "--travel", "--data", str(data)]
    env = subprocess_env(tmp_path / "hf")
    fits = _run([*cmd, "--weights", str(tmp_path / "none.pt")], REPO, env)
    assert fits.returncode == 0 and "fits" in fits.stdout, fits.stdout + fits.stderr
    too_big = _run([*cmd, "--weights", str(big)], REPO, env)
    assert too_big.returncode == 1 and "TOO BIG" in too_big.stdout


def test_the_check_runs_end_to_end_on_the_cpu(tmp_path):
    """`gpu_check.py --cpu`: every part, the trainer against the bare step eager and compiled
    (through aot_eager here: inductor's C++ compilation would take minutes on this machine)."""
    corpus = make_corpus(tmp_path / "corpus", n_train=300, n_valid=10, n_test=10)
    prepare(load_config(corpus_config(tmp_path, corpus)), quiet=True)
    cmd = [sys.executable, "scripts/gpu_check.py", "--cpu", "--data", str(tmp_path / "prepared"), "--weights",
           str(tmp_path / "none.pt"), "--out", str(tmp_path / "out"), "--backend", "aot_eager"]
    proc = _run(cmd, REPO, subprocess_env(tmp_path / "hf"))
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-2000:]
    assert "gpu_check: 5 of 5 parts passed" in out
    for size in ("0.5k tokens, eager", "1k tokens, eager", "1k tokens, compiled", "0.5k tokens, compiled"):
        assert f"mt train {size}" in out, size
    assert out.count("bare step, the same") == 4 and "compile ~" in out
    assert "synthetic train step, compiled" in out and "translate greedy, fp32" in out
    assert not list((tmp_path / "out").glob("**/*.pt"))  # checkpoints stay out of $OUT


def test_a_part_that_overruns_its_budget_is_killed_and_the_check_goes_on(tmp_path):
    env = {**subprocess_env(tmp_path / "hf"), "GPU_CHECK_HANG": "2"}
    cmd = [sys.executable, str(Path(__file__).with_name("gpu_check_driver.py")), "--cpu", "--parts", "21",
           "--budget-scale", "0.25", "--out", str(tmp_path / "out")]
    proc = _run(cmd, REPO, env)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "hanging on purpose" in out and "STUCK: not done within its budget of 12 s; killed" in out
    assert "matmul peak" in out  # part 1 ran after it
    assert "gpu_check: 1 of 2 parts passed (2 STUCK, 1 passed)" in out
