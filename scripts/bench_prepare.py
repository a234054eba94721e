"""Data-preparation benchmarks.

    python scripts/bench_prepare.py [--corpus ../shared/corpora/multi30k] [--scales 1 8]
    python scripts/bench_prepare.py --pairs 4500000 [--hub] [--corpus ...] [--work DIR] [--keep]

Scales (the default): each scale writes a corpus of that many copies of the Multi30k training
split (validation and test as they are) to a temporary directory and times a cold `prepare`
of it, so the growth of the time with corpus size can be read off the side-by-side table.

--pairs N: a WMT14-size run. It writes N synthetic training pairs to local disk, each two
Multi30k pairs joined (chosen with a fixed seed, so sentences are WMT-long and varied), as
gzipped text (or, with --hub, as a copy of the hub repository wmt/wmt14: parquet shards named
in its card, read through `datasets.load_dataset` as the real one is), then runs, each in its
own process: `mt prepare` with the data settings of configs/wmt14_en_de.yaml
on that corpus and on Multi30k itself, measuring wall time and peak RSS; and `mt train` of the
default experiment's model on each cache up to its first step, measuring the time to that step
and the RSS then. Targets on a 2-core machine: prepare within 10 minutes and 3 GB, and training
at its first step within 30 s and within 1 GB of the Multi30k run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from mt.config import Config, DataConfig
from mt.data.prepare import prepare

REPO = Path(__file__).resolve().parent.parent
EVAL_STEMS = {"valid": "val", "test": "test_2016_flickr"}
GIB = 1024**3


# --------------------------------------------------------------------------- scales


def build(corpus: Path, out: Path, scale: int) -> None:
    out.mkdir(parents=True)
    for lang in ("de", "en"):
        data = gzip.open(corpus / f"train.{lang}.gz", "rb").read()
        with gzip.open(out / f"train.{lang}.gz", "wb", compresslevel=1) as f:
            for _ in range(scale):
                f.write(data)
        for stem in EVAL_STEMS.values():
            shutil.copy(corpus / f"{stem}.{lang}.gz", out / f"{stem}.{lang}.gz")


def scales(corpus: Path, factors: list[int], num_proc: int) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale in factors:
            local = Path(tmp) / f"x{scale}"
            build(corpus, local, scale)
            cfg = Config(
                data=DataConfig(
                    local_dir=str(local),
                    local_splits={"train": "train", **EVAL_STEMS},
                    prepared_dir=str(Path(tmp) / f"prepared{scale}"),
                    max_len=128,
                    num_proc=num_proc,
                ),
                name=f"bench{scale}",
            )
            t = time.perf_counter()
            out = prepare(cfg, quiet=True)
            secs = time.perf_counter() - t
            meta = json.loads((out / "meta.json").read_text())
            n = sum(s["read"] for s in meta["splits"].values())
            rows.append((scale, n, secs))
    print("\ndata preparation (SentencePiece training + encoding of all splits)")
    print(f"{'scale':>6}{'sentence pairs':>16}{'seconds':>10}{'pairs/s':>10}{'time vs 1x':>12}")
    for scale, n, secs in rows:
        print(f"{scale:>5}x{n:>16}{secs:>10.2f}{n / secs:>10.0f}{secs / rows[0][2]:>11.2f}x")


# --------------------------------------------------------------------------- WMT14 size


def synthetic_corpus(corpus: Path, out: Path, pairs: int, seed: int = 0) -> None:
    """`pairs` training pairs, each two Multi30k pairs joined, plus Multi30k's val and test."""
    out.mkdir(parents=True, exist_ok=True)
    lines = {lang: gzip.open(corpus / f"train.{lang}.gz", "rt", encoding="utf-8").read().splitlines()
             for lang in ("de", "en")}
    n = len(lines["de"])
    rng = random.Random(seed)
    files = {lang: gzip.open(out / f"train.{lang}.gz", "wt", encoding="utf-8", compresslevel=1)
             for lang in ("de", "en")}
    try:
        block = 100_000
        for start in range(0, pairs, block):
            picks = [(rng.randrange(n), rng.randrange(n)) for _ in range(min(block, pairs - start))]
            for lang, f in files.items():
                f.write("".join(f"{lines[lang][a]} {lines[lang][b]}\n" for a, b in picks))
    finally:
        for f in files.values():
            f.close()
    for stem in EVAL_STEMS.values():
        for lang in ("de", "en"):
            shutil.copy(corpus / f"{stem}.{lang}.gz", out / f"{stem}.{lang}.gz")


WMT14_CARD = """---
configs:
- config_name: de-en
  data_files:
  - split: train
    path: de-en/train-*
  - split: validation
    path: de-en/validation-*
  - split: test
    path: de-en/test-*
---
# wmt14 (a synthetic copy for benchmarks)
"""


def hub_copy(corpus: Path, out: Path, shards: int = 3) -> Path:
    """The text corpus as wmt/wmt14 is on the hub: de-en/{split}-0000k-of-0000n.parquet with a
    `translation` column, and a card naming the config de-en; written a block at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = out / "wmt" / "wmt14"
    (repo / "de-en").mkdir(parents=True, exist_ok=True)
    (repo / "README.md").write_text(WMT14_CARD)
    splits = [("train", "train", shards), ("validation", EVAL_STEMS["valid"], 1),
              ("test", EVAL_STEMS["test"], 1)]
    for split, stem, n_shards in splits:
        files = [gzip.open(corpus / f"{stem}.{lang}.gz", "rt", encoding="utf-8") for lang in ("de", "en")]
        total = sum(1 for _ in gzip.open(corpus / f"{stem}.de.gz", "rb"))
        per = -(-total // n_shards)
        try:
            for k in range(n_shards):
                path = repo / "de-en" / f"{split}-{k:05d}-of-{n_shards:05d}.parquet"
                with pq.ParquetWriter(path, pa.schema([("translation", pa.struct(
                        [("de", pa.string()), ("en", pa.string())]))])) as writer:
                    left = min(per, total - k * per)
                    while left > 0:
                        block = min(left, 200_000)
                        de = [files[0].readline().rstrip("\n") for _ in range(block)]
                        en = [files[1].readline().rstrip("\n") for _ in range(block)]
                        rows = pa.StructArray.from_arrays([pa.array(de), pa.array(en)], ["de", "en"])
                        writer.write_table(pa.table({"translation": rows}))
                        left -= block
        finally:
            for f in files:
                f.close()
    return repo


def experiment(path: Path, corpus: Path, prepared: Path, run: Path, hub: bool = False) -> Path:
    """A config: WMT14's data settings on a local corpus (or a local copy of the hub's), the
    default experiment's model and training settings (sized for a CPU), so that only the data
    differs between the runs."""
    wmt = yaml.safe_load((REPO / "configs" / "wmt14_en_de.yaml").read_text())
    default = yaml.safe_load((REPO / "configs" / "multi30k_de_en.yaml").read_text())
    data = {k: v for k, v in wmt["data"].items() if not k.startswith("hub")}
    if hub:
        data.update(hub=str(corpus), hub_config="de-en", hub_splits=wmt["data"]["hub_splits"])
    else:
        data.update(local_dir=str(corpus), local_splits={"train": "train", **EVAL_STEMS})
    data.update(prepared_dir=str(prepared), num_proc=os.cpu_count() or 1)
    train = dict(default["train"], out_dir=str(run), log_every=1, valid_every=0, max_steps=10**6,
                 max_minutes=0.0)
    path.write_text(yaml.safe_dump({"data": data, "model": default["model"], "train": train}))
    return path


HF_CACHE: dict[str, str] = {}  # --hub: `datasets` keeps its Arrow copy in the work directory


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", **HF_CACHE}


def _rss(pid: int, field: str) -> int:
    """VmRSS or VmHWM (the peak) of a process, in bytes; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return 0


def _pss(pid: int) -> int:
    """Proportional set size of a process, in bytes: a page it shares with n processes counts 1/n."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return 0


def _tree_pss(pid: int) -> int:
    """The memory a process and its children (the encoding workers) take together, in bytes:
    forked workers share their parent's pages, which their own RSS would count again."""
    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        kids = []
    return _pss(pid) + sum(_pss(k) for k in kids)


def time_prepare(config: Path) -> dict[str, float]:
    """`mt prepare` in its own process: wall time, the peak RSS of its largest process (from
    wait4), and the peak memory of it and its workers together (PSS, sampled every 0.2 s)."""
    log = config.with_suffix(".prepare.log")
    t = time.perf_counter()
    with open(log, "w") as f:  # a file, not a pipe: nobody reads a pipe while this waits
        proc = subprocess.Popen([sys.executable, "-m", "mt", "prepare", str(config)], env=_env(),
                                stdout=f, stderr=subprocess.STDOUT)
    tree = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        tree = max(tree, _tree_pss(proc.pid))
        time.sleep(0.2)
    secs = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"mt prepare {config} failed ({proc.returncode}):\n{out[-3000:]}")
    print(out[out.find("prepared "):].rstrip(), flush=True)
    return {"seconds": secs, "peak_rss": usage.ru_maxrss * 1024, "tree_pss": tree}


def time_first_step(config: Path, run: Path) -> dict[str, float]:
    """`mt train` in its own process until metrics.jsonl has its first training record (step 1,
    log_every 1): the seconds since start and the process's peak RSS by then; then it is ended."""
    shutil.rmtree(run, ignore_errors=True)
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mt", "train", str(config)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    try:
        while proc.poll() is None:
            if metrics.exists() and metrics.read_text().strip():
                secs = time.perf_counter() - t
                return {"seconds": secs, "peak_rss": _rss(proc.pid, "VmHWM"), "rss": _rss(proc.pid, "VmRSS")}
            time.sleep(0.05)
        err = proc.stderr.read() if proc.stderr else ""
        raise SystemExit(f"mt train {config} ended before its first step ({proc.returncode}):\n{err[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def wmt_size(corpus: Path, pairs: int, work: Path | None, keep: bool, hub: bool) -> None:
    root = Path(work or tempfile.mkdtemp(prefix="bench_prepare_", dir=os.environ.get("TMPDIR", "/tmp")))
    try:
        synthetic = root / "synthetic"
        t = time.perf_counter()
        if not (synthetic / "train.en.gz").exists():
            synthetic_corpus(corpus, synthetic, pairs)
            print(f"wrote {pairs:,} synthetic pairs to {synthetic} in {time.perf_counter() - t:.0f}s")
        big = synthetic
        if hub:
            HF_CACHE["HF_DATASETS_CACHE"] = str(root / "hf-cache")
            shutil.rmtree(root / "hf-cache", ignore_errors=True)  # converting to Arrow is part of it
            big = root / "hub" / "wmt" / "wmt14"
            if not big.exists():
                t = time.perf_counter()
                hub_copy(synthetic, root / "hub")
                print(f"wrote them as a copy of wmt/wmt14 in {time.perf_counter() - t:.0f}s")
        rows = {}
        for label, source in (("Multi30k", corpus), (f"synthetic {pairs:,}", big)):
            tag = label.split()[0].lower()
            config = experiment(root / f"{tag}.yaml", source, root / f"prepared-{tag}", root / f"run-{tag}",
                                hub=hub and source == big)
            shutil.rmtree(root / f"prepared-{tag}", ignore_errors=True)  # a cold run every time
            prep = time_prepare(config)
            meta = json.loads((root / f"prepared-{tag}" / "meta.json").read_text())
            step = time_first_step(config, root / f"run-{tag}")
            rows[label] = (meta["splits"]["train"]["read"], prep, step)
        how = "a copy of wmt/wmt14 through datasets.load_dataset" if hub else "gzipped text"
        print(f"\nmt prepare (WMT14 data settings: bpe 32k, joint; the big corpus as {how}) and mt train "
              f"(the default model) up to its first step, on {os.cpu_count()} cores")
        print(f"{'corpus':<22}{'train pairs':>12}{'prepare s':>11}{'peak RSS':>10}{'all PSS':>10}"
              f"{'1st step s':>12}{'RSS then':>10}")
        for label, (n, prep, step) in rows.items():
            print(f"{label:<22}{n:>12,}{prep['seconds']:>11.1f}{prep['peak_rss'] / GIB:>9.2f}G"
                  f"{prep['tree_pss'] / GIB:>9.2f}G{step['seconds']:>12.1f}{step['peak_rss'] / GIB:>9.2f}G")
        (_, _, base), (_, big_prep, big_step) = rows.values()
        print("\ntargets: prepare <= 600 s and <= 3 GB; first step <= 30 s, RSS within 1 GB of Multi30k's")
        print(f"  prepare {big_prep['seconds']:.0f} s, {big_prep['peak_rss'] / GIB:.2f} GB; first step "
              f"{big_step['seconds']:.1f} s, RSS {(big_step['peak_rss'] - base['peak_rss']) / GIB:+.2f} GB")
    finally:
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpora" / "multi30k"))
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=0, help="a WMT14-size run with this many pairs")
    ap.add_argument("--work", type=Path, help="--pairs: directory for the corpus and caches (reused)")
    ap.add_argument("--keep", action="store_true", help="--pairs: keep the work directory")
    ap.add_argument("--hub", action="store_true", help="--pairs: as a copy of wmt/wmt14, through datasets")
    args = ap.parse_args()
    if args.pairs:
        wmt_size(Path(args.corpus), args.pairs, args.work, args.keep, args.hub)
    else:
        scales(Path(args.corpus), args.scales, args.num_proc)


if __name__ == "__main__":
    main()
