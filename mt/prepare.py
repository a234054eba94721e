"""`mt prepare`: clean, learn subwords, encode, and cache a parallel corpus.

The cache in `data/prepared/<name>/` holds, per split and side, a flat array of
token ids (`train.src.npy`) and an offsets array (`train.src.idx.npy`, n+1
entries: sentence i is ids[idx[i]:idx[i+1]]), the SentencePiece model(s),
`meta.json` (counts, drop reasons and the fingerprint of inputs and settings)
and the resolved `config.yaml`. Everything is written into a temporary
directory that replaces the old cache only when complete, so an interrupted run
leaves the previous cache or none, never half of one.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from mt import sources
from mt.config import Config, DataConfig, save_config
from mt.errors import DataError
from mt.files import DirectoryLock, remove_stale, replace_dir, temp_path
from mt.tokenizer import Tokenizer, load_processor, train_spm

if TYPE_CHECKING:  # imported by prepare() itself: training from a prepared cache needs no `datasets`
    import datasets

# Bump when the cache layout or the processing changes, so old caches are rebuilt.
PREPARE_VERSION = 2
DROP_REASONS = ("empty", "too_long", "ratio")
META = "meta.json"


# --------------------------------------------------------------------------- fingerprint


def fingerprint(cfg: DataConfig) -> str:
    """Hash of everything that determines the cache: settings, inputs, code version."""
    settings = {k: v for k, v in vars(cfg).items() if k not in ("prepared_dir", "num_proc")}
    blob = json.dumps(
        {"version": PREPARE_VERSION, "settings": settings, "inputs": sources.source_fingerprint(cfg)},
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
    return meta is not None and meta.get("fingerprint") == fingerprint(cfg.data)


# --------------------------------------------------------------------------- per-batch functions
# These run inside datasets.map, possibly in worker processes.

_PROCESSORS: dict[str, Any] = {}


def _processor(proto: bytes) -> Any:
    key = hashlib.sha1(proto).hexdigest()
    if key not in _PROCESSORS:
        _PROCESSORS[key] = load_processor(proto)
    return _PROCESSORS[key]


def _strip(batch: dict[str, list[str]]) -> dict[str, list[str]]:
    return {"src": [s.strip() for s in batch["src"]], "tgt": [t.strip() for t in batch["tgt"]]}


def _encode(
    batch: dict[str, list[str]], src_proto: bytes, tgt_proto: bytes, max_len: int, max_ratio: float
) -> dict[str, list]:
    src = _processor(src_proto).encode(batch["src"], out_type=int)
    tgt = _processor(tgt_proto).encode(batch["tgt"], out_type=int)
    reason = []
    for s, t in zip(src, tgt, strict=True):
        ls, lt = len(s), len(t)
        if max(ls, lt) > max_len:
            reason.append(2)  # DROP_REASONS index + 1
        elif max(ls, lt) > max_ratio * max(1, min(ls, lt)):
            reason.append(3)
        else:
            reason.append(0)
    return {"src_ids": src, "tgt_ids": tgt, "reason": reason}


# --------------------------------------------------------------------------- worker processes

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent(parent: _Parent) -> None:
    """In a process just forked from `parent`: have Linux SIGKILL it when `parent` ends, however
    it ends. Otherwise the pool of a SIGKILLed `mt prepare` (its workers and its manager process)
    waits forever for work. Linux sends the signal when the *thread* that forked ends: the pools
    of datasets.map are made by the thread that calls it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent.pid:  # it died before the prctl: no signal will come
        os.kill(os.getpid(), signal.SIGKILL)


class _Parent:
    def __init__(self) -> None:
        self.pid = os.getpid()


@contextlib.contextmanager
def _workers_die_with_this_process() -> Iterator[None]:
    """Within the block, each process forked by `multiprocess` (what datasets.map uses for
    num_proc > 1) runs `_die_with_parent` first thing; Linux only (prctl)."""
    if sys.platform != "linux":
        yield
        return
    import multiprocess.util

    parent = _Parent()
    multiprocess.util.register_after_fork(parent, _die_with_parent)
    yield
    # The registry holds `parent` weakly: the hook goes when this generator does.


# --------------------------------------------------------------------------- steps


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


def _sample_sentences(train: datasets.Dataset, cfg: DataConfig, sides: tuple[str, ...]) -> Iterator[str]:
    """At most spm_max_sentences sentences from the given sides, sampled with a fixed seed."""
    rows = max(1, cfg.spm_max_sentences // len(sides))
    if len(train) > rows:
        idx = np.sort(np.random.default_rng(0).choice(len(train), rows, replace=False))
        train = train.select(idx)
    for batch in train.select_columns(list(sides)).iter(batch_size=10_000):
        for side in sides:
            yield from (s for s in batch[side] if s)


def _write_arrays(
    ds: datasets.Dataset, out: Path, split: str, dtype: np.dtype, progress: bool = True
) -> dict[str, int]:
    """Stream the id lists of a split into flat memory-mapped arrays plus offsets."""
    n = len(ds)
    tokens = {}
    for side in ("src", "tgt"):
        col = ds.select_columns([f"{side}_ids"]).with_format("arrow")
        offsets = np.lib.format.open_memmap(out / f"{split}.{side}.idx.npy", "w+", np.int64, (n + 1,))
        offsets[0] = 0
        pos, total = 1, 0
        for table in col.iter(batch_size=50_000):
            lens = pc.list_value_length(table.column(0)).to_numpy(zero_copy_only=False)
            offsets[pos : pos + len(lens)] = total + np.cumsum(lens)
            total += int(lens.sum())
            pos += len(lens)
        ids = np.lib.format.open_memmap(out / f"{split}.{side}.npy", "w+", dtype, (max(total, 1),))
        start = 0
        bar = tqdm(total=n, desc=f"writing {split}.{side}", unit="sent", leave=False, disable=not progress)
        for table in col.iter(batch_size=50_000):
            chunked = table.column(0)
            values = pa.concat_arrays([c.flatten() for c in chunked.chunks]) if chunked.num_chunks else []
            vals = np.asarray(values, dtype=dtype)
            ids[start : start + len(vals)] = vals
            start += len(vals)
            bar.update(table.num_rows)
        bar.close()
        ids.flush()
        offsets.flush()
        del ids, offsets
        tokens[side] = total
    return tokens


def _write_text(ds: datasets.Dataset, out: Path, split: str) -> None:
    for side in ("src", "tgt"):
        with open(out / f"{split}.{side}.txt", "w", encoding="utf-8", newline="\n") as f:
            for batch in ds.select_columns([side]).iter(batch_size=10_000):
                f.writelines(line.replace("\n", " ").replace("\r", " ") + "\n" for line in batch[side])


def _count_reasons(ds: datasets.Dataset) -> np.ndarray:
    counts = np.zeros(len(DROP_REASONS) + 1, dtype=np.int64)
    for table in ds.select_columns(["reason"]).with_format("arrow").iter(batch_size=100_000):
        counts += np.bincount(table.column(0).to_numpy(), minlength=len(counts))[: len(counts)]
    return counts


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
    d = cfg.data
    fp = fingerprint(d)
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
    scratch = tmp / "scratch"
    scratch.mkdir(parents=True)
    was_enabled = datasets.is_progress_bar_enabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        meta = _prepare_into(cfg, tmp, scratch, fp, say, progress=not quiet)
        shutil.rmtree(scratch)
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


def _prepare_into(cfg: Config, tmp: Path, scratch: Path, fp: str, say: Any, progress: bool) -> dict[str, Any]:
    d = cfg.data
    splits = sources.split_names(d)
    if "train" not in splits:
        raise DataError("data: no 'train' split configured")
    say(f"preparing {d.src_lang}->{d.tgt_lang} from {d.local_dir if sources.use_local(d) else d.hub}")

    raw = {s: sources.load_split(d, s, scratch) for s in splits}
    for s, ds in raw.items():
        if len(ds) == 0:
            raise DataError(f"split '{s}' is empty")
    stats: dict[str, dict[str, Any]] = {s: {"read": len(ds)} for s, ds in raw.items()}

    # Clean: strip everywhere; drop empty pairs from the training split only.
    clean = {}
    for s, ds in raw.items():
        ds = ds.map(
            _strip, batched=True, cache_file_name=str(scratch / f"{s}.strip.arrow"), desc=f"strip {s}"
        )
        clean[s] = ds
    n_before = len(clean["train"])
    clean["train"] = clean["train"].filter(
        lambda b: [bool(x) and bool(y) for x, y in zip(b["src"], b["tgt"], strict=True)],
        batched=True,
        cache_file_name=str(scratch / "train.nonempty.arrow"),
        desc="drop empty pairs",
    )
    drops = {"empty": n_before - len(clean["train"])}
    if len(clean["train"]) == 0:
        raise DataError("training split: nothing left after dropping pairs with an empty side")

    # Subword models.
    t = time.time()
    if d.joint_vocab:
        src_proto = _train_spm(_sample_sentences(clean["train"], d, ("src", "tgt")), d)
        tgt_proto = src_proto
    else:
        src_proto = _train_spm(_sample_sentences(clean["train"], d, ("src",)), d)
        tgt_proto = _train_spm(_sample_sentences(clean["train"], d, ("tgt",)), d)
    tok = Tokenizer(src_proto, None if d.joint_vocab else tgt_proto)
    say(
        f"sentencepiece {d.spm_type}: vocab {tok.src_vocab_size}/{tok.tgt_vocab_size} "
        f"in {time.time() - t:.1f}s"
    )
    (tmp / "spm.src.model").write_bytes(src_proto)
    (tmp / "spm.tgt.model").write_bytes(tgt_proto)

    # Encode (parallel for the big split) and drop over-long pairs from train.
    dtype = (
        np.dtype(np.uint16) if max(tok.src_vocab_size, tok.tgt_vocab_size) <= 65535 else np.dtype(np.int32)
    )
    for s, ds in clean.items():
        big = len(ds) >= 20_000
        with _workers_die_with_this_process():
            enc = ds.map(
                _encode,
                batched=True,
                batch_size=2000,
                num_proc=d.num_proc if big and d.num_proc > 1 else None,
                remove_columns=["src", "tgt"],
                fn_kwargs={
                    "src_proto": src_proto,
                    "tgt_proto": tgt_proto,
                    "max_len": d.max_len,
                    "max_ratio": d.max_ratio,
                },
                cache_file_name=str(scratch / f"{s}.enc.arrow"),
                desc=f"encode {s}",
            )
        if s == "train":
            counts = _count_reasons(enc)
            drops["too_long"] = int(counts[2])
            drops["ratio"] = int(counts[3])
            enc = enc.filter(
                lambda b: [r == 0 for r in b["reason"]],
                batched=True,
                cache_file_name=str(scratch / "train.kept.arrow"),
                desc="drop long pairs",
            )
            if len(enc) == 0:
                raise DataError(
                    f"training split: nothing left after cleaning (dropped {drops}); "
                    f"check data.max_len ({d.max_len}) and data.max_ratio ({d.max_ratio})"
                )
        tokens = _write_arrays(enc, tmp, s, dtype, progress)
        if s != "train":  # the raw text, for scoring against real references
            _write_text(ds, tmp, s)
        stats[s].update(kept=len(enc), src_tokens=tokens["src"], tgt_tokens=tokens["tgt"])
    stats["train"]["dropped"] = drops

    save_config(cfg, tmp / "config.yaml")
    return {
        "format": "mt-prepared",
        "version": PREPARE_VERSION,
        "fingerprint": fp,
        "src_lang": d.src_lang,
        "tgt_lang": d.tgt_lang,
        "joint_vocab": d.joint_vocab,
        "src_vocab_size": tok.src_vocab_size,
        "tgt_vocab_size": tok.tgt_vocab_size,
        "dtype": dtype.name,
        "splits": stats,
    }


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
    return "\n".join(lines)
