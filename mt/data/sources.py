"""Where parallel corpora come from: local text files or Hugging Face hub data sets.

An experiment has one corpus (the single-source keys of `data`) or several (`data.sources`);
either way `sources_of` gives a list of `Source`s, each local or hub, and `open_split` one of
their splits as a `Split`: its number of pairs and its raw (src, tgt) lines in chunks, so
that nothing downstream holds a whole corpus. Local files are checked line by line when a
split is opened (UTF-8, equal line counts), so a bad file is reported with its name and line
number before anything is written. Hub data sets are read through `datasets.load_dataset`
(at a revision and in a folder of the repository if asked); every way that can fail is one
line naming the data set, the split and the cause.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mt.config import DataConfig, SourceConfig
from mt.errors import DataError, disk_full, exception_chain

if TYPE_CHECKING:  # imported where data is loaded: training from a prepared cache needs no `datasets`
    import datasets
    import pyarrow as pa

# The name of the one source an experiment without data.sources has.
MAIN = "main"
# A hub split named as it is, without slices (`train[:1000]`) or concatenations (`train+test`).
PLAIN_SPLIT = re.compile(r"[\w.-]+")
# What `datasets` (5.x) raises for a repository whose data needs a loading script.
SCRIPT_REFUSED = "Dataset scripts are no longer supported"


@dataclass
class LocalPair:
    """The two files of one split: line i of `src` translates to line i of `tgt`."""

    split: str
    src: Path
    tgt: Path


@dataclass
class Source:
    """One corpus of the experiment, resolved: local files or a hub data set."""

    cfg: SourceConfig
    key: str  # where its keys are in the config, for error messages: "data" or "data.sources[i]"
    local: bool

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def splits(self) -> dict[str, str]:
        """Our split name -> file stem or hub split, of the kind in use."""
        return self.cfg.local_splits if self.local else self.cfg.hub_splits

    def describe(self) -> str:
        c = self.cfg
        if self.local:
            return str(c.local_dir)
        extra = [f"{k} {v}" for k, v in (("config", c.hub_config), ("revision", c.hub_revision),
                                          ("data_dir", c.hub_data_dir)) if v]
        return f"{c.hub}" + (f" ({', '.join(extra)})" if extra else "")


# --------------------------------------------------------------------------- which sources


def source_configs(cfg: DataConfig) -> list[SourceConfig]:
    """data.sources, or the one source the single-source keys describe."""
    if cfg.sources:
        return list(cfg.sources)
    return [
        SourceConfig(
            name=MAIN,
            local_dir=cfg.local_dir,
            local_splits=cfg.local_splits,
            hub=cfg.hub,
            hub_config=cfg.hub_config,
            hub_revision=cfg.hub_revision,
            hub_data_dir=cfg.hub_data_dir,
            hub_splits=cfg.hub_splits,
            max_train_pairs=cfg.max_train_pairs,
        )
    ]


def _key(cfg: DataConfig, i: int) -> str:
    return f"data.sources[{i}]" if cfg.sources else "data"


def _local_dir_exists(src: SourceConfig) -> bool:
    return bool(src.local_dir) and Path(str(src.local_dir)).expanduser().is_dir()


def _hub_is_local(src: SourceConfig) -> bool:
    return src.hub is not None and Path(src.hub).expanduser().is_dir()


def sources_of(cfg: DataConfig) -> list[Source]:
    """The sources, each local when its directory exists, else from the hub."""
    out = []
    for i, src in enumerate(source_configs(cfg)):
        key = _key(cfg, i)
        if not _local_dir_exists(src) and src.hub is None:
            raise DataError(
                f"{key}.local_dir: directory not found: {src.local_dir} (and no {key}.hub is set)"
            )
        out.append(Source(src, key, _local_dir_exists(src)))
    return out


@dataclass
class Plan:
    """What is prepared: the training split from every source that has one (in this order in
    the cache), the other splits (valid, test, ...) from the evaluation source."""

    train: list[Source]
    eval: Source

    @property
    def eval_splits(self) -> list[str]:
        """The evaluation source's splits other than train: valid first, then by name."""
        return sorted((s for s in self.eval.splits if s != "train"), key=lambda s: (s != "valid", s))

    def parts(self) -> list[tuple[Source, str]]:
        return [(s, "train") for s in self.train] + [(self.eval, s) for s in self.eval_splits]


def plan(cfg: DataConfig) -> Plan:
    srcs = sources_of(cfg)
    train = [s for s in srcs if "train" in s.splits]
    if not train:
        raise DataError("data: no source has a 'train' split (in the local_splits or hub_splits it uses)")
    evaluation = next((s for s in srcs if s.name == cfg.eval_source), srcs[0])
    if "valid" not in evaluation.splits:
        raise DataError(no_valid_split(evaluation, cfg))
    return Plan(train, evaluation)


def no_valid_split(src: Source, cfg: DataConfig) -> str:
    """Why a corpus without a 'valid' split is refused: training would validate nothing, pick a
    "best" checkpoint blindly and never stop early, all silently."""
    key = f"{src.key}.{'local_splits' if src.local else 'hub_splits'}"
    which = "" if not cfg.sources else (
        f" of source '{src.name}', the evaluation source"
        f"{' (data.eval_source)' if cfg.eval_source else ' (the first; data.eval_source names another)'}"
    )
    return (
        f"{key}: no 'valid' split{which} ({', '.join(sorted(src.splits)) or 'none'} only): training "
        f"needs one to validate, keep the best checkpoint and stop early; add it (e.g. valid: dev)"
        + (", or set data.eval_source to a source that has one" if cfg.sources else "")
    )


def inputs_reachable(cfg: DataConfig) -> bool:
    """Whether every corpus can be read now: its local directory exists, its hub data set is a
    local directory, or the hub is not offline."""
    offline = bool(os.environ.get("HF_HUB_OFFLINE"))
    return all(
        _local_dir_exists(s) or _hub_is_local(s) or (s.hub is not None and not offline)
        for s in source_configs(cfg)
    )


# --------------------------------------------------------------------------- local files


def _find(directory: Path, stem: str, lang: str) -> Path:
    tried = [directory / f"{stem}.{lang}", directory / f"{stem}.{lang}.gz"]
    for p in tried:
        if p.is_file():
            return p
    raise DataError(f"missing corpus file: {tried[0]} (also tried {tried[1].name})")


def local_pair(src: Source, split: str, src_lang: str, tgt_lang: str) -> LocalPair:
    d = Path(str(src.cfg.local_dir)).expanduser()
    stem = src.cfg.local_splits[split]
    return LocalPair(split, _find(d, stem, src_lang), _find(d, stem, tgt_lang))


def _open(path: Path) -> io.BufferedIOBase:
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


def file_fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


# --------------------------------------------------------------------------- splits


class Split:
    """One split of one source: `len()` pairs, read in chunks of raw (src, tgt) lines."""

    def __init__(self, source: Source, split: str, n: int) -> None:
        self.source, self.split, self.n = source, split, n

    def __len__(self) -> int:
        return self.n

    def chunks(self, size: int) -> Iterator[tuple[list[str], list[str]]]:
        raise NotImplementedError


class LocalSplit(Split):
    def __init__(self, source: Source, pair: LocalPair, limit: int) -> None:
        n = check_pair(pair)
        super().__init__(source, pair.split, min(n, limit) if limit else n)
        self.pair = pair

    def chunks(self, size: int) -> Iterator[tuple[list[str], list[str]]]:
        src: list[str] = []
        tgt: list[str] = []
        for i, (s, t) in enumerate(zip(_lines(self.pair.src), _lines(self.pair.tgt), strict=True)):
            if i >= self.n:
                break
            src.append(s)
            tgt.append(t)
            if len(src) == size:
                yield src, tgt
                src, tgt = [], []
        if src:
            yield src, tgt


class HubSplit(Split):
    def __init__(
        self, source: Source, split: str, ds: datasets.Dataset, src_lang: str, tgt_lang: str
    ) -> None:
        super().__init__(source, split, len(ds))
        self.ds, self.src_lang, self.tgt_lang = ds, src_lang, tgt_lang

    def _start(self) -> int | None:
        """Where the data set's rows begin in its Arrow files: 0 for a whole split, 1000 for a
        slice `train[1000:]` (whose files are the whole split's); None when its rows are not one
        run of one split's rows (`train+validation`), or the split sizes are unknown."""
        import datasets

        spec = self.source.splits[self.split]
        if PLAIN_SPLIT.fullmatch(spec):  # a whole split: no need to know its size
            return 0
        sizes = {name: info.num_examples for name, info in (self.ds.info.splits or {}).items()}
        try:
            read = datasets.ReadInstruction.from_spec(spec).to_absolute(sizes)
        except (ValueError, KeyError, AssertionError):  # datasets checks specs with assert too
            return None
        return read[0].from_ if len(read) == 1 else None

    def _tables(self) -> Iterator[pa.Table | pa.RecordBatch]:
        """The rows in order, from the data set's Arrow files by plain reads when it has files:
        iterating its memory-mapped table would leave every page of a multi-GB file resident
        in this process. The data set is len() rows of those files from `_start()` on (a whole
        split or a slice of one, or the first max_train_pairs of either); anything else is read
        through the data set itself."""
        import pyarrow as pa

        files = [f["filename"] for f in self.ds.cache_files]
        start = self._start() if files else None
        if start is None:  # held in memory, or rows of several splits
            yield from self.ds.with_format("arrow").iter(batch_size=10_000)
            return
        for name in files:
            with pa.OSFile(name) as f:
                for batch in pa.ipc.open_stream(f):
                    if start >= batch.num_rows:  # before the slice
                        start -= batch.num_rows
                        continue
                    yield batch.slice(start)
                    start = 0

    def _columns(self, table: pa.Table | pa.RecordBatch) -> tuple[list[str], list[str]]:
        import pyarrow.compute as pc

        if "translation" in table.column_names:
            pairs = table.column("translation")
            cols = [pc.struct_field(pairs, lang) for lang in (self.src_lang, self.tgt_lang)]
        else:
            cols = [table.column(lang) for lang in (self.src_lang, self.tgt_lang)]
        src, tgt = ([s or "" for s in c.to_pylist()] for c in cols)  # a missing side is empty
        return src, tgt

    def chunks(self, size: int) -> Iterator[tuple[list[str], list[str]]]:
        src: list[str] = []
        tgt: list[str] = []
        left = self.n
        for table in self._tables():
            if left <= 0:
                break
            s, t = self._columns(table.slice(0, left))
            left -= len(s)
            src += s
            tgt += t
            while len(src) >= size:
                yield src[:size], tgt[:size]
                src, tgt = src[size:], tgt[size:]
        if src:
            yield src, tgt


def open_split(src: Source, split: str, data: DataConfig) -> Split:
    """A split of a source, checked (local files) or loaded (hub); the training split keeps the
    source's first max_train_pairs pairs when that is set."""
    limit = src.cfg.max_train_pairs if split == "train" else 0
    if src.local:
        pair = local_pair(src, split, data.src_lang, data.tgt_lang)
        opened = LocalSplit(src, pair, limit)
        if len(opened) == 0:
            raise DataError(f"split '{split}' is empty{_of(src)}: {pair.src} and {pair.tgt} have no lines")
        return opened
    ds = _check_columns(_load_hub(src, split), src, split, data)
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    if len(ds) == 0:
        raise DataError(f"split '{split}' is empty{_of(src)}: {src.describe()} has no rows in it")
    return HubSplit(src, split, ds, data.src_lang, data.tgt_lang)


def _of(src: Source) -> str:
    return "" if src.name == MAIN else f" in source '{src.name}'"


# --------------------------------------------------------------------------- the hub


def _load_hub(src: Source, split: str) -> datasets.Dataset:
    import datasets

    c, key = src.cfg, src.key
    hub_split = src.splits[split]
    try:
        return datasets.load_dataset(
            c.hub, c.hub_config, revision=c.hub_revision, data_dir=c.hub_data_dir, split=hub_split
        )
    except Exception as e:  # `datasets` fails in many ways (RuntimeError, ValueError, its own errors)
        cause = e
    chain = exception_chain(cause)
    full = disk_full(cause)
    if full is not None:  # `mt prepare` says "disk full", naming the file, not "cannot load"
        raise full from None
    reason = " ".join(str(cause).split())
    if isinstance(cause, RuntimeError) and SCRIPT_REFUSED in reason:
        script = reason.rsplit(" ", 1)[-1]
        at = f" at revision {c.hub_revision}" if c.hub_revision else ""
        raise DataError(
            f"{key}.hub: '{c.hub}'{at} needs a loading script ({script}), which datasets "
            f"{datasets.__version__} no longer runs; read the hub's parquet conversion instead: "
            f"{key}.hub_revision=refs/convert/parquet, {key}.hub_data_dir=<its folder for your "
            f"config, e.g. iwslt2017-de-en> and no {key}.hub_config"
        ) from None
    if chain[-1] is not cause:  # e.g. DatasetGenerationError: what went wrong is in its cause
        reason += f" ({type(chain[-1]).__name__}: {' '.join(str(chain[-1]).split())})"
    where = ""
    if isinstance(cause, ConnectionError):
        where = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else " (is the hub reachable?)"
        if c.local_dir:
            where += f"; {key}.local_dir {c.local_dir} does not exist, so the hub was tried"
    raise DataError(
        f"{key}.hub: cannot load '{src.describe()}', split '{hub_split}': "
        f"{type(cause).__name__}: {reason}{where}"
    ) from None


def _check_columns(ds: datasets.Dataset, src: Source, split: str, data: DataConfig) -> datasets.Dataset:
    key, hub_split, langs = src.key, src.splits[split], (data.src_lang, data.tgt_lang)
    cols = set(ds.column_names)
    if "translation" not in cols and not set(langs) <= cols:
        raise DataError(
            f"{key}.hub: '{src.describe()}' split '{hub_split}' has columns {sorted(cols)}; expected "
            f"'translation' or '{langs[0]}' and '{langs[1]}'"
        )
    if "translation" in cols:
        feature = ds.features["translation"]
        have = set(feature.keys()) if hasattr(feature, "keys") else set()
        if have and not set(langs) <= have:
            raise DataError(
                f"{key}.hub: '{src.describe()}' has languages {sorted(have)}, not "
                f"data.src_lang '{langs[0]}' and data.tgt_lang '{langs[1]}'"
            )
    return ds


# --------------------------------------------------------------------------- fingerprint


def _tree_fingerprint(root: Path) -> list[str]:
    """A hub data set that is a local directory: its data files, so that editing one prepares again."""
    return [
        f"{p.relative_to(root)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]


def source_fingerprint(cfg: DataConfig) -> list[str]:
    """What identifies the inputs: file paths, sizes and times, or the hub data set."""
    out = []
    for src, split in plan(cfg).parts():
        c = src.cfg
        if src.local:
            p = local_pair(src, split, cfg.src_lang, cfg.tgt_lang)
            out.append(f"{src.name}:{split}={file_fingerprint(p.src)}|{file_fingerprint(p.tgt)}")
        else:
            out.append(f"{src.name}:{split}=hub:{c.hub}|{c.hub_config}|{c.hub_revision}|{c.hub_data_dir}|"
                       f"{c.hub_splits[split]}")
            if _hub_is_local(c):
                out += _tree_fingerprint(Path(str(c.hub)).expanduser())
    return out
