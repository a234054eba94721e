"""Where a parallel corpus comes from: local text files or a Hugging Face hub data set.

Both kinds end up as a `datasets.Dataset` with two string columns, `src` and
`tgt`, so everything after loading is the same code. Local files are checked
line by line first (UTF-8, equal line counts) so that a bad file is reported
with its name and line number before anything is written.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from mt.config import DataConfig
from mt.errors import DataError

if TYPE_CHECKING:  # imported where data is loaded: training from a prepared cache needs no `datasets`
    import datasets


@dataclass
class LocalPair:
    """The two files of one split: line i of `src` translates to line i of `tgt`."""

    split: str
    src: Path
    tgt: Path


def use_local(cfg: DataConfig) -> bool:
    """Local files win when their directory exists; the hub is the fallback."""
    if cfg.local_dir and Path(cfg.local_dir).expanduser().is_dir():
        return True
    if cfg.hub is None:
        raise DataError(f"data.local_dir: directory not found: {cfg.local_dir} (and no data.hub is set)")
    return False


def inputs_reachable(cfg: DataConfig) -> bool:
    """Whether the corpus can be read now: its local directory exists, or the hub is not offline."""
    if cfg.local_dir and Path(cfg.local_dir).expanduser().is_dir():
        return True
    return cfg.hub is not None and not os.environ.get("HF_HUB_OFFLINE")


def split_names(cfg: DataConfig) -> list[str]:
    """Our split names, train first."""
    names = list(cfg.local_splits if use_local(cfg) else cfg.hub_splits)
    return sorted(names, key=lambda s: (s != "train", s != "valid", s))


def _find(directory: Path, stem: str, lang: str) -> Path:
    tried = [directory / f"{stem}.{lang}", directory / f"{stem}.{lang}.gz"]
    for p in tried:
        if p.is_file():
            return p
    raise DataError(f"missing corpus file: {tried[0]} (also tried {tried[1].name})")


def local_files(cfg: DataConfig) -> list[LocalPair]:
    assert cfg.local_dir is not None
    d = Path(cfg.local_dir).expanduser()
    return [
        LocalPair(split, _find(d, stem, cfg.src_lang), _find(d, stem, cfg.tgt_lang))
        for split, stem in cfg.local_splits.items()
    ]


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _lines(path: Path) -> Iterator[str]:
    """Decoded lines of a file, without line ends; a BOM at the start is removed."""
    try:
        with _open(path) as f:
            for n, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{path}:{n}: not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 4]!r})"
                    ) from None
                if n == 1 and line.startswith("\ufeff"):
                    line = line[1:]
                yield line.rstrip("\r\n")
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; corrupt data zlib.error
        raise DataError(f"{path}: cannot read: {e}") from None


def check_pair(pair: LocalPair) -> int:
    """Decode both files fully and compare line counts; return the count."""
    counts = [sum(1 for _ in _lines(p)) for p in (pair.src, pair.tgt)]
    if counts[0] != counts[1]:
        raise DataError(
            f"split '{pair.split}': {pair.src} has {counts[0]} lines but {pair.tgt} has {counts[1]}"
        )
    return counts[0]


def _pair_rows(src: str, tgt: str, limit: int) -> Iterator[dict[str, str]]:
    for i, (s, t) in enumerate(zip(_lines(Path(src)), _lines(Path(tgt)), strict=True)):
        if limit and i >= limit:
            return
        yield {"src": s, "tgt": t}


def file_fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def load_local(pair: LocalPair, cache_dir: Path, limit: int = 0) -> datasets.Dataset:
    """A local split as a Dataset(src, tgt), written to Arrow files under cache_dir."""
    import datasets

    if check_pair(pair) == 0:
        raise DataError(f"split '{pair.split}' is empty: {pair.src} and {pair.tgt} have no lines")
    features = datasets.Features({"src": datasets.Value("string"), "tgt": datasets.Value("string")})
    return datasets.Dataset.from_generator(
        _pair_rows,
        features=features,
        cache_dir=str(cache_dir),
        # The fingerprints make the generator's cache key change with the files.
        gen_kwargs={"src": str(pair.src), "tgt": str(pair.tgt), "limit": limit},
        fingerprint=hashlib.sha1(
            f"{file_fingerprint(pair.src)}|{file_fingerprint(pair.tgt)}|{limit}".encode()
        ).hexdigest(),
    )


def _to_pairs(batch: dict[str, list], src_lang: str, tgt_lang: str) -> dict[str, list[str]]:
    if "translation" in batch:
        rows = batch["translation"]
        return {"src": [r[src_lang] or "" for r in rows], "tgt": [r[tgt_lang] or "" for r in rows]}
    return {"src": [s or "" for s in batch[src_lang]], "tgt": [t or "" for t in batch[tgt_lang]]}


def load_hub(cfg: DataConfig, split: str, cache_dir: Path) -> datasets.Dataset:
    """A hub split (or a local directory in the hub's layout) as a Dataset(src, tgt)."""
    import datasets

    assert cfg.hub is not None
    hub_split = cfg.hub_splits[split]
    try:
        ds = datasets.load_dataset(cfg.hub, cfg.hub_config, split=hub_split)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        where = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE") else "is the hub reachable?"
        if cfg.local_dir:
            where += f"; data.local_dir {cfg.local_dir} does not exist, so the hub was tried"
        raise DataError(
            f"data.hub: cannot load '{cfg.hub}' (config {cfg.hub_config}, split '{hub_split}'): "
            f"{type(e).__name__}: {e} ({where})"
        ) from None
    cols = set(ds.column_names)
    if "translation" not in cols and not {cfg.src_lang, cfg.tgt_lang} <= cols:
        raise DataError(
            f"data.hub: '{cfg.hub}' split '{hub_split}' has columns {sorted(cols)}; expected "
            f"'translation' or '{cfg.src_lang}' and '{cfg.tgt_lang}'"
        )
    if "translation" in cols:
        langs = (
            set(ds.features["translation"].keys()) if hasattr(ds.features["translation"], "keys") else set()
        )
        if langs and not {cfg.src_lang, cfg.tgt_lang} <= langs:
            raise DataError(
                f"data.hub: '{cfg.hub}' has languages {sorted(langs)}, not "
                f"data.src_lang '{cfg.src_lang}' and data.tgt_lang '{cfg.tgt_lang}'"
            )
    if split == "train" and cfg.max_train_pairs:
        ds = ds.select(range(min(cfg.max_train_pairs, len(ds))))
    return ds.map(
        _to_pairs,
        batched=True,
        remove_columns=ds.column_names,
        fn_kwargs={"src_lang": cfg.src_lang, "tgt_lang": cfg.tgt_lang},
        cache_file_name=str(cache_dir / f"{split}.pairs.arrow"),
        desc=f"reading {split}",
    )


def source_fingerprint(cfg: DataConfig) -> list[str]:
    """What identifies the inputs: file paths, sizes and times, or the hub name."""
    if use_local(cfg):
        return [f"{p.split}={file_fingerprint(p.src)}|{file_fingerprint(p.tgt)}" for p in local_files(cfg)]
    return [f"hub={cfg.hub}|{cfg.hub_config}|{sorted(cfg.hub_splits.items())}"]


def load_split(cfg: DataConfig, split: str, cache_dir: Path) -> datasets.Dataset:
    if use_local(cfg):
        pair = next(p for p in local_files(cfg) if p.split == split)
        return load_local(pair, cache_dir, limit=cfg.max_train_pairs if split == "train" else 0)
    return load_hub(cfg, split, cache_dir)
