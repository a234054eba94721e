"""Decoding options resolved once (mt.config.resolve_decoding) and the one batch loop
(mt.translate.lines.decode_in_batches) that every translator runs."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from mt.cli import main
from mt.config import DecodeConfig, resolve_decoding
from mt.errors import ConfigError
from mt.translate.lines import decode_in_batches
from mt.translate.translator import Translator

# --------------------------------------------------------------------------- resolve_decoding


def test_options_not_given_keep_the_config_and_the_config_is_not_changed():
    decode = DecodeConfig(beam=4, max_tokens=300, alpha=0.6)
    got = resolve_decoding(decode)
    assert (got.beam, got.nbest, got.max_tokens, got.alpha) == (4, 1, 300, 0.6)
    got = resolve_decoding(decode, beam=2, nbest=2, max_tokens=50)
    assert (got.beam, got.nbest, got.max_tokens, got.alpha) == (2, 2, 50, 0.6)
    assert (decode.beam, decode.nbest, decode.max_tokens) == (4, 1, 300)


def test_an_nbest_above_the_configured_beam_widens_it_but_not_an_explicit_one():
    assert resolve_decoding(DecodeConfig(beam=2), nbest=5).beam == 5
    with pytest.raises(ConfigError, match=r"nbest \(3\) cannot exceed beam \(2\)"):
        resolve_decoding(DecodeConfig(beam=5), beam=2, nbest=3)


@pytest.mark.parametrize("option", ["beam", "nbest", "max_tokens"])
def test_options_below_one_are_errors_that_name_the_option(option):
    with pytest.raises(ConfigError, match=f"{option} must be >= 1, got 0"):
        resolve_decoding(DecodeConfig(), **{option: 0})


def test_the_cli_refuses_an_nbest_above_its_beam(tmp_path, capsys, checkpoint):
    src = tmp_path / "in.txt"
    src.write_text("ein hund\n", encoding="utf-8")
    argv = ["translate", "--checkpoint", str(checkpoint), "--input", str(src), "--beam", "2", "--nbest", "3"]
    assert main(argv) == 2
    assert "--nbest 3 cannot exceed --beam 2" in capsys.readouterr().err


# --------------------------------------------------------------------------- Translator


@pytest.fixture(scope="module")
def translator(checkpoint: Path) -> Translator:
    return Translator.from_checkpoint(checkpoint, "cpu")


def test_a_resolved_decode_is_taken_as_it_is(translator):
    lines = ["ein hund läuft", "", "die katze schläft"]
    short = resolve_decoding(translator.config.decode, beam=1)
    short.max_len_a, short.max_len_b = 0.0, 1  # at most one token: EOS, or one word piece
    got = translator.translate_nbest(lines, decode=short)
    assert got[1] == [("", 0.0)]
    assert all(len(translator.tokenizer.encode_tgt([t])[0]) <= 1 for hs in got for t, _ in hs)
    # The Python API's options give what the same settings resolved at an edge give.
    two = resolve_decoding(translator.config.decode, beam=2, nbest=2)
    assert translator.translate_nbest(lines, beam=2, nbest=2) == translator.translate_nbest(lines, decode=two)


def test_a_decode_and_options_together_are_refused(translator):
    with pytest.raises(TypeError, match="not both"):
        translator.translate_nbest(["ein hund"], beam=2, decode=translator.config.decode)


# --------------------------------------------------------------------------- the batch loop


def _lengths(n: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 30, n)


@pytest.mark.parametrize("workers", [1, 3])
def test_results_come_back_in_input_order_from_batches_within_the_budget(workers):
    lengths = _lengths(200)
    seen = []

    def decode_batch(idx: np.ndarray) -> list[int]:
        seen.append(idx)
        assert len(idx) == 1 or len(idx) * (lengths[idx].max() + 1) <= 64
        return [int(i) * 10 for i in idx]

    pool = ThreadPoolExecutor if workers > 1 else None
    assert decode_in_batches(lengths, 64, decode_batch, workers, pool) == [i * 10 for i in range(200)]
    assert sorted(int(i) for idx in seen for i in idx) == list(range(200))  # each sentence once


def test_workers_have_one_batch_running_and_at_most_one_waiting():
    lengths = _lengths(300)
    lock, running, submitted = threading.Lock(), [0], []

    def decode_batch(idx: np.ndarray) -> list[int]:
        with lock:
            running[0] += 1
            assert running[0] <= 2
        time.sleep(0.002)
        with lock:
            running[0] -= 1
        return [0] * len(idx)

    class Counting(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            future = super().submit(fn, *args, **kwargs)
            submitted.append(future)
            assert sum(not f.done() for f in submitted) <= 2 * 2 + 1  # the window, and the one just added
            return future

    assert len(decode_in_batches(lengths, 32, decode_batch, 2, Counting)) == 300
    assert len(submitted) > 8


def test_fewer_batches_than_workers_get_fewer_workers():
    sizes = []

    def pool(w: int) -> ThreadPoolExecutor:
        sizes.append(w)
        return ThreadPoolExecutor(w)

    # Three sentences, each its own batch at a budget of one token: three workers, not eight.
    decode_in_batches(np.array([5, 6, 7]), 100, lambda idx: [0] * len(idx), 8, pool)
    assert sizes == [3]
    # One batch: decoded on the calling thread, no pool at all.
    decode_in_batches(np.array([5]), 100, lambda idx: [0] * len(idx), 8, pool)
    assert decode_in_batches(np.array([], dtype=np.int64), 100, lambda idx: [], 8, pool) == []
    assert sizes == [3]
