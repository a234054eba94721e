"""Data-preparation benchmark: sentences per second at 1x and 8x the Multi30k training set.

    python scripts/bench_prepare.py [--corpus ../shared/corpora/multi30k] [--scales 1 8]

Each scale writes a corpus of that many copies of the training split (validation and
test as they are) to a temporary directory and times a cold `prepare` of it, so the
growth of the time with corpus size can be read off the side-by-side table.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import tempfile
import time
from pathlib import Path

from mt.config import Config, DataConfig
from mt.prepare import prepare


def build(corpus: Path, out: Path, scale: int) -> None:
    out.mkdir(parents=True)
    for lang in ("de", "en"):
        data = gzip.open(corpus / f"train.{lang}.gz", "rb").read()
        with gzip.open(out / f"train.{lang}.gz", "wb", compresslevel=1) as f:
            for _ in range(scale):
                f.write(data)
        for stem in ("val", "test_2016_flickr"):
            shutil.copy(corpus / f"{stem}.{lang}.gz", out / f"{stem}.{lang}.gz")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="../shared/corpora/multi30k")
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--num-proc", type=int, default=2)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale in args.scales:
            corpus = Path(tmp) / f"x{scale}"
            build(Path(args.corpus), corpus, scale)
            cfg = Config(
                data=DataConfig(
                    local_dir=str(corpus),
                    local_splits={"train": "train", "valid": "val", "test": "test_2016_flickr"},
                    prepared_dir=str(Path(tmp) / f"prepared{scale}"),
                    max_len=128,
                    num_proc=args.num_proc,
                ),
                name=f"bench{scale}",
            )
            t = time.perf_counter()
            out = prepare(cfg, quiet=True)
            secs = time.perf_counter() - t
            import json

            meta = json.loads((out / "meta.json").read_text())
            n = sum(s["read"] for s in meta["splits"].values())
            rows.append((scale, n, secs))
    print("\ndata preparation (SentencePiece training + encoding of all splits)")
    print(f"{'scale':>6}{'sentence pairs':>16}{'seconds':>10}{'pairs/s':>10}{'time vs 1x':>12}")
    for scale, n, secs in rows:
        print(f"{scale:>5}x{n:>16}{secs:>10.2f}{n / secs:>10.0f}{secs / rows[0][2]:>11.2f}x")


if __name__ == "__main__":
    main()
