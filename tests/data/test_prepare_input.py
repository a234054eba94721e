"""mt prepare on bad input (missing, mismatched, undecodable or hostile files, a full disk) and on
the hub path through `datasets`: one-line errors naming the file and line, and nothing lost."""

from __future__ import annotations

import errno
import gzip
import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
from helpers import (
    corpus_config,
    corpus_files,
    error_line,
    make_corpus,
    prepare_corpus,
    synthetic_pairs,
    write_lines,
)

from mt.cli import main
from mt.config import load_config
from mt.data.dataset import load_prepared
from mt.data.prepare import prepare
from mt.errors import DataError

# --------------------------------------------------------------------------- bad input


def _expect_error(tmp_path, corpus, match, old=None):
    cfg = load_config(corpus_config(tmp_path, corpus))
    with pytest.raises(DataError, match=match):
        prepare(cfg, quiet=True)
    assert not list(cfg.prepared_dir.parent.glob(".*tmp*")), "no half-written cache"
    if old is not None:
        assert json.loads((cfg.prepared_dir / "meta.json").read_text())["fingerprint"] == old


def test_missing_file_is_named(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    (corpus / "test.en.gz").unlink()
    _expect_error(tmp_path, corpus, r"missing corpus file: .*test\.en")


def test_mismatched_line_counts_name_both_files(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    _, out = prepare_corpus(tmp_path, corpus)
    old = json.loads((out / "meta.json").read_text())["fingerprint"]
    src, _ = synthetic_pairs(29, 1)
    write_lines(corpus / "val.de", src, gz=True)
    _expect_error(tmp_path, corpus, r"val\.de\.gz has 29 lines but .*val\.en\.gz has 30", old=old)


def test_bad_utf8_names_file_and_line(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    src, _ = synthetic_pairs(400, 0)
    data = ("\n".join(src[:6]) + "\n").encode() + b"caf\xe9 au lait\n" + ("\n".join(src[7:]) + "\n").encode()
    with gzip.open(corpus / "train.de.gz", "wb") as f:
        f.write(data)
    _expect_error(tmp_path, corpus, r"train\.de\.gz:7: not valid UTF-8")


def test_nothing_left_after_cleaning(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    write_lines(corpus / "train.de", ["", " ", "x"], gz=True)
    write_lines(corpus / "train.en", ["a", "b", ""], gz=True)
    _expect_error(tmp_path, corpus, "nothing left")


def test_empty_split_is_an_error(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    write_lines(corpus / "test.de", [], gz=True)
    write_lines(corpus / "test.en", [], gz=True)
    _expect_error(tmp_path, corpus, "split 'test' is empty")


def test_failure_keeps_previous_cache(tmp_path, monkeypatch):
    corpus = make_corpus(tmp_path / "corpus")
    cfg, out = prepare_corpus(tmp_path, corpus)
    old = json.loads((out / "meta.json").read_text())["fingerprint"]
    import mt.data.prepare as prep

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(prep, "_write_arrays", boom)
    cfg2 = load_config(corpus_config(tmp_path, corpus), ["data.vocab_size=50"])
    with pytest.raises(RuntimeError):
        prepare(cfg2, quiet=True)
    assert json.loads((out / "meta.json").read_text())["fingerprint"] == old
    assert not list(out.parent.glob(".*tmp*"))


@pytest.mark.parametrize("where", ["our arrays", "inside datasets"])
def test_a_full_disk_while_preparing_is_one_line_and_keeps_the_cache(tmp_path, monkeypatch, capsys, where):
    corpus = make_corpus(tmp_path / "corpus")
    cfg, out = prepare_corpus(tmp_path, corpus)
    meta = (out / "meta.json").read_text()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "disk" / "file"))

    overrides = ["data.vocab_size=50"]
    if where == "our arrays":
        monkeypatch.setattr("mt.data.prepare._write_arrays", full)
    else:  # the Arrow files `datasets` writes for a hub data set it loads
        monkeypatch.setattr(datasets.arrow_writer.ArrowWriter, "write_table", full)
        overrides += [f"data.hub={_hub_layout(tmp_path / 'hub')}", "data.local_dir=null"]
    assert main(["prepare", str(tmp_path / "exp.yaml"), *overrides]) == 2
    line = error_line(capsys.readouterr().err, "prepare")
    assert f"cannot write {tmp_path / 'disk' / 'file'}: No space left on device" in line
    assert f"the prepared cache {out} is as it was" in line
    assert (out / "meta.json").read_text() == meta
    assert not list(out.parent.glob(".*tmp*"))


def _prepare_cli(tmp_path: Path, corpus: Path, capsys, *overrides: str) -> tuple[int, str]:
    rc = main(["prepare", str(corpus_config(tmp_path, corpus)), *overrides])
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
    corpus = corpus_files(tmp_path / "corpus", {
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


@pytest.mark.parametrize("joint", [True, False])
def test_vocab_size_beyond_the_corpus_warns_once_per_model(tmp_path, capsys, joint):
    corpus = make_corpus(tmp_path / "corpus", n_train=100)
    prepare_corpus(tmp_path / "fits", corpus, "data.vocab_size=30", f"data.joint_vocab={joint}")
    assert "warning" not in capsys.readouterr().err

    _, out = prepare_corpus(tmp_path / "big", corpus, "data.vocab_size=60000", f"data.joint_vocab={joint}")
    meta = json.loads((out / "meta.json").read_text())
    sizes = [meta["src_vocab_size"]] if joint else [meta["src_vocab_size"], meta["tgt_vocab_size"]]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        f"mt: warning: data.vocab_size 60000 is more than this corpus supports; using {n}" for n in sizes
    ]
    assert max(sizes) < 1000


def test_vocabulary_too_small_for_the_alphabet_is_a_data_error(tmp_path, capsys):
    src, tgt = synthetic_pairs(100, seed=0)
    cjk = [chr(0x4E00 + 7 * i) + chr(0x4E01 + 11 * i) for i in range(100)]  # 200 distinct characters
    corpus = corpus_files(tmp_path / "corpus", {"train": (cjk, tgt), "val": (src[:5], tgt[:5]),
                                                "test": (src[:5], tgt[:5])})
    rc, err = _prepare_cli(tmp_path, corpus, capsys)  # vocab_size 60
    assert rc == 2
    line = error_line(err, "prepare")
    assert "data.vocab_size" in line and "character_coverage" in line
    assert not list(tmp_path.glob(".prepared*")), "no half-written cache"


def test_mismatched_plain_files_via_the_cli(tmp_path, capsys):
    src, tgt = synthetic_pairs(50, seed=0)
    corpus = corpus_files(tmp_path / "corpus", {"train": (src, tgt[:-1]), "val": (src[:5], tgt[:5]),
                                                "test": (src[:5], tgt[:5])})
    rc, err = _prepare_cli(tmp_path, corpus, capsys)
    assert rc == 2
    line = error_line(err, "prepare")
    assert f"{corpus / 'train.de'} has 50 lines but {corpus / 'train.en'} has 49" in line


def test_undecodable_and_corrupt_files_name_the_file(tmp_path, capsys):
    src, tgt = synthetic_pairs(50, seed=0)
    corpus = corpus_files(tmp_path / "corpus", {"train": (src, tgt), "val": (src[:5], tgt[:5]),
                                                "test": (src[:5], tgt[:5])})
    good = (corpus / "val.en").read_bytes()
    (corpus / "val.en").write_bytes(good.replace(b"\n", b"\n\xc3\x28 \xff\n", 1)[: len(good) + 5])
    rc, err = _prepare_cli(tmp_path, corpus, capsys)
    assert rc == 2 and f"{corpus / 'val.en'}:2: not valid UTF-8" in error_line(err, "prepare")
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
        assert f"{corpus / 'test.en.gz'}: cannot read" in error_line(err, "prepare"), name


def test_empty_valid_split_via_the_cli(tmp_path, capsys):
    src, tgt = synthetic_pairs(50, seed=0)
    corpus = corpus_files(tmp_path / "corpus", {"train": (src, tgt), "val": ([], []), "test": (src, tgt)})
    rc, err = _prepare_cli(tmp_path, corpus, capsys)
    assert rc == 2 and "split 'valid' is empty" in error_line(err, "prepare")


# --------------------------------------------------------------------------- the hub path


def _hub_layout(root, translation_column=True):
    """A data set directory laid out as on the hub: one JSON-lines file per split."""
    root.mkdir(parents=True)
    for split, n, seed in (("train", 300, 0), ("validation", 20, 1), ("test", 20, 2)):
        src, tgt = synthetic_pairs(n, seed)
        with open(root / f"{split}.jsonl", "w") as f:
            for s, t in zip(src, tgt, strict=True):
                row = {"translation": {"de": s, "en": t}} if translation_column else {"de": s, "en": t}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return root


@pytest.mark.parametrize("translation_column", [True, False])
def test_hub_path_through_datasets(tmp_path, translation_column):
    hub = _hub_layout(tmp_path / "hub", translation_column)
    cfg = load_config(
        corpus_config(tmp_path, tmp_path / "missing"),
        [f"data.hub={hub}", "data.local_dir=null"],
    )
    out = prepare(cfg, quiet=True)
    data = load_prepared(out)
    assert len(data.split("train")) == 300
    assert data.text("valid", "tgt") == synthetic_pairs(20, 1)[1]
    assert data.text("test", "src") == synthetic_pairs(20, 2)[0]


def test_hub_unreachable_is_a_clear_error(tmp_path):
    cfg = load_config(
        corpus_config(tmp_path, tmp_path / "missing"),
        ["data.hub=nobody/no-such-dataset-xyz", "data.local_dir=null"],
    )
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(DataError, match="cannot load 'nobody/no-such-dataset-xyz'"):
        prepare(cfg, quiet=True)


def test_arrays_are_compact_and_memory_mapped(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    _, out = prepare_corpus(tmp_path, corpus)
    train = load_prepared(out).split("train")
    assert train.src_ids.dtype == np.uint16 and isinstance(train.src_ids, np.memmap)
    assert train.src_idx[0] == 0 and np.all(np.diff(train.src_idx) >= 0)
    assert datasets.__version__  # prepared through datasets
