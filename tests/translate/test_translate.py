"""`mt translate`: N lines in, N lines out, whatever the lines contain; atomic output, which a
failed or killed run (through tests/fault_driver.py, see helpers.run_mt) never destroys."""

from __future__ import annotations

import errno
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    KILLED,
    REPO,
    build_checkpoint,
    error_line,
    forked_children,
    nothing_left_running,
    one_thread,
    run_mt,
    running_processes,
    synthetic_pairs,
)

from mt.cli import main
from mt.config import DecodeConfig, resolve_decoding
from mt.errors import DataError
from mt.files import decode_lines
from mt.translate.search import Hypothesis
from mt.translate.translator import Translator, cpu_workers, format_nbest, one_line, translate_ids
from mt.workers import FORKS

# `checkpoint` is conftest's tiny trained checkpoint, shared by the session (read only).


@pytest.fixture(scope="session")
def translator(checkpoint: Path) -> Translator:
    return Translator.from_checkpoint(checkpoint, "cpu")


def run_cli(capsys: pytest.CaptureFixture[str], checkpoint: Path, *argv: str) -> tuple[int, str, str]:
    rc = main(["translate", "--checkpoint", str(checkpoint), *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


SRC, _ = synthetic_pairs(12, seed=5)


# --------------------------------------------------------------------------- line splitting


def test_decode_lines_splits_on_newline_only():
    assert decode_lines(b"", "x") == []
    assert decode_lines(b"\n", "x") == [""]
    assert decode_lines(b"a\nb", "x") == ["a", "b"]  # no final newline
    assert decode_lines(b"a\nb\n", "x") == ["a", "b"]
    assert decode_lines(b"a\r\n\r\nb\r\n", "x") == ["a", "", "b"]
    odd = "a\x0bb\x0cc\x1cd\x1de\x1ef\x85g\u2028h\u2029i"
    assert decode_lines((odd + "\n" + odd).encode(), "x") == [odd, odd]
    assert decode_lines("\ufeffa\n".encode(), "x") == ["a"]


def test_decode_lines_names_the_bad_line():
    with pytest.raises(DataError, match=r"in\.txt: line 3 is not valid UTF-8 \(byte 0xff at byte 2"):
        decode_lines(b"ok\nfine\nx\xffy\n", "in.txt")
    assert decode_lines(b"ok\nx\xffy", "in.txt", errors="replace") == ["ok", "x\ufffdy"]


def test_output_lines_never_break():
    assert one_line("a\nb\r\nc\rd") == "a b c d"
    assert format_nbest([("a\tb", -1.0), ("c\nd", -2.5)], 2) == "a b\t-1.0000\tc d\t-2.5000"
    assert format_nbest([("x\ny", -1.0)], 1) == "x y"


# --------------------------------------------------------------------------- N in, N out


def test_n_lines_in_n_lines_out(tmp_path, capsys, checkpoint, translator):
    lines = [SRC[0], "", "   \t ", SRC[1], "der\x0bhund", "die katze\u2028läuft", "ein\x1cball", SRC[2]]
    # CRLF line ends and no final newline.
    inp = write(tmp_path / "in.txt", "\r\n".join(lines).encode())
    rc, out, err = run_cli(capsys, checkpoint, "--input", str(inp), "--beam", "2")
    assert rc == 0, err
    assert out.endswith("\n")
    got = out.split("\n")[:-1]
    assert len(got) == len(lines)
    assert got[1] == "" and got[2] == ""
    assert all(got[i] for i in (0, 3, 7))  # a trained model says something for real sentences
    # The CLI and the API agree line for line.
    assert got == translator.translate(lines, beam=2)


def test_long_line_is_truncated_with_a_warning_not_dropped(tmp_path, capsys, checkpoint):
    long = " ".join(["hund katze"] * 1000)  # 2,000 words, far beyond max_positions 64
    inp = write(tmp_path / "in.txt", f"{SRC[0]}\n\n{long}\n{SRC[1]}\n".encode())
    rc, out, err = run_cli(capsys, checkpoint, "--input", str(inp), "--beam", "1")
    assert rc == 0, err
    assert len(out.split("\n")) == 5  # 4 lines + the final newline
    m = re.search(r"input line 3 has (\d+) tokens; translating its first 63", err)
    assert m and int(m.group(1)) >= 2000


@pytest.mark.parametrize("beam", ["1", "2"])
def test_long_line_with_a_model_that_never_stops(tmp_path, capsys, beam):
    # An untrained model rarely says EOS: its output reaches the length limit, which
    # 1.2 * 64 + 5 would put past the model's 64 positions; search caps it there.
    ck = build_checkpoint(tmp_path / "untrained.pt", steps=0)
    inp = write(tmp_path / "in.txt", (" ".join(["hund katze"] * 1000) + "\n").encode())
    rc, out, err = run_cli(capsys, ck, "--input", str(inp), "--beam", beam)
    assert rc == 0, err
    assert out.count("\n") == 1


def test_empty_input_gives_empty_output(tmp_path, capsys, checkpoint):
    inp = write(tmp_path / "in.txt", b"")
    out_path = tmp_path / "out.txt"
    rc, out, err = run_cli(capsys, checkpoint, "--input", str(inp), "--output", str(out_path))
    assert rc == 0, err
    assert out == "" and out_path.read_bytes() == b""


def test_bad_utf8_strict_names_the_line_replace_goes_on(tmp_path, capsys, checkpoint):
    inp = write(tmp_path / "in.txt", f"{SRC[0]}\n".encode() + b"ein \xff hund\n" + f"{SRC[1]}\n".encode())
    rc, out, err = run_cli(capsys, checkpoint, "--input", str(inp))
    assert rc == 2 and out == ""
    assert f"{inp}: line 2 is not valid UTF-8" in err and "--errors replace" in err

    rc, out, err = run_cli(capsys, checkpoint, "--input", str(inp), "--errors", "replace")
    assert rc == 0, err
    assert len(out.split("\n")) == 4


def test_batch_size_does_not_change_the_output(tmp_path, capsys, checkpoint):
    src, _ = synthetic_pairs(16, seed=9)
    inp = write(tmp_path / "in.txt", "".join(s + "\n" for s in src).encode())
    for beam in ("1", "2"):
        outs = []
        for max_tokens in ("16", "100000"):  # batches of one or two sentences vs. one batch
            rc, out, err = run_cli(
                capsys, checkpoint, "--input", str(inp), "--beam", beam,
                "--max-tokens", max_tokens,
            )
            assert rc == 0, err
            outs.append(out)
        assert outs[0] == outs[1]
        assert len(outs[0].split("\n")) == 17


def test_nbest_gives_one_line_of_pairs_per_input_line(tmp_path, capsys, checkpoint, translator):
    lines = [SRC[0], "", SRC[1]]
    inp = write(tmp_path / "in.txt", "\n".join(lines).encode())
    rc, out, err = run_cli(
        capsys, checkpoint, "--input", str(inp), "--nbest", "2", "--beam", "3"
    )
    assert rc == 0, err
    got = out.split("\n")[:-1]
    assert len(got) == 3 and got[1] == ""
    for line, src in zip([got[0], got[2]], [SRC[0], SRC[1]], strict=True):
        fields = line.split("\t")
        assert len(fields) == 4
        scores = [float(fields[1]), float(fields[3])]
        assert scores[0] >= scores[1]  # best first
        assert fields[0] == translator.translate_nbest([src], beam=3, nbest=2)[0][0][0]


def test_options_and_paths_are_checked(tmp_path, capsys, checkpoint):
    inp = write(tmp_path / "in.txt", b"ein hund\n")
    rc, _, err = run_cli(capsys, checkpoint, "--input", str(inp), "--beam", "0")
    assert rc == 2 and "--beam must be >= 1" in err
    rc, _, err = run_cli(capsys, tmp_path / "nope.pt", "--input", str(inp))
    assert rc == 2 and "nope.pt" in err
    rc, _, err = run_cli(capsys, checkpoint, "--input", str(tmp_path / "missing.txt"))
    assert rc == 2 and "missing.txt" in err
    bad_out = tmp_path / "no" / "such" / "dir" / "out.txt"
    rc, _, err = run_cli(capsys, checkpoint, "--input", str(inp), "--output", str(bad_out))
    assert rc == 2 and str(bad_out) in err
    rc, _, err = run_cli(capsys, checkpoint, "--input", str(inp), "--output", str(tmp_path))
    assert rc == 2 and "is a directory" in err


# --------------------------------------------------------------------------- atomic output


def test_output_is_written_atomically(tmp_path, capsys, checkpoint, monkeypatch):
    inp = write(tmp_path / "in.txt", "".join(s + "\n" for s in SRC).encode())
    out_path = write(tmp_path / "out.txt", b"precious\n")

    def boom(*args, **kwargs):
        raise RuntimeError("decoder exploded")

    with monkeypatch.context() as m:
        m.setattr(Translator, "translate_nbest", boom)
        with pytest.raises(RuntimeError, match="decoder exploded"):
            run_cli(capsys, checkpoint, "--input", str(inp), "--output", str(out_path))
    assert out_path.read_bytes() == b"precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]  # no temp file left

    rc, out, err = run_cli(capsys, checkpoint, "--input", str(inp), "--output", str(out_path))
    assert rc == 0 and out == "", err
    assert len(out_path.read_text(encoding="utf-8").split("\n")) == len(SRC) + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _oom(*args, **kwargs):
    raise MemoryError


@pytest.mark.parametrize("fault", ["ctrl-c", "out of memory", "disk full"])
def test_failed_translate_keeps_existing_output(tmp_path, monkeypatch, capsys, checkpoint, fault):
    inp = tmp_path / "in.txt"
    inp.write_text("".join(s + "\n" for s in SRC[:6]), encoding="utf-8")
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


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, mt_env, checkpoint):
    inp = tmp_path / "in.txt"
    inp.write_text("".join(s + "\n" for s in SRC * 50), encoding="utf-8")
    out = tmp_path / "out.txt"
    out.write_bytes(b"precious\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mt", "translate", "--checkpoint", str(checkpoint), "--input", str(inp),
         "--output", str(out), "--device", "cpu"],
        cwd=tmp_path, env=mt_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    tmp = tmp_path / f"out.txt.tmp-{proc.pid}"
    deadline = time.monotonic() + 60
    while not tmp.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tmp.exists(), "the output's temporary file never appeared"
    proc.send_signal(signal.SIGTERM)  # while it loads the model or translates: the file is open
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.rstrip("\n").endswith("mt translate: terminated") and "Traceback" not in err, err
    assert out.read_bytes() == b"precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]


@pytest.mark.slow
def test_sigkill_during_translate_keeps_output_whole(tmp_path, mt_env, checkpoint, capsys):
    src = SRC[:6]
    inp = tmp_path / "in.txt"
    inp.write_text("".join(s + "\n" for s in src), encoding="utf-8")
    existing = tmp_path / "out.txt"
    existing.write_bytes(b"precious\n")
    fresh = tmp_path / "fresh.txt"
    for out in (existing, fresh):
        argv = ["translate", "--checkpoint", str(checkpoint), "--input", str(inp), "--output", str(out),
                "--device", "cpu"]
        proc = run_mt(argv, tmp_path, mt_env, "translate")
        assert proc.returncode == KILLED, proc.stderr[-3000:]
    assert existing.read_bytes() == b"precious\n", "an existing output is never destroyed"
    assert not fresh.exists(), "no partial output"

    with one_thread():
        rc = main(["translate", "--checkpoint", str(checkpoint), "--input", str(inp),
                   "--output", str(existing), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert len(existing.read_text(encoding="utf-8").split("\n")) == len(src) + 1


# --------------------------------------------------------------------------- stdin and stdout


class _Stdin:
    """A stdin with these bytes in it, a terminal (lines already typed) or not (a pipe)."""

    def __init__(self, data: bytes, *, tty: bool) -> None:
        self.buffer = io.BytesIO(data)
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_interactive_prompt_translates_each_line(capsys, monkeypatch, checkpoint, translator):
    monkeypatch.setattr(sys, "stdin", _Stdin(f"{SRC[0]}\n\n{SRC[1]}\n".encode(), tty=True))
    rc, out, err = run_cli(capsys, checkpoint, "--beam", "2")
    assert rc == 0, err
    assert out.split("\n")[:-1] == translator.translate([SRC[0], "", SRC[1]], beam=2)
    assert "> " in err


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
    """The tests above read files; here the stdin path (not a terminal) and more odd inputs."""
    monkeypatch.setattr(sys, "stdin", _Stdin(data, tty=False))
    with one_thread():
        rc = main(["translate", "--checkpoint", str(checkpoint), "--device", "cpu", "--beam", "1",
                   "--errors", "replace"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.count("\n") == n and (out == "" or out.endswith("\n"))
    assert "\r" not in out


def test_subprocess_reads_stdin_and_writes_stdout(checkpoint, translator):
    lines = [SRC[0], "", "die\u2028katze", SRC[3]]
    data = ("\r\n".join(lines)).encode()  # CRLF, no final newline
    proc = subprocess.run(
        [sys.executable, "-m", "mt", "translate", "--checkpoint", str(checkpoint), "--beam", "2",
         "--device", "cpu"],
        input=data, capture_output=True, cwd=REPO, timeout=120,
        # Our output is UTF-8 whatever the locale says; one thread as in _one_thread.
        env={**os.environ, "PYTHONIOENCODING": "ascii", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode("utf-8").split("\n")[:-1] == translator.translate(lines, beam=2)


def test_dash_is_standard_input_and_output(tmp_path, monkeypatch, capsys, checkpoint, translator):
    monkeypatch.chdir(tmp_path)  # a file named "-" would appear here
    monkeypatch.setattr(sys, "stdin", _Stdin(f"{SRC[0]}\n{SRC[1]}\n".encode(), tty=False))
    rc, out, err = run_cli(capsys, checkpoint, "--input", "-", "--output", "-", "--beam", "2")
    assert rc == 0, err
    assert out.split("\n")[:-1] == translator.translate(SRC[:2], beam=2)
    assert list(tmp_path.iterdir()) == []


def _close_stdin() -> None:
    os.close(0)


def test_closed_stdin_is_a_one_line_error(checkpoint):
    proc = subprocess.run(  # `mt translate --checkpoint CK <&-`
        [sys.executable, "-m", "mt", "translate", "--checkpoint", str(checkpoint)],
        preexec_fn=_close_stdin, capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2
    assert "no standard input" in error_line(proc.stderr, "translate")


@pytest.mark.low_precision
def test_precision_option(tmp_path, capsys, checkpoint, translator):
    src = write(tmp_path / "in.txt", ("\n".join(SRC[:6]) + "\n\n").encode())
    rc, out, err = run_cli(capsys, checkpoint, "--input", str(src), "--precision", "bf16", "--beam", "1")
    assert rc == 0, err
    lines = out.split("\n")[:-1]
    assert len(lines) == 7 and lines[-1] == ""
    assert Translator.from_checkpoint(checkpoint, "cpu", "bf16").model.out_proj.weight.dtype == torch.bfloat16
    assert translator.model.out_proj.weight.dtype == torch.float32  # the checkpoint's default

    rc, out, err = run_cli(capsys, checkpoint, "--input", str(src), "--precision", "fp16", "--device", "cpu")
    assert rc == 2 and out == ""
    assert "decode.precision=fp16 needs a GPU; on CPU use bf16" in err


# --------------------------------------------------------------------------- batches on threads


def _ids(translator: Translator, n: int) -> list:
    src, _ = synthetic_pairs(n, seed=9)
    return translator._encode(src, range(1, n + 1))


@pytest.fixture(params=["threads", "processes"])
def side_by_side(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Batches side by side in threads, or in forked processes (where mt forks: Linux)."""
    forks = request.param == "processes"
    if forks and not FORKS:
        pytest.skip("decoder processes are forked on Linux only")
    monkeypatch.setattr("mt.workers.FORKS", forks)
    return request.param


@pytest.mark.parametrize("beam", [1, 3])
def test_batches_side_by_side_give_the_same_output(translator, beam, monkeypatch, side_by_side):
    seqs = _ids(translator, 40)
    one = DecodeConfig(beam=beam, max_len_b=5, inter_threads=1)
    three = DecodeConfig(beam=beam, max_len_b=5, inter_threads=3)
    assert cpu_workers(three, torch.device("cpu")) == 3
    assert cpu_workers(three, torch.device("meta")) == 1  # only on CPU
    ref = translate_ids(translator.model, seqs, resolve_decoding(one, max_tokens=64))  # one after another
    monkeypatch.setattr(translator.config, "decode", three)
    out = translator.translate_ids(seqs, resolve_decoding(three, max_tokens=64))  # three side by side
    assert torch.get_num_threads() == 1  # restored
    assert [[h.tokens for h in hs] for hs in out] == [[h.tokens for h in hs] for hs in ref]


def test_an_error_in_one_worker_stops_the_rest(translator, monkeypatch, tmp_path, side_by_side):
    calls = tmp_path / "calls"  # a byte per call, in a file: processes append to it too

    def failing(model, src, **kw):  # the first batch fails at once, the others take a while
        fd = os.open(calls, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, b"x")  # one write, atomic: the offset after it counts the calls so far
            first = os.lseek(fd, 0, os.SEEK_CUR) == 1
        finally:
            os.close(fd)
        if first:
            raise RuntimeError("boom")
        time.sleep(1.0)  # while the main thread stops the pool
        return [[] for _ in range(src.size(0))]

    monkeypatch.setattr("mt.translate.translator.greedy", failing)
    monkeypatch.setattr(translator.config.decode, "inter_threads", 2)
    seqs = _ids(translator, 40)
    with pytest.raises(RuntimeError, match="boom"):
        translator.translate_ids(seqs, resolve_decoding(translator.config.decode, beam=1, max_tokens=16))
    # About 20 batches (of at most 16 tokens): all but the failing one and those already running
    # or queued on the two workers when it failed are dropped (which of them fails first is a race).
    assert len(calls.read_bytes()) <= 6
    assert torch.get_num_threads() == 1 and not translator.model.training


def test_each_worker_gets_its_share_of_threads_and_the_count_is_restored(
    translator, monkeypatch, side_by_side
):
    def counting(model, src, **kw):  # the thread count each batch ran with, as its output
        return [Hypothesis([torch.get_num_threads()], 0.0, 0.0) for _ in range(src.size(0))]

    monkeypatch.setattr("mt.translate.translator.greedy", counting)
    seqs = _ids(translator, 24)
    torch.set_num_threads(2)
    try:
        decode = resolve_decoding(translator.config.decode, beam=1, max_tokens=64)
        out = translator.translate_ids(seqs, decode)
        assert {hs[0].tokens[0] for hs in out} == {1}  # 2 batches at a time, one torch thread each
        assert torch.get_num_threads() == 2
        later: list[int] = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [2]  # threads started afterwards get the caller's count back too
    finally:
        torch.set_num_threads(1)


@pytest.mark.skipif(not FORKS, reason="decoder processes are forked on Linux only")
def test_sigterm_while_decoder_processes_run_ends_them_and_cleans_up(tmp_path, mt_env, checkpoint):
    inp = tmp_path / "in.txt"
    inp.write_text("".join(s + "\n" for s in SRC * 400), encoding="utf-8")
    out = tmp_path / "out.txt"
    out.write_bytes(b"precious\n")
    argv = [sys.executable, "-m", "mt", "translate", "--checkpoint", str(checkpoint), "--input", str(inp),
            "--output", str(out), "--device", "cpu", "--max-tokens", "64"]
    env = {**mt_env, "OMP_NUM_THREADS": "2"}  # two torch threads: two batches side by side
    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    with nothing_left_running(proc, argv):
        forked = forked_children(proc, 2, timeout=60)
        assert len(forked) >= 2, f"no decoder processes seen (exit status: {proc.poll()})"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, err
        assert err.rstrip("\n").endswith("mt translate: terminated") and "Traceback" not in err, err
        assert out.read_bytes() == b"precious\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]
        assert not running_processes(argv), "decoder processes outlived the run"


# --------------------------------------------------------------------------- --alignment


def test_alignment_appends_fairseq_pairs_after_a_tab(tmp_path, capsys, checkpoint, translator):
    lines = [SRC[0], "", SRC[1]]
    src = write(tmp_path / "in.txt", ("\n".join(lines) + "\n").encode())
    rc, out, err = run_cli(capsys, checkpoint, "--input", str(src), "--beam", "2", "--alignment")
    assert rc == 0, err
    got = out.split("\n")[:-1]
    assert len(got) == 3 and got[1] == ""
    for line, expected, row in zip(lines, translator.translate(lines, beam=2), got, strict=True):
        if not line:
            continue
        text, pairs = row.split("\t")
        assert text == expected
        pairs = [tuple(map(int, p.split("-"))) for p in pairs.split()]
        assert [j for _, j in pairs] == list(range(len(text.split())))
        assert all(0 <= i < len(line.split()) for i, _ in pairs)
    rc, out, err = run_cli(capsys, checkpoint, "--input", str(src), "--alignment", "--nbest", "2")
    assert rc == 2 and "--alignment goes with one translation per line" in err
