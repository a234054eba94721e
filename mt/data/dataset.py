"""Reading the prepared cache: memory-mapped token ids per split, and the tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mt.data.tokenizer import Tokenizer
from mt.errors import DataError


class PreparedSplit:
    """One split of the cache. Sentence i of a side is ids[idx[i]:idx[i+1]] (no specials)."""

    def __init__(self, directory: Path, split: str) -> None:
        self.name = split
        try:
            self.src_ids = np.load(directory / f"{split}.src.npy", mmap_mode="r")
            self.src_idx = np.load(directory / f"{split}.src.idx.npy", mmap_mode="r")
            self.tgt_ids = np.load(directory / f"{split}.tgt.npy", mmap_mode="r")
            self.tgt_idx = np.load(directory / f"{split}.tgt.idx.npy", mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"{directory}: cannot read split '{split}' of the prepared cache: {e}") from None
        if len(self.src_idx) != len(self.tgt_idx):
            raise DataError(f"{directory}: split '{split}' has different source and target counts")
        self.src_lens = np.diff(self.src_idx).astype(np.int64)
        self.tgt_lens = np.diff(self.tgt_idx).astype(np.int64)

    def __len__(self) -> int:
        return len(self.src_lens)

    def src(self, i: int) -> np.ndarray:
        return self.src_ids[self.src_idx[i] : self.src_idx[i + 1]]

    def tgt(self, i: int) -> np.ndarray:
        return self.tgt_ids[self.tgt_idx[i] : self.tgt_idx[i + 1]]


@dataclass
class Prepared:
    """The whole cache: metadata, tokenizer and splits."""

    directory: Path
    meta: dict[str, Any]
    tokenizer: Tokenizer

    def split(self, name: str) -> PreparedSplit:
        if name not in self.meta["splits"]:
            raise DataError(
                f"{self.directory}: no split '{name}'; prepared splits are {', '.join(self.meta['splits'])}"
            )
        return PreparedSplit(self.directory, name)

    def train_sources(self) -> list[tuple[str, int]]:
        """The training split's sources in their order in it, with their pair counts: source k
        holds the pairs after those of the sources before it. Empty for caches that predate it."""
        return [(s["name"], int(s["kept"])) for s in self.meta.get("train_sources", [])]

    def text(self, split: str, side: str) -> list[str]:
        """The stripped raw text of a validation or test split (references for scoring)."""
        path = self.directory / f"{split}.{side}.txt"
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except OSError as e:
            raise DataError(f"{path}: cannot read raw text of split '{split}': {e}") from None
        return lines[:-1]  # the file ends with a newline


def load_prepared(directory: Path) -> Prepared:
    directory = Path(directory)
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        src_proto = (directory / "spm.src.model").read_bytes()
        tgt_proto = (directory / "spm.tgt.model").read_bytes()
    except (OSError, ValueError) as e:
        raise DataError(f"{directory}: not a prepared corpus ({e}); run `mt prepare CONFIG` first") from None
    tok = Tokenizer(src_proto, None if meta.get("joint_vocab") else tgt_proto)
    return Prepared(directory, meta, tok)
