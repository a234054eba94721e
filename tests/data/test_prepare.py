"""`mt prepare`: the cache it writes and when it prepares again; valid and test keep every line;
a killed run leaves the old cache or none, never half of one (the kills through
tests/fault_driver.py, see helpers.run_mt); memory stays bounded. Bad input: test_prepare_input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    KILLED,
    corpus_config,
    forked_children,
    make_corpus,
    nothing_left_running,
    prepare_corpus,
    run_mt,
    running_processes,
    synthetic_pairs,
    write_lines,
)

from mt.config import load_config
from mt.data.dataset import load_prepared
from mt.data.prepare import is_up_to_date, prepare


def test_prepare_writes_cache_and_is_idempotent(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus")
    cfg, out = prepare_corpus(tmp_path, corpus)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["read"] == 400
    assert meta["splits"]["valid"]["kept"] == 30 and meta["splits"]["test"]["kept"] == 30
    assert (out / "config.yaml").exists() and (out / "spm.src.model").exists()

    data = load_prepared(out)
    train = data.split("train")
    assert len(train) == meta["splits"]["train"]["kept"]
    assert train.src_lens.sum() == meta["splits"]["train"]["src_tokens"]
    # The cached ids are exactly what the tokenizer gives for the text.
    src, _ = synthetic_pairs(400, 0)
    assert train.src(0).tolist() == data.tokenizer.encode_src([src[0]])[0]

    mtime = (out / "meta.json").stat().st_mtime_ns
    prepare(cfg)
    assert "up to date" in capsys.readouterr().out
    assert (out / "meta.json").stat().st_mtime_ns == mtime
    assert not list(out.parent.glob(".*tmp*")), "no temporary directories left behind"


def test_changed_setting_or_input_prepares_again(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    _, out = prepare_corpus(tmp_path, corpus)
    fp1 = json.loads((out / "meta.json").read_text())["fingerprint"]
    _, out = prepare_corpus(tmp_path, corpus, "data.vocab_size=50")
    fp2 = json.loads((out / "meta.json").read_text())["fingerprint"]
    assert fp1 != fp2
    src, tgt = synthetic_pairs(100, 7)
    write_lines(corpus / "train.de", src, gz=True)
    write_lines(corpus / "train.en", tgt, gz=True)
    os.utime(corpus / "train.de.gz", ns=(1, 1))  # a different mtime even on coarse clocks
    _, out = prepare_corpus(tmp_path, corpus, "data.vocab_size=50")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["fingerprint"] != fp2 and meta["splits"]["train"]["read"] == 100


def test_valid_and_test_keep_every_line_in_order(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    src, tgt = synthetic_pairs(20, 3)
    src[3], tgt[3] = "", ""  # empty pair
    src[5], tgt[5] = "   ", "\t"  # whitespace only
    src[8] = " ".join(["hund"] * 300)  # far over max_len
    tgt[11] = "ein"  # extreme length ratio
    src[11] = "der mann sitzt im park mit dem ball und dem roten hund auf der katze"
    write_lines(corpus / "val.de", src, gz=True)
    write_lines(corpus / "val.en", tgt, gz=True)
    _, out = prepare_corpus(tmp_path, corpus)
    data = load_prepared(out)
    valid = data.split("valid")
    assert len(valid) == 20
    assert data.text("valid", "src") == [s.strip() for s in src]
    assert data.text("valid", "tgt") == [t.strip() for t in tgt]
    assert valid.src_lens[3] == 0 and valid.src_lens[8] >= 300
    for i in range(20):
        assert data.tokenizer.tgt.decode(valid.tgt(i).tolist()) == data.tokenizer.tgt.decode(
            data.tokenizer.encode_tgt([tgt[i].strip()])[0]
        )


def test_training_split_cleaning_is_counted(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    src, tgt = synthetic_pairs(50, 4)
    src[0] = ""  # empty
    tgt[1] = "  "  # empty after strip
    src[2] = " ".join(["katze"] * 200)  # too long
    tgt[2] = " ".join(["cat"] * 200)
    src[3] = "der mann sitzt im park mit dem ball und dem roten hund auf der katze im park"
    tgt[3] = "a"  # ratio
    write_lines(corpus / "train.de", src, gz=True)
    write_lines(corpus / "train.en", tgt, gz=True)
    _, out = prepare_corpus(tmp_path, corpus)
    st = json.loads((out / "meta.json").read_text())["splits"]["train"]
    assert st["read"] == 50
    assert st["dropped"] == {"empty": 2, "too_long": 1, "ratio": 1}
    assert st["kept"] == 46


def test_plain_text_files_and_bom(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", gz=False)
    src, tgt = synthetic_pairs(30, 1)
    (corpus / "val.de").write_bytes(("\ufeff" + "\n".join(src) + "\n").encode())
    _, out = prepare_corpus(tmp_path, corpus)
    assert load_prepared(out).text("valid", "src")[0] == src[0]


def test_max_train_pairs_takes_a_slice(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    _, out = prepare_corpus(tmp_path, corpus, "data.max_train_pairs=100")
    assert json.loads((out / "meta.json").read_text())["splits"]["train"]["read"] == 100


def test_separate_vocabularies_and_bpe(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    overrides = ("data.joint_vocab=false", "data.spm_type=bpe", "data.vocab_size=50")
    _, out = prepare_corpus(tmp_path, corpus, *overrides)
    data = load_prepared(out)
    assert not data.tokenizer.joint
    assert data.tokenizer.src.id_to_piece(3) == "</s>" and data.tokenizer.src.pad_id() == 0


# --------------------------------------------------------------------------- interrupted preparation


def _stale(prepared: Path) -> list[str]:
    return sorted(p.name for p in prepared.parent.glob(f".{prepared.name}.*"))


@pytest.mark.slow
def test_sigkill_during_prepare_leaves_old_cache_or_none(tmp_path, mt_env):
    corpus = make_corpus(tmp_path / "corpus", n_train=100, n_valid=10, n_test=10)
    config = corpus_config(tmp_path, corpus)
    out = tmp_path / "prepared"

    # No cache yet: a killed run leaves none (and a temp directory that is not a cache).
    proc = run_mt(["prepare", str(config)], tmp_path, mt_env, "prepare")
    assert proc.returncode == KILLED, proc.stderr[-3000:]
    assert not out.exists()
    assert len(_stale(out)) == 1

    old_cfg = load_config(config)
    prepare(old_cfg, quiet=True)  # cleans up the dead run's temp directory
    assert _stale(out) == []
    old_meta = (out / "meta.json").read_text()

    # A complete cache: a run killed while writing arrays leaves it as it was.
    proc = run_mt(["prepare", str(config), "data.vocab_size=50"], tmp_path, mt_env, "prepare")
    assert proc.returncode == KILLED, proc.stderr[-3000:]
    assert (out / "meta.json").read_text() == old_meta and is_up_to_date(old_cfg)
    assert len(load_prepared(out).split("train")) == 100
    assert len(_stale(out)) == 1

    # Killed between moving the old cache aside and the new one in: no cache, never half of one.
    proc = run_mt(["prepare", str(config), "data.vocab_size=50"], tmp_path, mt_env, "swap")
    assert proc.returncode == KILLED, proc.stderr[-3000:]
    assert not out.exists() or (out / "meta.json").read_text() == old_meta
    assert not is_up_to_date(load_config(config, ["data.vocab_size=50"]))

    new_cfg = load_config(config, ["data.vocab_size=50"])
    prepare(new_cfg, quiet=True)
    assert _stale(out) == [], "stale temporary and old directories are removed"
    assert is_up_to_date(new_cfg) and len(load_prepared(out).split("valid")) == 10


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="workers die with their parent through Linux's prctl")
def test_workers_die_with_a_killedprepare_corpus(tmp_path, mt_env):
    corpus = make_corpus(tmp_path / "corpus", n_train=20_000)  # prepare uses num_proc from 20,000 pairs
    # The config's path is unique to this test, and forked workers keep their parent's command line.
    argv = [sys.executable, "-m", "mt", "prepare", str(corpus_config(tmp_path, corpus)), "data.num_proc=2"]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=mt_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    with nothing_left_running(proc, argv):
        # Encoding forks two workers, which would wait for work forever if their parent is killed.
        forked = forked_children(proc, 2, timeout=120)
        assert len(forked) >= 2, f"no workers seen (prepare's exit status: {proc.poll()})"
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while running_processes(argv) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running_processes(argv), "workers outlived their parent"


# --------------------------------------------------------------------------- bounded memory


def _cache_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".npy", ".txt", ".model")}


def test_chunked_encoding_in_worker_processes_writes_the_same_cache(tmp_path, monkeypatch):
    corpus = make_corpus(tmp_path / "corpus", n_train=400)
    # num_proc also sets SentencePiece's threads, on which its model depends: the same for both.
    _, whole = prepare_corpus(tmp_path / "whole", corpus, "data.num_proc=2")
    monkeypatch.setattr("mt.data.prepare.CHUNK", 7)  # many chunks, the last one short
    monkeypatch.setattr("mt.data.prepare.POOL_FROM", 100)  # the training split goes to two workers
    _, chunked = prepare_corpus(tmp_path / "chunked", corpus, "data.num_proc=2")
    assert _cache_files(chunked) == _cache_files(whole)


def test_a_fast_reader_never_queues_more_than_two_chunks_per_worker():
    from helpers import tiny_spm

    from mt.data.prepare import _encoded, _Encoder
    from mt.data.tokenizer import Tokenizer

    pulled = []

    def chunks():
        for i in range(50):
            pulled.append(i)
            yield synthetic_pairs(20, seed=i)

    tok = Tokenizer(tiny_spm())
    encoder = _Encoder(tok.src_proto, tok.tgt_proto, np.dtype(np.uint16), 40, 3.0, clean=True)
    encoded = _encoded(chunks(), encoder, workers=2)
    first = next(encoded)
    assert len(pulled) <= 4 and first.reason.shape == (20,)
    assert sum(len(e.reason) for e in encoded) == 49 * 20  # the rest, in order, then the pool ends


def test_sentencepiece_learns_from_a_bounded_sample_of_the_training_pairs(tmp_path, monkeypatch):
    import mt.data.prepare as prep

    seen: list[list[str]] = []
    real = prep.train_spm

    def recording(sentences, cfg):
        seen.append(list(sentences))
        return real(iter(seen[-1]), cfg)

    monkeypatch.setattr(prep, "train_spm", recording)
    corpus = make_corpus(tmp_path / "corpus", n_train=400)
    prepare_corpus(tmp_path / "a", corpus, "data.spm_max_sentences=200")
    prepare_corpus(tmp_path / "b", corpus, "data.spm_max_sentences=200")
    assert len(seen[0]) == 200  # 100 pairs, both sides: a joint model
    assert seen[0] == seen[1], "the same sample every time"
    src, tgt = synthetic_pairs(400, 0)
    assert set(seen[0]) <= set(src) | set(tgt) and set(seen[0]) != set(src[:100]) | set(tgt[:100])
