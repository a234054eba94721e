"""What the one-shot GPU check (scripts/gpu_check.py) relies on, checked here on the CPU: a
prepared cache travels alone (no corpus, no `datasets` there), and what travels fits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, corpus_config, make_corpus, subprocess_env

from mt.config import load_config
from mt.prepare import prepare

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
