"""`mt prepare`: clean, learn subwords, encode, and cache a parallel corpus.

The cache in `data/prepared/<name>/` holds, per split and side, a flat array of
token ids (`train.src.npy`) and an offsets array (`train.src.idx.npy`, n+1
entries: sentence i is ids[idx[i]:idx[i+1]]), the SentencePiece model(s),
`meta.json` (counts, drop reasons, the training split's sources in order, and the
fingerprint of inputs and settings) and the resolved `config.yaml`. Everything is
written into a temporary directory that replaces the old cache only when complete,
so an interrupted run leaves the previous cache or none, never half of one.

Memory stays bounded whatever the corpus size: splits are read in chunks (sources.Split),
SentencePiece learns from a sample of at most data.spm_max_sentences sentences, and the
encoded ids go to disk chunk by chunk. The training split of several sources is their
cleaned pairs one source after the other; how an epoch mixes them is the trainer's
(mt.train.batching.Mixture), so the weights are not part of the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm import tqdm

from mt.checkpoint import Checkpoint
from mt.config import Config, DataConfig, save_config
from mt.data import sources
from mt.data.tokenizer import Tokenizer, load_processor, train_spm
from mt.errors import CheckpointError, DataError
from mt.files import DirectoryLock, remove_stale, replace_dir, temp_path
from mt.workers import fork_context, start_worker

# Bump when the cache layout or the processing changes, so old caches are rebuilt.
PREPARE_VERSION = 3
DROP_REASONS = ("empty", "too_long", "ratio")
META = "meta.json"
CHUNK = 10_000  # pairs read, encoded and written at a time
POOL_FROM = 20_000  # pairs in a split from which data.num_proc worker processes encode it

# A source protos pair: the SentencePiece models of source and target (the same for joint).
Vocab = tuple[bytes, bytes]


# --------------------------------------------------------------------------- fingerprint


def fingerprint(cfg: DataConfig, vocab: Vocab | None = None) -> str:
    """Hash of everything that determines the cache: settings, inputs, given subword models,
    code version. Source weights are left out: they change the mixture, not the cache."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("prepared_dir", "num_proc")}
    for src in settings["sources"]:
        del src["weight"]
    blob = json.dumps(
        {
            "version": PREPARE_VERSION,
            "settings": settings,
            "inputs": sources.source_fingerprint(cfg),
            "vocab": [hashlib.sha256(p).hexdigest() for p in vocab] if vocab else None,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_meta(prepared_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((prepared_dir / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_up_to_date(cfg: Config) -> bool:
    meta = read_meta(cfg.prepared_dir)
    return meta is not None and meta.get("fingerprint") == fingerprint(cfg.data, pretrained_vocab(cfg))


# --------------------------------------------------------------------------- fine-tuning

_VOCABS: dict[tuple[str, int, int], tuple[Vocab, dict[str, Any]]] = {}


def _checkpoint_vocab(path: Path) -> tuple[Vocab, dict[str, Any]]:
    """The subword models and config of a checkpoint, read once per file version: checking
    that the cache is up to date and preparing it both need them."""
    try:
        st = path.stat()
    except OSError:
        raise CheckpointError(f"train.init_from: checkpoint not found: {path}") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _VOCABS:
        try:
            ck = Checkpoint.read(path)
        except CheckpointError as e:
            raise CheckpointError(f"train.init_from: {e}") from None
        _VOCABS[key] = ((ck.spm_src, ck.spm_tgt), ck.config)
    return _VOCABS[key]


# Model settings a fine-tuning run may change: the rest decide the shapes of the weights.
FREE_WHEN_FINE_TUNING = {"dropout", "attention_dropout", "activation_dropout"}


def pretrained_vocab(cfg: Config) -> Vocab | None:
    """With train.init_from, the checkpoint's subword models, which then encode the data. It is
    checked first, so that nothing is prepared for a run that cannot start: it must load, be of
    the config's languages (its vocabulary would not fit others) and of its model shape."""
    if not cfg.train.init_from:
        return None
    path = Path(cfg.train.init_from)
    vocab, ck_config = _checkpoint_vocab(path)
    then = ck_config.get("data", {})
    langs, now = (then.get("src_lang"), then.get("tgt_lang")), (cfg.data.src_lang, cfg.data.tgt_lang)
    if langs != now:
        raise CheckpointError(
            f"train.init_from: {path} translates {langs[0]}->{langs[1]}, but this config "
            f"{now[0]}->{now[1]}; fine-tune a model of the same languages"
        )
    model_then, model_now = ck_config.get("model", {}), dataclasses.asdict(cfg.model)
    shape = {k: (model_then[k], v) for k, v in model_now.items()
             if k in model_then and model_then[k] != v and k not in FREE_WHEN_FINE_TUNING}
    if shape:
        shown = ", ".join(f"model.{k} {a!r} -> {b!r}" for k, (a, b) in shape.items())
        raise CheckpointError(
            f"train.init_from: {path} has another model shape ({shown}, checkpoint -> config); "
            f"give the model section the checkpoint's values"
        )
    return vocab


# --------------------------------------------------------------------------- encoding
# Runs in the main process or, for big splits, in worker processes (one _Encoder each).

_PROCESSORS: dict[str, Any] = {}


def _processor(proto: bytes) -> Any:
    key = hashlib.sha1(proto).hexdigest()
    if key not in _PROCESSORS:
        _PROCESSORS[key] = load_processor(proto)
    return _PROCESSORS[key]


@dataclass
class _Encoded:
    """One chunk, encoded: the ids of the pairs kept, and why each pair was dropped."""

    reason: np.ndarray  # per pair read: 0 kept, else DROP_REASONS index + 1
    src_lens: np.ndarray  # per pair kept
    tgt_lens: np.ndarray
    src_ids: np.ndarray  # the kept pairs' ids, concatenated
    tgt_ids: np.ndarray
    text: tuple[list[str], list[str]] | None  # the stripped lines, for splits that keep every line


def _flat(ids: list[list[int]], lens: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lens.sum()))


@dataclass
class _Encoder:
    """Strip, encode and (for training) drop pairs: one chunk at a time."""

    src_proto: bytes
    tgt_proto: bytes
    dtype: np.dtype
    max_len: int
    max_ratio: float
    clean: bool  # training: drop empty, over-long and badly proportioned pairs; else keep all

    def __call__(self, chunk: tuple[list[str], list[str]]) -> _Encoded:
        src = [s.strip() for s in chunk[0]]
        tgt = [t.strip() for t in chunk[1]]
        reason = np.zeros(len(src), dtype=np.int8)
        if self.clean:
            empty = np.fromiter((not (s and t) for s, t in zip(src, tgt, strict=True)), bool, len(src))
            reason[empty] = 1
            if empty.any():
                src = [s for s, e in zip(src, empty, strict=True) if not e]
                tgt = [t for t, e in zip(tgt, empty, strict=True) if not e]
        s_ids = _processor(self.src_proto).encode(src, out_type=int)
        t_ids = _processor(self.tgt_proto).encode(tgt, out_type=int)
        ls = np.fromiter(map(len, s_ids), np.int64, len(s_ids))
        lt = np.fromiter(map(len, t_ids), np.int64, len(t_ids))
        if self.clean:
            longer, shorter = np.maximum(ls, lt), np.maximum(1, np.minimum(ls, lt))
            why = np.where(longer > self.max_len, 2, np.where(longer > self.max_ratio * shorter, 3, 0))
            reason[reason == 0] = why
            keep = why == 0
            if not keep.all():
                s_ids = [x for x, k in zip(s_ids, keep, strict=True) if k]
                t_ids = [x for x, k in zip(t_ids, keep, strict=True) if k]
                ls, lt = ls[keep], lt[keep]
        return _Encoded(
            reason,
            ls,
            lt,
            _flat(s_ids, ls, self.dtype),
            _flat(t_ids, lt, self.dtype),
            None if self.clean else (src, tgt),
        )


# --------------------------------------------------------------------------- worker processes

_WORKER: dict[str, _Encoder] = {}


def _start_worker(parent_pid: int, encoder: _Encoder) -> None:
    start_worker(parent_pid)
    _WORKER["encoder"] = encoder


def _encode_in_worker(chunk: tuple[list[str], list[str]]) -> _Encoded:
    return _WORKER["encoder"](chunk)


def _encoded(
    chunks: Iterator[tuple[list[str], list[str]]], encoder: _Encoder, workers: int
) -> Iterator[_Encoded]:
    """The chunks encoded in order, by `workers` processes when more than one; at most two
    chunks per worker are in flight, so a fast reader never queues up the corpus."""
    if workers <= 1:
        yield from map(encoder, chunks)
        return
    pool = fork_context().Pool(workers, _start_worker, (os.getpid(), encoder))
    try:
        pending: deque[Any] = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        pool.terminate()
        pool.join()


# --------------------------------------------------------------------------- writing arrays


class _IdsFile:
    """One side of a split: ids appended chunk by chunk to a raw file, then written as `.npy`
    (ids) and `.idx.npy` (offsets) without ever holding all ids in memory."""

    def __init__(self, out: Path, split: str, side: str, dtype: np.dtype) -> None:
        self.path = out / f"{split}.{side}.npy"
        self.idx_path = out / f"{split}.{side}.idx.npy"
        self.raw_path = out / f"{split}.{side}.raw"
        self.dtype = dtype
        self.raw: IO[bytes] = open(self.raw_path, "wb")
        self.lengths: list[np.ndarray] = []

    def append(self, ids: np.ndarray, lens: np.ndarray) -> None:
        self.raw.write(ids.tobytes())
        self.lengths.append(lens.astype(np.int32))

    def finish(self) -> int:
        """Write the arrays; returns the number of tokens."""
        self.raw.close()
        lens = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int32)
        offsets = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        np.save(self.idx_path, offsets)
        total = int(offsets[-1])
        with open(self.path, "wb") as f, open(self.raw_path, "rb") as raw:
            # An empty array cannot be memory-mapped: a split without tokens stores one padding id.
            shape = (max(total, 1),)
            descr = np.lib.format.dtype_to_descr(self.dtype)
            np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
            shutil.copyfileobj(raw, f, 1 << 24)
            if total == 0:
                f.write(np.zeros(1, self.dtype).tobytes())
        self.raw_path.unlink()
        return total

    def discard(self) -> None:
        self.raw.close()


def _write_arrays(
    parts: list[sources.Split], out: Path, split: str, encoder: _Encoder, workers: int, progress: bool
) -> dict[str, Any]:
    """Encode the parts of a split (one per source for training) and write its arrays, and for
    a split that keeps every line its reference text; returns its counts, per part too."""
    sides = ("src", "tgt")
    files = [_IdsFile(out, split, side, encoder.dtype) for side in sides]
    # The raw text of splits that keep every line, for scoring against real references.
    text = [] if encoder.clean else [
        open(out / f"{split}.{side}.txt", "w", encoding="utf-8", newline="\n") for side in sides
    ]
    counts = []
    total = sum(map(len, parts))
    bar = tqdm(total=total, desc=f"encode {split}", unit="pair", leave=False, disable=not progress)
    try:
        for part in parts:
            reasons = np.zeros(len(DROP_REASONS) + 1, dtype=np.int64)
            use = workers if len(part) >= POOL_FROM else 1
            for enc in _encoded(part.chunks(CHUNK), encoder, use):
                files[0].append(enc.src_ids, enc.src_lens)
                files[1].append(enc.tgt_ids, enc.tgt_lens)
                for f, lines in zip(text, enc.text or (), strict=True):
                    f.writelines(line.replace("\n", " ").replace("\r", " ") + "\n" for line in lines)
                reasons += np.bincount(enc.reason, minlength=len(reasons))
                bar.update(len(enc.reason))
            counts.append({
                "name": part.source.name,
                "read": len(part),
                "kept": int(reasons[0]),
                "dropped": {r: int(n) for r, n in zip(DROP_REASONS, reasons[1:], strict=True)},
            })
        tokens = [f.finish() for f in files]
    finally:
        bar.close()
        for f in files:
            f.discard()
        for t in text:
            t.close()
    return {
        "read": total,
        "kept": sum(c["kept"] for c in counts),
        "src_tokens": tokens[0],
        "tgt_tokens": tokens[1],
        "parts": counts,
    }


# --------------------------------------------------------------------------- subword models


def _train_spm(sentences: Iterator[str], cfg: DataConfig) -> bytes:
    """SentencePiece training; settings this corpus cannot satisfy are a DataError."""
    try:
        return train_spm(sentences, cfg)
    except RuntimeError as e:  # e.g. more distinct characters than vocab_size allows
        reason = " ".join(str(e).split()).rsplit("] ", 1)[-1]
        raise DataError(
            f"SentencePiece training failed: {reason} (data.vocab_size {cfg.vocab_size}, "
            f"data.character_coverage {cfg.character_coverage})"
        ) from None


SAMPLE_BATCH = 10_000  # kept pairs whose sides go to SentencePiece one side after the other


def _sample_sentences(parts: list[sources.Split], cfg: DataConfig, sides: tuple[int, ...]) -> Iterator[str]:
    """Sentences for SentencePiece: of at most spm_max_sentences // len(sides) training pairs,
    chosen with a fixed seed over all sources (all of them when there are fewer), the stripped
    sides of those with no empty side, in batches of SAMPLE_BATCH pairs, side by side."""
    n = sum(map(len, parts))
    rows = max(1, cfg.spm_max_sentences // len(sides))
    picks = np.sort(np.random.default_rng(0).choice(n, rows, replace=False)) if n > rows else None
    batch: list[tuple[str, str]] = []
    seen = 0
    for part in parts:
        for src, tgt in part.chunks(CHUNK):
            read = len(src)
            if picks is not None:
                lo, hi = np.searchsorted(picks, [seen, seen + read])
                src, tgt = [src[i - seen] for i in picks[lo:hi]], [tgt[i - seen] for i in picks[lo:hi]]
            seen += read
            stripped = ((s.strip(), t.strip()) for s, t in zip(src, tgt, strict=True))
            batch += [(s, t) for s, t in stripped if s and t]
            while len(batch) >= SAMPLE_BATCH:
                head, batch = batch[:SAMPLE_BATCH], batch[SAMPLE_BATCH:]
                for side in sides:
                    yield from (pair[side] for pair in head)
            if picks is not None and seen > picks[-1]:  # the rest holds no picked pair
                break
    for side in sides:
        yield from (pair[side] for pair in batch)


# --------------------------------------------------------------------------- main


def prepare(cfg: Config, force: bool = False, quiet: bool = False) -> Path:
    """Prepare the corpus of `cfg` unless the cache is already up to date; returns its path."""
    out = cfg.prepared_dir
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"data.prepared_dir: cannot create {out.parent}: {e.strerror or e}") from None
    with cache_lock(out):
        return _prepare_locked(cfg, out, force, quiet)


def cache_lock(out: Path) -> DirectoryLock:
    """One `mt prepare` per cache at a time. The lock sits beside the cache, which is replaced
    whole, and is not named like its temporary and old copies (`.<name>.<tag>-<pid>`)."""
    return DirectoryLock(out, "data.prepared_dir", lock=out.parent / f".{out.name}-lock")


def _prepare_locked(cfg: Config, out: Path, force: bool, quiet: bool) -> Path:
    say = (lambda *a: None) if quiet else print
    vocab = pretrained_vocab(cfg)
    fp = fingerprint(cfg.data, vocab)
    if not force and is_up_to_date(cfg):
        say(f"{out}: up to date (fingerprint {fp}); nothing to do")
        return out

    try:
        import datasets
    except ImportError as e:  # e.g. on a GPU machine that got a prepared cache and torch only
        raise DataError(f"preparing data needs the `datasets` package ({e}): pip install datasets") from None

    t0 = time.time()
    remove_stale(out.parent, f".{out.name}.*-*")  # temporary and old caches of killed runs
    tmp = temp_path(out, hidden=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    was_enabled = datasets.is_progress_bar_enabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        meta = _prepare_into(cfg, tmp, fp, vocab, say, progress=not quiet)
        meta["seconds"] = round(time.time() - t0, 2)
        (tmp / META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        replace_dir(tmp, out)
    except OSError as e:  # a full disk, in `datasets` or in our own writes
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(
            f"cannot write {e.filename or tmp}: {e.strerror or e}; the prepared cache {out} is as it was"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if quiet and was_enabled:
            datasets.enable_progress_bars()
    say(summary(meta, out))
    return out


def _prepare_into(
    cfg: Config, tmp: Path, fp: str, vocab: Vocab | None, say: Any, progress: bool
) -> dict[str, Any]:
    d = cfg.data
    plan = sources.plan(d)
    say(f"preparing {d.src_lang}->{d.tgt_lang} from " + ", ".join(s.describe() for s in plan.train))
    # Every split is opened (files checked, hub splits loaded) before anything is computed.
    train = [sources.open_split(s, "train", d) for s in plan.train]
    others = {s: sources.open_split(plan.eval, s, d) for s in plan.eval_splits}

    t = time.time()
    if vocab is not None:
        src_proto, tgt_proto = vocab
        how = f"from {cfg.train.init_from}"
    else:
        src_proto, tgt_proto = _learn_subwords(train, d)
        how = f"{d.spm_type}, learned"
    tok = Tokenizer(src_proto, None if src_proto == tgt_proto else tgt_proto)
    say(f"sentencepiece ({how}): vocab {tok.src_vocab_size}/{tok.tgt_vocab_size} in {time.time() - t:.1f}s")
    (tmp / "spm.src.model").write_bytes(src_proto)
    (tmp / "spm.tgt.model").write_bytes(tgt_proto)

    dtype = (
        np.dtype(np.uint16) if max(tok.src_vocab_size, tok.tgt_vocab_size) <= 65535 else np.dtype(np.int32)
    )
    stats: dict[str, dict[str, Any]] = {}
    for split, parts in [("train", train), *((s, [p]) for s, p in others.items())]:
        encoder = _Encoder(src_proto, tgt_proto, dtype, d.max_len, d.max_ratio, clean=split == "train")
        st = _write_arrays(parts, tmp, split, encoder, d.num_proc, progress)
        part_counts = st.pop("parts")
        if split == "train":
            st["dropped"] = {r: sum(c["dropped"][r] for c in part_counts) for r in DROP_REASONS}
            if st["kept"] == 0:
                raise DataError(
                    f"training split: nothing left after cleaning (dropped {st['dropped']}); "
                    f"check data.max_len ({d.max_len}) and data.max_ratio ({d.max_ratio})"
                )
            train_sources = part_counts
        stats[split] = st

    save_config(cfg, tmp / "config.yaml")
    return {
        "format": "mt-prepared",
        "version": PREPARE_VERSION,
        "fingerprint": fp,
        "src_lang": d.src_lang,
        "tgt_lang": d.tgt_lang,
        "joint_vocab": tok.joint,
        "src_vocab_size": tok.src_vocab_size,
        "tgt_vocab_size": tok.tgt_vocab_size,
        "dtype": dtype.name,
        "splits": stats,
        # In the order of the training split: source k holds the `kept` pairs after those before it.
        "train_sources": train_sources,
    }


def _learn_subwords(train: list[sources.Split], d: DataConfig) -> Vocab:
    """SentencePiece model(s) learned from a sample of the training pairs."""
    if d.joint_vocab:
        proto = _train_spm(_nonempty(_sample_sentences(train, d, (0, 1))), d)
        return proto, proto
    return (
        _train_spm(_nonempty(_sample_sentences(train, d, (0,))), d),
        _train_spm(_nonempty(_sample_sentences(train, d, (1,))), d),
    )


def _nonempty(sentences: Iterator[str]) -> Iterator[str]:
    """The sentences, or an error when there are none: SentencePiece's own would not say why."""
    first = next(sentences, None)
    if first is None:
        raise DataError("training split: nothing left after dropping pairs with an empty side")
    yield first
    yield from sentences


def summary(meta: dict[str, Any], out: Path) -> str:
    lines = [f"prepared {out} in {meta.get('seconds', 0):.1f}s (fingerprint {meta['fingerprint']})"]
    lines.append(
        f"  vocabulary: src {meta['src_vocab_size']}, tgt {meta['tgt_vocab_size']}"
        f"{' (joint)' if meta['joint_vocab'] else ''}"
    )
    lines.append(f"  {'split':<20}{'read':>10}{'kept':>10}{'src tokens':>12}{'tgt tokens':>12}")
    for s, st in meta["splits"].items():
        lines.append(f"  {s:<20}{st['read']:>10}{st['kept']:>10}{st['src_tokens']:>12}{st['tgt_tokens']:>12}")
    drops = meta["splits"]["train"].get("dropped", {})
    lines.append("  train pairs dropped: " + ", ".join(f"{k} {v}" for k, v in drops.items()))
    if len(meta.get("train_sources", [])) > 1:
        for src in meta["train_sources"]:
            dropped = ", ".join(f"{k} {v}" for k, v in src["dropped"].items())
            lines.append(f"    {src['name']}: read {src['read']}, kept {src['kept']}; dropped {dropped}")
    return "\n".join(lines)
