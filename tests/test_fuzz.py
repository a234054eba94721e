"""Property tests: whatever text or bytes come in, translation keeps N lines in, N lines out,
and loading a corpus either works or fails with an MTError, never another exception."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from helpers import build_checkpoint, corpus_config
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from mt.cli import main
from mt.config import load_config, resolve_decoding
from mt.data import sources
from mt.data.dataset import load_prepared
from mt.data.prepare import prepare
from mt.errors import MTError
from mt.files import decode_lines
from mt.translate.translator import Translator, translate_lines

FAST = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Any character that UTF-8 can encode (no surrogates); lines themselves never contain "\n".
CHARS = st.characters(exclude_categories=("Cs",))
LINE = st.text(CHARS.filter(lambda c: c != "\n"), max_size=40)
LINES = st.lists(LINE, max_size=8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("fuzz_ck") / "tiny.pt", steps=20)


@pytest.fixture(scope="module")
def translator(checkpoint: Path) -> Translator:
    return Translator.from_checkpoint(checkpoint, "cpu")


# --------------------------------------------------------------------------- translation


@FAST
@given(lines=LINES, beam=st.sampled_from([1, 2]))
def test_translator_keeps_line_count_and_order(translator, lines, beam):
    out = translator.translate(lines, beam=beam)
    assert len(out) == len(lines)
    assert all(isinstance(t, str) for t in out)
    for line, t in zip(lines, out, strict=True):
        if not line.strip():
            assert t == ""
    # Order: each line alone gives what it gave in the batch.
    if lines:
        i = len(lines) // 2
        assert translator.translate([lines[i]], beam=beam) == [out[i]]


@FAST
@given(lines=LINES, final_newline=st.booleans(), crlf=st.booleans(), bom=st.booleans())
def test_cli_reading_and_writing_keep_n_lines(translator, lines, final_newline, crlf, bom):
    assume(final_newline or not lines or lines[-1] != "")  # a last empty line needs its newline
    end = "\r\n" if crlf else "\n"
    text = end.join(lines) + (end if final_newline and lines else "")
    data = (("\ufeff" if bom else "") + text).encode("utf-8")
    read = decode_lines(data, "stdin")
    assert len(read) == len(lines)
    out = translate_lines(translator, read, resolve_decoding(translator.config.decode, beam=1))
    written = "".join(line + "\n" for line in out)
    assert written.split("\n")[:-1] == out and len(out) == len(lines)
    assert "\r" not in written


@settings(FAST, max_examples=10)
@given(data=st.binary(max_size=200))
def test_cli_any_bytes_n_lines_out(tmp_path_factory, capsys, checkpoint, data):
    d = tmp_path_factory.mktemp("cli")
    inp, out = d / "in.txt", d / "out.txt"
    inp.write_bytes(data)
    rc = main(["translate", "--checkpoint", str(checkpoint), "--input", str(inp), "--output", str(out),
               "--device", "cpu", "--beam", "1", "--errors", "replace"])
    assert rc == 0, capsys.readouterr().err
    text = data.decode("utf-8", errors="replace").removeprefix("\ufeff")
    n = text.count("\n") + (1 if text and not text.endswith("\n") else 0)
    assert out.read_bytes().count(b"\n") == n
    capsys.readouterr()


# --------------------------------------------------------------------------- loading a corpus


def _pair(d: Path, src: bytes, tgt: bytes, gz: bool) -> sources.LocalPair:
    paths = []
    for name, data in (("x.de", src), ("x.en", tgt)):
        p = d / (name + (".gz" if gz else ""))
        p.write_bytes(gzip.compress(data) if gz else data)
        paths.append(p)
    return sources.LocalPair("train", paths[0], paths[1])


def _expected_count(data: bytes) -> int:
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


@settings(FAST, max_examples=60)
@given(src=st.binary(max_size=100), tgt=st.binary(max_size=100), gz=st.booleans())
def test_check_pair_on_any_bytes_loads_or_raises_mterror(tmp_path_factory, src, tgt, gz):
    pair = _pair(tmp_path_factory.mktemp("bytes"), src, tgt, gz)
    try:
        n = sources.check_pair(pair)
    except MTError:
        event("MTError")
        return
    event("loaded")
    assert n == _expected_count(src) == _expected_count(tgt)


@settings(FAST, max_examples=60)
@given(lines=st.lists(st.text(CHARS.filter(lambda c: c != "\n"), max_size=20), max_size=6))
def test_lines_of_any_utf8_text_round_trip(tmp_path_factory, lines):
    p = tmp_path_factory.mktemp("text") / "x.de"
    p.write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))
    got = list(sources._lines(p))
    expected = [line.rstrip("\r") for line in lines]
    if expected:
        expected[0] = expected[0].removeprefix("\ufeff")
    assert got == expected


@settings(FAST, max_examples=60)
@given(data=st.binary(min_size=1, max_size=300), where=st.integers(min_value=0), flip=st.integers(1, 255))
def test_damaged_gzip_loads_or_raises_mterror(tmp_path_factory, data, where, flip):
    raw = bytearray(gzip.compress(data))
    raw[where % len(raw)] ^= flip
    p = tmp_path_factory.mktemp("gz") / "x.de.gz"
    p.write_bytes(bytes(raw))
    try:
        list(sources._lines(p))
        event("loaded")
    except MTError:
        event("MTError")


SENTENCE = st.text(CHARS.filter(lambda c: c != "\n"), min_size=0, max_size=30)


@settings(FAST, max_examples=8)
@given(
    train=st.lists(st.tuples(SENTENCE, SENTENCE), min_size=1, max_size=25),
    valid=st.lists(st.tuples(SENTENCE, SENTENCE), min_size=1, max_size=5),
    vocab=st.sampled_from([16, 2000]),
)
def test_prepare_any_text_prepares_or_raises_mterror(tmp_path_factory, train, valid, vocab):
    """Valid keeps every line in order (stripped; a CR inside a line becomes a space). A small
    vocabulary often cannot hold the alphabet of random text: that must be an MTError too."""
    root = tmp_path_factory.mktemp("prep")
    corpus = root / "corpus"
    corpus.mkdir()
    for stem, pairs in (("train", train), ("val", valid), ("test", valid)):
        for i, lang in enumerate(("de", "en")):
            (corpus / f"{stem}.{lang}").write_bytes("".join(p[i] + "\n" for p in pairs).encode("utf-8"))
    cfg = load_config(corpus_config(root, corpus), [f"data.vocab_size={vocab}"])
    try:
        out = prepare(cfg, quiet=True)
    except MTError as e:
        event(f"MTError: {str(e)[:40]}")
        return
    event("prepared")
    data = load_prepared(out)
    for side, i in (("src", 0), ("tgt", 1)):
        lines = [p[i] for p in valid]
        lines[0] = lines[0].removeprefix("\ufeff")
        assert data.text("valid", side) == [s.strip().replace("\r", " ") for s in lines]
    assert len(data.split("valid")) == len(valid)
