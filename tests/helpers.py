"""Helpers the test modules share: small synthetic corpora, a tiny trained checkpoint, and
running `mt` in a subprocess, plainly or with one fault injected by tests/fault_driver.py.

Fixtures and hooks live in conftest.py; this module holds plain functions and constants, so
that test modules import them from here rather than from conftest or from each other.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from mt.checkpoint import save_checkpoint
from mt.cli import main
from mt.config import Config, DataConfig, DecodeConfig, ModelConfig, load_config, resolve_decoding, to_dict
from mt.data.prepare import prepare
from mt.data.tokenizer import Tokenizer, train_spm
from mt.errors import MTError
from mt.model import Transformer
from mt.serve.batcher import LocalEngine, ServeLimits
from mt.special import BOS, EOS, PAD
from mt.translate.translator import Translator, pad_sources

if TYPE_CHECKING:  # CTranslate2 is the export extra's; its translator is imported where it runs
    from mt.export.ct2_translator import CT2Translator

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


# --------------------------------------------------------------------------- synthetic corpora


def running_processes(command: list[str]) -> list[int]:
    """The processes with this command line that still run (a zombie has ended), from /proc:
    no psutil here. Forked workers keep their parent's command line."""
    found = []
    cmdline = "".join(arg + "\0" for arg in command).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "cmdline").read_bytes() == cmdline:
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError):
            continue  # it ended while we looked
    return found


def forked_children(proc: subprocess.Popen, n: int, timeout: float) -> list[str]:
    """The pids of the children that `proc`'s main thread forked, once there are `n` (or it
    ended, or `timeout` seconds passed): polled often, as a pool may last a moment only."""
    children = Path("/proc") / str(proc.pid) / "task" / str(proc.pid) / "children"
    forked: list[str] = []
    deadline = time.monotonic() + timeout
    while len(forked) < n and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
        forked = children.read_text().split()
    return forked


@contextlib.contextmanager
def nothing_left_running(proc: subprocess.Popen, argv: list[str]) -> Iterator[None]:
    """On the way out, whatever happened: kill `proc` and every process with its command line
    (its forked workers), so that a failed test leaves no processes behind."""
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in running_processes(argv):
            os.kill(pid, signal.SIGKILL)


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


def corpus_files(root: Path, splits: dict[str, tuple[list[str], list[str]]], gz: bool = False) -> Path:
    """A local corpus in the Multi30k layout with the given lines: {stem: (src, tgt)}."""
    root.mkdir(parents=True, exist_ok=True)
    for stem, (src, tgt) in splits.items():
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



def prepare_corpus(tmp_path: Path, corpus: Path, *overrides: str) -> tuple[Config, Path]:
    """Prepare the tiny experiment of corpus_config over `corpus`: its config and prepare's summary."""
    cfg = load_config(corpus_config(tmp_path, corpus), list(overrides))
    return cfg, prepare(cfg, quiet=True)

# --------------------------------------------------------------------------- a tiny checkpoint


@functools.lru_cache(maxsize=1)
def tiny_spm() -> bytes:
    src, tgt = synthetic_pairs(200, seed=0)
    return train_spm(src + tgt, DataConfig(vocab_size=60, num_proc=1))


@functools.lru_cache(maxsize=1)
def tiny_spm_pair() -> tuple[bytes, bytes]:
    """Separate source and target SentencePiece models (of different sizes) for synthetic_pairs."""
    src, tgt = synthetic_pairs(200, seed=0)
    cfg = DataConfig(vocab_size=60, num_proc=1)  # more than the corpus supports: 43 and 42 pieces
    return train_spm(src, cfg), train_spm(tgt, cfg)


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


# --------------------------------------------------------------------------- near ties
# Low-precision arithmetic (bf16, int8) rounds differently on different CPUs (native bf16 or
# VNNI instructions, or a library's emulation) and for different batch shapes, so a search in
# it may part from the fp32 search only where two tokens are this close in the fp32 model. On
# the tiny model of test_search one step of one sentence is a near tie (gap 0.078) that flips on
# some CPUs; every other step has a gap of at least 0.88, and bf16 decoding broken on purpose (a
# wrong attention scale) parts at gaps of 0.9 to 5.
NEAR_TIE = 0.25


@torch.no_grad()
def divergence_gap(model: Transformer, src: torch.Tensor, a: list[int], b: list[int]) -> float:
    """Where outputs `a` and `b` of one (1, S) source first differ, the fp32 log-probability gap
    between the two tokens they chose there (EOS ends each); 0.0 when they are equal."""
    a, b = a + [EOS], b + [EOS]
    t = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if t is None:
        return 0.0
    prefix = torch.tensor([[BOS] + a[:t]])
    lp = F.log_softmax(model.decode(prefix, model.encode(src))[0, -1].float(), -1)
    return abs(float(lp[a[t]] - lp[b[t]]))


def assert_agree_up_to_near_ties(
    fp32_model: Transformer,
    sources: list[torch.Tensor],
    outs_a: list[list[int]],
    outs_b: list[list[int]],
    min_equal: int,
) -> None:
    """Outputs a and b of each (1, S) source are equal, or part where `fp32_model` finds the two
    choices within NEAR_TIE of each other; at least `min_equal` are equal."""
    gaps = [divergence_gap(fp32_model, s, a, b) for s, a, b in zip(sources, outs_a, outs_b, strict=True)]
    assert max(gaps) <= NEAR_TIE, f"outputs part at a clear choice: fp32 log-prob gaps {gaps}"
    assert sum(g == 0.0 for g in gaps) >= min_equal, f"too many near ties to be chance: {gaps}"


SERVE_SRC = synthetic_pairs(8, seed=21)[0]  # what the serve tests translate
SERVE_LIMITS = ServeLimits(max_lines=8, max_chars=200, max_queued_lines=16)


class SwitchEngine:
    """The test translator behind a switch: decoding waits for `go`, lines containing BAD raise,
    lines containing MT raise an MTError; every decoded line is recorded."""

    def __init__(self, translator: Translator) -> None:
        self.inner = LocalEngine(translator)
        self.config, self.tokenizer, self.device, self.attention = (
            translator.config,
            translator.tokenizer,
            "cpu",
            True,
        )
        self.go = threading.Event()
        self.go.set()
        self.decoded: list[str] = []
        self.aborted = False

    def translate_nbest(self, lines, decode):
        assert self.go.wait(30)
        if any("BAD" in line for line in lines):
            raise RuntimeError("a bug met a bad line")
        if any("MT" in line for line in lines):
            raise MTError("decode.something: this engine cannot do that")
        self.decoded += lines
        return self.inner.translate_nbest(lines, decode)

    def attention_body(self, text, decode, layer, head):
        return self.inner.attention_body(text, decode, layer, head)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True
        self.go.set()



# --------------------------------------------------------------------------- exports

SOURCES = synthetic_pairs(40, seed=7)[0]  # what the export tests translate


def export(fmt: str, checkpoint: Path, out: Path, *extra: str) -> Path:
    assert main(["export", fmt, "--checkpoint", str(checkpoint), "--output", str(out), *extra]) == 0
    return out


def source_ids(translator: Translator | CT2Translator, lines: list[str] = SOURCES) -> list[np.ndarray]:
    return [np.asarray(s, dtype=np.int64) for s in translator.tokenizer.encode_src(lines)]


def mt_greedy(translator: Translator, seqs: list[np.ndarray]) -> list[list[int]]:
    greedy = resolve_decoding(translator.config.decode, beam=1)
    return [h[0].tokens for h in translator.translate_ids(seqs, greedy)]


@torch.inference_mode()
def mt_log_probs(
    translator: Translator, seqs: list[np.ndarray], outputs: list[list[int]]
) -> list[np.ndarray]:
    """Our log-probability of every token of each output, its EOS included."""
    out = []
    for s, o in zip(seqs, outputs, strict=True):
        logits = translator.model(pad_sources([s], torch.device("cpu")), torch.tensor([[BOS, *o]]))[0]
        out.append(logits.log_softmax(-1)[torch.arange(len(o) + 1), torch.tensor([*o, EOS])].numpy())
    return out


def readme_example(readme: str) -> str:
    (code,) = re.findall(r"```python\n(.*?)```", readme, re.S)
    return code


# --------------------------------------------------------------------------- the CLI's errors


def error_line(err: str, cmd: str) -> str:
    """The CLI's error: one line, no traceback (progress bars may precede it)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"mt {cmd}: error: ")]
    assert len(lines) == 1, err
    assert err.rstrip("\n").endswith(lines[0]), "nothing after the error line"
    return lines[0]


# --------------------------------------------------------------------------- mt in a subprocess

# Faults are injected from outside: the run is started through this script, which monkeypatches
# one function of `mt` to SIGKILL its own process at a precise point, so no test hooks live in
# the production code and the process gets no chance to clean up.
DRIVER = Path(__file__).resolve().parent / "fault_driver.py"

KILLED = -signal.SIGKILL  # the return code of a process that died of SIGKILL


def subprocess_env(hf_cache: Path) -> dict[str, str]:
    """The environment for `mt` in a subprocess: one thread, offline hub, its own datasets cache."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(hf_cache),
        "TOKENIZERS_PARALLELISM": "false",
    }


def run_mt(args: list[str], cwd: Path, env: dict[str, str], fault: str | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m mt ARGS`, or the same through the fault driver with FAULT (see fault_driver.py)."""
    cmd = [sys.executable, str(DRIVER), fault, *args] if fault else [sys.executable, "-m", "mt", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- mt serve on loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    port: int, *options: str, python: tuple[str, ...] = (), log: Path | None = None
) -> subprocess.Popen:
    """`mt serve OPTIONS` on loopback in a subprocess, once /health answers. Its stderr goes to
    `log` when given (a long run's access log would fill a pipe nobody reads), else to a pipe."""
    err = log.open("w") if log is not None else subprocess.PIPE
    proc = subprocess.Popen(
        [sys.executable, *python, "-m", "mt", "serve", "--port", str(port), "--device", "cpu", *options],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=err,
    )
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            text = log.read_text() if log is not None else proc.communicate()[1]
            raise AssertionError(f"mt serve exited {proc.returncode}: {text[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("mt serve did not answer /health within 90 s")


def post(port: int, path: str, body: object, timeout: float = 60) -> tuple[int, dict]:
    """(status, JSON body) of a POST on loopback."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def read_answer(sock: socket.socket) -> tuple[int, dict]:
    """(status, JSON body) of the answer on `sock`, read until the server closes it."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


# --------------------------------------------------------------------------- copies of hub repositories
# The hub is out of reach: its data sets are tested on local directories laid out exactly like
# their repositories (at the revision the configs name), which `datasets.load_dataset` reads
# through the same call. Named like the repository (`IWSLT/iwslt2017`) under a directory that is
# the working directory of the test, a shipped config's `data.hub` names the copy as written.


@functools.lru_cache(maxsize=16)
def multi30k_lines(stem: str, lang: str) -> tuple[str, ...]:
    """The lines of a Multi30k file, e.g. ("train", "de"); read only."""
    with gzip.open(MULTI30K / f"{stem}.{lang}.gz", "rt", encoding="utf-8") as f:
        return tuple(f.read().splitlines())


def multi30k_rows(stem: str, langs: tuple[str, str], start: int, n: int) -> list[dict[str, str]]:
    """Rows of a `translation` column: {lang: text} for Multi30k lines start .. start + n - 1."""
    cols = [multi30k_lines(stem, lang)[start : start + n] for lang in langs]
    return [dict(zip(langs, texts, strict=True)) for texts in zip(*cols, strict=True)]


def write_parquet(path: Path, rows: list[dict[str, str]]) -> None:
    """A parquet file with one struct column `translation`, as the hub's data sets have."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"translation": rows}), path)


# Pairs in each split of a copy: a few hundred Multi30k pairs, and the Multi30k split they come from.
HUB_SPLITS = {"train": ("train", 300), "validation": ("val", 20), "test": ("test_2016_flickr", 20)}


def _split_rows(split: str, langs: tuple[str, str]) -> list[dict[str, str]]:
    stem, n = HUB_SPLITS[split]
    return multi30k_rows(stem, langs, 0, n)


def _parquet_conversion(repo: Path, folders: dict[str, tuple[str, str]]) -> None:
    """The layout of `refs/convert/parquet`: {config folder}/{split}/0000.parquet, one config."""
    for folder, langs in folders.items():
        for split in HUB_SPLITS:
            write_parquet(repo / folder / split / "0000.parquet", _split_rows(split, langs))
        # Some snapshots of the conversion have a duckdb index beside the parquet file.
        (repo / folder / "test" / "index.duckdb").write_bytes(b"DUCK")


def iwslt2017_repository(root: Path, revision: str) -> Path:
    """IWSLT/iwslt2017 at `main` (its loading script and card) or at `refs/convert/parquet`."""
    repo = root / "IWSLT" / "iwslt2017"
    repo.mkdir(parents=True)
    if revision == "main":
        (repo / "iwslt2017.py").write_text('"""IWSLT 2017 dataset (a loading script)"""\nimport datasets\n')
        (repo / "README.md").write_text("---\nlicense: cc-by-nc-nd-4.0\n---\n# IWSLT 2017\n")
    else:
        _parquet_conversion(repo, {"iwslt2017-de-en": ("de", "en"), "iwslt2017-fr-en": ("fr", "en")})
    return repo


def iwslt14_repository(root: Path, revision: str) -> Path:
    """bbaaaa/iwslt14-de-en at `main` (a loading script and a zip) or at `refs/convert/parquet`."""
    repo = root / "bbaaaa" / "iwslt14-de-en"
    repo.mkdir(parents=True)
    if revision == "main":
        (repo / "iwslt14-de-en.py").write_text('"""IWSLT 2014 (a loading script)"""\nimport datasets\n')
        (repo / "data").mkdir()
        (repo / "data" / "de-en.zip").write_bytes(b"PK\x05\x06" + bytes(18))
    else:
        _parquet_conversion(repo, {"de-en": ("de", "en")})
    return repo


WMT14_CARD = """---
configs:
{configs}
---
# Dataset Card for wmt14
"""


def wmt14_repository(root: Path) -> Path:
    """wmt/wmt14 at `main`: parquet files per config folder, named in the card's configs."""
    repo = root / "wmt" / "wmt14"
    configs = []
    for config, langs in (("de-en", ("de", "en")), ("fr-en", ("fr", "en"))):
        configs.append(f"- config_name: {config}\n  data_files:")
        for split in HUB_SPLITS:
            shards = 3 if split == "train" else 1
            rows = _split_rows(split, langs)
            cuts = [k * len(rows) // shards for k in range(shards + 1)]
            for k in range(shards):  # in order: the shards together are the split as written
                name = f"{split}-{k:05d}-of-{shards:05d}.parquet"
                write_parquet(repo / config / name, rows[cuts[k] : cuts[k + 1]])
            configs.append(f"  - split: {split}\n    path: {config}/{split}-*")
    (repo / "README.md").write_text(WMT14_CARD.format(configs="\n".join(configs)))
    return repo


# --------------------------------------------------------------------------- training runs


def train_config(tmp_path: Path, corpus: Path, *overrides: str) -> Config:
    """The config of corpus_config with a small token budget, and `overrides`."""
    return load_config(corpus_config(tmp_path, corpus), ["train.max_tokens=400", *overrides])


def same_contents(a: object, b: object, where: str = "") -> None:
    """Deep equality of checkpoint contents, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            same_contents(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same_contents(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"



def run_metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    for r in rows:
        r.pop("tok_s", None)  # throughput, the one timing-dependent value
    return rows

