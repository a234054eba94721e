"""Fixtures and hooks for all test modules: offline hub, a private HF cache, one torch thread,
and the corpus, prepared cache and tiny checkpoint that several modules share.

Plain helpers (corpora, build_checkpoint, run_mt, ...) are in helpers.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import build_checkpoint, make_corpus, one_thread, subprocess_env

# The hub is unreachable here; fail fast instead of retrying for 20 s.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path_factory.getbasetemp() / "hf_cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))


@pytest.fixture(params=[False, True], ids=["rows_outer", "positions_outer"])
def positions_outer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Each layout of the decoder's self-attention cache in turn (mt.model.SelfKV), whichever
    this CPU would choose."""
    monkeypatch.setattr("mt.model._POSITIONS_OUTER", request.param)
    return request.param


@pytest.fixture(scope="module")
def mt_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment for `run_mt`: the module's own HF datasets cache."""
    return subprocess_env(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic corpus (300 training pairs) in the Multi30k layout; read only."""
    return make_corpus(tmp_path_factory.mktemp("corpus"), n_train=300, n_valid=20, n_test=20)


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One prepared cache for all runs over `corpus` (its fingerprint is the same for all)."""
    return tmp_path_factory.mktemp("shared") / "prepared"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny trained checkpoint of `build_checkpoint`; read only."""
    return build_checkpoint(tmp_path_factory.mktemp("ck") / "tiny.pt")
