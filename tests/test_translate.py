"""`mt translate`: N lines in, N lines out, whatever the lines contain; atomic output.

Also home of `build_checkpoint`, the tiny trained checkpoint the translate, evaluate
and average tests share.
"""

from __future__ import annotations

import functools
import io
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, one_thread, synthetic_pairs

from mt.checkpoint import save_checkpoint
from mt.cli import main
from mt.config import Config, DataConfig, DecodeConfig, ModelConfig, to_dict
from mt.errors import DataError
from mt.files import decode_lines
from mt.model import Transformer
from mt.search import greedy
from mt.special import BOS, EOS, PAD
from mt.tokenizer import Tokenizer, train_spm
from mt.translator import Translator, cpu_workers, format_nbest, one_line, translate_ids

# --------------------------------------------------------------------------- a tiny checkpoint


@functools.lru_cache(maxsize=1)
def tiny_spm() -> bytes:
    src, tgt = synthetic_pairs(200, seed=0)
    return train_spm(src + tgt, DataConfig(vocab_size=60, num_proc=1))


def tiny_config(**model: object) -> Config:
    cfg = Config(name="tiny")
    cfg.data.max_len = 40
    # max_positions small, so that a 2,000-token line really is over the model's limit.
    cfg.model = ModelConfig(d_model=16, heads=2, ffn_dim=32, layers=1, dropout=0.0, max_positions=64)
    for k, v in model.items():
        setattr(cfg.model, k, v)
    cfg.decode = DecodeConfig(beam=2, max_len_b=5)
    return cfg


def _batch(tok: Tokenizer, src: list[str], tgt: list[str]) -> tuple[torch.Tensor, ...]:
    def pad(rows: list[list[int]]) -> torch.Tensor:
        out = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        return out

    s = [ids + [EOS] for ids in tok.encode_src(src)]
    t = tok.encode_tgt(tgt)
    return pad(s), pad([[BOS] + ids for ids in t]), pad([ids + [EOS] for ids in t])


def build_checkpoint(
    path: Path,
    cfg: Config | None = None,
    src_proto: bytes | None = None,
    tgt_proto: bytes | None = None,
    steps: int = 40,
    seed: int = 0,
) -> Path:
    """Save a checkpoint as the trainer writes it: a tiny model, trained `steps` steps on synthetic pairs."""
    cfg = cfg or tiny_config()
    src_proto = src_proto or tiny_spm()
    tgt_proto = tgt_proto or src_proto
    tok = Tokenizer(src_proto, tgt_proto)
    torch.manual_seed(seed)
    model = Transformer(cfg.model, tok.src_vocab_size, tok.tgt_vocab_size)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    src, tgt = synthetic_pairs(32, seed=seed)
    batch = _batch(tok, src, tgt)
    model.train()
    with one_thread():
        for _ in range(steps):  # enough for outputs that depend on the input
            logits = model(batch[0], batch[1])
            loss = F.cross_entropy(logits.flatten(0, 1), batch[2].flatten(), ignore_index=PAD)
            opt.zero_grad()
            loss.backward()
            opt.step()
    state = {
        "config": to_dict(cfg),
        "name": cfg.name,
        "spm_src": src_proto,
        "spm_tgt": tgt_proto,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "state": {"step": steps},
    }
    save_checkpoint(path, state)
    return path


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ck") / "tiny.pt")


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


# --------------------------------------------------------------------------- stdin and stdout


class _Terminal:
    """A stdin that says it is a terminal, with lines already typed."""

    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)

    def isatty(self) -> bool:
        return True


def test_interactive_prompt_translates_each_line(capsys, monkeypatch, checkpoint, translator):
    monkeypatch.setattr(sys, "stdin", _Terminal(f"{SRC[0]}\n\n{SRC[1]}\n".encode()))
    rc, out, err = run_cli(capsys, checkpoint, "--beam", "2")
    assert rc == 0, err
    assert out.split("\n")[:-1] == translator.translate([SRC[0], "", SRC[1]], beam=2)
    assert "> " in err


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


@pytest.mark.parametrize("beam", [1, 3])
def test_batches_on_threads_give_the_same_output(translator, beam, monkeypatch):
    seqs = _ids(translator, 40)
    one = DecodeConfig(beam=beam, max_len_b=5, inter_threads=1)
    three = DecodeConfig(beam=beam, max_len_b=5, inter_threads=3)
    assert cpu_workers(three, torch.device("cpu")) == 3
    assert cpu_workers(three, torch.device("meta")) == 1  # only on CPU
    ref = translate_ids(translator.model, seqs, one, max_tokens=64)  # one batch after another
    monkeypatch.setattr(translator.config, "decode", three)
    out = translator.translate_ids(seqs, max_tokens=64)  # three side by side
    assert torch.get_num_threads() == 1  # restored
    assert [[h.tokens for h in hs] for hs in out] == [[h.tokens for h in hs] for hs in ref]


def test_an_error_on_a_thread_stops_the_rest(translator, monkeypatch):
    calls = []

    def failing(model, src, **kw):  # the first batch fails at once, the others take a while
        calls.append(src.size(0))
        if len(calls) == 1:
            raise RuntimeError("boom")
        time.sleep(1.0)  # while the main thread stops the pool
        return [[] for _ in range(src.size(0))]

    monkeypatch.setattr("mt.translator.greedy", failing)
    monkeypatch.setattr(translator.config.decode, "inter_threads", 2)
    seqs = _ids(translator, 40)
    with pytest.raises(RuntimeError, match="boom"):
        translator.translate_ids(seqs, beam=1, max_tokens=16)
    # About 20 batches (of at most 16 tokens): all but the failing one and those already running
    # on the two threads when it failed are dropped (which of them fails first is a race).
    assert len(calls) <= 6
    assert torch.get_num_threads() == 1 and not translator.model.training


def test_each_thread_gets_its_share_and_the_count_is_restored(translator, monkeypatch):
    seen = []

    def counting(model, src, **kw):
        seen.append(torch.get_num_threads())
        return greedy(model, src, **kw)

    monkeypatch.setattr("mt.translator.greedy", counting)
    seqs = _ids(translator, 24)
    torch.set_num_threads(2)
    try:
        translator.translate_ids(seqs, beam=1, max_tokens=64)
        assert len(seen) > 2 and set(seen) == {1}  # 2 batches at a time, one torch thread each
        assert torch.get_num_threads() == 2
        later: list[int] = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [2]  # threads started afterwards get the caller's count back too
    finally:
        torch.set_num_threads(1)
