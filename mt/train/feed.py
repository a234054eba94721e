"""What a run trains and validates on: the prepared cache (prepared first when missing or out of
date), its validation split, the batchers with the training sources' mixture, and the updates of
each epoch in order."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from mt.config import Config
from mt.data.dataset import Prepared, PreparedSplit, load_prepared
from mt.data.prepare import is_up_to_date, prepare, read_meta
from mt.data.sources import inputs_reachable, source_configs
from mt.errors import DataError, MTError
from mt.train.batching import Batch, Mixture, TokenBatcher, make_batch
from mt.train.distributed import Dist


def load_data(cfg: Config, dist: Dist) -> Prepared:
    """The prepared cache; rank 0 prepares it first when it is missing or out of date.

    A cache whose corpus is out of reach (copied to a machine without the raw files, the
    hub offline) is used as it is: it cannot be checked, nor prepared again.
    """
    directory = cfg.prepared_dir
    if dist.is_main:
        if read_meta(directory) is not None and not inputs_reachable(cfg.data):
            print(
                f"mt train: the corpus of '{cfg.name}' is out of reach (data.local_dir not found, "
                f"hub offline); training on the prepared cache {directory} as it is"
            )
        elif not is_up_to_date(cfg):
            print(f"mt train: data for '{cfg.name}' is not prepared (or out of date); preparing it first")
            prepare(cfg)
    dist.barrier()
    return load_prepared(directory)


def valid_split(data: Prepared, cfg: Config) -> PreparedSplit:
    """The validation split, which a cache used as it is (its corpus out of reach) may lack:
    `mt prepare` refuses a corpus without one (mt.data.sources.no_valid_split says why)."""
    if "valid" not in data.meta["splits"]:
        raise DataError(
            f"data: the prepared data in {cfg.prepared_dir} has no 'valid' split; training needs "
            f"one to validate, keep the best checkpoint and stop early: add it and prepare again"
        )
    return data.split("valid")


def build_batcher(
    data: Prepared, split: PreparedSplit, cfg: Config, dist: Dist, weights: dict[str, float] | None = None
) -> TokenBatcher:
    """The batcher of the training `split` on this rank, its sources mixed by `weights` (else the
    config's)."""
    t = cfg.train
    try:
        return TokenBatcher(
            split.src_lens,
            split.tgt_lens,
            t.max_tokens,
            t.seed,
            rank=dist.rank,
            world_size=dist.world_size,
            mixture=mixture(data, cfg, weights),
            pad_to_multiple=t.pad_to_multiple,
        )
    except ValueError as e:
        raise MTError(f"train.max_tokens: {e}") from None


def mixture(data: Prepared, cfg: Config, weights: dict[str, float] | None = None) -> Mixture | None:
    """The training split's sources (from the cache) with their weights (from the config,
    unless given)."""
    parts = data.train_sources()
    weights = weights or {s.name: s.weight for s in source_configs(cfg.data)}
    unknown = [name for name, _ in parts if name not in weights]
    if unknown:  # a cache used as it is, its corpus out of reach, prepared from other sources
        raise MTError(
            f"data.sources: the prepared data in {cfg.prepared_dir} holds source(s) "
            f"{', '.join(unknown)}, which the config does not name"
        )
    if not parts:  # a cache written before sources were recorded: every pair once
        return None
    return Mixture(tuple(n for _, n in parts), tuple(weights[name] for name, _ in parts))


def updates(
    batcher_of: Callable[[int], TokenBatcher], epoch: int, pos: int, accum: int
) -> Iterator[tuple[list[np.ndarray], int, int]]:
    """From (epoch, pos), each update's batches (`accum` of them) with the (epoch, position)
    the run is at after them: an epoch's last update moves on to position 0 of the next epoch.
    The batch lists are pure functions of seed and epoch (and the batcher of each epoch)."""
    while True:
        batches = batcher_of(epoch).epoch_batches(epoch)
        while pos < len(batches):
            chunk = batches[pos : pos + accum]
            pos += len(chunk)
            yield chunk, *((epoch + 1, 0) if pos >= len(batches) else (epoch, pos))
        epoch, pos = epoch + 1, 0


def collate(split: PreparedSplit, idx: np.ndarray, pad_to_multiple: int = 0, max_tokens: int = 0) -> Batch:
    return make_batch(
        [split.src(i) for i in idx], [split.tgt(i) for i in idx], idx, pad_to_multiple, max_tokens
    )
