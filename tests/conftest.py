"""Shared fixtures: offline hub, a private HF cache, small synthetic corpora."""

from __future__ import annotations

import contextlib
import gzip
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# The hub is unreachable here; fail fast instead of retrying for 20 s.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
MULTI30K = Path(os.environ.get("MT_MULTI30K", REPO.parent / "shared" / "corpora" / "multi30k"))

WORDS_DE = (
    "ein eine der die das mann frau hund katze kind spielt läuft sitzt auf im park ball rot blau".split()
)
WORDS_EN = "a an the the the man woman dog cat child plays runs sits on in park ball red blue".split()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: the tests' models are tiny, and on a busy 2-core machine a second
    OpenMP thread makes them many times slower. Also gives the count back after in-process runs
    that set their own (train.threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path_factory.getbasetemp() / "hf_cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))


def synthetic_pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Word-by-word 'translations' of random German-like sentences."""
    rng = random.Random(seed)
    src, tgt = [], []
    for _ in range(n):
        idx = [rng.randrange(len(WORDS_DE)) for _ in range(rng.randint(2, 9))]
        src.append(" ".join(WORDS_DE[i] for i in idx))
        tgt.append(" ".join(WORDS_EN[i] for i in idx))
    return src, tgt


def write_lines(path: Path, lines: list[str], gz: bool = False) -> Path:
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_corpus(root: Path, n_train: int = 400, n_valid: int = 30, n_test: int = 30, gz: bool = True) -> Path:
    """A local corpus in the Multi30k layout: {train,val,test}.{de,en}[.gz]."""
    root.mkdir(parents=True, exist_ok=True)
    for stem, n, seed in (("train", n_train, 0), ("val", n_valid, 1), ("test", n_test, 2)):
        src, tgt = synthetic_pairs(n, seed)
        write_lines(root / f"{stem}.de", src, gz)
        write_lines(root / f"{stem}.en", tgt, gz)
    return root


def corpus_config(tmp_path: Path, corpus: Path, **extra: object) -> Path:
    """A tiny experiment YAML over a local corpus, prepared under tmp_path."""
    lines = [
        "data:",
        f"  local_dir: {corpus}",
        "  local_splits: {train: train, valid: val, test: test}",
        f"  prepared_dir: {tmp_path / 'prepared'}",
        "  vocab_size: 60",
        "  max_len: 40",
        "  num_proc: 1",
        "model: {d_model: 16, heads: 2, ffn_dim: 32, layers: 1, dropout: 0.0}",
        f"train: {{max_tokens: 256, max_steps: 4, valid_every: 2, lr: 0.003, warmup_steps: 2, "
        f"log_every: 1, out_dir: {tmp_path / 'run'}}}",
        "decode: {beam: 2, max_len_b: 5}",
    ]
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "exp.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path
